"""LoRA pass: PEFT LoRA linears -> `fxfuse::lora_linear`, one op per group sharing an input.

PEFT's LoRA linear traces (dynamo) as
    out = to?( linear(x, W, bias) + linear(linear(dropout?(to?(x)), A), B) * scaling )
The anchor is the low-rank chain linear(linear(., A), B); from each anchor the matcher walks up
to the sum, so every low-rank chain in the graph is a candidate that is either rewritten or
declined with a reason (DoRA, trainable base weights, ...). Sites whose base linears read the
same node (q/k/v, gate/up) become one grouped op that reads the input once for the low-rank part.
"""
from __future__ import annotations

import operator
from collections import defaultdict

import torch
import torch.fx as fx

from ..runtime.ops import lora as lora_op  # noqa: F401  (registers torch.ops.fxfuse.lora_linear)
from ..runtime.ops.lora_graph import lora_linear_graph
from .manager import GraphPass, PassStats, Site
from .pattern import Decline, Lit, Op, Opt, Var, canon, example_value, graphs_of, is_anchor, match_at, module_path

# The report column that counts graph-op groups; the backend reads it (Inductor's buffer reuse).
GRAPH_OP_COLUMN = "graph-op groups"

# Sites below this many tokens become graph ops (runtime/ops/lora_graph.py). Short steps are bound by
# the fused op's host time: at 1k on an H200 the graph ops ran 6373 tok/s against the op's 4113 at
# 15.88 against 15.83 GiB (bench/RESULTS.md, twenty-first session). 4k and longer were tuned on the
# op's kernels and keep it.
GRAPH_OPS_BELOW = 2048



def _narrow(t) -> bool:
    """A weight that projects down (rank < in_features): what makes a linear chain low-rank."""
    v = example_value(t)
    return isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape[0] < v.shape[1]


def _patterns(narrow: bool):
    """(anchor, pattern). narrow=False: the same structure with any lora_A width, to report a LoRA
    linear whose rank is not below its in_features (declined: not low-rank) instead of skipping it.
    A bare two-linear chain that does not sit in that structure is no candidate either way."""
    low_rank = Op("linear", (Op("linear", (Opt("dropout", Opt("to", Var("x")), name="dropout"),
                                           Var("lora_A", where=_narrow if narrow else None, label="low-rank weight"),
                                           None),
                                name="down", label="lora_A linear"),
                             Var("lora_B"), Var("lora_B_bias")), name="up", label="lora_B linear")
    pattern = Opt("to", Op("add", (Op("linear", (Var("x"), Var("weight"), Var("bias")), name="base", label="base linear"),
                                   Op("mul", (low_rank, Lit("scaling")), commutative=True, label="scaled low-rank term")),
                           commutative=True, name="sum", label="base + low-rank sum"))
    return low_rank, pattern


LOW_RANK, PATTERN = _patterns(narrow=True)
_ANY_RANK, _ANY_RANK_PATTERN = _patterns(narrow=False)

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
MAX_RANK = 128

DORA_MAGNITUDE = ("DoRA (PEFT use_dora=True) or a like form: the low-rank term is multiplied by a tensor "
                  "(DoRA's magnitude over the weight's norm), not by a number; the pass fuses plain LoRA only")
DORA_WEIGHT_NORM = ("DoRA's weight norm (PEFT use_dora=True): the low-rank chain is applied to an identity "
                    "matrix to form B·A, not to activations; the pass fuses plain LoRA only")


STACKED_ADAPTERS = ("another adapter's sum, not the base linear: more than one adapter is active on this layer; the "
                    "pass fuses the first adapter's term with the base linear and leaves this one as PEFT computes it")
CONV1D_BASE = ("the base layer is a GPT-2-style Conv1D (addmm on the flattened input, PEFT fan_in_fan_out=True), "
               "not a linear; the pass fuses nn.Linear bases only")
_VIEWS = {"view", "reshape"}


def _lora_module(path: str) -> str:
    """The LoRA layer's path from its lora_B linear's. A frame dynamo starts inside the layer after a
    graph break (DoRA's forward, which takes lora_B as an argument) records only `L['lora_B']`."""
    module = path.removesuffix(".lora_B.default").removesuffix(".lora_B")
    return "<inside a LoRA layer, after a graph break>" if module == "L" else module


