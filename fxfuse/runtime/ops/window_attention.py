"""`fxfuse::window_attention`: causal sliding-window attention (Mistral's `sliding_window`, the local
layers of Gemma 2/3), key j seen by query i when i - window < j <= i, without a [Tq, Tkv] mask.

HF materialises that mask ([B, 1, T, T] bool: 1 GiB at 32k tokens, 16 GiB at 128k) and hands it to
SDPA, which then runs a masked kernel over all T x T scores. Here the queries go in chunks of
`chunk` rows (at least the window), and each chunk attends only to the keys its window can reach
(at most chunk + window - 1): memory and work O(T * (chunk + window)), not O(T^2).
- Forward: SDPA per chunk with that chunk's band mask ([chunk, chunk + window - 1] bool); the first
  chunk, where the band is the causal triangle, runs with is_causal=True and no mask. GQA key/value
  heads are repeated per chunk (only the chunk's keys).
- Backward: recomputed per block of BACKWARD_ROWS query rows in fp32 (scores, softmax, then
  dS = P * (dP - rowsum(P * dP))), so no forward state but q, k, v is kept and at most one block's
  [H, rows, keys] scores live at a time. dk and dv accumulate in fp32 (a key is read by up to two
  chunks), and GQA gradients are summed over each kv head's query heads.
Every query keeps at least its own key, so no softmax row is empty. No dropout (the pass declines it).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

OP = "fxfuse::window_attention"
BACKWARD_ROWS = 256  # query rows per backward block: [B, H, 256, 255 + window] fp32 scores at a time


def chunks(t: int, window: int, chunk: int):
    """(query start, query end, first key) of each forward query chunk: max(window, chunk) rows, so
    that a key is read by at most two chunks."""
    yield from row_blocks(t, window, max(window, chunk))


def row_blocks(t: int, window: int, rows: int):
    """(query start, query end, first key) of each block of `rows` query rows: the keys from the first
    query's earliest (start - window + 1) to the last query."""
    for s in range(0, t, rows):
        yield s, min(s + rows, t), max(0, s - window + 1)


def band(s: int, e: int, ks: int, window: int, device) -> Tensor:
    """[e - s, e - ks] bool: query s + i sees key ks + j when 0 <= (s + i) - (ks + j) < window."""
    d = torch.arange(s, e, device=device)[:, None] - torch.arange(ks, e, device=device)[None, :]
    return (d >= 0) & (d < window)


def _band_for(masks: dict, s: int, e: int, ks: int, window: int, device, keep: bool = True) -> Tensor:
    """band(s, e, ks, ...) (or its complement, keep=False) built once per call: it depends on the
    block only through its sizes e - s and e - ks (their difference is the offset s - ks), which
    every interior block shares."""
    key = (e - s, e - ks, keep)
    mask = masks.get(key)
    if mask is None:
        mask = band(s, e, ks, window, device)
        mask = masks[key] = mask if keep else ~mask
    return mask


