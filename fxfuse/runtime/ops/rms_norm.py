"""`fxfuse::rms_norm`: RMSNorm over the last dim, optionally fused with the residual add feeding it.

    h = residual + x            (only with a residual; returned, since the residual stream goes on)
    y = round_out(round_rd(h · rstd) · (offset + w)),  rstd = 1 / sqrt(mean(h²) + eps)

`offset` 0 with `round_dtype` = input dtype is the Llama/Qwen/Mistral form (`w * x.to(dtype)`);
offset 1 without rounding is Gemma's (`(x * (1 + w.float())).type_as(x)`). The op returns
[h,] y, rstd (fp32, one per row, saved for backward).

Backward is its own custom op (`fxfuse::rms_norm_backward`): dh in fp32 from dy and the gradient
h gets from its other users, rounded once; x and the residual both receive it. dw only when the
weight requires grad. Numerics: docs/numerics.md.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from .. import stats
from ..kernels import rms_norm as K

OP = "fxfuse::rms_norm"
BWD = "fxfuse::rms_norm_backward"


def _rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])



# ---------------------------------------------------------------- reference (eager) implementation


def rms_norm_reference(x, weight, residual, eps, offset, round_dtype, out_dtype):
    h = x if residual is None else (residual.float() + x.float()).to(x.dtype)
    hf = h.float()
    rstd = torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    n = hf * rstd
    if round_dtype is not None:
        n = n.to(round_dtype).float()
    y = (n * (offset + weight.float())).to(out_dtype)
    return ([h] if residual is not None else []) + [y, rstd.squeeze(-1)]


def rms_norm_backward_reference(dy, dh, h, weight, rstd, offset, round_dtype, need_dw):
    hf, rs = _rows(h).float(), rstd.reshape(-1, 1)
    n = hf * rs
    g = _rows(dy).float() * (offset + weight.float())
    dx = rs * (g - n * (g * n).mean(-1, keepdim=True))
    if dh is not None:
        dx = dx + _rows(dh).float()
    out = [dx.to(h.dtype).reshape(h.shape)]
    if need_dw:
        nr = n.to(round_dtype).float() if round_dtype is not None else n
        out.append((_rows(dy).float() * nr).sum(0).to(weight.dtype))
    return out


# ---------------------------------------------------------------- kernel implementation


def _forward_kernels(x, weight, residual, eps, offset, round_dtype, out_dtype):
    h, y, rstd = K.rms_norm_forward(_rows(x), weight, _rows(residual) if residual is not None else None,
                                    eps, offset, round_dtype, out_dtype)
    lead = x.shape[:-1]
    return ([h.reshape(x.shape)] if h is not None else []) + [y.reshape(x.shape), rstd.reshape(lead)]


def _backward_kernels(dy, dh, h, weight, rstd, offset, round_dtype, need_dw):
    dx, dw = K.rms_norm_backward(_rows(dy), _rows(dh) if dh is not None else None, _rows(h), weight,
                                 rstd.reshape(-1), offset, round_dtype, need_dw)
    return [dx.reshape(h.shape)] + ([dw] if need_dw else [])


# ---------------------------------------------------------------- custom ops


@torch.library.custom_op(OP, mutates_args=())
def rms_norm(x: Tensor, weight: Tensor, residual: Optional[Tensor], eps: float, offset: float,
             round_dtype: Optional[torch.dtype], out_dtype: torch.dtype) -> List[Tensor]:
    # the kernels read rows with unit stride; views such as a transposed head split are copied
    x = x.contiguous()
    residual = residual.contiguous() if residual is not None else None
    args = (x, weight.contiguous(), residual, eps, offset, round_dtype, out_dtype)
    return stats.dispatch(OP, x.device, _forward_kernels, rms_norm_reference, args)


@rms_norm.register_fake
def _(x, weight, residual, eps, offset, round_dtype, out_dtype):
    h = [x.new_empty(x.shape)] if residual is not None else []
    return h + [x.new_empty(x.shape, dtype=out_dtype), x.new_empty(x.shape[:-1], dtype=torch.float32)]


@torch.library.custom_op(BWD, mutates_args=())
def rms_norm_backward(dy: Tensor, dh: Optional[Tensor], h: Tensor, weight: Tensor, rstd: Tensor, offset: float,
                      round_dtype: Optional[torch.dtype], need_dw: bool) -> List[Tensor]:
    dy, h, rstd = dy.contiguous(), h.contiguous(), rstd.contiguous()
    dh = dh.contiguous() if dh is not None else None
    args = (dy, dh, h, weight.contiguous(), rstd, offset, round_dtype, need_dw)
    return stats.dispatch(BWD, h.device, _backward_kernels, rms_norm_backward_reference, args)


@rms_norm_backward.register_fake
def _(dy, dh, h, weight, rstd, offset, round_dtype, need_dw):
    return [h.new_empty(h.shape)] + ([weight.new_empty(weight.shape)] if need_dw else [])


def _setup_context(ctx, inputs, output):
    x, weight, residual, eps, offset, round_dtype, out_dtype = inputs
    ctx.has_residual = residual is not None
    ctx.offset, ctx.round_dtype, ctx.out_dtype = offset, round_dtype, out_dtype
    h = output[0] if residual is not None else x
    ctx.save_for_backward(h, weight, output[-1])


def _backward(ctx, grads):
    h, weight, rstd = ctx.saved_tensors
    dh, dy = (grads[0], grads[1]) if ctx.has_residual else (None, grads[0])
    if dy is None:
        dy = h.new_zeros(h.shape, dtype=ctx.out_dtype)
    need_dw = bool(ctx.needs_input_grad[1])
    out = torch.ops.fxfuse.rms_norm_backward(dy, dh, h, weight, rstd, ctx.offset, ctx.round_dtype, need_dw)
    dx, dw = out[0], (out[1] if need_dw else None)
    return dx, dw, (dx if ctx.has_residual else None), None, None, None, None


torch.library.register_autograd(OP, _backward, setup_context=_setup_context)
