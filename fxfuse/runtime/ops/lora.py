"""`fxfuse::lora_linear`: a group of PEFT LoRA linears that share one input, as one custom op.

For member i:  y_i = x·W_iᵀ (+ b_i) + s_i · (drop_i(x)·A_iᵀ)·B_iᵀ,  drop_i(x) = M_i ⊙ x / (1 − p_i)
with the dropout mask M_i drawn in-kernel from `seed` (an input of the op), so a recomputation
under activation checkpointing sees the same mask. The op returns the n outputs and, last, the
fp32 products drop_i(x)·A_iᵀ side by side ([M, Σr]); backward reuses them (they are tiny).

Backward is its own custom op (`fxfuse::lora_linear_backward`) so AOTAutograd keeps it opaque:
  g_i = dy_i·B_i,  dB_i = s_i·dy_iᵀ·(drop_i(x)·A_iᵀ),  dA_i = s_i·g_iᵀ·drop_i(x),
  dx = Σ_i dy_i·W_i + M_i ⊙ (s_i·g_i·A_i) / (1 − p_i).
It returns the members' dA stacked as one fp32 [Σr, K] tensor: without dropout one pass over x
computes them all ([g_1 … g_n]ᵀ·x, in chunks of members up to the kernels' rank limit), and a
custom op's outputs may not alias, so the autograd formula splits it (and casts to the adapters'
dtype) outside the op; fp32 adapters' gradients are then disjoint row slices of that one tensor.
The frozen base weight and bias get no gradient (the pass declines sites where they train).

Precision (docs/numerics.md): every product accumulates in fp32; a bf16/fp32 dot runs as bf16x3
on the GPU (tf32x3 with FXFUSE_LORA_FP32_DOT=tf32x3). Elsewhere the fused Triton GEMM adds the low-rank term to the base accumulator and rounds
once. On CUDA the base GEMM is cuBLAS and the low-rank term, computed from xa and s·B rounded to the
activation dtype, is its C operand; there the dx of a group's members accumulates in the activation
dtype, one rounding per member, as eager autograd does.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from .. import env, stats
from ..kernels import lora as K
from ..kernels import lora_expand as KE
from .lora_graph import wide_output

OP = "fxfuse::lora_linear"
_SEED_STRIDE = 7919  # members draw independent masks from one seed


def member_seed(seed: int, i: int) -> int:
    return (seed + _SEED_STRIDE * i) % (2**31 - 1)


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t in dtype; t itself when it is already (a no-op `.to` still costs ~2 us of argument parsing, and
    the op's host time is the short-context step's limit)."""
    return t if t.dtype == dtype else t.to(dtype)


def _seed(seed: Optional[Tensor]) -> int:
    return int(seed.item()) if seed is not None else 0


def gemm_strategy(device: torch.device) -> str:
    """Which GEMM carries the base product: our fused Triton kernel, or cuBLAS with the low-rank
    term accumulated into its output (beta=1 epilogue). On the H100 cuBLAS won all 12 forward
    shapes of the 8B model (by 5-45%) and lost 5 of 12 backward shapes by 1-12% (bench/RESULTS.md,
    LoRA GEMM table), so CUDA takes cuBLAS everywhere; the interpreter runs the fused kernel.
    FXFUSE_LORA_GEMM=triton|cublas overrides."""
    forced = env.get("FXFUSE_LORA_GEMM", "auto")
    if forced in ("triton", "cublas"):
        return forced
    if forced != "auto":
        raise ValueError(f"FXFUSE_LORA_GEMM must be auto, triton or cublas, not {forced!r}")
    return "cublas" if device.type == "cuda" else "triton"


# ---------------------------------------------------------------- reference (eager) implementation


def lora_linear_reference(x, weights, biases, lora_as, lora_bs, scalings, dropout_ps, seed, out_dtype):
    """Eager math with the same semantics (fp32 low-rank, one rounding) and the kernels' dropout
    mask (`dropout_mask` reproduces it on the host when Triton cannot run)."""
    x2d = _flat(x)
    xa_all = lora_xa_reference(x, lora_as, dropout_ps, seed)
    outs, off = [], 0
    for w, b, a, bb, s in zip(weights, biases, lora_as, lora_bs, scalings):
        xa = xa_all[:, off:off + a.shape[0]]
        off += a.shape[0]
        acc = x2d.float() @ w.float().t() + s * (xa @ bb.float().t())
        if b is not None:
            acc = acc + b.float()
        outs.append(acc.to(out_dtype).reshape(*x.shape[:-1], w.shape[0]))
    return outs + [xa_all]


