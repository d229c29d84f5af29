"""fp16 guard: a float16 model's residual stream is carried in fp32.

Why: in a float16 model (fp16 weights, no autocast) every residual add `h = h + sublayer(norm(h))`
rounds the stream to fp16, whose largest finite value is 65504. Deep models grow the stream past
that (outlier features, large MLP/MoE outputs); eager then holds inf, the next norm NaN, and the
backward's stream gradient is fp16 as well. With this pass each residual add runs in fp32 and its
result stays fp32 along the stream, across layers and checkpoint bodies (AOTAutograd derives an
fp32 stream gradient). Consumers that do not upcast the stream themselves get an fp16 copy, rounded
as eager rounds it: linears, attention and the LoRA ops keep fp16 inputs. Norms that
begin with an fp32 upcast (HF's RMSNorm, Gemma's) read the fp32 stream directly, and
`F.layer_norm` on the stream runs in fp32 (weight and bias upcast) and rounds its output once.

A residual add is found by structure, not by module names: an fp16 add of two same-shaped tensors
where one operand (the stream) also feeds a norm (an fp32 upcast or `F.layer_norm`) from which the
other operand is computed. That covers pre-norm blocks, sandwich norms and parallel attention/MLP
blocks; post-norm blocks (`norm(h + sublayer(h))`) are not candidates. Nor is an add whose stream and
branch both enter its graph as inputs, after a graph break: nothing in that graph shows the norm
(transformers' eager experts loop breaks the graph at its data-dependent `nonzero`; the default grouped
experts trace whole). Those adds stay fp16; where one is an add of two graph inputs it is reported
as declined, so that it is not left silently.

A residual add's branch is computed in fp32 where it can be (fp32_branch.py): LoRA sites (o_proj,
down_proj: `out_dtype=float32`), an MoE's down projection (`fxfuse::grouped_mm`, `out_dtype`) and
its expert sum, plain linears (`linear32`), batched-matmul experts (`bmm32`), a sandwich norm's
fp32 result (its rounding to fp16 dropped) write their fp32 accumulators, so a sublayer output past
65504 joins the stream finite.
Where the walk back from the add meets fp16 it cannot widen, it says so in the add's note.

Declined with the reason, every graph left as it was: an in-place op on the stream or on a view or
upcast of it (promotion would change what it mutates). A checkpoint body called from several places
keeps fp16 at its boundary (its callers would all need the same dtypes). Residual adds that the
opt-in rms_norm pass fused into `fxfuse::rms_norm` (the op stores an fp16 sum, as eager does) are
reported as declined. Not guarded: intermediates inside a sublayer (an MLP's gate/up products, the
attention scores are computed by their own ops), experts that accumulate in place (`index_add_` into
an fp16 buffer: reported in the note).

Cost: the stream and its gradient take twice the bytes, the checkpointed layer inputs too. Graphs in
bf16 or fp32, and fp16 autocast over fp32 weights (whose stream is fp32 already), have no candidates.
"""
from __future__ import annotations

import operator
from collections import deque

import torch
import torch.fx as fx

from ..runtime.ops import rms_norm as _rms_op  # noqa: F401  (registers torch.ops.fxfuse.rms_norm)
from ..runtime.ops.wide_linear import bmm32, linear32
from . import fp32_branch
from .manager import GraphPass, PassStats, Site
from .pattern import Decline, canon, example_value, graphs_of, module_path, same_size

_HOPS = {"tag_activation_checkpoint", "wrap"}  # bodies whose placeholders are the call's args[1:]
_LAYER_NORM = {torch.nn.functional.layer_norm, torch.layer_norm}
_VIEW_METHODS = {"view", "reshape", "transpose", "permute", "expand", "unsqueeze", "squeeze", "contiguous",
                 "flatten", "unflatten", "narrow", "select", "t", "split", "chunk", "unbind", "view_as",
                 "reshape_as", "expand_as", "detach", "__getitem__"}
_VIEW_FUNCTIONS = {operator.getitem, torch.reshape, torch.transpose, torch.permute, torch.unsqueeze, torch.squeeze,
                   torch.flatten, torch.narrow, torch.select, torch.split, torch.chunk, torch.unbind, torch.t}
