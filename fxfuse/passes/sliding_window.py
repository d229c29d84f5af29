"""Sliding-window pass: SDPA over HF's materialised sliding-window causal mask (Mistral's
`sliding_window`, the local layers of Gemma 2/3) -> `fxfuse::window_attention`, which attends in
query chunks to the keys each chunk's window reaches, without the [Tq, Tkv] mask (O(T * window)
memory and work; fxfuse/runtime/ops/window_attention.py).

The mask is proven the way the causal-mask pass proves a causal one (its evaluator, on the
top-level producer cone; symbolic sizes through its affine algebra): a conjunction of the causal
term (`kv <= q` over one strictly increasing index), all-true terms, and one window term
`q - kv < W` for a constant W >= 1 (as a comparison of a query-side with a key-side vector, an
affine comparison, or, for masks small enough to evaluate, the whole band). Positions must be
consecutive (the window is counted in indices). When k and v are `repeat_kv` copies (HF repeats
them whenever a mask is present), the op reads the kv heads themselves. Declined with the reason:
any other mask (padding, packed sequences, a band without the causal term), dropout, is_causal with
a mask, Tq != Tkv, query heads not a multiple of the kv heads.
Opt-in (not in fxfuse's default passes): on an H200 its op ran 2.6-5.9x slower than the masked SDPA at 4k-16k
tokens (bench/RESULTS.md); it is a memory option for long windows at long context.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx

from ..runtime.ops import window_attention as window_ops
from .manager import GraphPass, PassStats
from .mask_analysis import SDPA, Conj, Pair, SymCmp, classify, drop_unused_masks, mask_verdict, masked_sdpa_sites, \
    rows, size_eq, sym
from .pattern import Decline, check_grouped_repeat, example_value, match_at, repeat_source, sdpa_params


def band_window(term: torch.Tensor, mask_shape: tuple) -> int:
    """W when an evaluated [.., T, T] mask is the causal band of width W < T; else Decline."""
    t = mask_shape[-1]
    full = term.to(torch.bool).expand(mask_shape)
    if mask_shape[-2] != t or t < 2:
        raise Decline("evaluated mask is not square")
    column = full[0, 0, :, 0]
    masked = (~column).nonzero()
    if len(masked) == 0:
        raise Decline("evaluated mask keeps the whole first column: no window")
    w = int(masked[0])
    if w < 1 or not torch.equal(full, window_ops.band(0, t, 0, w, "cpu").expand(mask_shape)):
        raise Decline("evaluated mask is not a causal sliding-window band")
    return w


def _pair_window(term: Pair, mask_shape: tuple) -> int:
    """W for `q_side < kv_side` (or <=) with q_side = idx - W (- 1) and kv_side = idx, idx consecutive."""
    b = mask_shape[0]
    q, kv = rows(term.q_side, 2, b), rows(term.kv_side, 3, b)
    if term.op not in ("lt", "le") or q.shape != kv.shape or q.shape[-1] < 2:
        raise Decline(f"mask term q {term.op} kv is not a sliding window")
    if q.is_floating_point() or kv.is_floating_point():  # a fractional gap would be rounded to a wrong width
        raise Decline(f"mask term q {term.op} kv compares floating-point positions")
    if not bool((kv[:, 1:] - kv[:, :-1] == 1).all()):
        raise Decline("window over positions that are not consecutive (packed sequences?)")
    gap = kv - q
    w = int(gap.flatten()[0]) + (1 if term.op == "le" else 0)
    if not bool((gap == gap.flatten()[0]).all()) or w < 1:
        raise Decline(f"mask term q {term.op} kv is not a sliding window of constant width")
    return w


def _affine_window(term: SymCmp) -> int:
    """W for `kv - q + c > 0` (W = c) or `>= 0` (W = c + 1) over the mask's query and key indices."""
    d = term.diff.left_pad(4)
    if len(d.shape) == 4 and term.op in ("gt", "ge") and d.coefs == (0, 0, -1, 1):
        w = d.c + (1 if term.op == "ge" else 0)
        if w >= 1:
            return w
    raise Decline(f"mask term {term.op} over indices {d.coefs} + {d.c} is not a sliding window")


def window_of(value: Any, mask_shape: tuple) -> int:
    """The window W of an evaluated causal sliding-window mask; Decline for anything else."""
    terms = value.terms if isinstance(value, Conj) else [value]
    windows, rest, causal, why = [], [], False, None
    for term in terms:
        try:
            if isinstance(term, torch.Tensor) and not bool(term.to(torch.bool).all()):
                windows.append(band_window(term, mask_shape))
                causal = True  # the band holds the causal triangle
            elif isinstance(term, Pair) and term.op in ("lt", "le"):
                windows.append(_pair_window(term, mask_shape))
            elif isinstance(term, SymCmp) and _is_window_cmp(term):
                windows.append(_affine_window(term))
            else:
                rest.append(term)
        except Decline as e:
            if isinstance(term, torch.Tensor):
                raise
            why = e  # a window-like term that is not one: its reason, if no term is a window
            rest.append(term)
    if not windows and why is not None:
        raise why
    if len(windows) != 1:
        raise Decline("no sliding-window term in the mask" if not windows else "more than one window term")
    if rest and classify(Conj(rest) if len(rest) > 1 else rest[0], mask_shape) == "causal":
        causal = True
    if not causal:
        raise Decline("a window without the causal term (a bidirectional band) is not supported")
    return windows[0]