def lora_xa_reference(x, lora_as, dropout_ps, seed):
    """The op's last output alone: drop_i(x)·A_iᵀ side by side, fp32."""
    x2d = _flat(x)
    xas = []
    for i, (a, p) in enumerate(zip(lora_as, dropout_ps)):
        xd = x2d.float()
        if p > 0:
            keep = K.dropout_mask(x2d.shape[0], x2d.shape[1], p, member_seed(_seed(seed), i), x.device)
            xd = xd * keep / (1 - p)
        xas.append(xd @ a.float().t())
    return torch.cat(xas, dim=1)


def lora_linear_backward_reference(dys, x, weights, lora_as, lora_bs, xa, scalings, dropout_ps, seed, need_dx):
    x2d = _flat(x).float()
    dx = torch.zeros_like(x2d) if need_dx else None
    d_as, d_bs, off = [], [], 0
    for i, (w, a, b, s, p) in enumerate(zip(weights, lora_as, lora_bs, scalings, dropout_ps)):
        r = a.shape[0]
        dy = _flat(dys[i]).float()
        xa_i = xa[:, off:off + r]
        off += r
        keep = None
        xd = x2d
        if p > 0:
            keep = K.dropout_mask(x2d.shape[0], x2d.shape[1], p, member_seed(_seed(seed), i), x.device)
            xd = x2d * keep / (1 - p)
        g = dy @ b.float()
        d_bs.append((s * dy.t() @ xa_i).to(b.dtype))
        d_as.append(s * g.t() @ xd)
        if need_dx:
            low = s * (g @ a.float())
            if keep is not None:
                low = low * keep / (1 - p)
            dx += dy @ w.float() + low
    out = [torch.cat(d_as, dim=0)] + d_bs
    if need_dx:
        out.append(dx.to(x.dtype).reshape(x.shape))
    return out


# ---------------------------------------------------------------- kernel implementation


def rank_chunks(ranks: List[int]) -> List[tuple]:
    """Consecutive member ranges [i, j) whose ranks sum to at most the kernels' MAX_RANK (each member
    is at most MAX_RANK: the LoRA pass declines larger ones), so a group's members share launches
    without one launch exceeding the kernels' rank limit."""
    chunks, start, total = [], 0, 0
    for i, r in enumerate(ranks):
        if total + r > K.MAX_RANK and i > start:
            chunks.append((start, i))
            start, total = i, 0
        total += r
    chunks.append((start, len(ranks)))
    return chunks


def _xa_kernels(x, lora_as, dropout_ps, seed):
    x2d = _flat(x)
    if all(p == 0 for p in dropout_ps):
        # one pass over x per chunk of members (all of them up to MAX_RANK in all)
        parts = [K.skinny_matmul(x2d, torch.cat(lora_as[i:j], dim=0) if j - i > 1 else lora_as[i])
                 for i, j in rank_chunks([a.shape[0] for a in lora_as])]
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    xa = torch.empty(x2d.shape[0], sum(a.shape[0] for a in lora_as), device=x.device, dtype=torch.float32)
    off, seed_i = 0, _seed(seed)
    for i, (a, p) in enumerate(zip(lora_as, dropout_ps)):
        xa[:, off:off + a.shape[0]] = K.skinny_matmul(x2d, a, p=p, seed=member_seed(seed_i, i))
        off += a.shape[0]
    return xa


def _expand_on() -> bool:
    """FXFUSE_LORA_EXPAND=1 (read per call; default 0): on CUDA the members' low-rank terms come from one
    `lowrank_expand` launch per GROUP_MAX members instead of torch casts and GEMMs. Off by default: the 4k step
    was no faster with it (it is GPU-bound there; its host-time effect was mixed: bench/RESULTS.md)."""
    return env.flag("FXFUSE_LORA_EXPAND", False)


