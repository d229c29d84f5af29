"""`linear32` and `bmm32`: `F.linear` and `torch.bmm` on 16-bit operands with the fp32 accumulator
returned, not rounded.

The fp16_guard pass puts it where a plain linear (not a LoRA site) computes a residual add's branch,
e.g. a down projection that LoRA does not target, and `bmm32` where experts run as one batched matmul
(Llama 4's): an fp16 output past 65504 would be inf before it reaches the fp32 stream. An autograd.Function, not a custom op: AOTAutograd traces its forward and
backward into the graphs. Its own backward because cuBLAS's `mm(..., out_dtype=float32)` (the
forward's GEMM on CUDA; elsewhere an fp32 GEMM on upcast copies) has no derivative in torch 2.11:
the fp32 gradient is rounded to the operands' dtype, and dx = g·W (dW = gᵀ·x, db = Σg where they
train) as the 16-bit linear's backward computes them.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .lora_graph import _no_autocast, mm32

_BMM_OUT_DTYPE = hasattr(torch.ops.aten.bmm, "dtype")  # torch.bmm(a, b, out_dtype=...) (torch >= 2.8)


class _Linear32(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d, weight, bias):
        with _no_autocast(x2d.device.type):
            y = mm32(x2d, weight.t())
            if bias is not None:
                y = y + bias.float()
        ctx.bias_dtype = bias.dtype if bias is not None else None
        # x only for a weight that trains (a frozen base weight needs none)
        ctx.save_for_backward(x2d if ctx.needs_input_grad[1] else None, weight)
        return y

    @staticmethod
    def backward(ctx, g):
        x2d, weight = ctx.saved_tensors
        g16 = g.to(weight.dtype)
        dx = g16 @ weight if ctx.needs_input_grad[0] else None
        dw = g16.t() @ x2d if ctx.needs_input_grad[1] else None
        db = g.sum(0).to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
        return dx, dw, db


def linear32(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    y = _Linear32.apply(x.reshape(-1, x.shape[-1]), weight, bias)
    return y.reshape(*x.shape[:-1], weight.shape[0])


class _Bmm32(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        with _no_autocast(a.device.type):
            if a.is_cuda and _BMM_OUT_DTYPE:
                y = torch.bmm(a, b, out_dtype=torch.float32)
            else:
                y = torch.bmm(a.float(), b.float())
        ctx.dtype = a.dtype
        ctx.save_for_backward(a if ctx.needs_input_grad[1] else None, b if ctx.needs_input_grad[0] else None)
        return y

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        g16 = g.to(ctx.dtype)
        da = torch.bmm(g16, b.transpose(1, 2)) if ctx.needs_input_grad[0] else None
        db = torch.bmm(a.transpose(1, 2), g16) if ctx.needs_input_grad[1] else None
        return da, db


def bmm32(a: Tensor, b: Tensor) -> Tensor:
    return _Bmm32.apply(a, b)
