"""Triton kernels for RMSNorm, optionally fused with the residual add that feeds it.

Forward, per row of width N (``o`` = weight offset: 0 for the Llama form, 1 for Gemma's
``1 + w``; ``rd`` = the dtype HF rounds the normalized value to before the weight multiply, or
none; every rounding point below is one of HF's)::

    h    = round_x(residual + x)          (only with a residual; the add is computed in fp32)
    rstd = 1 / sqrt(mean(h²) + eps)       (fp32; saved for backward, one float per row)
    y    = round_out(round_rd(h · rstd) · (o + w))

Backward (fp32 throughout, one rounding per output; ``n = h·rstd``, ``g = dy·(o + w)``)::

    dh = rstd · (g − n · mean(g·n)) (+ the gradient h receives from its other users)
    dw = Σ_rows dy · round_rd(n)

Rows are processed in column blocks of BLOCK (a power of two); a row wider than BLOCK takes
several blocks (the forward loops over them twice; the backward splits into a per-row dot
product and a (row chunk, column block) kernel that also accumulates dw partials in registers).

bf16 results are rounded to nearest-even in fp32 with integer ops before the store: the CPU
interpreter truncates fp32 -> bf16 casts and stores, and a value already on the bf16 grid
stores exactly there and on the GPU alike.

Launchers check their inputs and raise ``ValueError("not supported: ...")``; ``check_*`` return
the reason (or None) so callers can decline instead of guessing.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .host_math import cdiv, next_power_of_2
from .lora import triton_available

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_WIDTH = 1 << 17  # one program walks a whole row; wider rows would want a split-row reduction
# GPU: a Llama/Qwen hidden row (<= 8192) is one block; the interpreter pays per program and step.
_MAX_BLOCK = 1024 if _INTERPRET else 8192


def rounding_kind(dtype: Optional[torch.dtype]) -> int:
    """0: stay fp32 (or no rounding), 1: round to fp16, 2: round to bf16."""
    return {None: 0, torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[dtype]


@triton.jit
def round_to(v, KIND: tl.constexpr):
    """Round fp32 values to the grid of fp16 (KIND 1) or bf16 (KIND 2), nearest-even, in fp32."""
    if KIND == 1:
        v = v.to(tl.float16).to(tl.float32)
    elif KIND == 2:
        bits = v.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        v = tl.where(v != v, v, bits.to(tl.float32, bitcast=True))
    return v


@triton.jit
def _fwd(X, R, W, Y, H, RSTD, stride_x, stride_r, stride_y, stride_h, N, eps, offset,
         HAS_RES: tl.constexpr, H_KIND: tl.constexpr, RD_KIND: tl.constexpr, Y_KIND: tl.constexpr,
         BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols0 = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for b in range(0, tl.cdiv(N, BLOCK)):
        cols = b * BLOCK + cols0
        mask = cols < N
        h = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            h = round_to(h + tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32), H_KIND)
            tl.store(H + row * stride_h + cols, h.to(H.dtype.element_ty), mask=mask)
        acc += h * h
    rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / N + eps)
    tl.store(RSTD + row, rstd)
    for b in range(0, tl.cdiv(N, BLOCK)):
        cols = b * BLOCK + cols0
        mask = cols < N
        # recompute the sum rather than read back this program's own stores
        h = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            h = round_to(h + tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32), H_KIND)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        y = round_to(round_to(h * rstd, RD_KIND) * (offset + w), Y_KIND)
        tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_dot(DY, H, W, RSTD, C, stride_dy, stride_h, N, offset, BLOCK: tl.constexpr):
    """C[row] = mean(g·n) with g = dy·(o + w), n = h·rstd."""
    row = tl.program_id(0).to(tl.int64)
    cols0 = tl.arange(0, BLOCK)
    rstd = tl.load(RSTD + row)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for b in range(0, tl.cdiv(N, BLOCK)):
        cols = b * BLOCK + cols0
        mask = cols < N
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        h = tl.load(H + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        acc += dy * (offset + w) * (h * rstd)
    tl.store(C + row, tl.sum(acc, axis=0) / N)


@triton.jit
def _bwd_dx(DY, DH, H, W, RSTD, C, DX, DWP, stride_dy, stride_dh, stride_h, stride_dx, M, N, offset,
            ROWS, HAS_DH: tl.constexpr, HAS_DW: tl.constexpr, RD_KIND: tl.constexpr,
            DX_KIND: tl.constexpr, BLOCK: tl.constexpr):
    """Program (i, j): rows [i·ROWS, (i+1)·ROWS) x column block j; dw partials go to DWP[i, cols]."""
    pid_m = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < N
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, ROWS):
        row = pid_m.to(tl.int64) * ROWS + i
        inside = row < M
        mask = cmask & inside
        rstd = tl.load(RSTD + row, mask=inside, other=0.0)
        c = tl.load(C + row, mask=inside, other=0.0)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        n = tl.load(H + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32) * rstd
        dx = rstd * (dy * (offset + w) - n * c)
        if HAS_DH:
            dx += tl.load(DH + row * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row * stride_dx + cols, round_to(dx, DX_KIND).to(DX.dtype.element_ty), mask=mask)
        if HAS_DW:
            dw += dy * round_to(n, RD_KIND)
    if HAS_DW:
        tl.store(DWP + pid_m.to(tl.int64) * N + cols, dw, mask=cmask)


# --------------------------------------------------------------------------------- launchers


def _block(n: int, block: Optional[int]) -> int:
    return block if block is not None else min(next_power_of_2(n), _MAX_BLOCK)


def _warps(block: int) -> int:
    return max(1, min(16, block // 256))


def check_rms_norm(x: torch.Tensor, weight: torch.Tensor, residual: Optional[torch.Tensor],
                   round_dtype: Optional[torch.dtype], out_dtype: torch.dtype,
                   block: Optional[int] = None) -> Optional[str]:
    """None if the kernels support this call, else the reason (x, residual: [M, N], weight: [N])."""
    tensors = {"x": x, "weight": weight} | ({"residual": residual} if residual is not None else {})
    for name, t in tensors.items():
        if t.dtype not in _DTYPES:
            return f"not supported: {name} dtype {t.dtype} (fp32/fp16/bf16 only)"
    for dt in (round_dtype, out_dtype):
        if dt is not None and dt not in _DTYPES:
            return f"not supported: dtype {dt} (fp32/fp16/bf16 only)"
    if x.dim() != 2 or weight.dim() != 1:
        return "not supported: x must be 2-D [rows, width] and weight 1-D"
    m, n = x.shape
    if weight.shape[0] != n:
        return f"not supported: weight of {weight.shape[0]} for rows of width {n}"
    if not 1 <= n <= MAX_WIDTH:
        return f"not supported: row width {n} outside [1, {MAX_WIDTH}]"
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        return "not supported: residual must have x's shape and dtype"
    if any(t.stride(-1) != 1 for t in tensors.values()):
        return "not supported: rows must be contiguous (last-dim stride 1)"
    if block is not None and (block < 16 or block & (block - 1)):
        return f"not supported: block {block} is not a power of two >= 16"
    if len({t.device for t in tensors.values()}) > 1:
        return "not supported: tensors on different devices"
    return triton_available(x.device)


def rms_norm_forward(x, weight, residual, eps: float, offset: float, round_dtype, out_dtype, block=None):
    """(h or None, y, rstd): h = residual + x rounded to x's dtype, y the normalized rows, rstd [M] fp32."""
    why = check_rms_norm(x, weight, residual, round_dtype, out_dtype, block)
    if why:
        raise ValueError(why)
    m, n = x.shape
    y = torch.empty((m, n), device=x.device, dtype=out_dtype)
    rstd = torch.empty((m,), device=x.device, dtype=torch.float32)
    h = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else None
    bl = _block(n, block)
    if m:
        _fwd[(m,)](x, residual if residual is not None else x, weight, y, h if h is not None else y, rstd,
                   x.stride(0), residual.stride(0) if residual is not None else 0, y.stride(0),
                   h.stride(0) if h is not None else 0, n, float(eps), float(offset),
                   HAS_RES=residual is not None, H_KIND=rounding_kind(x.dtype), RD_KIND=rounding_kind(round_dtype),
                   Y_KIND=rounding_kind(out_dtype), BLOCK=bl, num_warps=_warps(bl))
    return h, y, rstd


