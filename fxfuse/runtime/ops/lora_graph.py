"""`lora_linear_graph`: the math of `fxfuse::lora_linear` (without dropout) as plain torch ops, for
the compiler to schedule.

Measured (bench/RESULTS.md, twenty-first session): 1k on an H200, 6373 tok/s against 4113 with
the op, at 15.88 GiB against 15.83 (with Inductor's buffer reuse off for these graphs: with it,
15.96). So LoraPass uses them below 2048 tokens by default (GRAPH_OPS_BELOW).

Why: at short context the fused op's host time is the step's limit. A custom op costs ~0.5 ms of
Python a forward call and ~0.8 ms a backward call on the H200's host, and a 1k step of the 8B shape
makes ~450 of them; with PEFT's own linears left to Inductor the same step ran 2.15x as fast, but
PEFT's math keeps fp32 copies of the layer inputs and peaked 0.5 GiB higher (bench/RESULTS.md,
nineteenth session). This is the op's math in graph ops: the same GEMMs on the activations as they
are (no fp32 copy of x or dy), fp32 only for the [M, r] products, so Inductor's generated code calls
the GEMMs directly. It is an autograd.Function, not a custom op, on purpose: AOTAutograd traces
its forward and backward into the graphs, where a custom op would stay opaque.

Numerics are those of the op on CUDA (ops/lora.py): every product of an activation (bf16, exact)
with an fp32 operand is one GEMM over the fp32 operand split into three bf16 parts (by bit masks:
see `_top_bf16`), accumulated and returned in fp32 (`torch.mm(..., out_dtype=torch.float32)`;
bf16x3, as the op's kernels); the low-rank term s·xa·Bᵀ is rounded to the activation dtype and
added by addmm to the base GEMM (Inductor may lower an addmm as mm + add: one rounding more); the
low-rank part of dx is one bf16 GEMM over the members' g. Elsewhere (CPU, fp16, fp32, or a torch
without mm's out_dtype) the fp32 operand products are fp32 GEMMs on upcast copies of x and dy
(more memory; and TF32 if the user allows it for fp32 matmuls, below the op's precision).

Dropout is not expressed here (the op draws its mask in-kernel): the LoRA pass keeps the op for
sites with dropout.
"""
from __future__ import annotations

import contextlib

from typing import List, Optional, Sequence

import torch
from torch import Tensor

_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")  # torch.mm(a, b, out_dtype=...) (torch >= 2.8)


def split_path(a: Tensor) -> bool:
    """Whether products with a bf16 activation run as one bf16 GEMM over a split fp32 operand with
    fp32 output (CUDA only); otherwise as an fp32 GEMM on upcast copies."""
    return a.is_cuda and a.dtype == torch.bfloat16 and _MM_OUT_DTYPE


def mm32(a: Tensor, b: Tensor) -> Tensor:
    """a·b accumulated and returned in fp32, both operands in one dtype."""
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    if a.is_cuda and _MM_OUT_DTYPE:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())  # the same products; a host without mm's out_dtype


def wide_output(x2d: Tensor, w: Tensor, b: Optional[Tensor], xa: Tensor, lora_b: Tensor, s: float) -> Tensor:
    """One member's output in fp32 from 16-bit x (the fp16 guard's LoRA sites that join an fp32
    residual stream; here and on the op's cuBLAS path): the base GEMM's fp32 accumulator plus the fp32
    low-rank term s·xa·Bᵀ and bias, never rounded to 16 bits."""
    y = torch.addmm(mm32(x2d, w.t()), xa, lora_b.t().float(), alpha=s)
    return y + b.float() if b is not None else y


def _top_bf16(t: Tensor) -> Tensor:
    """fp32 t with its mantissa cut to bf16's 8 bits (truncation, by the bits): exactly representable
    in bf16. A rounding cast would not do here: Inductor computes `t.to(bf16).float()` inside a
    fused kernel without the rounding (emulate_precision_casts is off), and the split would vanish."""
    return (t.view(torch.int32) & -65536).view(torch.float32)


def split3(t: Tensor) -> List[Tensor]:
    """fp32 t as hi + mid + lo in bf16, each part's value exact in bf16 and their sum t exactly:
    hi its top 8 mantissa bits, mid the next 8, lo the remaining ones (at most 8)."""
    t = t.float()
    hi = _top_bf16(t)
    rest = t - hi  # exact: the bits below hi's
    mid = _top_bf16(rest)
    return [p.to(torch.bfloat16) for p in (hi, mid, rest - mid)]


def dot32(a: Tensor, b: Tensor, split: bool) -> Tensor:
    """a·b in fp32 for an activation a (exact in its dtype) and an fp32 or activation-dtype b.
    split (bf16 a): b in three bf16 parts side by side along the output columns, one GEMM that
    reads a once, the parts' products summed in fp32."""
    if b.dtype == a.dtype:
        return mm32(a, b)
    if not split or a.dtype != torch.bfloat16:
        return torch.mm(a.float(), b.float())
    n = b.shape[1]
    out = mm32(a, torch.cat(split3(b), dim=1))
    return out[:, :n] + out[:, n:2 * n] + out[:, 2 * n:]


