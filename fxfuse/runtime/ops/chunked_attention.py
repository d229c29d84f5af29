"""`fxfuse::chunked_attention`: attention with what SDPA cannot express, in blocks of query rows so
that the [B, H, Tq, Tkv] scores never exist in full: logit softcapping (Gemma 2:
`cap * tanh(s / cap)` on the scaled scores, before the mask) and attention sinks (gpt-oss: a learned
per-head logit that joins each row's softmax denominator and reads no value).

HF runs those models' attention eagerly: it keeps the scores, their fp32 softmax and its copy in the
model dtype for the backward ([B, H, T, T] each: at 16k tokens and 16 heads, 16 GiB in fp32). Here:
- Forward: per block of `rows` query rows, the scores in fp32, softcap, + the additive mask's rows,
  the softmax over the keys and the sink, output = P @ V; also returned: the rows' log-sum-exp
  ([B, H, Tq] fp32; the backward does not read it, the tests check each row's normaliser by it).
  Kept for the backward: q, k, v and the mask.
- Backward: per block, the scores and P recomputed as in the forward (shifted by the row max, not by
  the log-sum-exp: see _probs); dS = P * (dP - rowsum(P * dP)) (the sink reads no value, so its dP
  is 0), through tanh's derivative 1 - (c / cap)^2, into dq, dk, dv (fp32 accumulation); the sinks'
  gradient is -sum(P_sink * rowsum(P * dP)).
All arithmetic in fp32 (float64 for float64 inputs; fp16 scores near 65504 would overflow in q @ kᵀ before the cap is applied).
GQA: k/v may carry fewer heads than q (query head h reads kv head h // (Hq / Hkv), as repeat_kv).
The mask is HF's additive float mask ([B or 1, H or 1, Tq, Tkv]; 0 = keep, a large negative =
drop), not differentiated. No dropout (the pass declines attention dropout in training).
Work is the eager path's; this op is for memory, not speed.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .window_attention import _bthd, _heads

OP = "fxfuse::chunked_attention"
BWD = "fxfuse::chunked_attention_backward"
ROWS = 256  # query rows per block: [B, H, 256, Tkv] fp32 scores (and their softmax) at a time


def check(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], sinks: Optional[Tensor], scale: float,
          softcap: float, rows: int) -> Optional[str]:
    """None when the op supports these inputs, else why not."""
    if not (q.dim() == k.dim() == v.dim() == 4):
        return f"q, k, v must be [B, H, T, D] (got {q.dim()}, {k.dim()}, {v.dim()} dims)"
    if q.shape[0] != k.shape[0] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        return f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit together"
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        return f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads"
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        return f"dtypes {q.dtype}, {k.dtype}, {v.dtype}: one floating dtype needed"
    if mask is not None:
        if not mask.is_floating_point():
            return f"mask in {mask.dtype}: an additive float mask is needed (0 keeps, a large negative drops)"
        scores = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        if mask.dim() != 4 or any(m not in (1, s) for m, s in zip(mask.shape, scores)) or mask.shape[2:] != scores[2:]:
            return f"mask {tuple(mask.shape)} does not fit the scores {scores}"
    if sinks is not None and (sinks.dim() != 1 or sinks.shape[0] != q.shape[1] or not sinks.is_floating_point()):
        return f"sinks {tuple(sinks.shape)} {sinks.dtype}: one float logit per query head ({q.shape[1]}) needed"
    if not (isinstance(scale, float) and isinstance(softcap, float)) or softcap < 0:
        return f"scale {scale!r} and softcap {softcap!r} must be floats, softcap >= 0 (0: none)"
    if type(rows) is not int or rows < 1:
        return f"rows {rows!r} must be a positive int"
    return None


def _acc(dtype: torch.dtype) -> torch.dtype:
    """The arithmetic's dtype: fp32, or float64 for float64 inputs (the tests' reference precision)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _logits(qb: Tensor, kf: Tensor, mask: Optional[Tensor], s: int, e: int, scale: float, softcap: float):
    """(the block's logits, tanh(scaled scores / cap) or None): fp32 [B, H, e - s, Tkv]."""
    z = (qb @ kf.transpose(-1, -2)) * scale
    th = None
    if softcap:
        th = torch.tanh(z / softcap)
        z = th * softcap
    if mask is not None:
        z = z + mask[:, :, s:e].to(z.dtype)
    return z, th


def _probs(z: Tensor, sink: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor], Tensor]:
    """(P over the keys, the sink's probability [B, H, rows, 1] or None, the rows' log-sum-exp) of a
    block's logits: each row's softmax over its keys and, where present, the head's sink logit
    ([H] -> [1, H, 1, 1]), which reads no value. Shifted by the row's max rather than by its
    log-sum-exp: where a finite mask (HF's finfo.min of bf16/fp32) drops every key of a row (a
    left-padded query), the masked logits are all equal and z - lse rounds to 0, so every key would
    get 1; eager's softmax attends uniformly there, as this does. (An fp16 mask's -65504 keeps the
    scores' differences in fp32: such a row is the softmax of its scores, in eager too.)"""
    top = z.amax(dim=-1, keepdim=True)
    if sink is not None:
        top = torch.maximum(top, sink.view(1, -1, 1, 1))
    p = torch.exp(z - top)
    den = p.sum(dim=-1, keepdim=True)
    p_sink = None
    if sink is not None:
        p_sink = torch.exp(sink.view(1, -1, 1, 1) - top)
        den = den + p_sink
        p_sink = p_sink / den
    return p / den, p_sink, (top + torch.log(den)).squeeze(-1)