def _dora_reason(up: fx.Node) -> str:
    """A reason that names DoRA for a low-rank chain that failed the pattern, from its structure:
    the chain reads torch.eye (DoRA builds B·A so), or its result is multiplied by a tensor before
    any sum (DoRA's magnitude scale). "" for anything else. The caller keeps the pattern's reason
    beside it: another form could be scaled by a tensor too."""
    down = canon(canon(up).operands[0])  # the anchor's inner linear
    src = down.operands[0] if down is not None else None
    while isinstance(src, fx.Node) and src.op == "call_method" and src.target in ("to", "float", "type"):
        src = src.args[0]
    if isinstance(src, fx.Node) and src.op == "call_function" and src.target is torch.eye:
        return DORA_WEIGHT_NORM
    for user in up.users:
        c = canon(user)
        if c is not None and c.kind == "mul":
            others = [example_value(o) for o in c.operands if o is not up]
            if others and isinstance(others[0], torch.Tensor) and others[0].dim() > 0:
                return DORA_MAGNITUDE
    return ""


def _base_reason(up: fx.Node) -> str:
    """A reason that names what the scaled low-rank term is added to, where that is not a linear:
    another adapter's sum (stacked adapters), or a Conv1D's addmm (through its view). "" otherwise."""
    for scaled in up.users:
        c = canon(scaled)
        if c is None or c.kind != "mul":
            continue
        for add in scaled.users:
            c = canon(add)
            if c is None or c.kind != "add":
                continue
            for base in c.operands:
                if base is scaled or not isinstance(base, fx.Node):
                    continue
                if (canon(base) is not None and canon(base).kind == "add") or \
                        (base.op == "call_function" and base.target is operator.add):
                    return STACKED_ADAPTERS
                while (base.op == "call_method" and base.target in _VIEWS) or \
                        (base.op == "call_function" and base.target is torch.reshape):
                    base = base.args[0]
                if base.op == "call_function" and base.target is torch.addmm:
                    return CONV1D_BASE
    return ""


def check(m) -> dict:
    """Read the site's tensors from the graph's fake values; decline what the op cannot express."""
    x, w, bias = (example_value(m[k]) for k in ("x", "weight", "bias"))
    a, b = example_value(m["lora_A"]), example_value(m["lora_B"])
    for name, t in (("input", x), ("base weight", w), ("lora_A", a), ("lora_B", b)):
        if not isinstance(t, torch.Tensor):
            raise Decline(f"{name} has no recorded tensor value")
        if t.dtype not in _FLOATS:
            raise Decline(f"{name} dtype {t.dtype} not supported (fp32/fp16/bf16)")
    if w.dim() != 2 or a.dim() != 2 or b.dim() != 2 or x.dim() < 2:
        raise Decline("base weight, lora_A and lora_B must be 2-D and the input at least 2-D")
    n, k = w.shape
    r = a.shape[0]
    if x.shape[-1] != k or a.shape[1] != k or b.shape != (n, r):
        raise Decline(f"shapes do not form a LoRA linear: x {tuple(x.shape)}, W {tuple(w.shape)}, "
                      f"A {tuple(a.shape)}, B {tuple(b.shape)}")
    if m["lora_B_bias"] is not None:
        raise Decline("lora_B has a bias (lora_bias=True): not supported yet")
    if r > MAX_RANK:
        raise Decline(f"rank {r} > {MAX_RANK} (kernel limit)")
    # The dtypes the two branches computed in, as dynamo recorded them: they follow autocast
    # regions (operands are cast to them), which the operands' own dtypes do not show.
    base_dt, low_dt = example_value(m["base"]), example_value(m["up"])
    if not isinstance(base_dt, torch.Tensor) or not isinstance(low_dt, torch.Tensor):
        raise Decline("the base or low-rank linear has no recorded tensor value")
    base_dt, low_dt = base_dt.dtype, low_dt.dtype
    if base_dt not in _FLOATS or low_dt not in _FLOATS:
        raise Decline(f"linears compute in {base_dt}/{low_dt}, not fp32/fp16/bf16")
    if w.requires_grad:
        raise Decline("base weight requires grad (not a frozen-base LoRA)")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (n,):
            raise Decline("base bias is not a 1-D tensor of out_features")
        if bias.requires_grad:
            raise Decline("base bias requires grad (LoraConfig bias='all'/'lora_only')")
    p, training = 0.0, False
    if m.get("dropout") is not None:
        attrs = canon(m["dropout"]).attrs
        p, training = attrs["p"], attrs["training"]
        if not isinstance(p, (int, float)) or not isinstance(training, bool):
            raise Decline("dropout p/training are not literals in the graph")
        if attrs["inplace"] and training and p > 0:
            raise Decline("in-place dropout also changes the input the base linear reads")
    p = float(p) if training else 0.0
    if not 0.0 <= p < 1.0:
        raise Decline(f"dropout p={p} outside [0, 1)")
    out = example_value(m.root)
    if not isinstance(out, torch.Tensor) or out.dtype not in _FLOATS:
        raise Decline("site output has no floating tensor value")
    return {"p": p, "scaling": float(m["scaling"]), "out_dtype": out.dtype,
            "compute_dtype": base_dt, "lowrank_dtype": low_dt}


