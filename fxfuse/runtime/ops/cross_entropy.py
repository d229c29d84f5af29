"""`fxfuse::linear_cross_entropy`: a causal-LM head and its loss, `F.cross_entropy(
(hidden · Wᵀ).float(), target)`, without materialising the [T, V] logits.

Tokens are processed in chunks of rows (`chunk_rows`: at most `CHUNK_BYTES` of chunk logits).
Per chunk the lm_head GEMM runs in the model dtype (cuBLAS, as HF's `lm_head`), then a Triton
kernel computes the rows' losses in fp32 and, when the op is asked for the gradient, overwrites
the chunk with d loss / d logits (rounded to the model dtype, as autograd rounds it through
HF's `.float()`), and `dlogits · W` gives that chunk's gradient of the hidden states.

The gradient is computed during the forward (`with_grad=True`), which saves recomputing the
lm_head GEMM in backward; the op returns it as a second, non-differentiable output and the
backward is a cheap aten scale by the incoming gradient. The pass sets `with_grad` only when the
hidden states require grad, so eval / no_grad forwards do not pay for it; called with
`with_grad=False` on inputs that do require grad, the backward recomputes it with the op.
The lm_head weight gets no gradient (the pass declines a trainable lm_head).

`softcap` > 0 applies gemma2's final-logit softcapping cap · tanh(logits / cap) in fp32 after the
upcast (HF rounds the three softcap ops in the model dtype; see docs/numerics.md).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import env, stats
from ..kernels import cross_entropy as K

OP = "fxfuse::linear_cross_entropy"
REDUCTIONS = ("mean", "sum")
# Chunk logits (model dtype) kept alive at once: 256 MiB = 1024 rows of a 128k bf16 vocab. At 4k
# tokens on the 8B shape a 1 GiB chunk (all 4096 rows) was the step's memory peak; GEMMs of 1024 rows
# still run near cuBLAS's ceiling. FXFUSE_CE_CHUNK_MIB overrides it at run time (benchmarks' A/B).
CHUNK_BYTES = 256 << 20


def chunk_bytes() -> int:
    mib = env.get("FXFUSE_CE_CHUNK_MIB")
    if mib is None:
        return CHUNK_BYTES
    if not mib.isdigit() or int(mib) < 1:
        raise ValueError(f"FXFUSE_CE_CHUNK_MIB must be a positive whole number of MiB, not {mib!r}")
    return int(mib) << 20


# Whole GEMM tiles: chunk rows are multiples of this when more than one tile fits
TILE_ROWS = 256
# Tokens from which all-in-one-chunk logits are split in two (each part then has >= TILE_ROWS + 1 rows)
SPLIT_FROM_TOKENS = 4 * TILE_ROWS


def chunk_rows(tokens: int, vocab: int, dtype: torch.dtype, budget: Optional[int] = None) -> int:
    """Rows per chunk: as many as fit `budget` bytes of logits (default: CHUNK_BYTES, or
    FXFUSE_CE_CHUNK_MIB), a multiple of TILE_ROWS when more than one tile fits, never more than the
    tokens. On the default budget, when every token fits one chunk and there are at least
    SPLIT_FROM_TOKENS of them, the first chunk takes half the tokens rounded up to whole tiles and
    the second the rest: one chunk would hold every token's logits, which the op exists to avoid.
    At 1k tokens on the 8B shape that is 125 instead of 250 MiB of logits, and the cudagraphs=True
    step's peak went from 15.98 to 15.91 GiB (H200, bench/RESULTS.md); GEMMs of 512 rows still run
    near cuBLAS's ceiling. An explicit budget (A/B runs, bench/ce_capture_memory.py) is taken as is."""
    explicit = budget is not None or env.get("FXFUSE_CE_CHUNK_MIB") is not None
    per_row = vocab * torch.empty((), dtype=dtype).element_size()
    rows = max(1, (chunk_bytes() if budget is None else budget) // per_row)
    if rows > TILE_ROWS:
        rows -= rows % TILE_ROWS
    if not explicit and rows >= tokens >= SPLIT_FROM_TOKENS:
        rows = -(-tokens // (2 * TILE_ROWS)) * TILE_ROWS  # half the tokens, rounded up to whole tiles
    return max(1, min(rows, tokens))


# ---------------------------------------------------------------- reference (eager) implementation


def linear_cross_entropy_reference(hidden: Tensor, weight: Tensor, target: Tensor, reduction: str, softcap: float,
                                   ignore_index: int, with_grad: bool) -> Tuple[Tensor, Tensor]:
    """HF's math, unchunked: model-dtype GEMM, fp32 upcast, softcap, F.cross_entropy. The gradient
    is written out (an op body runs below autograd): scale·(softmax − onehot), rounded to the
    model dtype like autograd's through `.float()`, times W."""
    logits = hidden @ weight.t()
    z = logits.float()
    if softcap:
        z = torch.tanh(z / softcap) * softcap
    loss = torch.nn.functional.cross_entropy(z, target, ignore_index=ignore_index, reduction=reduction)
    if not with_grad:
        return loss, hidden.new_empty((0, hidden.shape[1]))
    valid = target != ignore_index
    dz = torch.softmax(z, dim=-1)
    dz[valid, target[valid]] -= 1.0
    if reduction == "mean":
        dz /= valid.sum()
    dz[~valid] = 0.0
    if softcap:
        dz *= 1.0 - (z / softcap) ** 2
    return loss, dz.to(hidden.dtype) @ weight


# ---------------------------------------------------------------- kernel implementation


def linear_cross_entropy_chunked(hidden: Tensor, weight: Tensor, target: Tensor, reduction: str, softcap: float,
                                 ignore_index: int, with_grad: bool, rows_per_chunk: int) -> Tuple[Tensor, Tensor]:
    tokens, h = hidden.shape
    losses = torch.empty(tokens, device=hidden.device, dtype=torch.float32)
    n_valid = (target != ignore_index).sum().to(torch.float32)
    # 'mean' divides by the number of non-ignored rows: 0/0 = nan when all are ignored, as eager
    scale = 1.0 / n_valid if reduction == "mean" else torch.ones((), device=hidden.device)
    grad = hidden.new_empty((tokens, h) if with_grad else (0, h))
    wt = weight.t()
    # One chunk buffer, reused: the peak is one chunk of logits by construction, not by the allocator
    # handing a freed chunk's block to the next (also while a CUDA graph records the op).
    buf = hidden.new_empty((min(rows_per_chunk, tokens), weight.shape[0]))
    for start in range(0, tokens, rows_per_chunk):
        end = min(tokens, start + rows_per_chunk)
        logits = torch.mm(hidden[start:end], wt, out=buf[:end - start])
        K.cross_entropy_rows(logits, target[start:end], losses[start:end], scale, ignore_index=ignore_index,
                             softcap=softcap, with_grad=with_grad)
        if with_grad:
            torch.mm(logits, weight, out=grad[start:end])
    total = losses.sum()
    return (total / n_valid if reduction == "mean" else total), grad


def _check(hidden, weight, target, reduction, softcap) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{OP}: reduction must be one of {REDUCTIONS}, not {reduction!r}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"{OP}: hidden [T, H] and weight [V, H] expected, got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"{OP}: hidden {hidden.dtype} and weight {weight.dtype} must share a dtype")
    if target.dim() != 1 or target.shape[0] != hidden.shape[0]:
        raise ValueError(f"{OP}: target must have shape ({hidden.shape[0]},), got {tuple(target.shape)}")
    if softcap < 0:
        raise ValueError(f"{OP}: softcap must be >= 0 (0 = none), got {softcap}")


# ---------------------------------------------------------------- custom op


@torch.library.custom_op(OP, mutates_args=())
def linear_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor, reduction: str, softcap: float,
                         ignore_index: int, with_grad: bool) -> Tuple[Tensor, Tensor]:
    _check(hidden, weight, target, reduction, softcap)
    hidden, target = hidden.contiguous(), target.contiguous()
    rows = chunk_rows(hidden.shape[0], weight.shape[0], hidden.dtype)
    return stats.dispatch(OP, hidden.device,
                          lambda *a: linear_cross_entropy_chunked(*a, rows), linear_cross_entropy_reference,
                          (hidden, weight, target, reduction, softcap, ignore_index, with_grad))


@linear_cross_entropy.register_fake
def _(hidden, weight, target, reduction, softcap, ignore_index, with_grad):
    _check(hidden, weight, target, reduction, softcap)
    return (hidden.new_empty((), dtype=torch.float32),
            hidden.new_empty((hidden.shape[0], hidden.shape[1]) if with_grad else (0, hidden.shape[1])))


def _setup_context(ctx, inputs, output):
    hidden, weight, target, reduction, softcap, ignore_index, with_grad = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.args = (reduction, softcap, ignore_index)
    ctx.with_grad = with_grad
    ctx.save_for_backward(*((output[1],) if with_grad else (hidden, weight, target)))


def _backward(ctx, grad_loss, _):
    if ctx.needs_input_grad[1]:
        raise NotImplementedError(f"{OP} computes no gradient for the lm_head weight")
    if ctx.with_grad:
        (grad,) = ctx.saved_tensors
    else:
        hidden, weight, target = ctx.saved_tensors
        _, grad = torch.ops.fxfuse.linear_cross_entropy(hidden, weight, target, *ctx.args, True)
    return grad * grad_loss, None, None, None, None, None, None


torch.library.register_autograd(OP, _backward, setup_context=_setup_context)
