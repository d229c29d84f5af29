"""`linear32`: `F.linear` on 16-bit operands with the fp32 accumulator returned, not rounded.

The fp16_guard pass puts it where a plain linear (not a LoRA site) computes a residual add's branch,
e.g. a down projection that LoRA does not target: an fp16 output past 65504 would be inf before it
reaches the fp32 stream. A plain function, not a custom op: AOTAutograd traces its GEMM (cuBLAS
`mm(..., out_dtype=float32)` on CUDA, an fp32 GEMM on upcast copies elsewhere) and the gradient,
which autograd rounds to the operands' dtype.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from .lora_graph import mm32


def linear32(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    y = mm32(x.reshape(-1, x.shape[-1]), weight.t())
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*x.shape[:-1], weight.shape[0])
