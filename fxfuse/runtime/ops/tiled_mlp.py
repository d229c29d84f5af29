"""`fxfuse::tiled_mlp`: a gated MLP with PEFT LoRA on gate, up and down, run over token chunks.

    y = down(act(gate(x)) * up(x)),   each projection an `fxfuse::lora_linear` (base + low-rank)

At long context the [T, intermediate] tensors dominate a decoder layer's memory (at 320k tokens on
the Llama-8B shape gate, up and their product are ~9 GiB each, and the backward holds several
more). This op never holds them for more than `rows_per_chunk` tokens: the forward keeps nothing
but its inputs, and the backward (`fxfuse::tiled_mlp_backward`, its own custom op) recomputes
each chunk's gate/up/product before its gradients. The price is one more MLP forward per step,
so the pass that emits this op only does so from a token count up (passes/mlp_tiling.py).

Numerics are those of the untiled ops chunk by chunk: each chunk calls `fxfuse::lora_linear` and
its backward (same kernels, same rounding points: the activation in the I/O dtype, then the
product, as HF computes it); the LoRA weight gradients are summed over chunks in fp32 and rounded
to the adapter dtype once (bf16 adapters too). Dropout on
these projections and base biases are not supported (the pass declines them).
"""
from __future__ import annotations

from typing import List

import torch
from torch import Tensor

from ..kernels import lora as K
from .lora import split_lora_a_grads  # importing ops.lora registers torch.ops.fxfuse.lora_linear

OP = "fxfuse::tiled_mlp"
BWD = "fxfuse::tiled_mlp_backward"
ACTIVATIONS = ("silu", "gelu_tanh")


def _act(g: Tensor, activation: str) -> Tensor:
    if activation == "silu":
        return torch.nn.functional.silu(g)
    return torch.nn.functional.gelu(g, approximate="tanh")


def _act_backward(d: Tensor, g: Tensor, activation: str) -> Tensor:
    if activation == "silu":
        return torch.ops.aten.silu_backward(d, g)
    return torch.ops.aten.gelu_backward(d, g, approximate="tanh")


def _check(x, weights, lora_as, lora_bs, scalings, activation, rows_per_chunk):
    if activation not in ACTIVATIONS:
        raise ValueError(f"{OP}: activation must be one of {ACTIVATIONS}, not {activation!r}")
    if len(weights) != 3 or len(lora_as) != 3 or len(lora_bs) != 3 or len(scalings) != 3:
        raise ValueError(f"{OP}: expects gate, up and down (3 weights, 3 lora_A, 3 lora_B, 3 scalings)")
    if rows_per_chunk < 1:
        raise ValueError(f"{OP}: rows_per_chunk must be >= 1, got {rows_per_chunk}")
    (wg, wu, wd), h = weights, x.shape[-1]
    if wg.shape != wu.shape or wg.shape[1] != h or wd.shape != (h, wg.shape[0]):
        raise ValueError(f"{OP}: weights do not form a gated MLP over hidden size {h}: gate {tuple(wg.shape)}, "
                         f"up {tuple(wu.shape)}, down {tuple(wd.shape)}")


def _gate_up(x2d, weights, lora_as, lora_bs, scalings, dtype):
    """gate, up and their fp32 low-rank products xa for one chunk (one grouped LoRA op)."""
    g, u, xa = torch.ops.fxfuse.lora_linear(x2d, list(weights[:2]), [None, None], list(lora_as[:2]),
                                            list(lora_bs[:2]), list(scalings[:2]), [0.0, 0.0], None, dtype)
    return g, u, xa


def _chunks(m: int, rows: int):
    return ((s, min(m, s + rows)) for s in range(0, m, rows))


@torch.library.custom_op(OP, mutates_args=())
def tiled_mlp(x: Tensor, weights: List[Tensor], lora_as: List[Tensor], lora_bs: List[Tensor],
              scalings: List[float], activation: str, rows_per_chunk: int, mid_dtype: torch.dtype,
              out_dtype: torch.dtype) -> Tensor:
    _check(x, weights, lora_as, lora_bs, scalings, activation, rows_per_chunk)
    x2d = x.reshape(-1, x.shape[-1])
    out = x2d.new_empty((x2d.shape[0], weights[2].shape[0]), dtype=out_dtype)
    for s, e in _chunks(x2d.shape[0], rows_per_chunk):
        g, u, _ = _gate_up(x2d[s:e], weights, lora_as, lora_bs, scalings, mid_dtype)
        h = _act(g, activation) * u
        del g, u
        y, _ = torch.ops.fxfuse.lora_linear(h, [weights[2]], [None], [lora_as[2]], [lora_bs[2]], [scalings[2]],
                                            [0.0], None, out_dtype)
        out[s:e] = y
    return out.reshape(*x.shape[:-1], weights[2].shape[0])