def _is_window_cmp(term: SymCmp) -> bool:
    return term.op in ("gt", "ge") and term.diff.left_pad(4).coefs == (0, 0, -1, 1)


class SlidingWindowPass(GraphPass):
    name = "sliding_window"
    depends_on = ("fxfuse.passes.pattern", "fxfuse.passes.mask_analysis", "fxfuse.runtime.ops.window_attention")

    def __init__(self, chunk: int = 1024, eval_limit: int = 1 << 20):
        if type(chunk) is not int or chunk < 1:
            raise ValueError(f"chunk must be a positive int, not {chunk!r}")
        self.chunk, self.eval_limit = chunk, eval_limit
        self.config = {"chunk": chunk, "eval_limit": eval_limit}

    def run(self, gm: fx.GraphModule, stats: PassStats) -> None:
        verdicts: dict[fx.Node, Any] = {}
        cones: dict[fx.Node, set] = {}
        for sub, node, site in masked_sdpa_sites(gm, stats, self.name):
            try:
                match_at(SDPA, SDPA, node)
                window = self._verdict(gm, sub, node, verdicts, cones)
                q, k, v, scale = self._operands(node)
            except Decline as e:
                site.reason = str(e)
                continue
            with sub.graph.inserting_before(node):
                new = sub.graph.call_function(torch.ops.fxfuse.window_attention.default,
                                              (q, k, v, window, scale, self.chunk))
            new.meta.update({key: node.meta[key] for key in ("example_value", "val", "stack_trace",
                                                             "nn_module_stack") if key in node.meta})
            node.replace_all_uses_with(new)
            old_kv = [node.args[i] if i < len(node.args) else None for i in (1, 2)]
            sub.graph.erase_node(node)
            for chain_end in old_kv:
                _erase_dead_chain(sub.graph, chain_end)
            site.rewritten, site.group = True, f"{new.name}:window {window}"
        proven = {top: cones[top] for top, v in verdicts.items() if not isinstance(v, Decline)}
        drop_unused_masks(gm, proven)

    def _operands(self, node: fx.Node):
        params = sdpa_params(node)
        if params.get("dropout_p") not in (None, 0, 0.0):
            raise Decline(f"dropout_p {params['dropout_p']!r}: window attention has no dropout")
        if params.get("is_causal"):
            raise Decline("SDPA already has is_causal=True and a mask")
        q, k, v = params["query"], params["key"], params["value"]
        qv, kv_, vv = (example_value(n) for n in (q, k, v))
        if not all(isinstance(x, torch.Tensor) and x.dim() == 4 for x in (qv, kv_, vv)):
            raise Decline("q, k, v are not 4-D tensors")
        if not size_eq(sym(qv.shape[-2]), sym(kv_.shape[-2])):
            raise Decline("Tq != Tkv (the window is aligned for equal lengths only)")
        d = qv.shape[-1]
        if not isinstance(d, int):
            raise Decline("symbolic head dim")
        scale = params.get("scale")
        scale = 1.0 / math.sqrt(d) if scale is None else scale
        if not isinstance(scale, (int, float)):
            raise Decline(f"scale {scale!r} is not a constant")
        # k and v as the kv heads themselves when both are repeat_kv's grouped copies
        rk, rv = repeat_source(k), repeat_source(v)
        if rk and rv:
            try:
                check_grouped_repeat(rk, qv)
                check_grouped_repeat(rv, qv)
                k, v = rk[0], rv[0]
            except Decline:
                pass  # another expand: the op reads k and v as they are
        hq, hk = qv.shape[1], example_value(k).shape[1]
        if not (isinstance(hq, int) and isinstance(hk, int)) or hk == 0 or hq % hk:
            raise Decline(f"{hq} query heads are not a multiple of {hk} kv heads")
        if hq != hk and not params.get("enable_gqa") and (k is params["key"]):
            raise Decline("query and key heads differ without enable_gqa")
        return q, k, v, float(scale)

    def _verdict(self, gm, sub, node, verdicts, cones) -> int:
        return mask_verdict(gm, sub, node, verdicts, cones, self.eval_limit, window_of)


def _erase_dead_chain(graph: fx.Graph, end) -> None:
    """Erase a repeat_kv chain (reshape <- expand <- getitem) left without readers."""
    chain = repeat_source(end) if isinstance(end, fx.Node) else None
    if chain is None:
        return
    for n in reversed(chain[1]):
        if not n.users:
            graph.erase_node(n)
