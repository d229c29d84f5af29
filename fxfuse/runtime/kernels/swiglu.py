"""Triton kernels for gated activations: out = act(gate) · up, act = silu or tanh-approximated gelu.

Rounding points are HF's (`act_fn(gate) * up` in the tensors' dtype): the activation is rounded
to the I/O dtype, then the product is rounded again; all arithmetic is fp32. The backward
recomputes the activation from gate (nothing but gate and up is saved) and rounds each gradient
once:  dup = dy · round(act(gate)),  dgate = dy · up · act'(gate).

The tensors are treated as flat arrays of equal shape (any row width; contiguous copies are made
by the op when needed), split in blocks of BLOCK elements.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .host_math import cdiv
from .lora import triton_available
from .rms_norm import round_to, rounding_kind

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}
_BLOCK = 1024


@triton.jit
def _act(g, ACT: tl.constexpr):
    """(act(g), act'(g)) in fp32."""
    if ACT == 0:
        s = 1.0 / (1.0 + tl.exp(-g))
        a = g * s
        da = s * (1.0 + g * (1.0 - s))
    else:
        # 0.5·(1 + tanh(z)) = sigmoid(2z): no cancellation where gelu tends to 0
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        s = 1.0 / (1.0 + tl.exp(-2.0 * z))
        a = g * s
        da = s + g * s * (1.0 - s) * 2.0 * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * g * g)
    return a, da


@triton.jit
def _fwd(G, U, OUT, numel, ACT: tl.constexpr, KIND: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    a, _ = _act(g, ACT)
    tl.store(OUT + offs, round_to(round_to(a, KIND) * u, KIND).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _bwd(DY, G, U, DG, DU, numel, ACT: tl.constexpr, KIND: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    a, da = _act(g, ACT)
    tl.store(DU + offs, round_to(dy * round_to(a, KIND), KIND).to(DU.dtype.element_ty), mask=mask)
    tl.store(DG + offs, round_to(dy * u * da, KIND).to(DG.dtype.element_ty), mask=mask)


def check_swiglu(gate: torch.Tensor, up: torch.Tensor, activation: str, dy: Optional[torch.Tensor] = None) -> Optional[str]:
    """None if the kernels support this call, else the reason."""
    if activation not in ACTIVATIONS:
        return f"not supported: activation {activation!r} (silu, gelu_tanh)"
    for name, t in (("gate", gate), ("up", up), ("dy", dy)):
        if t is None:
            continue
        if t.dtype not in _DTYPES:
            return f"not supported: {name} dtype {t.dtype} (fp32/fp16/bf16 only)"
        if t.shape != gate.shape:
            return f"not supported: {name} shape {tuple(t.shape)} differs from gate's {tuple(gate.shape)}"
        if not t.is_contiguous():
            return f"not supported: {name} is not contiguous"
        if t.device != gate.device:
            return "not supported: tensors on different devices"
    if up.dtype != gate.dtype:
        return f"not supported: gate {gate.dtype} and up {up.dtype} differ"
    return triton_available(gate.device)


def swiglu_forward(gate, up, activation: str = "silu"):
    why = check_swiglu(gate, up, activation)
    if why:
        raise ValueError(why)
    out = torch.empty(gate.shape, device=gate.device, dtype=gate.dtype)
    n = gate.numel()
    if n:
        _fwd[(cdiv(n, _BLOCK),)](gate, up, out, n, ACT=ACTIVATIONS[activation],
                                        KIND=rounding_kind(gate.dtype), BLOCK=_BLOCK, num_warps=4)
    return out


def swiglu_backward(dy, gate, up, activation: str = "silu"):
    """(dgate, dup) in gate's dtype."""
    why = check_swiglu(gate, up, activation, dy)
    if why:
        raise ValueError(why)
    dg = torch.empty(gate.shape, device=gate.device, dtype=gate.dtype)
    du = torch.empty(gate.shape, device=gate.device, dtype=gate.dtype)
    n = gate.numel()
    if n:
        _bwd[(cdiv(n, _BLOCK),)](dy, gate, up, dg, du, n, ACT=ACTIVATIONS[activation],
                                        KIND=rounding_kind(gate.dtype), BLOCK=_BLOCK, num_warps=4)
    return dg, du