def _low_rank_terms(x, xa, biases, lora_bs, scalings, ranks):
    """Each member's s·xa_i·B_iᵀ + bias_i in x's dtype, by `lowrank_expand` (up to GROUP_MAX members a
    launch), or None where it declines the members (e.g. adapters of mixed dtypes): the caller then
    takes the per-member torch path, the same math with two more roundings."""
    calls, col = [], 0
    for c in range(0, len(lora_bs), KE.GROUP_MAX):
        part = slice(c, c + KE.GROUP_MAX)
        width = sum(ranks[part])
        args = (xa[:, col:col + width], lora_bs[part], scalings[part], biases[part], x.dtype)
        if KE.check_lowrank_expand(*args) is not None:
            return None  # before any launch: every chunk is checked first
        calls.append(args)
        col += width
    return [y for args in calls for y in KE.lowrank_expand(*args, checked=True)]


def _forward_kernels(x, weights, biases, lora_as, lora_bs, scalings, dropout_ps, seed, out_dtype):
    x2d = _flat(x)
    ranks = [a.shape[0] for a in lora_as]
    xa = _xa_kernels(x, lora_as, dropout_ps, seed)
    xa_low = None
    strategy = gemm_strategy(x.device)
    if strategy == "cublas" and out_dtype == torch.float32 and x.dtype != torch.float32:
        return _wide_outputs(x, xa, weights, biases, lora_bs, scalings, ranks) + [xa]
    if strategy == "cublas" and _expand_on():
        lows = _low_rank_terms(x, xa, biases, lora_bs, scalings, ranks)
        if lows is not None:
            # the low-rank term (and bias) is C of the base GEMM, accumulated in place (beta=1 epilogue)
            return [_as(y.addmm_(x2d, w.t()), out_dtype).reshape(*x.shape[:-1], w.shape[0])
                    for y, w in zip(lows, weights)] + [xa]
    outs, off = [], 0
    for w, b, bb, s, r in zip(weights, biases, lora_bs, scalings, ranks):
        xa_i = xa[:, off:off + r]
        if strategy == "triton":
            y = K.fused_lora_matmul(x2d, w, xa_i, bb, scale=s, bias=b, out_dtype=out_dtype)
        else:
            # cuBLAS: the low-rank term (and bias) is written where the output goes and becomes C of
            # the base GEMM in place (beta=1 epilogue); an out-of-place addmm would copy C first.
            if xa_low is None:
                xa_low = xa.to(x.dtype)
            # s·B rounded to the activation dtype (one launch; a plain cast when s is 1)
            b_low = bb.to(x.dtype) if s == 1.0 else torch.mul(bb, s, out=torch.empty(bb.shape, device=bb.device,
                                                                                     dtype=x.dtype))
            xa_i = xa_low[:, off:off + r]
            y = torch.addmm(b, xa_i, b_low.t()) if b is not None else torch.mm(xa_i, b_low.t())
            y = _as(y.addmm_(x2d, w.t()), out_dtype)
        off += r
        outs.append(y.reshape(*x.shape[:-1], w.shape[0]))
    return outs + [xa]


def _wide_outputs(x, xa, weights, biases, lora_bs, scalings, ranks):
    """fp32 outputs from 16-bit activations on the cuBLAS path (the fp16 guard asks for them where a
    site's output joins an fp32 residual stream), by the graph ops' `wide_output`."""
    x2d = _flat(x)
    offs = [sum(ranks[:i]) for i in range(len(ranks))]
    return [wide_output(x2d, w, b, xa[:, o:o + r], bb, s).reshape(*x.shape[:-1], w.shape[0])
            for w, b, bb, s, o, r in zip(weights, biases, lora_bs, scalings, offs, ranks)]


