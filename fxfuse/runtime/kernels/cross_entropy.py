"""Triton kernel for cross-entropy over a chunk of logit rows: row-wise online logsumexp, the
per-row loss, and (optionally) the logits' gradient written in place over the logits.

For row r with target t (``ignore_index`` rows give loss 0 and gradient 0)::

    z      = cap · tanh(x / cap)            (x itself when there is no softcap)
    lse    = log Σ_j exp(z_j)
    loss_r = lse − z_t
    dx_j   = scale · (exp(z_j − lse) − [j = t]) · (1 − (z_j / cap)²)   (last factor with softcap)

Logits are read in their storage dtype and upcast to fp32 right after ``tl.load`` (the CPU
interpreter's bf16 arithmetic is wrong, and fp32 is what HF's ``logits.float()`` computes in);
the gradient is rounded to the storage dtype on the store, as autograd rounds it back through
the ``.float()`` cast. ``scale`` is read from a device scalar (1/#valid for reduction 'mean')
so no host sync is needed. A target outside [0, V) that is not ``ignore_index`` gives a NaN loss:
the kernel cannot raise like eager ``F.cross_entropy`` does, and a NaN is never mistaken for a
result.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch

from .host_math import next_power_of_2
from .lora import triton_available

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - triton is a hard dependency; triton_available() says why
    triton = None
    tl = None

__all__ = ["cross_entropy_rows", "check_cross_entropy_rows", "triton_available"]

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_LOGIT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Interpreter cost is per loop step: one wide block per row keeps the fuzz fast while V > 256
# still takes several steps. On the GPU a 4096-wide block keeps 8 warps busy over a 128k vocab.
_BLOCK_V_MAX = 256 if _INTERPRET else 4096


if triton is not None:

    @triton.jit
    def _softcap(x, cap):
        # cap · tanh(x / cap) from one exp of a non-positive argument (no overflow)
        u = x / cap
        e = tl.exp(-2.0 * tl.abs(u))
        t = (1.0 - e) / (1.0 + e)
        return cap * tl.where(u < 0, -t, t)

    @triton.jit
    def _ce_rows_kernel(logits_ptr, stride_row, target_ptr, loss_ptr, scale_ptr, V, ignore_index, cap,
                        HAS_CAP: tl.constexpr, WITH_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride_row
        target = tl.load(target_ptr + row)
        m = tl.full([], float("-inf"), tl.float32)
        s = tl.full([], 0.0, tl.float32)
        z_t = tl.full([], 0.0, tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            inside = cols < V
            z = tl.load(base + cols, mask=inside, other=0.0).to(tl.float32)
            if HAS_CAP:
                z = _softcap(z, cap)
            z = tl.where(inside, z, float("-inf"))
            # every block holds at least one real column, so m_new is finite for finite logits
            m_new = tl.maximum(m, tl.max(z, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            z_t += tl.sum(tl.where(cols == target, z, 0.0), axis=0)
            m = m_new
        lse = m + tl.log(s)
        valid = target != ignore_index
        in_range = (target >= 0) & (target < V)
        loss = tl.where(valid, tl.where(in_range, lse - z_t, float("nan")), 0.0)
        tl.store(loss_ptr + row, loss)
        if WITH_GRAD:
            # ignored rows get an exact 0 (not 0 · scale: scale is inf when every row is ignored)
            scale = tl.where(valid, tl.load(scale_ptr), 0.0)
            for start in range(0, V, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                inside = cols < V
                z = tl.load(base + cols, mask=inside, other=0.0).to(tl.float32)
                if HAS_CAP:
                    z = _softcap(z, cap)
                g = tl.exp(z - lse) - tl.where(cols == target, 1.0, 0.0)
                if HAS_CAP:
                    t = z / cap
                    g = g * (1.0 - t * t)
                g = tl.where(valid, g * scale, 0.0)
                tl.store(base + cols, g.to(logits_ptr.dtype.element_ty), mask=inside)


def check_cross_entropy_rows(logits, target, losses, scale, *, softcap: float = 0.0, **_) -> Optional[str]:
    """None when `cross_entropy_rows` supports the call, else why not."""
    if not all(isinstance(t, torch.Tensor) for t in (logits, target, losses, scale)):
        return "not supported: logits, target, losses and scale must be tensors"
    if logits.dim() != 2 or logits.dtype not in _LOGIT_DTYPES:
        return f"not supported: logits must be 2-D fp32/fp16/bf16 (got {logits.dim()}-D {logits.dtype})"
    if logits.shape[1] == 0 or logits.stride(1) != 1:
        return "not supported: logit rows must be non-empty and contiguous"
    rows = logits.shape[0]
    if target.dtype != torch.int64 or tuple(target.shape) != (rows,):
        return f"not supported: target must be int64 of shape ({rows},) (got {target.dtype} {tuple(target.shape)})"
    if losses.dtype != torch.float32 or tuple(losses.shape) != (rows,) or not losses.is_contiguous():
        return f"not supported: losses must be a contiguous fp32 ({rows},) buffer"
    if scale.dtype != torch.float32 or scale.numel() != 1:
        return "not supported: scale must be one fp32 element"
    if not target.is_contiguous():
        return "not supported: target must be contiguous"
    if not softcap >= 0.0 or softcap == float("inf"):
        return f"not supported: softcap {softcap} (0 = none, else a positive finite cap)"
    devices = {t.device for t in (logits, target, losses, scale)}
    if len(devices) > 1:
        return f"not supported: tensors on different devices ({', '.join(sorted(map(str, devices)))})"
    why = triton_available(logits.device)
    return f"not supported: {why}" if why else None


def cross_entropy_rows(logits: torch.Tensor, target: torch.Tensor, losses: torch.Tensor, scale: torch.Tensor, *,
                       ignore_index: int = -100, softcap: float = 0.0, with_grad: bool = False) -> None:
    """Write each row's loss into `losses`; with `with_grad`, overwrite `logits` with
    scale · d loss_r / d logits (see the module docstring)."""
    why = check_cross_entropy_rows(logits, target, losses, scale, softcap=softcap)
    if why:
        raise ValueError(why)
    rows, v = logits.shape
    if rows == 0:
        return
    block = min(_BLOCK_V_MAX, max(16, next_power_of_2(v)))
    meta = {} if _INTERPRET else {"num_warps": 8 if block >= 2048 else 4}
    with torch.cuda.device(logits.device) if logits.device.type == "cuda" else contextlib.nullcontext():
        _ce_rows_kernel[(rows,)](logits, logits.stride(0), target, losses, scale, v, int(ignore_index),
                                 float(softcap) if softcap else 1.0, HAS_CAP=bool(softcap), WITH_GRAD=with_grad,
                                 BLOCK_V=block, **meta)
