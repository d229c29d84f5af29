"""The LoRA forward's low-rank term for a group of members that share one input, in one launch:

    out_j[M, N_j] = round(s_j · xa[:, off_j : off_j + R_j] @ B_j[N_j, R_j]ᵀ + bias_j)     (j < 3)

``xa`` holds the members' ``drop(x)·A_jᵀ`` side by side (the LoRA op's fp32 product). The outputs,
in the activation dtype, become C of the cuBLAS base GEMM (``out_j.addmm_(x, W_jᵀ)``). Doing this
as torch ops costs a cast of xa, and per member a cast of s·B and a GEMM: 7 launches for a q/k/v
group where this is 1, and the 4k step is bound by the host's launch time (bench/RESULTS.md).
It is also one rounding instead of three: xa and B stay fp32 (tf32x3 dots on the GPU, exact under
the interpreter) and the sum is rounded once to the output dtype.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from .host_math import cdiv
from .lora import (_FP32_DOT_PRECISION, _SUPPORTED_DTYPES, _bucket, _cfg, _check_rank, _check_scale,
                   _check_tensor, _launch, _maybe_autotune, _on_device, _pow2_at_least, triton_available)

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - triton is a hard dependency (lora.py reports it)
    triton = None

GROUP_MAX = 3  # members per launch

if triton is not None:

    _EXPAND_CONFIGS = [
        _cfg(4, 2, BLOCK_M=64, BLOCK_N=128),
        _cfg(8, 2, BLOCK_M=128, BLOCK_N=128),
        _cfg(4, 2, BLOCK_M=128, BLOCK_N=64),
        _cfg(8, 2, BLOCK_M=64, BLOCK_N=256),
    ]

    @_maybe_autotune(
        configs=_EXPAND_CONFIGS,
        key=["M_BUCKET", "N_BUCKET", "MEMBERS", "HAS_BIAS", "BLOCK_R"],
        interp_meta=dict(BLOCK_M=16, BLOCK_N=32),
    )
    @triton.jit
    def _lowrank_expand_kernel(
        xa_ptr, M, stride_xm, stride_xr,
        b0, bias0, o0, N0, R0, off0, sbn0, sbr0, sbias0, som0, son0, scale0,
        b1, bias1, o1, N1, R1, off1, sbn1, sbr1, sbias1, som1, son1, scale1,
        b2, bias2, o2, N2, R2, off2, sbn2, sbr2, sbias2, som2, son2, scale2,
        M_BUCKET, N_BUCKET,
        MEMBERS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        """Grid (M blocks, Σ_j N blocks of member j): a program finds its member from its N block.
        HAS_BIAS: bit j set when member j has a bias."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        nb0 = tl.cdiv(N0, BLOCK_N)
        nb1 = tl.cdiv(N1, BLOCK_N)
        if pid_n < nb0:
            b_ptr, bias_ptr, o_ptr, N, R, off, scale = b0, bias0, o0, N0, R0, off0, scale0
            sbn, sbr, sbias, som, son = sbn0, sbr0, sbias0, som0, son0
            member = 0
        elif pid_n < nb0 + nb1:  # an unused member has N = 0: no blocks
            b_ptr, bias_ptr, o_ptr, N, R, off, scale = b1, bias1, o1, N1, R1, off1, scale1
            sbn, sbr, sbias, som, son = sbn1, sbr1, sbias1, som1, son1
            member = 1
            pid_n -= nb0
        else:
            b_ptr, bias_ptr, o_ptr, N, R, off, scale = b2, bias2, o2, N2, R2, off2, scale2
            sbn, sbr, sbias, som, son = sbn2, sbr2, sbias2, som2, son2
            member = 2
            pid_n -= nb0 + nb1
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_r = tl.arange(0, BLOCK_R)
        m_mask = offs_m < M
        n_mask = offs_n < N
        r_mask = offs_r < R
        xa = tl.load(xa_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + (off + offs_r)[None, :] * stride_xr,
                     mask=m_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
        bt = tl.load(b_ptr + offs_r[:, None] * sbr + offs_n.to(tl.int64)[None, :] * sbn,
                     mask=r_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(xa, bt, input_precision=PRECISION) * scale
        if HAS_BIAS != 0:
            if ((HAS_BIAS >> member) & 1) != 0:
                acc += tl.load(bias_ptr + offs_n.to(tl.int64) * sbias, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        out_ptrs = o_ptr + offs_m.to(tl.int64)[:, None] * som + offs_n.to(tl.int64)[None, :] * son
        tl.store(out_ptrs, acc.to(o_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def check_lowrank_expand(xa, bs, scales, biases, out_dtype) -> Optional[str]:
    """None when `lowrank_expand` supports the call, else why not."""
    if not 1 <= len(bs) <= GROUP_MAX or len(scales) != len(bs) or len(biases) != len(bs):
        return f"1 to {GROUP_MAX} members, each with B, scale and bias (got {len(bs)}, {len(scales)}, {len(biases)})"
    for name, t in (("xa", xa), *((f"B[{j}]", b) for j, b in enumerate(bs))):
        reason = _check_tensor(name, t)
        if reason:
            return reason
    if out_dtype not in _SUPPORTED_DTYPES:
        return f"out_dtype {out_dtype} not supported"
    if len({b.dtype for b in bs}) > 1:
        return "the members' B do not share one dtype"
    given = [b for b in biases if b is not None]
    for b in given:
        reason = _check_tensor("bias", b, 1)
        if reason:
            return reason
    if len({b.dtype for b in given}) > 1:
        return "the members' biases do not share one dtype"
    devices = {t.device for t in (xa, *bs, *given)}
    if len(devices) > 1:
        return f"tensors on different devices ({', '.join(sorted(map(str, devices)))})"
    reason = triton_available(xa.device)
    if reason:
        return reason
    for j, (b, s, bias) in enumerate(zip(bs, scales, biases)):
        reason = _check_rank(b.shape[1]) or _check_scale(s)
        if reason:
            return f"member {j}: {reason}"
        if bias is not None and bias.shape[0] != b.shape[0]:
            return f"member {j}: bias of {bias.shape[0]} for {b.shape[0]} outputs"
        # a member's sizes and strides pass through one runtime branch: all must be 32-bit there
        big = [v for v in (b.shape[0], *b.stride(), *(bias.stride() if bias is not None else ())) if v >= 2**31]
        if big:
            return f"member {j}: sizes or strides of 2**31 or more ({big[0]})"
    if sum(b.shape[1] for b in bs) != xa.shape[1]:
        return f"xa has {xa.shape[1]} columns, the members' ranks sum to {sum(b.shape[1] for b in bs)}"
    return None


def lowrank_expand(xa: torch.Tensor, bs: List[torch.Tensor], scales: List[float],
                   biases: List[Optional[torch.Tensor]], out_dtype: torch.dtype, *,
                   checked: bool = False) -> List[torch.Tensor]:
    """``[s_j · xa_j @ B_jᵀ + bias_j]`` as new contiguous [M, N_j] tensors of ``out_dtype``, one launch
    (up to GROUP_MAX members). ``xa_j`` is xa's column block of member j: the members' ranks in order
    from column 0 (a column slice of a larger xa is fine). Raises ValueError where unsupported;
    ``checked``: the caller has just had None from `check_lowrank_expand` for these arguments."""
    reason = None if checked else check_lowrank_expand(xa, bs, scales, biases, out_dtype)
    if reason:
        raise ValueError(reason)
    offsets = [sum(b.shape[1] for b in bs[:j]) for j in range(len(bs))]
    m = xa.shape[0]
    outs = [torch.empty((m, b.shape[0]), dtype=out_dtype, device=xa.device) for b in bs]
    if m == 0 or all(b.shape[0] == 0 for b in bs):
        return outs
    bias_any = next((b for b in biases if b is not None), xa)  # a stand-in pointer of one type for the others
    has_bias = sum(1 << j for j, b in enumerate(biases) if b is not None)
    slots = []
    for j in range(GROUP_MAX):
        if j < len(bs):
            b, o = bs[j], outs[j]
            bias = biases[j]
            slots += [b, bias if bias is not None else bias_any, o, b.shape[0], b.shape[1], offsets[j],
                      b.stride(0), b.stride(1), bias.stride(0) if bias is not None else 1, o.stride(0), o.stride(1),
                      float(scales[j])]
        else:  # unused: N = 0, no blocks
            slots += [bs[0], bias_any, outs[0], 0, 1, 0, 1, 1, 1, 1, 1, 0.0]
    ns = [b.shape[0] for b in bs]
    grid = lambda meta: (cdiv(m, meta["BLOCK_M"]), sum(cdiv(n, meta["BLOCK_N"]) for n in ns))
    with _on_device(xa.device):
        _launch(_lowrank_expand_kernel, grid, xa, m, xa.stride(0), xa.stride(1), *slots,
                _bucket(m), _bucket(max(ns)), MEMBERS=len(bs), HAS_BIAS=has_bias,
                BLOCK_R=_pow2_at_least(max(b.shape[1] for b in bs)), PRECISION=_FP32_DOT_PRECISION)
    return outs