@tiled_mlp.register_fake
def _(x, weights, lora_as, lora_bs, scalings, activation, rows_per_chunk, mid_dtype, out_dtype):
    return x.new_empty((*x.shape[:-1], weights[2].shape[0]), dtype=out_dtype)


def _xa(h: Tensor, a: Tensor) -> Tensor:
    """h·Aᵀ in fp32, as `fxfuse::lora_linear` computes it (its backward needs it)."""
    if K.triton_available(h.device) is None:
        return K.skinny_matmul(h, a)
    return h.float() @ a.float().t()


@torch.library.custom_op(BWD, mutates_args=())
def tiled_mlp_backward(dy: Tensor, x: Tensor, weights: List[Tensor], lora_as: List[Tensor], lora_bs: List[Tensor],
                       scalings: List[float], activation: str, rows_per_chunk: int, mid_dtype: torch.dtype,
                       need_dx: bool) -> List[Tensor]:
    x2d, dy2d = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    # The per-chunk gradient ops get fp32 copies of bf16/fp16 adapters (exact casts), so they return
    # fp32 dA/dB: the sum over chunks is rounded to the adapter dtype once, as the untiled op rounds.
    # The forward recompute keeps the adapters as they are (same xa as the forward computed).
    as32 = [a.float() for a in lora_as]
    bs32 = [b.float() for b in lora_bs]
    d_as = [torch.zeros(a.shape, dtype=torch.float32, device=a.device) for a in lora_as]
    d_bs = [torch.zeros(b.shape, dtype=torch.float32, device=b.device) for b in lora_bs]
    dx = torch.empty_like(x2d) if need_dx else None
    for s, e in _chunks(x2d.shape[0], rows_per_chunk):
        xc = x2d[s:e]
        g, u, xa_gu = _gate_up(xc, weights, lora_as, lora_bs, scalings, mid_dtype)
        a = _act(g, activation)
        h = a * u
        (da_d, db_d, dh) = torch.ops.fxfuse.lora_linear_backward(  # da_d: [r, K] fp32, one member
            [dy2d[s:e]], h, [weights[2]], [as32[2]], [bs32[2]], _xa(h, lora_as[2]), [scalings[2]], [0.0],
            None, True)
        del h
        # autograd of act(gate) * up, in the I/O dtype as eager computes it
        du = dh * a
        dg = _act_backward(dh * u, g, activation)
        del a, g, u, dh
        grads = torch.ops.fxfuse.lora_linear_backward([dg, du], xc, list(weights[:2]), as32[:2], bs32[:2], xa_gu,
                                                      list(scalings[:2]), [0.0, 0.0], None, need_dx)
        for i, d in enumerate((*split_lora_a_grads(grads[0], as32[:2]), da_d)):
            d_as[i] += d
        for i, d in enumerate((grads[1], grads[2], db_d)):
            d_bs[i] += d
        if need_dx:
            dx[s:e] = grads[3]
    out = [d.to(a.dtype) for d, a in zip(d_as, lora_as)] + [d.to(b.dtype) for d, b in zip(d_bs, lora_bs)]
    if need_dx:
        out.append(dx.reshape(x.shape))
    return out


@tiled_mlp_backward.register_fake
def _(dy, x, weights, lora_as, lora_bs, scalings, activation, rows_per_chunk, mid_dtype, need_dx):
    out = [a.new_empty(a.shape) for a in lora_as] + [b.new_empty(b.shape) for b in lora_bs]
    if need_dx:
        out.append(x.new_empty(x.shape))
    return out


def _setup_context(ctx, inputs, output):
    x, weights, lora_as, lora_bs, scalings, activation, rows_per_chunk, mid_dtype, out_dtype = inputs
    ctx.args = (list(scalings), activation, rows_per_chunk, mid_dtype)
    ctx.save_for_backward(x, *weights, *lora_as, *lora_bs)


def _backward(ctx, dy):
    x, *rest = ctx.saved_tensors
    weights, lora_as, lora_bs = rest[:3], rest[3:6], rest[6:9]
    need_dx = bool(ctx.needs_input_grad[0])
    out = torch.ops.fxfuse.tiled_mlp_backward(dy, x, list(weights), list(lora_as), list(lora_bs), *ctx.args, need_dx)
    return (out[6] if need_dx else None), [None] * 3, list(out[:3]), list(out[3:6]), None, None, None, None, None


torch.library.register_autograd(OP, _backward, setup_context=_setup_context)