def _forward(x2d, weights, biases, lora_as, lora_bs, scalings, out_dtype, split):
    a_all = torch.cat(list(lora_as), dim=0) if len(lora_as) > 1 else lora_as[0]
    xa = dot32(x2d, a_all.t(), split)  # [M, Σr] fp32, one pass over x for the group
    xa_low = xa.to(x2d.dtype)
    outs, off = [], 0
    for w, b, bb, s in zip(weights, biases, lora_bs, scalings):
        r = bb.shape[1]
        if out_dtype == torch.float32 and x2d.dtype != torch.float32:
            outs.append(wide_output(x2d, w, b, xa[:, off:off + r], bb, s))
        else:
            b_low = (bb.float() * s).to(x2d.dtype)  # s·B rounded to the activation dtype, as the op on CUDA
            xa_i = xa_low[:, off:off + r]
            low = torch.addmm(b, xa_i, b_low.t()) if b is not None else torch.mm(xa_i, b_low.t())
            outs.append(torch.addmm(low, x2d, w.t()).to(out_dtype))
        off += r
    return outs, xa, a_all


def _backward(dys, x2d, weights, a_all, a_kinds, lora_bs, xa, scalings, need_dx, split):
    """(dA per member, dB per member, dx or None), by the op's formulas:
    g_i = s_i·dy_i·B_i, dB_i = s_i·dy_iᵀ·xa_i, dA_i = g_iᵀ·x, dx = Σ_i dy_i·W_i + g_i·A_i.
    a_all: the members' A stacked as the forward read them; a_kinds: each A's (rank, dtype)."""
    gs, d_bs, off = [], [], 0
    for dy, bb, s in zip(dys, lora_bs, scalings):
        r = bb.shape[1]
        gs.append(dot32(dy, bb, split) * s)
        d_bs.append((dot32(dy.t(), xa[:, off:off + r], split) * s).to(bb.dtype))
        off += r
    g_all = torch.cat(gs, dim=1) if len(gs) > 1 else gs[0]
    # dAᵀ = xᵀ·g for the whole group in one pass over x, transposed back (A's gradient layout)
    d_a_all = dot32(x2d.t(), g_all, split).t()
    d_as, off = [], 0
    for r, dtype in a_kinds:
        d_as.append(d_a_all[off:off + r].to(dtype).contiguous())
        off += r
    dx = None
    if need_dx:
        dx = torch.mm(g_all.to(x2d.dtype), a_all.to(x2d.dtype))
        for dy, w in zip(dys, weights):
            dx = torch.addmm(dx, dy, w)
    return d_as, d_bs, dx


def _no_autocast(device_type: str):
    """Autocast off on this device. The meta device (where `fxfuse inspect` traces full-size
    models) has no autocast to turn off, and torch.autocast raises there. (A string test, not
    torch.amp.is_autocast_available: dynamo cannot trace that builtin and would break the graph.)"""
    if device_type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


class _LoraGraph(torch.autograd.Function):
    """Tensors flat in the arguments (autograd differentiates positional tensors only):
    x, n weights, n biases (or None), n lora_A, n lora_B."""

    @staticmethod
    def forward(ctx, meta, x, *tensors):
        n, scalings, out_dtype = meta
        weights, biases = tensors[:n], tensors[n:2 * n]
        lora_as, lora_bs = tensors[2 * n:3 * n], tensors[3 * n:4 * n]
        x2d = x.reshape(-1, x.shape[-1])
        split = split_path(x2d)
        # the dtypes are the pass's choice (it casts operands as autocast would); autocast must not
        # round the fp32 products to its dtype
        with _no_autocast(x.device.type):
            outs, xa, a_all = _forward(x2d, weights, biases, lora_as, lora_bs, scalings, out_dtype, split)
        ctx.meta, ctx.split, ctx.x_shape = meta, split, x.shape
        ctx.a_kinds = [(a.shape[0], a.dtype) for a in lora_as]
        ctx.save_for_backward(x2d, xa, a_all, *weights, *lora_bs)
        return tuple(outs)  # 2-D: views made in here could not be modified in place by the caller

    @staticmethod
    def backward(ctx, *grads):
        n, scalings, _ = ctx.meta
        x2d, xa, a_all, *rest = ctx.saved_tensors
        weights, lora_bs = rest[:n], rest[n:2 * n]
        dys = [g.reshape(-1, g.shape[-1]).to(x2d.dtype) for g in grads]
        need_dx = ctx.needs_input_grad[1]
        with _no_autocast(x2d.device.type):
            d_as, d_bs, dx = _backward(dys, x2d, weights, a_all, ctx.a_kinds, lora_bs, xa, scalings, need_dx,
                                       ctx.split)
        dx = dx.reshape(ctx.x_shape) if dx is not None else None
        return (None, dx, *([None] * n), *([None] * n), *d_as, *d_bs)


def lora_linear_graph(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Optional[Tensor]],
                      lora_as: Sequence[Tensor], lora_bs: Sequence[Tensor], scalings: Sequence[float],
                      out_dtype: torch.dtype) -> tuple:
    """y_i = x·W_iᵀ (+ b_i) + s_i·(x·A_iᵀ)·B_iᵀ for each member, as a tuple; W_i and b_i frozen
    (they get no gradient, as with the op)."""
    n = len(weights)
    if not (len(biases) == len(lora_as) == len(lora_bs) == len(scalings) == n) or n == 0:
        raise ValueError("lora_linear_graph: weights, biases, lora_as, lora_bs and scalings need one entry per member")
    meta = (n, tuple(float(s) for s in scalings), out_dtype)
    outs = _LoraGraph.apply(meta, x, *weights, *biases, *lora_as, *lora_bs)
    # reshaped out here, so that a caller's in-place op on an output (Llama 4's `out.add_(routed)`
    # on its shared expert) meets an ordinary view, not a custom Function's view output
    return tuple(y.reshape(*x.shape[:-1], y.shape[-1]) for y in outs)
