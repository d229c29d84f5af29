"""Eager-attention pass: HF's eager attention (matmul -> scale -> mask -> softmax -> dropout ->
matmul) -> one `scaled_dot_product_attention` call.

Models loaded with `attn_implementation="eager"` (and architectures whose default is eager)
materialise the [B, H, Tq, Tkv] scores, their softmax in fp32 and its bf16 copy, and save them for
the backward: at 16k tokens on an 8B shape that is ~16 GiB per layer. SDPA computes the same
function in O(T) memory, and the later passes can then prove the mask causal (`causal_mask`,
which reads HF's additive `where(mask, 0, finfo.min)` too) and drop repeat_kv (`sdpa_gqa`).

The pattern, as data (RULES): `matmul(q, k.transpose(-2, -1))`, then an optional `* scale` or
`/ scale` (a number), an optional `+ mask`, `softmax(dim=-1)` (the anchor: every softmax fed by a
matmul is a candidate), an optional cast back, an optional dropout, `matmul(·, v)`. SDPA gets the
same mask (additive, same semantics) and the same scale. Its fp32 scores are more accurate than
eager's bf16 ones: equal in fp32, close in bf16 (tested).

Declined with the reason: softcapping (tanh) or sinks (an extra softmax column) between the scores
and the softmax, attention dropout in training (SDPA would draw another mask than eager), a softmax
over another dim, weights read elsewhere (`output_attentions=True`), shapes that broadcast, a mask
in another dtype than q (SDPA requires the same), non-4-D operands, and a mask computed from a graph
input (a padding mask, packed position_ids): such a mask can mask every key of a query row (left
padding), where eager attends uniformly and torch's fused CPU SDPA kernel returns wrong gradients
(torch 2.13, CPU: dq/dk/dv off by O(1) for those rows; its math backend agrees with eager).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .eager_scores import check, is_number
from .manager import GraphPass, PassStats, Site
from .mask_analysis import decline_input_masks
from .pattern import Decline, Op, Opt, Var, canon, graphs_of, match_at, module_path

_SOFTMAX = Op("softmax", (Var("scores"),), name="softmax")  # the anchor


def _rule(scale_kind, masked: bool) -> tuple:
    scores = Op("matmul", (Var("q"), Op("transpose", (Var("k"),), name="kt")), name="qk")
    if scale_kind is not None:
        scale = Var("scale", where=is_number, label="scale (a number)")
        scores = Op(scale_kind, (scores, scale), name="scaled", commutative=scale_kind == "mul")
    if masked:
        scores = Op("add", (scores, Var("mask")), name="masked", commutative=True)
    anchor = Op("softmax", (scores,), name="softmax")
    root = Op("matmul", (Opt("dropout", Opt("to", anchor, name="cast"), name="drop"), Var("v")), name="out",
              label="matmul(weights, v)")
    return anchor, root


# (scale kind, masked) -> (anchor, pattern): scaled by a multiply, a divide, or not at all; with or
# without an additive mask
RULES = {(kind, masked): _rule(kind, masked) for masked in (True, False) for kind in ("mul", "div", None)}


def _pick_rule(softmax: fx.Node) -> tuple:
    """The rule whose shape the softmax's input has, so a decline names the real mismatch."""
    x, masked = softmax.args[0], False
    c = canon(x)
    if c is not None and c.kind == "add":
        masked = True
        kinds = [canon(a).kind if canon(a) is not None else None for a in c.operands]
        x = next((a for a, k in zip(c.operands, kinds) if k in ("mul", "div", "matmul")), c.operands[0])
        c = canon(x)
    kind = c.kind if c is not None and c.kind in ("mul", "div") else None
    return RULES[(kind, masked)]


# Products that make attention scores in other spellings: candidates too, so that a softmax over
# them is reported (declined with what was found) rather than passed over in silence.
_OTHER_PRODUCTS = {torch.bmm, torch.einsum}


def _is_product(n: fx.Node) -> bool:
    c = canon(n)
    return (c is not None and c.kind == "matmul") or (n.op == "call_function" and n.target in _OTHER_PRODUCTS)


