"""Fused linear + cross-entropy pass: a causal-LM head and its loss -> `fxfuse::linear_cross_entropy`,
which never materialises the [T, vocab] logits.

transformers' ForCausalLMLoss traces (dynamo) as
    loss = cross_entropy(view(to(softcap?(linear(hidden, W))), -1, V), target, ignore_index, reduction)
with softcap(x) = tanh(x / c) * c (gemma2's final_logit_softcapping), or with the logits scaled by a
constant instead (`* s`: cohere's logit_scale; `/ d`: granite's logits_scaling), which the op gets by
scaling the hidden states (x W^T s = (x s) W^T; autograd carries the factor into their gradient).
Every cross_entropy node is a candidate. The label shift/pad that computes `target` stays in the graph, and so does the division
by `num_items_in_batch` that follows a 'sum' reduction.

HF also returns the logits, so they are a graph output. When the loss will be backpropagated and
the frontend drops the logits from the model output (`optimize(..., keep_logits=False)`, the
default), the pass replaces that graph output by a zero-storage NaN stand-in which the frontend's
hook replaces with None (a stand-in that escaped would read as NaN, never as numbers). Otherwise
(keep_logits=True, eval / no_grad) a site whose logits leave the graph is declined: fusing would
not save their memory.
"""
from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx

from ..runtime.ops import cross_entropy as ce_op
from ..runtime.ops import lora as _lora_op  # noqa: F401  (torch.ops.fxfuse.lora_linear, to name LoRA heads)
from ..runtime.ops.lora_graph import lora_linear_graph
from .manager import GraphPass, PassStats, Site
from .pattern import Decline, Lit, Match, Op, Opt, Var, _show, canon, example_value, graphs_of, match_pat, module_path

LINEAR = Op("linear", (Var("hidden"), Var("weight"), Var("bias")), name="head", label="lm_head linear")
SOFTCAPPED = Op("mul", (Op("tanh", (Op("div", (LINEAR, Lit("cap_in"))),)), Lit("cap_out")),
                commutative=True, name="softcap", label="softcap tanh(x / c) * c")
SCALED = Op("mul", (LINEAR, Lit("scale")), commutative=True, name="scaled", label="logits * constant")
DIVIDED = Op("div", (LINEAR, Lit("divisor")), name="divided", label="logits / constant")


def _loss_of(logits) -> Op:
    flat = Opt("view", Opt("to", logits, name="upcast"), name="flat")
    return Op("cross_entropy", (flat, Var("target")), name="loss", label="cross_entropy")


def _is_lora_output(node) -> bool:
    """The output of a LoRA linear, raw (PEFT's add) or already rewritten by the LoRA pass (its op,
    or its graph ops under graph_ops_below)."""
    if isinstance(node, fx.Node) and node.target is operator.getitem:
        return getattr(node.args[0], "target", None) in (torch.ops.fxfuse.lora_linear.default, lora_linear_graph)
    c = canon(node)
    kinds = [getattr(canon(a), "kind", None) for a in c.operands] if c is not None else []
    return c is not None and c.kind == "add" and "linear" in kinds and "mul" in kinds


# Tried in order: the first that matches is rewritten.
PATTERNS = (_loss_of(SOFTCAPPED), _loss_of(SCALED), _loss_of(DIVIDED), _loss_of(LINEAR))
# Never rewritten: matched only to name the decline of a LoRA-adapted lm_head (scaled logits too).
_ADAPTED = Var("adapted", where=_is_lora_output)
LORA_HEADS = (_loss_of(_ADAPTED), _loss_of(Op("mul", (_ADAPTED, Lit("scale")), commutative=True)),
              _loss_of(Op("div", (_ADAPTED, Lit("divisor")))))

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def match(node: fx.Node) -> Match:
    reason = None
    for pattern in PATTERNS:
        m = Match()
        m.root = node
        try:
            match_pat(pattern, node, m)
            return m
        except Decline as e:
            reason = str(e)  # the plain head's reason (last) is the one to show
    for head in LORA_HEADS:
        try:
            match_pat(head, node, Match())
        except Decline:
            continue
        raise Decline("lm_head is a LoRA target (its adapters train): the op computes no weight gradient")
    raise Decline(reason)


