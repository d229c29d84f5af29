"""Softcap-attention pass: HF's eager attention with logit softcapping (Gemma 2's
`attn_logit_softcapping`: scores * scale, / cap, tanh, * cap, + mask, softmax, matmul with v) ->
`fxfuse::chunked_attention`, which computes it in blocks of query rows
(fxfuse/runtime/ops/chunked_attention.py).

SDPA has no softcap, so the eager_attention pass declines these sites and HF's eager path keeps the
[B, H, T, T] scores, their fp32 softmax and its copy for the backward (O(T²) memory per layer). The
op keeps q, k, v and the mask (its backward recomputes the scores per block), and its scores and softmax are fp32 (HF
rounds the capped scores to the model dtype), so in bf16 it is closer to float64 than eager is;
in fp32 it equals eager within rounding (tested).

The pattern, as data (RULES): `matmul(q, k.transpose(-2, -1))`, an optional `* scale` or `/ scale`
(a number), `/ cap`, `tanh` (the anchor), `* cap` (the same number), an optional `+ mask`,
`softmax(dim=-1)`, an optional cast, an optional dropout, `matmul(·, v)`. When k and v are
repeat_kv's copies the op reads the kv heads. Declined with the reason: two different caps, attention
dropout in training, a mask the op does not take (not 4-D, not additive float, not broadcastable row
by row), weights read elsewhere (`output_attentions=True`), what eager_attention's checks decline
(operand shapes and dtypes, softmax dim/dtype).
Opt-in: the op runs the eager math in fp32 blocks (no fused kernel yet; on an H200 3.5-13x less
memory than eager at 2k-8k tokens, 3.7-5.1x slower, bench/RESULTS.md, measured before the row-max backward); it is
a memory option: it removes the O(T²) tensors, not the O(T²) work.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..runtime.ops import chunked_attention as ops
from .eager_scores import check as eager_check, is_number, kv_heads, replace_attention, scale_value
from .manager import GraphPass, PassStats, Site
from .pattern import Decline, Op, Opt, Var, canon, example_value, graphs_of, match_at, module_path


def _rule(scale_kind, masked: bool) -> tuple:
    scores = Op("matmul", (Var("q"), Op("transpose", (Var("k"),), name="kt")), name="qk")
    if scale_kind is not None:
        scale = Var("scale", where=is_number, label="scale (a number)")
        scores = Op(scale_kind, (scores, scale), name="scaled", commutative=scale_kind == "mul")
    cap_in = Var("cap_in", where=is_number, label="softcap (a number)")
    anchor = Op("tanh", (Op("div", (scores, cap_in), name="cap_div"),), name="tanh")
    capped = Op("mul", (anchor, Var("cap_out", where=is_number, label="softcap (a number)")), name="capped",
                commutative=True)
    if masked:
        capped = Op("add", (capped, Var("mask")), name="masked", commutative=True)
    softmax = Op("softmax", (capped,), name="softmax")
    root = Op("matmul", (Opt("dropout", Opt("to", softmax, name="cast"), name="drop"), Var("v")), name="out",
              label="matmul(weights, v)")
    return anchor, root


# (scale kind, masked) -> (anchor, pattern)
RULES = {(kind, masked): _rule(kind, masked) for masked in (True, False) for kind in ("mul", "div", None)}


def _pick_rule(tanh: fx.Node) -> tuple:
    """The rule whose shape the scores above the tanh and the capped scores below it have."""
    div = canon(tanh.args[0])
    above = canon(div.operands[0]) if div is not None and div.kind == "div" else None
    kind = above.kind if above is not None and above.kind in ("mul", "div") else None
    capped = next(iter(tanh.users), None)
    below = next(iter(capped.users), None) if capped is not None and len(tanh.users) == 1 else None
    masked = canon(below) is not None and canon(below).kind == "add"
    return RULES[(kind, masked)]


class SoftcapAttentionPass(GraphPass):
    name = "softcap_attention"
    depends_on = ("fxfuse.passes.pattern", "fxfuse.passes.eager_scores", "fxfuse.runtime.ops.chunked_attention")

    def __init__(self, rows: int = ops.ROWS):
        if type(rows) is not int or rows < 1:
            raise ValueError(f"rows must be a positive int, not {rows!r}")
        self.rows = rows
        self.config = {"rows": rows}

    def run(self, gm: fx.GraphModule, stats: PassStats) -> None:
        for gname, sub in graphs_of(gm):
            for node in list(sub.graph.nodes):
                c = canon(node)
                if c is None or c.kind != "tanh" or not self._feeds_softmax(node):
                    continue
                stats.sites.append(self._site(gname, sub, node))

    @staticmethod
    def _feeds_softmax(tanh: fx.Node, depth: int = 3) -> bool:
        """A tanh is a candidate when a softmax reads it a few steps down (a GELU's tanh is not)."""
        level = [tanh]
        for _ in range(depth):
            level = [u for n in level for u in n.users]
            if any(canon(u) is not None and canon(u).kind == "softmax" for u in level):
                return True
        return False

    def _site(self, gname, gm, node) -> Site:
        site = Site(self.name, module_path(node), node.name, gname, False)
        anchor, pattern = _pick_rule(node)
        try:
            m = match_at(pattern, anchor, node)
            q, k, v, mask, scale, cap = self._operands(m)
        except Decline as e:
            site.reason = str(e)
            return site
        op = replace_attention(gm.graph, m.root, torch.ops.fxfuse.chunked_attention.default,
                               (q, k, v, mask, None, scale, cap, self.rows), m.nodes, (m["k"], m["v"]))
        site.rewritten, site.group = True, f"{op.name}:softcap {cap:g}"
        return site

    def _operands(self, m):
        """(q, k, v, mask, scale, cap) for the op, or Decline."""
        for name in ("softmax", "capped", "tanh", "cap_div"):
            if len(m[name].users) != 1:
                raise Decline(f"the {name} values are read elsewhere too (output_attentions=True?)")
        cap_in, cap_out = scale_value(m["cap_in"]), scale_value(m["cap_out"])
        if cap_in != cap_out or not cap_in or cap_in < 0:
            raise Decline(f"scores / {cap_in} then * {cap_out}: not one positive softcap")
        kwargs = eager_check(m)  # shapes, dtypes, softmax over the keys, no dropout in training, the mask
        q, k, v, mask = m["q"], m["k"], m["v"], m.get("mask")
        qv = example_value(q)
        k, v = kv_heads(k, v, qv)
        kv_, vv = example_value(k), example_value(v)
        mv = example_value(mask) if mask is not None else None
        if mv is not None and getattr(mv, "requires_grad", False):
            raise Decline("the mask requires grad (the op does not differentiate it)")
        reason = ops.check(qv, kv_, vv, mv, None, float(kwargs["scale"]), float(cap_in), self.rows)
        if reason:
            raise Decline(reason)
        return q, k, v, mask, float(kwargs["scale"]), float(cap_in)
