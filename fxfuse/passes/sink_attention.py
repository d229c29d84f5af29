"""Sink-attention pass: HF's eager attention with attention sinks (gpt-oss: a learned per-head logit
joined to each row's softmax, then dropped) -> `fxfuse::chunked_attention` with `sinks`
(fxfuse/runtime/ops/chunked_attention.py), which computes it in blocks of query rows.

SDPA cannot add a softmax column, so eager_attention declines these sites and HF keeps the
[B, H, T, T + 1] logits, their softmax and its slice for the backward. The op keeps q, k, v, the
mask and the sinks (its backward recomputes the scores per block), computes in fp32 (gpt-oss's eager softmax runs in the model
dtype), and gives the sinks their gradient.

The pattern, as data: the scores (RULES: `matmul(q, k.transpose(-2, -1))`, an optional `* scale`
or `/ scale`, an optional `+ mask`), then fixed steps from the softmax up (`_match`): an optional
`- max(·, dim=-1, keepdim=True)` (a stabiliser: softmax is shift-invariant), `cat([scores, sinks],
dim=-1)` with sinks = a [H] parameter viewed as [1, H, 1, 1] and expanded; below the softmax
`[..., :-1]` (the sink's column dropped), an optional dropout, an optional cast, `matmul(·, v)`.
Declined with the reason: sinks that are not one logit per query head, a slice other than dropping
the last column, a softmax over another dim, attention dropout in training, weights read elsewhere,
a mask the op does not take, shapes or dtypes the op does not take.
Opt-in: the op runs the eager math in fp32 blocks (no fused kernel yet): on an H200 it used 3.4-6.5x
less memory than eager at 4k-8k tokens and ran 3.2-3.6x slower (bench/RESULTS.md).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..runtime.ops import chunked_attention as ops
from .eager_scores import is_number, kv_heads, last_two, replace_attention, scale_of
from .manager import GraphPass, PassStats, Site
from .pattern import Decline, Match, Op, Var, _arg, canon, example_value, graphs_of, match_pat, module_path


def _scores(scale_kind, masked: bool):
    scores = Op("matmul", (Var("q"), Op("transpose", (Var("k"),), name="kt")), name="qk")
    if scale_kind is not None:
        scores = Op(scale_kind, (scores, Var("scale", where=is_number, label="scale (a number)")), name="scaled",
                    commutative=scale_kind == "mul")
    if masked:
        scores = Op("add", (scores, Var("mask")), name="masked", commutative=True)
    return scores


# the scores' spellings, most specific first: (scale kind, masked)
RULES = [_scores(kind, masked) for masked in (True, False) for kind in ("mul", "div", None)]


def _is(node, fns: set, methods: tuple = ()) -> bool:
    return isinstance(node, fx.Node) and ((node.op == "call_function" and node.target in fns)
                                          or (node.op == "call_method" and node.target in methods))


def _stabiliser(n):
    """`x - max(x, dim=-1, keepdim=True).values` (or `amax`): returns x, or None when n is not that."""
    if not (_is(n, {operator.sub, torch.sub}, ("sub",)) and len(n.args) == 2 and not n.kwargs):
        return None
    x, mx = n.args
    if _is(mx, {operator.getitem}) and len(mx.args) == 2 and mx.args[1] == 0 and _is(mx.args[0], {torch.max}, ("max",)):
        mx = mx.args[0]
    elif not _is(mx, {torch.amax}, ("amax",)):
        return None
    src = mx.args[0] if mx.op == "call_method" or mx.args else mx.kwargs.get("input")
    dim = _arg(mx, 1, "dim")
    keep = _arg(mx, 2, "keepdim", False)
    return x if src is x and dim in (-1, 3, [-1], (-1,), [3], (3,)) and keep is True else None


def _sink_column(n) -> tuple:
    """(scores, sinks [H] node, its [1, H, 1, 1] view) of `cat([scores, expand(view(sinks))], -1)`."""
    pieces = _arg(n, 0, "tensors") if _is(n, {torch.cat, torch.concat}) else None
    if not (isinstance(pieces, (list, tuple)) and len(pieces) == 2):
        raise Decline(f"expected cat([scores, sinks], dim=-1), found {n}")
    dim = _arg(n, 1, "dim", 0)
    if dim not in (-1, 3):
        raise Decline(f"cat over dim {dim}, not the key dim")
    scores, column = pieces
    if _is(column, set(), ("expand",)) and column.args:
        column = column.args[0]
    view = example_value(column) if isinstance(column, fx.Node) else None
    if not (_is(column, set(), ("view", "reshape")) and column.args and isinstance(column.args[0], fx.Node)
            and isinstance(view, torch.Tensor) and view.dim() == 4 and tuple(view.shape)[::2] == (1, 1)
            and view.shape[3] == 1):
        raise Decline("the extra softmax column is not a per-head parameter viewed as [1, H, 1, 1]")
    return scores, column.args[0], column


def _dropped_sink(softmax: fx.Node) -> fx.Node:
    """The softmax's one reader `[..., :-1]`."""
    users = list(softmax.users)
    if len(users) != 1:
        raise Decline("the softmax is read elsewhere too (output_attentions=True?)")
    s = users[0]
    if not (_is(s, {operator.getitem}) and s.args[1] == (Ellipsis, slice(None, -1, None))):
        raise Decline(f"expected the sink column dropped ([..., :-1]), found {s}")
    return s