class LoraPass(GraphPass):
    name = "lora"
    depends_on = ("fxfuse.passes.pattern", "fxfuse.runtime.ops.lora", "fxfuse.runtime.kernels.lora",
                  "fxfuse.runtime.ops.lora_graph")

    def __init__(self, group: bool = True, recompute_xa: bool = True, min_tokens: int = 0,
                 graph_ops_below: int = GRAPH_OPS_BELOW):
        """group: one op per set of LoRA linears reading the same input. recompute_xa: where a
        checkpointed backward recomputes an op only for its low-rank activation, recompute only that
        (checkpoint policy `recompute_lora_xa`, at partition time; fxfuse/passes/recompute_lora_xa.py).
        min_tokens: decline sites whose input has fewer rows (tokens) than this, where the op's host
        time per call may exceed what it saves (a graph traced with a symbolic token count is not
        declined: the count is unknown). 0: none declined for their size.
        graph_ops_below: sites with fewer rows than this become the op's math as graph ops for the
        compiler to schedule (runtime/ops/lora_graph.py), not the custom op, whose host time per call
        limits short steps; sites with dropout, and symbolic token counts, keep the op. 0: none.
        Default GRAPH_OPS_BELOW (2048).
        min_tokens is checked first: a site it declines is not rewritten at all."""
        for name, v in (("min_tokens", min_tokens), ("graph_ops_below", graph_ops_below)):
            if type(v) is not int or v < 0:
                raise ValueError(f"{name} must be an int >= 0, not {v!r}")
        self.group = group
        self.min_tokens = min_tokens
        self.graph_ops_below = graph_ops_below
        self.config = {"group": group, "max_rank": MAX_RANK, "recompute_xa": recompute_xa, "min_tokens": min_tokens,
                       "graph_ops_below": graph_ops_below}

    def run(self, gm: fx.GraphModule, stats: PassStats) -> None:
        for gname, sub in graphs_of(gm):
            self._run_graph(gname, sub, stats)

    def _check_size(self, rows) -> str:
        """Decline a site below min_tokens rows (None: a symbolic count); a note (for the report)
        where the count is symbolic and min_tokens could not apply."""
        if not self.min_tokens:
            return ""
        if rows is None:
            return f"min_tokens={self.min_tokens} not applied: the token count is symbolic (dynamic shapes)"
        if rows < self.min_tokens:
            raise Decline(f"{rows} tokens < min_tokens={self.min_tokens}: the fused op's host time per call "
                          "would exceed what it saves; PEFT's own linears are left to the compiler")
        return ""

    def _as_graph_ops(self, rows, info) -> tuple:
        """(whether the site becomes graph ops, a note for the report) under graph_ops_below."""
        if not self.graph_ops_below:
            return False, ""
        if rows is None:
            return False, (f"graph_ops_below={self.graph_ops_below} not applied (kept as the fused op): the token "
                           "count is symbolic (dynamic shapes)")
        if rows >= self.graph_ops_below:
            return False, ""
        if info["p"]:
            return False, f"kept as the fused op below graph_ops_below={self.graph_ops_below}: graph ops draw no dropout mask"
        return True, f"graph ops ({rows} tokens < graph_ops_below={self.graph_ops_below}): the compiler schedules them"

    def _report_full_rank(self, gname: str, node: fx.Node, stats: PassStats) -> None:
        """A chain whose lora_A does not project down (r >= in_features, e.g. r=64 on a 64-wide
        input) is a candidate, declined with why, when it sits in the LoRA structure (base + scaled
        chain on one input) or in a PEFT LoRA module (then with what else fails); a bare chain
        elsewhere is none."""
        if not is_anchor(_ANY_RANK, node):
            return
        path = module_path(node)
        module = _lora_module(path)
        try:
            m = match_at(_ANY_RANK_PATTERN, _ANY_RANK, node)
        except Decline as e:
            if module != path:  # PEFT's lora_B: a LoRA linear, whatever else is wrong with it
                stats.sites.append(Site(self.name, module, node.name, gname, False, str(e), check="pattern"))
            return
        a = example_value(m["lora_A"])
        if isinstance(a, torch.Tensor) and a.dim() == 2 and a.shape[0] >= a.shape[1]:
            reason = (f"lora_A [{a.shape[0]}x{a.shape[1]}] does not project down (rank >= in_features): not a "
                      "low-rank update: the pass fuses only low-rank ones")
        else:
            reason = "lora_A has no recorded 2-D tensor value"
        stats.sites.append(Site(self.name, module, node.name, gname, False, reason, check="pattern"))

    def _run_graph(self, gname: str, gm: fx.GraphModule, stats: PassStats) -> None:
        anchor = LOW_RANK
        sites = []
        for node in list(gm.graph.nodes):
            if not is_anchor(anchor, node):
                self._report_full_rank(gname, node, stats)
                continue
            module = _lora_module(module_path(node))
            step = "pattern"
            try:
                m = match_at(PATTERN, anchor, node)
                step = "check()"
                info = check(m)
                step = "min_tokens"
                rows = _rows(m)
                info["note"] = self._check_size(rows)
                info["graph"], graph_note = self._as_graph_ops(rows, info)
                info["note"] = "; ".join(n for n in (info["note"], graph_note) if n)
            except Decline as e:
                named = (_dora_reason(node) or _base_reason(node)) if step == "pattern" else ""
                reason = f"{named} (pattern: {e})" if named else str(e)
                stats.sites.append(Site(self.name, module, node.name, gname, False, reason, check=step))
                continue
            sites.append((m, info, module))
        groups: dict = defaultdict(list)
        for m, info, module in sites:
            key = (m["x"], info["out_dtype"], info["compute_dtype"], info["lowrank_dtype"], info["graph"])
            groups[key if self.group else id(m)].append((m, info, module))
        replaced: dict = {}  # a rewritten site's old output -> its getitem, for sites that read it
        for members in groups.values():
            for m, _, _ in members:
                for k in _OPERANDS:
                    m[k] = replaced.get(m[k], m[k])
            for part in _placeable(gm, members):
                graph = part[0][1]["graph"]
                fused = _replace_group(gm, part, graph, replaced)
                stats.add(GRAPH_OP_COLUMN if graph else "fused ops")
                for m, info, module in part:
                    notes = [f"dropout p={info['p']:g}: the mask is drawn in-kernel" if info["p"] else "", info["note"]]
                    note = "; ".join(n for n in notes if n)
                    stats.sites.append(Site(self.name, module, m["up"].name, gname, True, note, group=fused.name))