def escaping(m: Match) -> list[fx.Node]:
    """Matched nodes (other than the loss) that are graph outputs; any other outside use declines."""
    inside, out = set(m.nodes), []
    for n in m.nodes:
        if n is m.root:
            continue
        for u in n.users:
            if u.op == "output":
                out.append(n)
            elif u not in inside:
                raise Decline(f"{_show(n)} is also used by {_show(u)} outside the loss (not convex)")
    return out


def check(m: Match) -> dict:
    """Read the site's fake values; decline what the op cannot express."""
    hidden, weight, logits = (example_value(m[k]) for k in ("hidden", "weight", "head"))
    flat, target, loss = (example_value(n) for n in (canon(m.root).operands[0], m["target"], m.root))
    for name, t in (("hidden states", hidden), ("lm_head weight", weight), ("logits", logits),
                    ("cross_entropy input", flat), ("target", target), ("loss", loss)):
        if not isinstance(t, torch.Tensor):
            raise Decline(f"{name} has no recorded tensor value")
    if m["bias"] is not None:
        raise Decline("lm_head has a bias: not supported")
    if weight.dim() != 2 or hidden.dim() < 2 or hidden.shape[-1] != weight.shape[1]:
        raise Decline(f"lm_head weight {tuple(weight.shape)} is not 2-D [vocab, hidden] for hidden states "
                      f"{tuple(hidden.shape)}")
    if weight.requires_grad:
        raise Decline("lm_head weight requires grad (a trained lm_head): the op computes no weight gradient")
    if hidden.dtype not in _FLOATS or weight.dtype != hidden.dtype or logits.dtype != hidden.dtype:
        raise Decline(f"lm_head computes {hidden.dtype} x {weight.dtype} -> {logits.dtype} (autocast?): "
                      "the op needs one fp32/fp16/bf16 dtype")
    vocab, tokens = weight.shape[0], hidden.numel() // hidden.shape[-1]
    if flat.dtype != torch.float32:
        raise Decline(f"cross_entropy reads {flat.dtype} logits; the op computes the loss in fp32 (HF upcasts)")
    if tuple(flat.shape) != (tokens, vocab):
        raise Decline(f"cross_entropy input {tuple(flat.shape)} is not the logits flattened to ({tokens}, {vocab})")
    if target.dtype != torch.int64 or tuple(target.shape) != (tokens,):
        raise Decline(f"target {target.dtype} {tuple(target.shape)} is not int64 class indices of shape ({tokens},)")
    attrs = canon(m.root).attrs
    if attrs["weight"] is not None:
        raise Decline("cross_entropy with class weights: not supported")
    if attrs["size_average"] is not None or attrs["reduce"] is not None:
        raise Decline("cross_entropy with legacy size_average/reduce arguments: not supported")
    if attrs["label_smoothing"] != 0.0:
        raise Decline(f"cross_entropy with label_smoothing={attrs['label_smoothing']}: not supported")
    if attrs["reduction"] not in ce_op.REDUCTIONS:
        raise Decline(f"cross_entropy reduction {attrs['reduction']!r}: only 'mean' and 'sum' are supported")
    if isinstance(attrs["ignore_index"], bool) or not isinstance(attrs["ignore_index"], int):
        raise Decline(f"ignore_index {attrs['ignore_index']!r} is not an integer literal")
    cap = 0.0
    if m.get("softcap") is not None:
        cap = float(m["cap_in"])
        if cap != float(m["cap_out"]) or not (cap > 0 and math.isfinite(cap)):
            raise Decline(f"softcap divides by {m['cap_in']} and multiplies by {m['cap_out']}: not tanh(x / c) * c "
                          "with one positive c")
    scale = None  # (operator, constant) applied to the hidden states
    for key, op in (("scale", operator.mul), ("divisor", operator.truediv)):
        if m.get(key) is not None:
            c = m[key]
            try:
                ok = not isinstance(c, bool) and isinstance(c, (int, float)) and math.isfinite(c) and c != 0
            except OverflowError:  # an int beyond float's range
                ok = False
            if not ok:
                raise Decline(f"the logits are scaled by {c!r}: not a finite non-zero number")
            scale = (op, c)
    return {"reduction": attrs["reduction"], "ignore_index": attrs["ignore_index"], "softcap": cap, "scale": scale,
            "with_grad": bool(hidden.requires_grad), "loss_grad": bool(loss.requires_grad)}