@torch.library.custom_op(OP, mutates_args=())
def chunked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], sinks: Optional[Tensor],
                      scale: float, softcap: float, rows: int) -> tuple[Tensor, Tensor]:
    reason = check(q, k, v, mask, sinks, scale, softcap, rows)
    if reason:
        raise ValueError(f"{OP}: {reason}")
    hq, t, acc = q.shape[1], q.shape[2], _acc(q.dtype)
    kf, vf = _heads(k, hq).to(acc), _heads(v, hq).to(acc)
    sink = None if sinks is None else sinks.to(acc)
    out = _bthd(q, v.shape[-1])
    lse = torch.empty(q.shape[:3], dtype=acc, device=q.device)
    for s in range(0, t, rows):
        e = min(s + rows, t)
        z, _ = _logits(q[:, :, s:e].to(acc), kf, mask, s, e, scale, softcap)
        p, _, lse[:, :, s:e] = _probs(z, sink)
        out[:, :, s:e] = (p @ vf).to(q.dtype)
    return out, lse


@chunked_attention.register_fake
def _(q, k, v, mask, sinks, scale, softcap, rows):
    return _bthd(q, v.shape[-1]), q.new_empty(q.shape[:3], dtype=_acc(q.dtype))


@torch.library.custom_op(BWD, mutates_args=())
def chunked_attention_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor],
                               sinks: Optional[Tensor], scale: float, softcap: float,
                               rows: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    b, hq, t, _ = q.shape
    hk, acc = k.shape[1], _acc(q.dtype)
    kf, vf = _heads(k, hq).to(acc), _heads(v, hq).to(acc)
    sink = None if sinks is None else sinks.to(acc)
    dq = _bthd(q, q.shape[-1])
    dk = torch.zeros((b, hq) + k.shape[2:], dtype=acc, device=k.device)
    dv = torch.zeros((b, hq) + v.shape[2:], dtype=acc, device=v.device)
    dsink = torch.zeros(hq, dtype=acc, device=q.device)
    for s in range(0, t, rows):
        e = min(s + rows, t)
        qb, gb = q[:, :, s:e].to(acc), grad[:, :, s:e].to(acc)
        z, th = _logits(qb, kf, mask, s, e, scale, softcap)
        p, p_sink, _ = _probs(z, sink)
        del z
        dp = gb @ vf.transpose(-1, -2)
        delta = (p * dp).sum(dim=-1, keepdim=True)
        if sink is not None:  # the sink's probability times (0 - delta), summed over batch and rows
            dsink -= (p_sink * delta).sum(dim=(0, 2, 3))
        ds = p * (dp - delta)
        del dp
        if th is not None:
            ds = ds * (1 - th * th)
        ds = ds * scale
        dq[:, :, s:e] = (ds @ kf).to(q.dtype)
        dk += ds.transpose(-1, -2) @ qb
        dv += p.transpose(-1, -2) @ gb
    if hk != hq:  # each kv head's gradient sums over the query heads that read it
        dk = dk.view(b, hk, hq // hk, *dk.shape[2:]).sum(2)
        dv = dv.view(b, hk, hq // hk, *dv.shape[2:]).sum(2)
    dk_out, dv_out = _bthd(k, k.shape[-1]), _bthd(v, v.shape[-1])
    dk_out.copy_(dk)
    dv_out.copy_(dv)
    return dq, dk_out, dv_out, dsink.to(sinks.dtype) if sinks is not None else dsink.new_zeros(0)


@chunked_attention_backward.register_fake
def _(grad, q, k, v, mask, sinks, scale, softcap, rows):
    dsink = q.new_empty(sinks.shape if sinks is not None else (0,),
                        dtype=sinks.dtype if sinks is not None else _acc(q.dtype))
    return _bthd(q, q.shape[-1]), _bthd(k, k.shape[-1]), _bthd(v, v.shape[-1]), dsink


def _setup_context(ctx, inputs, output):
    q, k, v, mask, sinks, scale, softcap, rows = inputs
    ctx.save_for_backward(q, k, v, mask, sinks)
    ctx.mark_non_differentiable(output[1])  # the log-sum-exp is reported, not differentiated
    ctx.scale, ctx.softcap, ctx.rows = scale, softcap, rows


def _backward(ctx, grad, _grad_lse):
    q, k, v, mask, sinks = ctx.saved_tensors
    if ctx.needs_input_grad[3]:
        raise NotImplementedError(f"{OP}: the mask's gradient is not computed (HF's masks need none)")
    dq, dk, dv, dsink = chunked_attention_backward(grad.contiguous(), q, k, v, mask, sinks,
                                                   ctx.scale, ctx.softcap, ctx.rows)
    return dq, dk, dv, None, dsink if sinks is not None else None, None, None, None


chunked_attention.register_autograd(_backward, setup_context=_setup_context)


def reference(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], sinks: Optional[Tensor], scale: float,
              softcap: float) -> Tensor:
    """HF's eager math over the whole [Tq, Tkv] scores (tests; float64 inputs give the float64 answer)."""
    hq = q.shape[1]
    z = (q @ _heads(k, hq).transpose(-1, -2)) * scale
    if softcap:
        z = torch.tanh(z / softcap) * softcap
    if mask is not None:
        z = z + mask.to(z.dtype)
    if sinks is not None:
        z = torch.cat([z, sinks.to(z.dtype).view(1, -1, 1, 1).expand(*z.shape[:-1], 1)], dim=-1)
    p = torch.softmax(z, dim=-1)
    if sinks is not None:
        p = p[..., :-1]
    return p @ _heads(v, hq)