def _g_and_db(dy2d, lora_bs, xa, scalings):
    """g_i = s_i·dy_i·B_i (also side by side as one [M, Σr] tensor) and dB_i = s_i·dy_iᵀ·xa_i, in the
    adapters' dtype: one launch per product by default. FXFUSE_LORA_GROUPED_LAUNCH=1 (read per call)
    launches each per K.GROUP_MAX members instead (less host time; off by default: the one step
    measured with it was slower, bench/RESULTS.md), unless the adapters' dtypes differ. Inputs a
    grouped launch rejects raise, as the per-product launches would."""
    n, ranks = len(lora_bs), [b.shape[1] for b in lora_bs]
    offs = [sum(ranks[:i]) for i in range(n)]
    xa_t = [xa[:, o:o + r].t() for o, r in zip(offs, ranks)]
    b_t = [b.t() for b in lora_bs]
    if env.get("FXFUSE_LORA_GROUPED_LAUNCH") == "1" and len({b.dtype for b in lora_bs}) == 1 and \
            K.check_skinny_matmul_group(dy2d[:K.GROUP_MAX], b_t[:K.GROUP_MAX], scalings[:K.GROUP_MAX]) is None:
        gs, bases, d_bs = [], [], []
        for c in range(0, n, K.GROUP_MAX):
            part = slice(c, c + K.GROUP_MAX)
            *g_part, base = K.skinny_matmul_group(dy2d[part], b_t[part], scalings[part], side_by_side=True)
            gs += g_part
            bases.append(base)
            d_bs += K.skinny_matmul_group([d.t() for d in dy2d[part]], xa_t[part], scalings[part])
        g_all = torch.cat(bases, dim=1) if len(bases) > 1 else bases[0]
    else:
        gs = [K.skinny_matmul(d, bt, scale=s) for d, bt, s in zip(dy2d, b_t, scalings)]
        d_bs = [K.skinny_matmul(d.t(), xt, scale=s) for d, xt, s in zip(dy2d, xa_t, scalings)]
        g_all = torch.cat(gs, dim=1) if n > 1 else gs[0]
    return gs, g_all, [_as(d, b.dtype) for d, b in zip(d_bs, lora_bs)]


def _backward_kernels(dys, x, weights, lora_as, lora_bs, xa, scalings, dropout_ps, seed, need_dx):
    x2d = _flat(x)
    m, k = x2d.shape
    seed_i = _seed(seed)
    seeds = [member_seed(seed_i, i) for i in range(len(weights))]
    dy2d = [_as(_flat(d), x.dtype) for d in dys]  # outputs may be in another dtype than x
    many = len(weights) > 1
    no_dropout = all(p == 0 for p in dropout_ps)
    gs, g_all, d_bs = _g_and_db(dy2d, lora_bs, xa, scalings)
    if no_dropout:
        # every member's dA in one pass over x per chunk of members up to MAX_RANK
        ranks, col, parts = [b.shape[1] for b in lora_bs], 0, []
        for i, j in rank_chunks(ranks):
            width = sum(ranks[i:j])
            parts.append(K.lowrank_weight_grad(g_all[:, col:col + width], x2d))
            col += width
        d_a = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
    else:
        d_a = [K.lowrank_weight_grad(g, x2d, p=p, seed=si) for g, p, si in zip(gs, dropout_ps, seeds)]
        d_a = torch.cat(d_a, dim=0) if many else d_a[0]
    out = [d_a] + d_bs
    if not need_dx:
        return out
    if gemm_strategy(x.device) == "triton":
        dx = None
        for dy, w, a, g, p, si in zip(dy2d, weights, lora_as, gs, dropout_ps, seeds):
            part = K.fused_lora_matmul(dy, w.t(), g, a.t(), scale=1.0, p=p, seed=si,
                                       out_dtype=torch.float32 if many else x.dtype)
            dx = part if dx is None else dx.add_(part)
    else:
        if no_dropout:
            # every member's low-rank dx term in one GEMM over the concatenated ranks
            a_all = torch.cat(lora_as, dim=0) if many else lora_as[0]
            low = torch.mm(g_all.to(x.dtype), a_all.to(x.dtype))
        else:
            low = torch.zeros(m, k, device=x.device, dtype=torch.float32)
            for g, a, p, si in zip(gs, lora_as, dropout_ps, seeds):
                term = g @ a.float()
                if p > 0:
                    term *= K.dropout_mask(m, k, p, si, x.device) / (1 - p)
                low += term
            low = low.to(x.dtype)
        dx = low  # accumulated in place: an out-of-place addmm would first copy `low`
        for dy, w in zip(dy2d, weights):
            dx.addmm_(dy, w)
    out.append(_as(dx, x.dtype).reshape(x.shape))
    return out


# ---------------------------------------------------------------- custom ops


@torch.library.custom_op(OP, mutates_args=())
def lora_linear(x: Tensor, weights: List[Tensor], biases: List[Optional[Tensor]], lora_as: List[Tensor],
                lora_bs: List[Tensor], scalings: List[float], dropout_ps: List[float], seed: Optional[Tensor],
                out_dtype: torch.dtype) -> List[Tensor]:
    args = (x, weights, biases, lora_as, lora_bs, scalings, dropout_ps, seed, out_dtype)
    return stats.dispatch(OP, x.device, _forward_kernels, lora_linear_reference, args)