def _heads(kv: Tensor, hq: int) -> Tensor:
    """kv heads repeated to the query heads (query head h reads kv head h // (hq / hkv), as repeat_kv)."""
    hk = kv.shape[-3]
    return kv if hk == hq else kv.repeat_interleave(hq // hk, dim=-3)


def check(q: Tensor, k: Tensor, v: Tensor, window: int, chunk: int) -> Optional[str]:
    """None when the op supports these inputs, else why not."""
    if not (q.dim() == k.dim() == v.dim() == 4):
        return f"q, k, v must be [B, H, T, D] (got {q.dim()}, {k.dim()}, {v.dim()} dims)"
    if q.shape[0] != k.shape[0] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        return f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit together"
    if q.shape[-2] != k.shape[-2]:
        return f"{q.shape[-2]} queries against {k.shape[-2]} keys (the window is aligned for Tq == Tkv only)"
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        return f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads"
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        return f"dtypes {q.dtype}, {k.dtype}, {v.dtype}: one floating dtype needed"
    if type(window) is not int or window < 1 or type(chunk) is not int or chunk < 1:
        return f"window {window!r} and chunk {chunk!r} must be positive ints"
    return None


def _bthd(like: Tensor, d: int, dtype=None) -> Tensor:
    """An uninitialised [B, H, T, d] tensor in [B, T, H, d]-contiguous layout: SDPA's output layout,
    which HF's `transpose(1, 2).view(...)` after attention relies on, and (for the gradients) the
    layout of HF's q/k/v projections. Fixed, not copied from the inputs: the compiled graph was traced
    with these strides, and an input's run-time strides need not equal its traced ones."""
    b, h, t, _ = like.shape
    return torch.empty((b, t, h, d), dtype=dtype or like.dtype, device=like.device).transpose(1, 2)


def _out(q: Tensor, v: Tensor) -> Tensor:
    return _bthd(q, v.shape[-1])


@torch.library.custom_op(OP, mutates_args=())
def window_attention(q: Tensor, k: Tensor, v: Tensor, window: int, scale: float, chunk: int) -> Tensor:
    reason = check(q, k, v, window, chunk)
    if reason:
        raise ValueError(f"{OP}: {reason}")
    out = _out(q, v)
    hq, masks = q.shape[1], {}
    for s, e, ks in chunks(q.shape[-2], window, chunk):
        kk, vv = _heads(k[:, :, ks:e], hq), _heads(v[:, :, ks:e], hq)
        causal_only = ks == 0 and e <= window  # the band is the causal triangle
        mask = None if causal_only else _band_for(masks, s, e, ks, window, q.device)
        out[:, :, s:e] = F.scaled_dot_product_attention(q[:, :, s:e], kk, vv, attn_mask=mask,
                                                        is_causal=causal_only, scale=scale)
    return out


@window_attention.register_fake
def _(q, k, v, window, scale, chunk):
    return _out(q, v)


BWD = "fxfuse::window_attention_backward"


@torch.library.custom_op(BWD, mutates_args=())
def window_attention_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, window: int,
                              scale: float) -> tuple[Tensor, Tensor, Tensor]:
    b, hq, t, _ = q.shape
    hk = k.shape[1]
    dq = _bthd(q, q.shape[-1])
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    masks: dict = {}
    for s, e, ks in row_blocks(t, window, BACKWARD_ROWS):
        qb, gb = q[:, :, s:e].float(), grad[:, :, s:e].float()
        kb, vb = _heads(k[:, :, ks:e], hq).float(), _heads(v[:, :, ks:e], hq).float()
        scores = (qb @ kb.transpose(-1, -2)) * scale
        scores.masked_fill_(_band_for(masks, s, e, ks, window, q.device, keep=False), float("-inf"))
        p = torch.softmax(scores, dim=-1)
        del scores
        dp = gb @ vb.transpose(-1, -2)
        ds = p * (dp - (p * dp).sum(dim=-1, keepdim=True))
        del dp
        dq[:, :, s:e] = ((ds @ kb) * scale).to(q.dtype)
        dkb, dvb = (ds.transpose(-1, -2) @ qb) * scale, p.transpose(-1, -2) @ gb
        if hk != hq:  # each kv head's gradient sums over the query heads that read it
            dkb = dkb.view(b, hk, hq // hk, *dkb.shape[2:]).sum(2)
            dvb = dvb.view(b, hk, hq // hk, *dvb.shape[2:]).sum(2)
        dk[:, :, ks:e] += dkb
        dv[:, :, ks:e] += dvb
    dk_out, dv_out = _bthd(k, k.shape[-1]), _bthd(v, v.shape[-1])
    dk_out.copy_(dk)
    dv_out.copy_(dv)
    return dq, dk_out, dv_out


@window_attention_backward.register_fake
def _(grad, q, k, v, window, scale):
    return _bthd(q, q.shape[-1]), _bthd(k, k.shape[-1]), _bthd(v, v.shape[-1])


def _setup_context(ctx, inputs, output):
    q, k, v, window, scale, _ = inputs
    ctx.save_for_backward(q, k, v)
    ctx.window, ctx.scale = window, scale


def _backward(ctx, grad):
    q, k, v = ctx.saved_tensors
    dq, dk, dv = window_attention_backward(grad.contiguous(), q, k, v, ctx.window, ctx.scale)
    return dq, dk, dv, None, None, None


window_attention.register_autograd(_backward, setup_context=_setup_context)


def reference(q: Tensor, k: Tensor, v: Tensor, window: int, scale: float) -> Tensor:
    """The same attention with the full [T, T] band mask (tests; float64 inputs give the float64 answer)."""
    t, hq = q.shape[-2], q.shape[1]
    mask = band(0, t, 0, window, q.device)
    return F.scaled_dot_product_attention(q, _heads(k, hq), _heads(v, hq), attn_mask=mask, scale=scale)