class FusedLinearCrossEntropyPass(GraphPass):
    name = "fused_linear_cross_entropy"
    depends_on = ("fxfuse.passes.pattern", "fxfuse.runtime.ops.cross_entropy", "fxfuse.runtime.kernels.cross_entropy",
                  "fxfuse.runtime.ops.lora", "fxfuse.runtime.ops.lora_graph")

    def __init__(self, keep_logits: bool = True):
        # True by default: only the frontend, which also drops the stand-in from the model output,
        # may let the pass replace the logits output.
        self.keep_logits = keep_logits
        self.config = {"keep_logits": keep_logits, "chunk_bytes": ce_op.CHUNK_BYTES}

    def run(self, gm: fx.GraphModule, stats: PassStats) -> None:
        for gname, sub in graphs_of(gm):
            for node in list(sub.graph.nodes):
                if (c := canon(node)) is None or c.kind != "cross_entropy":
                    continue
                head = node
                try:
                    m = match(node)
                    head = m["head"]
                    info = check(m)
                    outputs = escaping(m)
                    if outputs and self.keep_logits:
                        raise Decline("the logits are also a model output (keep_logits=True, or eval/no labels): "
                                      "fusing would not save their memory")
                    if outputs and not info["loss_grad"]:
                        raise Decline("the logits are also a model output and the loss needs no gradient "
                                      "(eval / no_grad keeps the logits)")
                except Decline as e:
                    stats.sites.append(Site(self.name, module_path(head), node.name, gname, False, str(e)))
                    continue
                fused = _replace(sub, m, info, outputs)
                stats.sites.append(Site(self.name, module_path(head), node.name, gname, True, group=fused.name))


def _replace(gm: fx.GraphModule, m: Match, info: dict, outputs: list[fx.Node]) -> fx.Node:
    g = gm.graph
    order = {n: i for i, n in enumerate(g.nodes)}
    last = max((m[k] for k in ("hidden", "weight", "target")), key=order.__getitem__)
    hidden_v, weight_v = example_value(m["hidden"]), example_value(m["weight"])
    mode = getattr(hidden_v, "fake_mode", None)
    hidden = m["hidden"]
    if info["scale"] is not None:  # x W^T * s == (x * s) W^T, and the same for / d
        with g.inserting_after(last):
            hidden = last = g.call_function(info["scale"][0], (m["hidden"], info["scale"][1]))
        if mode is not None:
            with mode:
                hidden.meta["example_value"] = info["scale"][0](hidden_v, info["scale"][1])
    with g.inserting_after(last):
        flat = g.call_method("reshape", (hidden, -1, hidden_v.shape[-1]))
    with g.inserting_after(flat):
        fused = g.call_function(torch.ops.fxfuse.linear_cross_entropy.default,
                                (flat, m["weight"], m["target"], info["reduction"], info["softcap"],
                                 info["ignore_index"], info["with_grad"]))
    with g.inserting_after(fused):
        loss = g.call_function(operator.getitem, (fused, 0))
    for n in {hidden, flat, fused, loss} - {m["hidden"]}:
        n.meta["nn_module_stack"] = dict(m.root.meta.get("nn_module_stack", {}))
    if mode is not None:
        with mode:
            flat.meta["example_value"] = hidden_v.reshape(-1, hidden_v.shape[-1])
            fused.meta["example_value"] = torch.ops.fxfuse.linear_cross_entropy.default(
                flat.meta["example_value"], weight_v, example_value(m["target"]), *fused.args[3:])
            loss.meta["example_value"] = fused.meta["example_value"][0]
    m.root.replace_all_uses_with(loss)
    output = next(n for n in g.nodes if n.op == "output")
    for n in outputs:
        val = example_value(n)
        with g.inserting_before(output):
            nan = g.call_function(torch.full, ((), float("nan")), {"dtype": val.dtype, "device": val.device})
            standin = g.call_method("expand", (nan, *val.shape))
        if mode is not None:
            with mode:
                nan.meta["example_value"] = torch.full((), float("nan"), dtype=val.dtype, device=val.device)
                standin.meta["example_value"] = nan.meta["example_value"].expand(*val.shape)
        output.replace_input_with(n, standin)
    for n in sorted(set(m.nodes), key=order.__getitem__, reverse=True):
        if not n.users:
            g.erase_node(n)
    return fused