class SinkAttentionPass(GraphPass):
    name = "sink_attention"
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
                if c is None or c.kind != "softmax":
                    continue
                x = c.operands[0]
                if _is(x, {operator.sub, torch.sub}, ("sub",)) and x.args:
                    x = x.args[0]  # a stabiliser (or not: _match declines it with the reason)
                if not _is(x, {torch.cat, torch.concat}):
                    continue  # not a softmax over joined columns: eager_attention's candidate
                stats.sites.append(self._site(gname, sub, node))

    def _site(self, gname, gm, softmax) -> Site:
        site = Site(self.name, module_path(softmax), softmax.name, gname, False)
        try:
            m, root = self._match(softmax)
            q, k, v, mask, sinks, scale = self._operands(m)
        except Decline as e:
            site.reason = str(e)
            return site
        op = replace_attention(gm.graph, root, torch.ops.fxfuse.chunked_attention.default,
                               (q, k, v, mask, sinks, scale, 0.0, self.rows), m.nodes, (m["k"], m["v"]))
        site.rewritten, site.group = True, f"{op.name}:sinks"
        return site

    def _match(self, softmax: fx.Node) -> tuple[Match, fx.Node]:
        """The match (q, k, v, scale, mask, sinks; the nodes the op replaces) and the root matmul."""
        attrs = canon(softmax).attrs
        if not isinstance(attrs["dim"], int) or attrs["dim"] % 4 != 3:
            raise Decline(f"softmax over dim {attrs['dim']}, not the key dim")
        m = Match()
        x = softmax.args[0]
        stable = _stabiliser(x)
        steps = [softmax]
        if stable is None and _is(x, {operator.sub, torch.sub}, ("sub",)):
            raise Decline(f"{x.name} subtracts something other than the row max (keepdim) from the logits")
        if stable is not None:
            steps += [x, x.args[1]]
            if _is(x.args[1], {operator.getitem}):  # max(...).values; a traced-but-unread .indices goes too
                mx = x.args[1].args[0]
                steps += [mx] + [u for u in mx.users if u is not x.args[1] and _is(u, {operator.getitem}) and not u.users]
            x = stable
        scores, sinks, view = _sink_column(x)
        column = _arg(x, 0, "tensors")[1]  # the expand, when there is one
        steps += [x, view] + ([column] if column is not view else [])
        for n in steps[1:]:  # each read only inside the pattern (the stabiliser's max reads the cat too)
            if any(u not in steps for u in n.users):
                raise Decline(f"{n.name} is read outside the pattern")
        reason = None
        for rule in RULES:
            trial = Match()
            try:
                match_pat(rule, scores, trial)
                m.update(trial)
                m.nodes[:] = trial.nodes
                break
            except Decline as e:
                reason = reason or str(e)
        else:
            raise Decline(f"the scores are not q·kᵀ (scaled, masked): {reason}")
        m["sinks"], m["softmax"] = sinks, softmax
        below = _dropped_sink(softmax)
        steps.append(below)
        cur = below
        while True:  # optional dropout, optional cast, then matmul(weights, v)
            users = list(cur.users)
            if len(users) != 1:
                raise Decline(f"the attention weights ({cur.name}) are read elsewhere too (output_attentions=True?)")
            nxt = users[0]
            c = canon(nxt)
            if c is not None and c.kind == "dropout":
                if c.attrs["inplace"] or (c.attrs["p"] != 0 and c.attrs["training"] is not False):
                    raise Decline(f"attention dropout p={c.attrs['p']} in training: the op has no dropout")
            elif c is not None and c.kind == "to":
                pass
            elif c is not None and c.kind == "matmul" and c.operands[0] is cur:
                m["v"], m.root = c.operands[1], nxt
                break
            else:
                raise Decline(f"expected dropout, a cast or matmul(weights, v) after the weights, found {nxt}")
            steps.append(nxt)
            cur = nxt
        m.nodes += steps
        return m, m.root

    def _operands(self, m: Match):
        """(q, k, v, mask, sinks, scale) for the op, or Decline."""
        q, k, v, mask, sinks = m["q"], m["k"], m["v"], m.get("mask"), m["sinks"]
        qv, kv_, vv, mv, sv = (example_value(n) if isinstance(n, fx.Node) else n for n in (q, k, v, mask, sinks))
        if not all(isinstance(t, torch.Tensor) for t in (qv, kv_, vv, sv)):
            raise Decline("q, k, v or the sinks have no recorded tensor value")
        if not last_two(canon(m["kt"]).attrs["dims"], kv_.dim()):
            raise Decline(f"k is transposed over dims {canon(m['kt']).attrs['dims']}, not the last two")
        if qv.shape[:2] != kv_.shape[:2] or kv_.shape[:2] != vv.shape[:2]:
            raise Decline(f"batch/head dims differ: q {tuple(qv.shape)}, k {tuple(kv_.shape)}, v {tuple(vv.shape)}")
        if sv.dim() != 1:
            raise Decline(f"sinks {tuple(sv.shape)}: one logit per query head ([H]) expected")
        if getattr(mv, "requires_grad", False):
            raise Decline("the mask requires grad (the op does not differentiate it)")
        scale = scale_of(m)
        k, v = kv_heads(k, v, qv)
        kv_, vv = example_value(k), example_value(v)
        reason = ops.check(qv, kv_, vv, mv, sv, float(scale), 0.0, self.rows)
        if reason:
            raise Decline(reason)
        return q, k, v, mask, sinks, float(scale)