_SHAPE_METHODS = {"size", "dim", "numel", "stride"}
_IN_PLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem}
_SOURCE_COLUMNS = {"LoRA op": "fp32 LoRA outputs", "grouped_mm": "fp32 grouped_mm outputs",
                   "linear": "fp32 linear outputs", "bmm": "fp32 bmm outputs"}


def _hop_name(node: fx.Node) -> str:
    return getattr(node.target, "__name__", "") if node.op == "call_function" else ""


def _body_name(gname: str, attr: fx.Node) -> str:
    """The graphs_of name of the body a HOP call reads through its get_attr node."""
    return f"{gname}.{attr.target}" if gname != "<top>" else attr.target


def _is_fp16(node) -> bool:
    v = example_value(node)
    return isinstance(node, fx.Node) and isinstance(v, torch.Tensor) and v.dtype == torch.float16


def _is_upcast(user: fx.Node, node: fx.Node) -> bool:
    c = canon(user)
    return c is not None and c.kind == "to" and c.attrs.get("dtype") == torch.float32 and user.args[0] is node


def _is_layer_norm(user: fx.Node, node: fx.Node) -> bool:
    return user.op == "call_function" and user.target in _LAYER_NORM and user.args[:1] == (node,)


def _is_cast_of(user: fx.Node, node: fx.Node) -> bool:
    """`user` casts `node` to a fixed dtype (the same result whether node is fp16 or fp32)."""
    c = canon(user)
    return c is not None and c.kind == "to" and c.operands[0] is node


def _is_shape_query(user: fx.Node) -> bool:
    return (user.op == "call_method" and user.target in _SHAPE_METHODS) or \
        (user.op == "call_function" and user.target is getattr and user.args[1:] == ("shape",))


def _is_view(user: fx.Node) -> bool:
    return (user.op == "call_method" and user.target in _VIEW_METHODS) or \
        (user.op == "call_function" and user.target in _VIEW_FUNCTIONS)


def _in_place(user: fx.Node, node: fx.Node) -> bool:
    """Does `user` write into `node`'s memory?"""
    if user.op == "call_function":
        if user.target in _IN_PLACE_FUNCTIONS:
            return user.args[:1] == (node,)
        if user.kwargs.get("out") is node:
            return True
        name = getattr(user.target, "__name__", "")
        return (user.kwargs.get("inplace") is True or (name.endswith("_") and not name.startswith("_"))) \
            and user.args[:1] == (node,)
    if user.op == "call_method":
        t = user.target
        return user.args[:1] == (node,) and ((t.endswith("_") and not t.startswith("_")) or
                                             t in ("__iadd__", "__isub__", "__imul__", "__itruediv__", "__setitem__"))
    return False