def _fake_xa(x, lora_as):
    m = 1
    for d in x.shape[:-1]:
        m = m * d
    return x.new_empty((m, sum(a.shape[0] for a in lora_as)), dtype=torch.float32)


@lora_linear.register_fake
def _(x, weights, biases, lora_as, lora_bs, scalings, dropout_ps, seed, out_dtype):
    outs = [x.new_empty((*x.shape[:-1], w.shape[0]), dtype=out_dtype) for w in weights]
    return outs + [_fake_xa(x, lora_as)]


XA = "fxfuse::lora_xa"


@torch.library.custom_op(XA, mutates_args=())
def lora_xa(x: Tensor, lora_as: List[Tensor], dropout_ps: List[float], seed: Optional[Tensor]) -> Tensor:
    """lora_linear's last output alone, by the same kernels (the same value; bit-identical unless
    split-K atomics reorder sums): what a checkpointed backward needs from an op whose outputs it
    does not read (passes/recompute_lora_xa.py)."""
    return stats.dispatch(XA, x.device, _xa_kernels, lora_xa_reference, (x, lora_as, dropout_ps, seed))


@lora_xa.register_fake
def _(x, lora_as, dropout_ps, seed):
    return _fake_xa(x, lora_as)


BWD = "fxfuse::lora_linear_backward"


@torch.library.custom_op(BWD, mutates_args=())
def lora_linear_backward(dys: List[Tensor], x: Tensor, weights: List[Tensor], lora_as: List[Tensor],
                         lora_bs: List[Tensor], xa: Tensor, scalings: List[float], dropout_ps: List[float],
                         seed: Optional[Tensor], need_dx: bool) -> List[Tensor]:
    args = (dys, x, weights, lora_as, lora_bs, xa, scalings, dropout_ps, seed, need_dx)
    return stats.dispatch(BWD, x.device, _backward_kernels, lora_linear_backward_reference, args)


@lora_linear_backward.register_fake
def _(dys, x, weights, lora_as, lora_bs, xa, scalings, dropout_ps, seed, need_dx):
    d_a = lora_as[0].new_empty((sum(a.shape[0] for a in lora_as), lora_as[0].shape[1]), dtype=torch.float32)
    out = [d_a] + [b.new_empty(b.shape) for b in lora_bs]
    if need_dx:
        out.append(x.new_empty(x.shape))
    return out


def split_lora_a_grads(d_a: Tensor, lora_as) -> List[Tensor]:
    """The backward op's stacked fp32 dA [Σr, K] as one gradient per member, in its adapter's dtype."""
    out, off = [], 0
    for a in lora_as:
        out.append(_as(d_a[off:off + a.shape[0]], a.dtype))
        off += a.shape[0]
    return out


def _setup_context(ctx, inputs, output):
    x, weights, biases, lora_as, lora_bs, scalings, dropout_ps, seed, out_dtype = inputs
    n = len(weights)
    ctx.n, ctx.scalings, ctx.dropout_ps = n, list(scalings), list(dropout_ps)
    ctx.has_seed = seed is not None
    # autograd flattens a list of tensors into leaves but keeps a list holding None as one leaf
    ctx.bias_grads = [None] * n if all(b is not None for b in biases) else None
    ctx.out_dtype = out_dtype
    saved = [x, output[n], *weights, *lora_as, *lora_bs] + ([seed] if seed is not None else [])
    ctx.save_for_backward(*saved)


def _backward(ctx, grads):
    n = ctx.n
    x, xa, *rest = ctx.saved_tensors
    weights, lora_as, lora_bs = rest[:n], rest[n:2 * n], rest[2 * n:3 * n]
    seed = rest[3 * n] if ctx.has_seed else None
    dys = [g if g is not None else x.new_zeros((*x.shape[:-1], w.shape[0]), dtype=ctx.out_dtype)
           for g, w in zip(grads[:n], weights)]
    need_dx = bool(ctx.needs_input_grad[0])
    out = torch.ops.fxfuse.lora_linear_backward(dys, x, list(weights), list(lora_as), list(lora_bs), xa,
                                                ctx.scalings, ctx.dropout_ps, seed, need_dx)
    d_as = split_lora_a_grads(out[0], lora_as)
    d_bs = out[1:n + 1]
    dx = out[n + 1] if need_dx else None
    none = [None] * n
    return dx, none, ctx.bias_grads, list(d_as), list(d_bs), None, None, None, None


torch.library.register_autograd(OP, _backward, setup_context=_setup_context)