def _feeds_from_matmul(node: fx.Node, depth: int = 6) -> bool:
    """A softmax is a candidate when its input comes from a matmul (or bmm, einsum) a few elementwise
    steps up."""
    frontier = [node]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for a in n.all_input_nodes:
                if _is_product(a):
                    return True
                nxt.append(a)
        frontier = nxt
    return False


def _cats_scores(cat: fx.Node) -> bool:
    """A cat one of whose pieces is (fed by) a matmul: columns joined to the scores, not a mask's
    producers."""
    pieces = cat.args[0] if cat.args and isinstance(cat.args[0], (list, tuple)) else []
    return any(isinstance(p, fx.Node) and ((canon(p) is not None and canon(p).kind == "matmul")
                                           or _feeds_from_matmul(p)) for p in pieces)


def _scores_chain_reason(softmax: fx.Node, depth: int = 6) -> str:
    """Why a candidate softmax does not read plain (scaled, masked) scores, in words: breadth-first
    up to `depth` steps from the softmax (a mask's own producers are many, so depth, not a count,
    bounds the walk), stopping at the q·kᵀ matmul."""
    seen, level = set(), [softmax.args[0]]
    for _ in range(depth):
        nxt = []
        for n in level:
            if not isinstance(n, fx.Node) or n in seen:
                continue
            seen.add(n)
            c = canon(n)
            if c is not None and c.kind == "tanh":
                return "logit softcapping (tanh) before the softmax: SDPA has no softcap (opt-in pass softcap_attention takes it)"
            if n.op == "call_function" and n.target in (torch.cat, torch.concat) and _cats_scores(n):
                return ("the softmax runs over extra columns (attention sinks?): SDPA cannot add them (opt-in pass "
                        "sink_attention takes sinks)")
            if c is None or c.kind != "matmul":
                nxt.extend(n.all_input_nodes)
        level = nxt
    return ""


class EagerAttentionPass(GraphPass):
    name = "eager_attention"
    depends_on = ("fxfuse.passes.pattern", "fxfuse.passes.eager_scores", "fxfuse.passes.mask_analysis")

    def __init__(self):
        self.config = {}

    def run(self, gm: fx.GraphModule, stats: PassStats) -> None:
        for gname, sub in graphs_of(gm):
            for node in list(sub.graph.nodes):
                c = canon(node)
                if c is None or c.kind != "softmax" or not _feeds_from_matmul(node):
                    continue
                stats.sites.append(self._site(gname, gm, sub, node))

    def _site(self, gname, gm, sub, node) -> Site:
        site = Site(self.name, module_path(node), node.name, gname, False)
        reason = _scores_chain_reason(node)
        if reason:
            site.reason = reason
            return site
        anchor, pattern = _pick_rule(node)
        try:
            m = match_at(pattern, anchor, node)
            kwargs = check(m)
            decline_input_masks(gm, sub, m.get("mask"))
        except Decline as e:
            site.reason = str(e)
            return site
        g = sub.graph
        with g.inserting_before(m.root):
            sdpa = g.call_function(torch._C._nn.scaled_dot_product_attention, (m["q"], m["k"], m["v"]), kwargs)
        # the matmul's recorded value stands for SDPA's: same shape and dtype (the strides of a
        # backend's output may differ; the passes after this one read shapes and dtypes only, and
        # AOTAutograd traces fresh values)
        sdpa.meta.update({k: v for k, v in m.root.meta.items() if k in ("nn_module_stack", "example_value", "val",
                                                                        "stack_trace")})
        m.root.replace_all_uses_with(sdpa)
        order = {n: i for i, n in enumerate(g.nodes)}
        scale = m.get("scale")
        dead = set(m.nodes) | ({scale} if isinstance(scale, fx.Node) else set())  # GPT-2's torch.full
        for n in sorted(dead, key=order.__getitem__, reverse=True):
            if not n.users:
                g.erase_node(n)
        site.rewritten, site.group = True, sdpa.name
        return site