def _mutation(node: fx.Node):
    """An in-place op on `node` or on a view or fp32 upcast of it (the upcast of an fp32 stream is the
    stream itself), or None."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        for u in n.users:
            if _in_place(u, n):
                return u
            if _is_view(u) or _is_upcast(u, n):
                todo.append(u)
    return None


def _reaches(start: fx.Node, target: fx.Node, order: dict) -> bool:
    limit = order[target]
    seen, todo = {start}, deque([start])
    while todo:
        n = todo.popleft()
        if n is target:
            return True
        for u in n.users:
            if u not in seen and order.get(u, limit + 1) <= limit:
                seen.add(u)
                todo.append(u)
    return False


def residual_stream(add: fx.Node, order: dict):
    """The stream operand of a residual add, or None when `add` is not one."""
    c = canon(add)
    if c is None or c.kind != "add" or not all(_is_fp16(x) for x in (*c.operands, add)):
        return None
    a, b = c.operands
    va, vb = example_value(a), example_value(b)
    if va.dim() != vb.dim() or not all(same_size(x, y) for x, y in zip(va.shape, vb.shape)):
        return None
    for stream, other in ((a, b), (b, a)):
        for u in stream.users:
            if u is not add and (_is_upcast(u, stream) or _is_layer_norm(u, stream)) and _reaches(u, other, order):
                return stream
    return None


def _fused_by_rms_norm(pass_name: str, graphs: dict) -> list:
    """Declined sites for the fp16 residual adds the rms_norm pass fused into its op: the op stores
    the fp16 sum, and this pass cannot reach inside it."""
    out = []
    for gname, sub in graphs.items():
        for n in sub.graph.nodes:
            if n.op == "call_function" and n.target is torch.ops.fxfuse.rms_norm.default and len(n.args) > 2 \
                    and n.args[2] is not None and _is_fp16(n.args[0]):
                out.append(Site(pass_name, module_path(n), n.name, gname, False,
                                "residual add fused into fxfuse::rms_norm by the rms_norm pass, which stores the "
                                "fp16 sum: not guarded (leave rms_norm off to guard it)", check="pattern"))
    return out


def _split_adds(pass_name: str, graphs: dict, candidates: dict) -> list:
    """Declined sites for fp16 adds of two same-shaped inputs of the top graph: a residual add whose
    norm a graph break left in an earlier graph looks like this, and nothing here shows which operand
    is the stream. Reported so that it is not silently left in fp16."""
    out = []
    sub = graphs.get("<top>")
    for n in sub.graph.nodes if sub is not None else ():
        c = canon(n)
        if n in candidates.get("<top>", {}) or c is None or c.kind != "add" or not _is_fp16(n):
            continue
        a, b = c.operands
        if all(isinstance(x, fx.Node) and x.op == "placeholder" and _is_fp16(x) for x in (a, b)) \
                and same_size(example_value(a).numel(), example_value(b).numel()):
            out.append(Site(pass_name, module_path(n), n.name, "<top>", False,
                            "an fp16 add of two inputs of this graph: a residual add split from its norm by a "
                            "graph break (the report lists them) cannot be told from any other add here: "
                            "not guarded", check="pattern"))
    return out


class _Plan:
    """What promoting the stream changes, worked out before anything is changed."""

    def __init__(self, graphs: dict, callers: dict, candidates: dict):
        self.graphs, self.callers, self.candidates = graphs, callers, candidates
        self.promoted: dict[str, set] = {g: set() for g in graphs}
        self.copies: dict[str, dict] = {g: {} for g in graphs}  # node -> users that get an fp16 copy
        self.layer_norms: dict[str, list] = {g: [] for g in graphs}
        self.branches: dict[tuple, fp32_branch.Branch] = {}  # (graph, add) -> how its branch is widened
        self.seeds: list = []

    def seed(self, gname: str, add: fx.Node, stream: fx.Node) -> None:
        if stream not in self.promoted[gname]:
            self.seeds.append((gname, add, stream))
        self.promote(gname, add)

    def promote(self, gname: str, node: fx.Node) -> None:
        if node in self.promoted[gname]:
            return
        self.promoted[gname].add(node)
        bad = _mutation(node)
        if bad is not None:
            raise Decline(f"in-place {bad.target} ({bad.name}) on the fp16 stream {node.name}: promotion "
                          "would change what it writes")
        for u in list(node.users):
            if u in self.candidates[gname]:
                self.promote(gname, u)
            elif _is_upcast(u, node) or _is_shape_query(u):
                continue
            elif _is_layer_norm(u, node) and _is_fp16(u):
                self.layer_norms[gname].append(u)
            elif u.op == "output" and self._into_parent(gname, node, u):
                continue
            elif u.op == "call_function" and _hop_name(u) in _HOPS and self._into_body(gname, node, u):
                continue
            else:
                self.copies[gname].setdefault(node, []).append(u)

    def widen(self) -> None:
        """Each residual add's branch is computed in fp32 where fp32_branch finds how (LoRA, MoE
        and plain linear outputs, fp32 values rounded to fp16): the sum joins the fp32 stream without
        being rounded to fp16 first (a branch past 65504 stays finite). Not where the branch is
        itself a stream (promoted, or cast to fp32 where it enters the stream)."""
        for gname, cands in self.candidates.items():
            streams = set(cands.values())
            stop = self.promoted[gname] | set(cands) | streams
            for add, stream in cands.items():
                other = next((x for x in canon(add).operands if x is not stream), None)
                if not isinstance(other, fx.Node) or other in self.promoted[gname] or other in streams:
                    continue
                self.branches[(gname, add)] = fp32_branch.plan(other, stop, _mutation)

    def _caller(self, gname: str):
        """The one call of a body; None for the top graph and for bodies called from several places
        (those keep fp16 at their boundary: each caller would need the same dtypes)."""
        calls = self.callers.get(gname, [])
        return calls[0] if len(calls) == 1 else None

    def _into_parent(self, gname: str, node: fx.Node, output: fx.Node) -> bool:
        """The body returns the stream: its caller's getitems become fp32 (False: a copy is returned)."""
        caller = self._caller(gname)
        outs = output.args[0]
        if caller is None or not isinstance(outs, (tuple, list)):
            return False
        parent, call = caller
        if not all(u.op == "call_function" and u.target is operator.getitem for u in call.users):
            return False
        # every output that is this node goes out fp32, so each getitem reading it is promoted
        idx = {i for i, o in enumerate(outs) if o is node}
        for g in list(call.users):
            if g.args[1] in idx:
                self.promote(parent, g)
        return True

    def _into_body(self, gname: str, node: fx.Node, call: fx.Node) -> bool:
        body_attr = call.args[0]
        if not (isinstance(body_attr, fx.Node) and body_attr.op == "get_attr") or node in call.kwargs.values():
            return False
        body = _body_name(gname, body_attr)
        if body not in self.graphs or self._caller(body) is None:
            return False
        placeholders = [n for n in self.graphs[body].graph.nodes if n.op == "placeholder"]
        for j, a in enumerate(call.args[1:]):
            if a is node:
                self.promote(body, placeholders[j])
        return True