def _row_chunk(m: int, col_blocks: int, device: torch.device) -> int:
    """Rows per backward program: about four programs per SM over the whole grid."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    programs_m = max(1, 4 * sms // col_blocks)
    return max(1, cdiv(m, programs_m))


def rms_norm_backward(dy, dh, h, weight, rstd, offset: float, round_dtype, need_dw: bool, block=None):
    """(dx, dw or None): dx in h's dtype (dh, the gradient of h's other users, added in fp32),
    dw in weight's dtype, summed over rows in fp32."""
    why = check_rms_norm(h, weight, None, round_dtype, h.dtype, block)
    for name, g in (("dy", dy), ("dh", dh)):
        if why is None and g is not None and (g.shape != h.shape or g.dtype not in _DTYPES or g.stride(-1) != 1):
            why = f"not supported: {name} must be a fp32/fp16/bf16 tensor shaped like h with contiguous rows"
    if why is None and (rstd.shape != (h.shape[0],) or rstd.dtype != torch.float32 or not rstd.is_contiguous()):
        why = "not supported: rstd must be [rows] fp32"
    if why:
        raise ValueError(why)
    m, n = h.shape
    dx = torch.empty((m, n), device=h.device, dtype=h.dtype)
    if m == 0:
        return dx, (torch.zeros_like(weight) if need_dw else None)
    bl = _block(n, block)
    c = torch.empty((m,), device=h.device, dtype=torch.float32)
    _bwd_dot[(m,)](dy, h, weight, rstd, c, dy.stride(0), h.stride(0), n, float(offset), BLOCK=bl,
                   num_warps=_warps(bl))
    col_blocks = cdiv(n, bl)
    rows = _row_chunk(m, col_blocks, h.device)
    programs_m = cdiv(m, rows)
    dwp = torch.empty((programs_m, n), device=h.device, dtype=torch.float32) if need_dw else c
    _bwd_dx[(programs_m, col_blocks)](
        dy, dh if dh is not None else dy, h, weight, rstd, c, dx, dwp, dy.stride(0),
        dh.stride(0) if dh is not None else 0, h.stride(0), dx.stride(0), m, n, float(offset),
        ROWS=rows, HAS_DH=dh is not None, HAS_DW=need_dw, RD_KIND=rounding_kind(round_dtype),
        DX_KIND=rounding_kind(h.dtype), BLOCK=bl, num_warps=_warps(bl))
    return dx, (dwp.sum(0).to(weight.dtype) if need_dw else None)
