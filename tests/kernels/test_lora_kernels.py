"""Fuzz tests of the LoRA Triton kernels against float64 references.

Runs on CPU under the Triton interpreter (set below, before torch/triton are
imported).  Shapes are kept small (<= ~96) because the interpreter's cost is
per program and per loop step; the interpreter block sizes are 32 so these
shapes still span several blocks, K steps and split chunks.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import contextlib  # noqa: E402
import math  # noqa: E402
from unittest import mock  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import example, given, settings, strategies as st  # noqa: E402

from fxfuse.runtime.kernels import lora as L  # noqa: E402

pytestmark = [
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                       reason="needs TRITON_INTERPRET=1 or a CUDA device"),
    # The interpreter converts loop bounds with int(array): harmless with numpy < 2.4.
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
]

DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
# On the GPU every new shape bucket autotunes (~1 s): fewer examples there.
EXAMPLES = int(os.environ.get("FXFUSE_FUZZ_EXAMPLES", 200 if DEVICE == "cpu" else 25))
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32

dims = st.integers(1, 96)
ranks = st.integers(1, 64)
dropout_ps = st.sampled_from([0.0, 0.1, 0.5])
seeds = st.integers(0, 2**31 - 1)
layouts = st.sampled_from(["contiguous", "transposed", "sliced"])


@st.composite
def scales(draw):
    """LoRA scalings: plain alpha/r-like values and rsLoRA alpha/sqrt(r)."""
    if draw(st.booleans()):
        return draw(st.sampled_from([0.5, 1.0, 2.0, 4.0]))
    alpha, r = draw(st.sampled_from([8, 16, 32])), draw(st.integers(1, 64))
    return alpha / math.sqrt(r)


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def make(shape, dtype, layout, gen, mag=1.0):
    """A [rows, cols] tensor with values ~ N(0, mag^2), stored with ``layout``:
    contiguous, a transposed view (column-major), or a strided column slice."""
    rows, cols = shape
    if layout == "transposed":
        base = torch.randn(cols, rows, generator=gen, dtype=torch.float64).t()
    elif layout == "sliced":
        base = torch.randn(rows, 2 * cols + 1, generator=gen, dtype=torch.float64)[:, 1::2]
    else:
        base = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    lim = torch.finfo(dtype).max * 0.99
    t = (base * mag).clamp(-lim, lim).to(dtype)
    if layout == "transposed":
        t = t.t().contiguous().t()
    elif layout == "sliced":
        full = torch.zeros(rows, 2 * cols + 1, dtype=dtype)
        full[:, 1::2] = t
        t = full[:, 1::2]
    assert tuple(t.shape) == (rows, cols)
    return t.to(DEVICE)


_real_empty = torch.empty


def _nan_empty(*args, **kwargs):
    t = _real_empty(*args, **kwargs)
    if t.is_floating_point():
        t.fill_(float("nan"))
    return t


@contextlib.contextmanager
def poisoned_outputs():
    """``torch.empty`` returns NaN-filled memory inside this block, so any
    output element a kernel forgets to write fails the finiteness check."""
    with mock.patch.object(torch, "empty", _nan_empty):
        yield


def f64(t):
    return t.detach().cpu().to(torch.float64)


def keep_f64(m, k, p, seed):
    """Keep-mask scaled by 1/(1-p), float64, from the shared contract."""
    keep = L.dropout_mask(m, k, p, seed, DEVICE).cpu().to(torch.float64)
    return keep / (1.0 - p) if p > 0 else keep


# Per-element relative tolerance of the output rounding (bf16 stores may
# truncate under the interpreter: allow one full ulp, 2^-7 relative).
_ROUND_RTOL = {F32: 1e-6, F16: 2.0**-10, BF16: 2.0**-7}
# Relative-L2 bounds per output dtype.
_L2_TOL = {F32: 1e-5, F16: 2e-3, BF16: 1e-2}


def assert_matches(out, ref, ref_abs, dtype):
    """``out`` must be finite everywhere and match ``ref`` (float64).

    ``ref_abs`` is the same product computed on |operands|: the scale of the
    fp32 accumulation error, so cancellations do not need loose bounds.
    """
    assert out.dtype == dtype, (out.dtype, dtype)
    assert tuple(out.shape) == tuple(ref.shape), (out.shape, ref.shape)
    out = f64(out)
    assert torch.isfinite(out).all(), "non-finite values in output"
    err = (out - ref).abs()
    bound = _ROUND_RTOL[dtype] * ref.abs() + 2e-5 * ref_abs + 1e-30
    bad = err > bound
    assert not bad.any(), (
        f"{int(bad.sum())}/{out.numel()} elements off; first at {bad.nonzero()[0].tolist()}: "
        f"out={out[bad][0].item()} ref={ref[bad][0].item()}")
    ref_norm = ref.norm().item()
    if ref_norm == 0:
        assert (out == 0).all()
    else:
        # Relative L2 catches systematic error (wrong rounding, a dropped term). Under heavy
        # cancellation (|ref| << ref_abs) fp32 accumulation alone is ~eps32 * ref_abs, so that
        # much absolute error is allowed on top: 1e-6 is ~16 fp32 ulps of the |operand| sum.
        err_norm = (out - ref).norm().item()
        allowed = _L2_TOL[dtype] * ref_norm + 1e-6 * ref_abs.norm().item()
        assert err_norm <= allowed, (
            f"relative L2 error {err_norm / ref_norm:.3g} > {_L2_TOL[dtype]} "
            f"(+ accumulation slack {1e-6 * ref_abs.norm().item():.3g} absolute)")


def ref_skinny(x, a, scale, p, seed):
    d = keep_f64(*x.shape, p, seed)
    xd = f64(x) * d
    return scale * xd @ f64(a).t(), abs(scale) * xd.abs() @ f64(a).abs().t()


def ref_wgrad(g, x, scale, p, seed):
    d = keep_f64(*x.shape, p, seed)
    xd = f64(x) * d
    return scale * f64(g).t() @ xd, abs(scale) * f64(g).abs().t() @ xd.abs()


def ref_fused(x, w, xa, b, scale, bias, p, seed):
    d = keep_f64(x.shape[0], w.shape[0], p, seed)
    base = f64(x) @ f64(w).t()
    low = scale * d * (f64(xa) @ f64(b).t())
    mag = f64(x).abs() @ f64(w).abs().t() + abs(scale) * d * (f64(xa).abs() @ f64(b).abs().t())
    if bias is not None:
        base = base + f64(bias)
        mag = mag + f64(bias).abs()
    return base + low, mag


# --------------------------------------------------------------------------
# fuzzing
# --------------------------------------------------------------------------

@settings(deadline=None, max_examples=EXAMPLES)
@given(m=dims, k=dims, r=ranks, dtype=st.sampled_from([F32, F16, BF16]),
       adapter_f32=st.booleans(), p=dropout_ps, seed=seeds, scale=scales(),
       lx=layouts, la=layouts, split_k=st.sampled_from([None, 1, 2, 3]),
       big=st.booleans(), data_seed=st.integers(0, 2**16), split_fp32=st.sampled_from([None, True]))
def test_skinny_matmul_fuzz(m, k, r, dtype, adapter_f32, p, seed, scale, lx, la, split_k,
                            big, data_seed, split_fp32):
    gen = torch.Generator().manual_seed(data_seed)
    # fp16 near its max: products and sums overflow fp16 but not fp32.
    mag = 3e4 if (big and dtype == F16) else 1.0
    x = make((m, k), dtype, lx, gen, mag)
    a = make((r, k), F32 if adapter_f32 else dtype, la, gen)
    with poisoned_outputs():
        out = L.skinny_matmul(x, a, scale=scale, p=p, seed=seed, split_k=split_k, split_fp32=split_fp32)
    ref, ref_abs = ref_skinny(x, a, scale, p, seed)
    assert_matches(out, ref, ref_abs, F32)


@settings(deadline=None, max_examples=EXAMPLES // 2)
@given(n=st.integers(1, 3), same_m=st.booleans(), sizes=st.lists(st.tuples(dims, dims, ranks), min_size=3, max_size=3),
       dtype=st.sampled_from([F32, F16, BF16]), adapter_f32=st.booleans(), layouts3=st.lists(layouts, min_size=6, max_size=6),
       split_k=st.sampled_from([None, 1, 2, 3]), big=st.booleans(), data_seed=st.integers(0, 2**16),
       split_fp32=st.sampled_from([None, True, False]))
def test_skinny_matmul_group_fuzz(n, same_m, sizes, dtype, adapter_f32, layouts3, split_k, big, data_seed, split_fp32):
    """Each problem of a grouped launch equals its float64 product (as skinny_matmul's), whatever
    the other problems' sizes, ranks and layouts; side by side, the outputs are the base's columns."""
    gen = torch.Generator().manual_seed(data_seed)
    mag = 3e4 if (big and dtype == F16) else 1.0
    sizes = [(sizes[0][0] if same_m else m, k, r) for m, k, r in sizes[:n]]
    xs = [make((m, k), dtype, layouts3[2 * j], gen, mag) for j, (m, k, r) in enumerate(sizes)]
    as_ = [make((r, k), F32 if adapter_f32 else dtype, layouts3[2 * j + 1], gen) for j, (m, k, r) in enumerate(sizes)]
    scales_ = [0.5 + j for j in range(n)]
    with poisoned_outputs():
        outs = L.skinny_matmul_group(xs, as_, scales_, side_by_side=same_m, split_k=split_k, split_fp32=split_fp32)
    assert len(outs) == n + same_m
    for out, x, a, s in zip(outs, xs, as_, scales_):
        ref, ref_abs = ref_skinny(x, a, s, 0.0, 0)
        assert_matches(out, ref, ref_abs, F32)
    if same_m:
        assert torch.equal(outs[-1], torch.cat(outs[:n], dim=1))


def test_skinny_matmul_group_rejects_what_it_cannot_launch():
    x, a = torch.ones(4, 8, device=DEVICE), torch.ones(2, 8, device=DEVICE)
    for xs, as_, why in [([x] * 4, [a] * 4, "1 to 3 problems"), ([x, x.half()], [a, a], "share one dtype"),
                         ([x], [torch.ones(2, 9, device=DEVICE)], "problem 0: shape mismatch"),
                         ([x], [torch.ones(129, 8, device=DEVICE)], "problem 0: rank 129")]:
        with pytest.raises(ValueError, match=why):
            L.skinny_matmul_group(xs, as_, [1.0] * len(xs))
    with pytest.raises(ValueError, match="side_by_side"):
        L.skinny_matmul_group([x, x[:3]], [a, a], [1.0, 1.0], side_by_side=True)


@settings(deadline=None, max_examples=EXAMPLES)
@given(m=dims, n=dims, k=dims, r=ranks, dtype=st.sampled_from([F32, F16, BF16]),
       adapter_f32=st.booleans(), out_f32=st.booleans(), has_bias=st.booleans(),
       p=dropout_ps, seed=seeds, scale=scales(), lx=layouts, lw=layouts, la=layouts,
       lb=layouts, big=st.booleans(), data_seed=st.integers(0, 2**16))
def test_fused_lora_matmul_fuzz(m, n, k, r, dtype, adapter_f32, out_f32, has_bias, p, seed,
                                scale, lx, lw, la, lb, big, data_seed):
    gen = torch.Generator().manual_seed(data_seed)
    adt = F32 if adapter_f32 else dtype
    # Big fp16 inputs with a weight scaled down so the true result still fits.
    mag = 3e4 if (big and dtype == F16) else 1.0
    x = make((m, k), dtype, lx, gen, mag)
    w = make((n, k), dtype, lw, gen, 1.0 / (mag * math.sqrt(k)))
    xa = make((m, r), adt, la, gen)
    b = make((n, r), adt, lb, gen, 1.0 / math.sqrt(r))
    bias = make((1, n), adt, "contiguous", gen)[0] if has_bias else None
    out_dtype = F32 if out_f32 else None
    with poisoned_outputs():
        out = L.fused_lora_matmul(x, w, xa, b, scale=scale, bias=bias, p=p, seed=seed,
                                  out_dtype=out_dtype)
    ref, ref_abs = ref_fused(x, w, xa, b, scale, bias, p, seed)
    assert_matches(out, ref, ref_abs, out_dtype or dtype)


@settings(deadline=None, max_examples=EXAMPLES)
@given(m=dims, k=dims, r=ranks, dtype=st.sampled_from([F32, F16, BF16]),
       g_f32=st.booleans(), p=dropout_ps, seed=seeds, scale=scales(), lg=layouts,
       lx=layouts, split_m=st.sampled_from([None, 1, 2, 3]), big=st.booleans(),
       data_seed=st.integers(0, 2**16), split_fp32=st.sampled_from([None, True]))
# A one-element output whose 94 terms cancel to 3e-4 of their magnitude (a CI draw): the kernel's
# fp32 sum is as close as a sequential fp32 sum, so the L2 check allows accumulation slack.
@example(m=94, k=1, r=1, dtype=F16, g_f32=False, p=0.5, seed=1, scale=0.5, lg="sliced",
         lx="sliced", split_m=None, big=False, data_seed=1, split_fp32=None)
def test_lowrank_weight_grad_fuzz(m, k, r, dtype, g_f32, p, seed, scale, lg, lx, split_m, big,
                                  data_seed, split_fp32):
    gen = torch.Generator().manual_seed(data_seed)
    mag = 3e4 if (big and dtype == F16) else 1.0
    g = make((m, r), F32 if g_f32 else dtype, lg, gen)
    x = make((m, k), dtype, lx, gen, mag)
    with poisoned_outputs():
        out = L.lowrank_weight_grad(g, x, scale=scale, p=p, seed=seed, split_m=split_m, split_fp32=split_fp32)
    ref, ref_abs = ref_wgrad(g, x, scale, p, seed)
    assert_matches(out, ref, ref_abs, F32)


def test_lora_forward_backward_composition():
    """The launchers composed as in the module docstring reproduce autograd
    of a LoRA layer (bf16 base, fp32 adapters, dropout)."""
    gen = torch.Generator().manual_seed(0)
    m, k, n, r, s, p, seed = 70, 50, 40, 8, 2.0, 0.1, 1234
    X = make((m, k), BF16, "contiguous", gen)
    W = make((n, k), BF16, "contiguous", gen, 0.2)
    A = make((r, k), F32, "contiguous", gen, 0.2)
    B = make((n, r), F32, "contiguous", gen, 0.2)
    dY = make((m, n), BF16, "contiguous", gen)

    XA = L.skinny_matmul(X, A, p=p, seed=seed)
    Y = L.fused_lora_matmul(X, W, XA, B, scale=s)
    g = L.skinny_matmul(dY, B.t())
    dB = L.skinny_matmul(dY.t(), XA.t(), scale=s)
    dA = L.lowrank_weight_grad(g, X, scale=s, p=p, seed=seed)
    dX = L.fused_lora_matmul(dY, W.t(), g, A.t(), scale=s, p=p, seed=seed)

    Xd, Ad, Bd = (f64(t).requires_grad_() for t in (X, A, B))
    Wd, dYd = f64(W), f64(dY)
    keep = keep_f64(m, k, p, seed)
    Yd = Xd @ Wd.t() + s * ((Xd * keep) @ Ad.t()) @ Bd.t()
    Yd.backward(dYd)
    assert_matches(Y, Yd.detach(), f64(X).abs() @ f64(W).abs().t() + 1, BF16)
    for got, want in ((dA, Ad.grad), (dB, Bd.grad)):
        rel = (f64(got) - want).norm() / want.norm()
        assert torch.isfinite(got).all() and rel < 1e-5
    rel = (f64(dX) - Xd.grad).norm() / Xd.grad.norm()
    assert torch.isfinite(f64(dX)).all() and rel < 1e-2


# --------------------------------------------------------------------------
# dropout contract
# --------------------------------------------------------------------------

@pytest.mark.parametrize("m,k,p,seed", [(1, 1, 0.5, 0), (37, 29, 0.5, 123), (5, 200, 0.1, 2**31 - 1),
                                        (64, 64, 0.9, 7)])
def test_dropout_mask_device_matches_host(m, k, p, seed):
    """The kernel mask and the numpy re-implementation of tl.rand agree."""
    dev = L.dropout_mask(m, k, p, seed, DEVICE).cpu()
    host = L._tl_rand_numpy(seed, np.arange(m * k, dtype=np.int64)) >= np.float32(p)
    assert dev.dtype == torch.bool and dev.shape == (m, k)
    assert torch.equal(dev, torch.from_numpy(host.reshape(m, k)))


def test_dropout_mask_statistics():
    keep = L.dropout_mask(100, 100, 0.3, 42, DEVICE)
    assert abs(keep.float().mean().item() - 0.7) < 0.03
    assert not torch.equal(keep, L.dropout_mask(100, 100, 0.3, 43, DEVICE))
    assert L.dropout_mask(3, 4, 0.0, 1, DEVICE).all()
    # Large flat indices use the int64 high word (index >= 2**32).
    hi = L._tl_rand_numpy(5, np.array([3, 3 + 2**32], dtype=np.int64))
    assert hi[0] != hi[1]


def test_dropout_helper_matches_mask():
    x = torch.randn(13, 17).to(DEVICE)
    keep = L.dropout_mask(13, 17, 0.5, 9, DEVICE)
    torch.testing.assert_close(L.dropout(x, 0.5, 9), torch.where(keep, x / 0.5, 0.0))
    assert L.dropout(x, 0.0, 9) is x


@pytest.mark.parametrize("p,seed", [(0.1, 3), (0.5, 2**31 - 1)])
def test_kernel_masks_equal_dropout_mask(p, seed):
    """Extract each kernel's in-kernel mask exactly and compare it with
    ``dropout_mask`` of the same logical shape (any strides)."""
    m, k, n = 45, 70, 39
    want = L.dropout_mask(m, k, p, seed, DEVICE).cpu()
    ones_t = torch.ones(k, m, device=DEVICE).t()  # transposed x: logical indices only
    eye = torch.eye(k, device=DEVICE)
    # skinny: drop(1) @ I^T == keep / (1-p)
    out = L.skinny_matmul(ones_t, eye, p=p, seed=seed).cpu()
    assert torch.equal(out != 0, want)
    torch.testing.assert_close(out[want], torch.full_like(out[want], 1 / (1 - p)))
    # weight grad: I^T @ drop(1) == keep / (1-p)
    out = L.lowrank_weight_grad(torch.eye(m, device=DEVICE), ones_t, p=p, seed=seed).cpu()
    assert torch.equal(out != 0, want)
    # fused epilogue: zero base, xa @ b^T == 1, masked over the [M, N] output
    z = torch.zeros
    out = L.fused_lora_matmul(z(m, 1, device=DEVICE), z(n, 1, device=DEVICE),
                              torch.ones(m, 1, device=DEVICE), torch.ones(n, 1, device=DEVICE),
                              scale=1.0, p=p, seed=seed).cpu()
    assert torch.equal(out != 0, L.dropout_mask(m, n, p, seed, DEVICE).cpu())


def test_skinny_dropout_equals_explicit_mask():
    gen = torch.Generator().manual_seed(1)
    x = make((50, 61), F32, "transposed", gen)
    a = make((12, 61), F32, "contiguous", gen)
    got = L.skinny_matmul(x, a, scale=1.5, p=0.5, seed=77)
    explicit = L.skinny_matmul(L.dropout(x, 0.5, 77), a, scale=1.5)
    torch.testing.assert_close(got, explicit, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(got, L.skinny_matmul(x, a, scale=1.5, p=0.5, seed=78))


# --------------------------------------------------------------------------
# numerics and edges
# --------------------------------------------------------------------------

def test_fp16_accumulator_does_not_overflow():
    """Running sums far beyond fp16 max, true results that fit: fp32
    accumulation must give finite, exact outputs."""
    m, n, k, r = 5, 7, 64, 4
    x = torch.full((m, k), 60000.0, dtype=F16)
    x[:, k // 2:] = -60000.0
    x[:, -1] = -5000.0  # row sums = 55000: fits fp16, running sums do not
    w = torch.ones(n, k, dtype=F16)
    xa = torch.full((m, r), 10.0, dtype=F16)
    b = torch.full((n, r), 10.0, dtype=F16)  # low-rank term: 0.25 * 4 * 100 = 100
    out = L.fused_lora_matmul(x.to(DEVICE), w.to(DEVICE), xa.to(DEVICE), b.to(DEVICE),
                              scale=0.25, p=0.0)
    ref, _ = ref_fused(x, w, xa, b, 0.25, None, 0.0, 0)
    assert torch.isfinite(out).all()
    assert (ref.abs() < 65504).all()
    torch.testing.assert_close(f64(out), ref, rtol=2.0**-10, atol=0)
    # skinny / weight grad take the same fp16 operands, fp32 outputs
    s = L.skinny_matmul(x.to(DEVICE), w[:r].to(DEVICE))
    torch.testing.assert_close(f64(s), f64(x) @ f64(w[:r]).t(), rtol=0, atol=0)
    gw = L.lowrank_weight_grad(xa[:, :1].to(DEVICE), x.to(DEVICE))
    torch.testing.assert_close(f64(gw), f64(xa[:, :1]).t() @ f64(x), rtol=0, atol=0)


@pytest.mark.parametrize("m,n,k,r", [(33, 65, 31, 1), (1, 1, 1, 1), (97, 3, 95, 64), (64, 64, 64, 33)])
def test_every_output_element_written(m, n, k, r):
    """Odd sizes around the 32-wide interpreter blocks, outputs poisoned with
    NaN: the full output (edges included) must be written and correct."""
    gen = torch.Generator().manual_seed(m * n + k)
    x = make((m, k), BF16, "sliced", gen)
    w = make((n, k), BF16, "transposed", gen)
    xa = make((m, r), F32, "contiguous", gen)
    b = make((n, r), F32, "transposed", gen)
    with poisoned_outputs():
        fused = L.fused_lora_matmul(x, w, xa, b, scale=2.0, p=0.1, seed=5)
        skinny = L.skinny_matmul(x, w[:min(n, 64)], p=0.5, seed=1)
        wgrad = L.lowrank_weight_grad(xa, x, scale=0.5, p=0.5, seed=1, split_m=1)
    assert_matches(fused, *ref_fused(x, w, xa, b, 2.0, None, 0.1, 5), BF16)
    assert_matches(skinny, *ref_skinny(x, w[:min(n, 64)], 1.0, 0.5, 1), F32)
    assert_matches(wgrad, *ref_wgrad(xa, x, 0.5, 0.5, 1), F32)


def test_empty_and_degenerate_shapes():
    x0 = torch.zeros(4, 0, device=DEVICE)
    a0 = torch.zeros(3, 0, device=DEVICE)
    assert torch.equal(L.skinny_matmul(x0, a0), torch.zeros(4, 3, device=DEVICE))
    assert L.skinny_matmul(torch.zeros(0, 5, device=DEVICE), torch.ones(3, 5, device=DEVICE)).shape == (0, 3)
    assert torch.equal(L.lowrank_weight_grad(torch.zeros(0, 2, device=DEVICE), torch.zeros(0, 5, device=DEVICE)),
                       torch.zeros(2, 5, device=DEVICE))
    # K == 0 in the fused kernel: only bias + low-rank remain.
    out = L.fused_lora_matmul(torch.zeros(3, 0, device=DEVICE), torch.zeros(2, 0, device=DEVICE),
                              torch.ones(3, 1, device=DEVICE), torch.ones(2, 1, device=DEVICE),
                              scale=3.0, bias=torch.ones(2, device=DEVICE))
    assert torch.equal(out, torch.full((3, 2), 4.0, device=DEVICE))


def test_lowrank_tf32_flag_runs():
    gen = torch.Generator().manual_seed(3)
    x, w = make((20, 30), BF16, "contiguous", gen), make((10, 30), BF16, "contiguous", gen)
    xa, b = make((20, 4), F32, "contiguous", gen), make((10, 4), F32, "contiguous", gen)
    out = L.fused_lora_matmul(x, w, xa, b, scale=1.0, allow_tf32_lowrank=True)
    ref, _ = ref_fused(x, w, xa, b, 1.0, None, 0.0, 0)
    assert torch.isfinite(out).all()
    assert ((f64(out) - ref).norm() / ref.norm()).item() < 1e-2


def test_fp32_dot_modes(monkeypatch):
    """bf16 against fp32 splits the fp32 operand (bf16x3), on either side; other pairs do not."""
    monkeypatch.delenv("FXFUSE_LORA_FP32_DOT", raising=False)
    assert L._dot_mode(BF16, F32, False)[2] == 2  # default: bf16x3
    assert L._dot_mode(BF16, F32, False, split=True)[2] == 2
    assert L._dot_mode(F32, BF16, False, split=True)[2] == 1
    for a, b in ((F16, F32), (F32, F32), (BF16, BF16), (F16, F16)):
        assert L._dot_mode(a, b, False, split=True)[2] == 0, (a, b)
    assert L._dot_mode(BF16, F32, True, split=True)[2] == 0  # tf32 allowed: one tf32 dot
    monkeypatch.setenv("FXFUSE_LORA_FP32_DOT", "tf32x3")
    assert L._dot_mode(BF16, F32, False)[2] == 0
    assert L._dot_mode(BF16, F32, False, split=True)[2] == 2  # an explicit split wins
    monkeypatch.setenv("FXFUSE_LORA_FP32_DOT", "fp64")
    with pytest.raises(ValueError, match="FXFUSE_LORA_FP32_DOT"):
        L._dot_mode(BF16, F32, False)


@pytest.mark.parametrize("split_fp32", [True, False])
def test_bf16x3_keeps_fp32_low_bits(split_fp32):
    """fp32 operands with bits in all three bf16 pieces (1 + u·2^-10 + v·2^-19 + w·2^-23): both fp32
    dot modes keep them (dropping the lowest piece is off by up to ~1e-5 relative), for the skinny
    and the weight-grad kernels, with the fp32 operand on either side."""
    m, k, r = 40, 70, 5
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(-3, 4, (m, k), generator=gen).to(BF16).to(DEVICE)  # exact small integers

    def three_pieces(*shape):
        u, v, w = (torch.randint(0, hi, shape, generator=gen).double() for hi in (8, 8, 2))
        return (1 + u * 2.0**-10 + v * 2.0**-19 + w * 2.0**-23).float().to(DEVICE)

    a = three_pieces(r, k)
    got = L.skinny_matmul(x, a, split_fp32=split_fp32)
    want = f64(x) @ f64(a).t()
    assert (f64(got) - want).abs().max().item() <= 1e-6 * (f64(x).abs() @ f64(a).abs().t()).max().item()
    g = three_pieces(m, r)
    got = L.lowrank_weight_grad(g, x, split_fp32=split_fp32)
    want = f64(g).t() @ f64(x)
    assert (f64(got) - want).abs().max().item() <= 1e-6 * (f64(g).abs().t() @ f64(x).abs()).max().item()


# --------------------------------------------------------------------------
# checkers
# --------------------------------------------------------------------------

def _t(*shape, dtype=F32):
    return torch.zeros(*shape, dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("call,args,kwargs,needle", [
    ("skinny_matmul", (_t(4, 8, dtype=torch.float64), _t(2, 8)), {}, "dtype torch.float64 not supported"),
    ("skinny_matmul", (_t(4, 8), _t(300, 8)), {}, "rank 300 > 128"),
    ("skinny_matmul", (_t(2, 4, 8), _t(2, 8)), {}, "not 2-D"),
    ("skinny_matmul", (_t(4, 8), _t(2, 7)), {}, "shape mismatch"),
    ("skinny_matmul", (_t(4, 8), _t(2, 8)), {"p": 1.0}, "dropout p"),
    ("skinny_matmul", (_t(4, 8), _t(2, 8)), {"seed": -1}, "seed"),
    ("skinny_matmul", (_t(4, 8), _t(2, 8)), {"seed": 2**31}, "seed"),
    ("skinny_matmul", (_t(4, 8), _t(2, 8)), {"scale": float("nan")}, "scale"),
    ("skinny_matmul", (_t(4, 8), _t(0, 8)), {}, "rank 0"),
    ("skinny_matmul", (_t(4, 8), "a"), {}, "not a tensor"),
    ("fused_lora_matmul", (_t(4, 8), _t(5, 8), _t(4, 2), _t(5, 2)), {"scale": 1.0, "out_dtype": torch.int32},
     "out_dtype"),
    ("fused_lora_matmul", (_t(4, 8), _t(5, 9), _t(4, 2), _t(5, 2)), {"scale": 1.0}, "shape mismatch"),
    ("fused_lora_matmul", (_t(4, 8), _t(5, 8), _t(4, 2), _t(5, 3)), {"scale": 1.0}, "shape mismatch"),
    ("fused_lora_matmul", (_t(4, 8), _t(5, 8), _t(4, 2), _t(5, 2)), {"scale": 1.0, "bias": _t(6)},
     "shape mismatch"),
    ("fused_lora_matmul", (_t(4, 8), _t(5, 8), _t(4, 2), _t(5, 2)), {"scale": 1.0, "bias": _t(5, 1)},
     "not 1-D"),
    ("fused_lora_matmul", (_t(4, 8), _t(5, 8), _t(4, 200), _t(5, 200)), {"scale": 1.0}, "rank 200 > 128"),
    ("fused_lora_matmul", (_t(4, 8, dtype=torch.int8), _t(5, 8), _t(4, 2), _t(5, 2)), {"scale": 1.0},
     "dtype torch.int8"),
    ("lowrank_weight_grad", (_t(4, 2), _t(5, 8)), {}, "shape mismatch"),
    ("lowrank_weight_grad", (_t(4, 129), _t(4, 8)), {}, "rank 129 > 128"),
    ("lowrank_weight_grad", (_t(4, 2), _t(4, 8, dtype=torch.float64)), {}, "dtype torch.float64"),
])
def test_checkers_and_launchers_reject(call, args, kwargs, needle):
    reason = getattr(L, "check_" + call)(*args, **kwargs)
    assert isinstance(reason, str) and needle in reason, reason
    with pytest.raises(ValueError, match=needle.split(" ")[0]):
        getattr(L, call)(*args, **kwargs)


def test_checkers_accept_supported_calls():
    assert L.check_skinny_matmul(_t(4, 8, dtype=BF16), _t(128, 8)) is None
    assert L.check_fused_lora_matmul(_t(4, 8, dtype=BF16), _t(5, 8, dtype=BF16), _t(4, 2), _t(5, 2),
                                     scale=2.0, bias=_t(5, dtype=BF16), p=0.5, seed=3) is None
    assert L.check_lowrank_weight_grad(_t(4, 2), _t(4, 8, dtype=F16), p=0.1) is None


def test_triton_available(monkeypatch):
    assert L.triton_available(DEVICE) is None
    monkeypatch.setattr(L, "_INTERPRET", False)
    assert L.triton_available("cpu") == "tensor on cpu and TRITON_INTERPRET is not set"
    reason = L.check_skinny_matmul(torch.zeros(2, 2), torch.zeros(2, 2))
    assert reason == "tensor on cpu and TRITON_INTERPRET is not set"
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        L.skinny_matmul(torch.zeros(2, 2), torch.zeros(2, 2))
    # dropout_mask still works off-device through the host Philox.
    assert torch.equal(L.dropout_mask(7, 9, 0.5, 11, "cpu"),
                       torch.from_numpy(L._tl_rand_numpy(11, np.arange(63)).reshape(7, 9) >= np.float32(0.5)))