_OPERANDS = ("x", "weight", "bias", "lora_A", "lora_B")


def _rows(m):
    """The site's static token count (rows of its input), or None where it is symbolic."""
    rows = 1
    for d in example_value(m["x"]).shape[:-1]:
        if not isinstance(d, int):
            return None
        rows *= d
    return rows


def _placeable(gm: fx.GraphModule, members) -> list:
    """A group's op must come after every operand and before every member's output is used; a
    group whose operands are not all defined before its first output is split into singles."""
    if len(members) == 1:
        return [members]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    operands = [m[k] for m, _, _ in members for k in _OPERANDS]
    last = max(order[n] for n in operands if isinstance(n, fx.Node))
    first_root = min(order[m.root] for m, _, _ in members)
    return [members] if last < first_root else [[member] for member in members]


def _replace_group(gm: fx.GraphModule, members, graph: bool = False, replaced=None) -> fx.Node:
    """The group's op (graph=False) or its math as graph ops (`lora_linear_graph`), and getitems for
    the members' outputs in place of their sums; `replaced` records old output -> getitem, since a
    later site may read an earlier one's output (a LoRA linear feeding another, `b(a(x))`)."""
    g = gm.graph
    x = members[0][0]["x"]
    operands = [x] + [m[k] for m, _, _ in members for k in ("weight", "bias", "lora_A", "lora_B")]
    order = {n: i for i, n in enumerate(g.nodes)}
    last = max((n for n in operands if isinstance(n, fx.Node)), key=order.__getitem__)
    ps = [info["p"] for _, info, _ in members]
    base_dt, low_dt = members[0][1]["compute_dtype"], members[0][1]["lowrank_dtype"]
    cursor = last

    def emit(target, args, kwargs=None, op="call_function"):
        nonlocal cursor
        with g.inserting_after(cursor):
            cursor = g.create_node(op, target, tuple(args), kwargs or {})
        return cursor

    def operand(node, dtype):
        # Under autocast a linear casts its operands; the op is not autocast-aware, so the graph does.
        if node is None or example_value(node).dtype == dtype:
            return node
        return emit("to", (node, dtype), op="call_method")

    seed = None
    if any(p > 0 for p in ps):
        # A fresh seed per call; AOTAutograd replays random ops inside checkpointed regions,
        # and the seed is saved for backward, so recomputation sees the same masks.
        seed = emit(torch.randint, (2**31 - 1, (1,)), {"dtype": torch.int64})
    dtypes = {"weight": base_dt, "bias": base_dt, "lora_A": low_dt, "lora_B": low_dt}
    lists = {k: [operand(m[k], dt) for m, _, _ in members] for k, dt in dtypes.items()}
    scalings, out_dtype = [info["scaling"] for _, info, _ in members], members[0][1]["out_dtype"]
    if graph:
        fused = emit(lora_linear_graph, (operand(x, base_dt), lists["weight"], lists["bias"], lists["lora_A"],
                                         lists["lora_B"], scalings, out_dtype))
    else:
        fused = emit(torch.ops.fxfuse.lora_linear.default, (
            operand(x, base_dt), lists["weight"], lists["bias"], lists["lora_A"], lists["lora_B"], scalings, ps,
            seed, out_dtype))
    fused.meta["nn_module_stack"] = dict(members[0][0].root.meta.get("nn_module_stack", {}))
    _set_fake_values(fused, seed)
    for i, (m, _, _) in enumerate(members):
        with g.inserting_after(cursor):
            out = g.call_function(operator.getitem, (fused, i))
        out.meta.update({k: v for k, v in m.root.meta.items() if k in ("nn_module_stack", "example_value", "val")})
        m.root.replace_all_uses_with(out)
        if replaced is not None:
            replaced[m.root] = out
        cursor = out
    for m, _, _ in members:
        for n in sorted(set(m.nodes), key=order.__getitem__, reverse=True):
            if not n.users:
                g.erase_node(n)
    return fused


def _set_fake_values(fused: fx.Node, seed) -> None:
    """Give the new nodes (casts, seed, op) fake values like dynamo's, so later passes and dumps
    can read shapes and dtypes."""
    source = fused.args[0]
    while example_value(source) is None and isinstance(source, fx.Node) and source.args:
        source = source.args[0]
    mode = getattr(example_value(source), "fake_mode", None)
    if mode is None:
        return

    def val(a):
        if isinstance(a, (list, tuple)):
            return type(a)(val(v) for v in a)
        if not isinstance(a, fx.Node):
            return a
        if example_value(a) is None:
            if a is seed:
                a.meta["example_value"] = torch.randint(2**31 - 1, (1,), dtype=torch.int64)
            elif a.op == "call_method" and a.target == "to":
                a.meta["example_value"] = val(a.args[0]).to(a.args[1])
        return example_value(a)

    with mode:
        fused.meta["example_value"] = fused.target(*val(list(fused.args)))