def _fake(node: fx.Node, dtype: torch.dtype):
    v = example_value(node)
    return v.to(dtype) if isinstance(v, torch.Tensor) else v


def _cast(graph: fx.Graph, node: fx.Node, dtype: torch.dtype, meta_from: fx.Node) -> fx.Node:
    c = graph.call_method("to", (node, dtype))
    c.meta["example_value"] = _fake(node, dtype)
    if "nn_module_stack" in meta_from.meta:
        c.meta["nn_module_stack"] = meta_from.meta["nn_module_stack"]
    return c


def _give_fp16_copy(graph: fx.Graph, node: fx.Node, users: list, order: dict, stats: PassStats) -> None:
    """`users` read an fp16 copy of the (now fp32) node, made before the first of them."""
    first = min(users, key=order.__getitem__)
    with graph.inserting_before(first):
        copy = _cast(graph, node, torch.float16, first)
    for u in users:
        u.replace_input_with(node, copy)
    stats.add("fp16 copies")


class Fp16GuardPass(GraphPass):
    name = "fp16_guard"
    depends_on = ("fxfuse.passes.pattern", "fxfuse.passes.fp32_branch", "fxfuse.runtime.ops.lora",
                  "fxfuse.runtime.ops.lora_graph", "fxfuse.runtime.ops.rms_norm", "fxfuse.runtime.ops.grouped_mm",
                  "fxfuse.runtime.ops.wide_linear")

    def __init__(self):
        self.config = {}

    def run(self, gm: fx.GraphModule, stats: PassStats) -> None:
        graphs = dict(graphs_of(gm))
        callers: dict[str, list] = {}
        candidates: dict[str, dict] = {}
        for gname, sub in graphs.items():
            order = {n: i for i, n in enumerate(sub.graph.nodes)}
            candidates[gname] = {}
            for n in sub.graph.nodes:
                if n.op == "call_function" and _hop_name(n) and isinstance(n.args[0] if n.args else None, fx.Node) \
                        and n.args[0].op == "get_attr":
                    callers.setdefault(_body_name(gname, n.args[0]), []).append((gname, n))
                stream = residual_stream(n, order)
                if stream is not None:
                    candidates[gname][n] = stream
        sites = {(g, a): Site(self.name, module_path(a), a.name, g, False)
                 for g, c in candidates.items() for a in c}
        stats.sites.extend(sites.values())
        stats.sites.extend(_fused_by_rms_norm(self.name, graphs))
        stats.sites.extend(_split_adds(self.name, graphs, candidates))
        if not sites:
            return
        plan = _Plan(graphs, callers, candidates)
        try:
            for gname, cands in candidates.items():
                for add, stream in cands.items():
                    plan.seed(gname, add, stream)
        except Decline as e:
            for s in sites.values():
                s.reason, s.check = str(e), "check()"
            return
        plan.widen()
        self._apply(plan, graphs, stats)
        seeds = {(g, a) for g, a, _ in plan.seeds}
        for (g, a), s in sites.items():
            s.rewritten, s.group = True, f"{a.name}:fp32"
            branch = plan.branches.get((g, a))
            notes = ["the stream enters fp32 here" if (g, a) in seeds else "", branch.describe() if branch else ""]
            s.reason = "; ".join(n for n in notes if n)

    def _apply(self, plan: _Plan, graphs: dict, stats: PassStats) -> None:
        for gname, add, stream in plan.seeds:
            with graphs[gname].graph.inserting_before(add):
                add.replace_input_with(stream, _cast(graphs[gname].graph, stream, torch.float32, add))
        for gname, promoted in plan.promoted.items():
            graph = graphs[gname].graph
            order = {n: i for i, n in enumerate(graph.nodes)}
            for node, users in plan.copies[gname].items():
                _give_fp16_copy(graph, node, users, order, stats)
            for ln in plan.layer_norms[gname]:
                with graph.inserting_before(ln):
                    for i, name in ((2, "weight"), (3, "bias")):
                        w = ln.args[i] if i < len(ln.args) else ln.kwargs.get(name)
                        if isinstance(w, fx.Node):
                            w32 = _cast(graph, w, torch.float32, ln)
                            if i < len(ln.args):
                                ln.update_arg(i, w32)
                            else:
                                ln.update_kwarg(name, w32)
                out16_meta = example_value(ln)
                ln.meta["example_value"] = _fake(ln, torch.float32)
                with graph.inserting_after(ln):
                    out16 = graph.call_method("to", (ln, torch.float16))
                out16.meta["example_value"] = out16_meta
                ln.replace_all_uses_with(out16, delete_user_cb=lambda u: u is not out16)
                stats.add("fp32 layer_norms")
            for node in promoted:
                node.meta["example_value"] = _fake(node, torch.float32)
        for gname in graphs:
            self._widen(plan, gname, graphs[gname].graph, stats)

    @staticmethod
    def _widen(plan: _Plan, gname: str, graph: fx.Graph, stats: PassStats) -> None:
        """Rewrites the graph's branches as fp32_branch planned them."""
        mine = [b for (g, _), b in plan.branches.items() if g == gname]
        sources = {n: s for b in mine for n, s in b.sources.items()}
        wide = set().union(*(b.wide for b in mine))
        casts = set().union(*(b.casts for b in mine))
        through = set().union(*(b.through for b in mine))
        fine = wide | through | set(plan.candidates[gname]) | plan.promoted[gname]  # readers that take fp32
        for n, (kind, target) in sources.items():
            if kind == "LoRA op":
                idx = fp32_branch.LORA_OUT_DTYPE_ARG[target.target]
                target.update_arg(idx, torch.float32)
                vals = example_value(target)
                if isinstance(vals, (list, tuple)) and vals and isinstance(vals[0], torch.Tensor):
                    target.meta["example_value"] = type(vals)([vals[0].to(torch.float32), *vals[1:]])
            elif kind == "grouped_mm":
                target.args = (*target.args, torch.float32)
            elif kind == "bmm":
                target.target = bmm32
            else:
                x, w, b = canon(target).operands
                target.target, target.args, target.kwargs = linear32, (x, w, b), {}
            stats.add(_SOURCE_COLUMNS[kind])
        for n in wide:
            n.meta["example_value"] = _fake(n, torch.float32)
        for c in casts:  # readers on the branch read the fp32 value the cast rounded
            x = canon(c).operands[0]
            for u in [u for u in c.users if u in fine]:
                u.replace_input_with(c, x)
            if not c.users:
                graph.erase_node(c)
            stats.add("fp16 roundings dropped")
        order = {n: i for i, n in enumerate(graph.nodes)}
        for n in sorted(wide, key=order.__getitem__):
            others = [u for u in n.users if not (u in fine or _is_shape_query(u) or _is_cast_of(u, n))]
            if others:
                _give_fp16_copy(graph, n, others, order, stats)
