"""Fuzz tests of the RMSNorm (+ residual add) kernels against float64 references.

Forward outputs must sit within one rounding of the float64 value computed with HF's rounding
points (h rounded to the I/O dtype, the normalized value rounded before the weight multiply);
gradients are fp32 inside and rounded once. Outputs are NaN-poisoned before the kernels write.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import contextlib  # noqa: E402
from unittest import mock  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402

from fxfuse.runtime.kernels import rms_norm as K  # noqa: E402

pytestmark = [
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                       reason="needs TRITON_INTERPRET=1 or a CUDA device"),
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
]

DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
EXAMPLES = int(os.environ.get("FXFUSE_FUZZ_EXAMPLES", 25))
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
ULP = {F32: 2.0**-23, F16: 2.0**-10, BF16: 2.0**-7}
L2 = {F32: 1e-5, F16: 2e-3, BF16: 1e-2}

_real_empty = torch.empty


@contextlib.contextmanager
def poisoned_outputs():
    def nan_empty(*args, **kwargs):
        t = _real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    with mock.patch.object(torch, "empty", nan_empty), mock.patch.object(
            torch, "empty_like", lambda t, **kw: nan_empty(t.shape, dtype=t.dtype, device=t.device)):
        yield


def f64(t):
    return t.detach().cpu().double()


def rnd(t64, dtype):
    """float64 values rounded to `dtype` and back (exact for fp16/bf16 via fp32)."""
    return t64.float().to(dtype).double() if dtype != F32 else t64.float().double()


def assert_close(out, ref, scale, dtype, what):
    """Element-wise within ~1 ulp of the reference (relative to |ref| + the row's magnitude scale),
    relative L2 within the dtype's bound, finite everywhere."""
    assert out.dtype == dtype, (what, out.dtype, dtype)
    out = f64(out)
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    # + one step of the dtype's subnormal grid: tiny gradients round there
    bound = 1.01 * ULP[dtype] * ref.abs() + 4e-6 * scale + torch.finfo(dtype).tiny * ULP[dtype]
    bad = (out - ref).abs() > bound
    assert not bad.any(), (f"{what}: {int(bad.sum())}/{out.numel()} off; first {bad.nonzero()[0].tolist()}: "
                           f"{out[bad][0].item()} vs {ref[bad][0].item()}")
    # relative L2; where the gradient cancels to ~0 (width 1), relative to the terms' magnitude
    denom = max(ref.norm(), 0.1 * scale.norm())
    if denom > 0:
        assert (out - ref).norm() / denom <= L2[dtype], what


@st.composite
def cases(draw):
    dtype = draw(st.sampled_from([F32, F16, BF16]))
    width = draw(st.sampled_from([1, 7, 96, 100, 257, 1000]))
    rows = draw(st.sampled_from([1, 2, 5]))
    block = draw(st.sampled_from([None, 16, 64]))  # forced small blocks: several blocks per row
    return dict(dtype=dtype, width=width, rows=rows, block=block, residual=draw(st.booleans()),
                form=draw(st.sampled_from(["llama", "gemma", "plain"])), w_dtype=draw(st.sampled_from(["same", F32])),
                mag=draw(st.sampled_from([1.0, 1e-3, 3e4])), seed=draw(st.integers(0, 2**16)),
                need_dw=draw(st.booleans()), with_dh=draw(st.booleans()))


def inputs(c):
    g = torch.Generator().manual_seed(c["seed"])
    dt = c["dtype"]

    def values():
        # mag 3e4: x and the residual near the fp16 maximum, their sum still below it (the overflow
        # itself is test_fp16_residual_add_beyond_65504_is_inf_like_eager_and_stats_stay_finite)
        return (torch.randn(c["rows"], c["width"], generator=g, dtype=torch.float64) * c["mag"]).clamp(-32000, 32000).to(dt)

    x = values()
    r = values() if c["residual"] else None
    w_dt = dt if c["w_dtype"] == "same" else F32
    w = (1 + 0.5 * torch.randn(c["width"], generator=g, dtype=torch.float64)).to(w_dt)
    offset, round_dtype = {"llama": (0.0, dt), "gemma": (1.0, None), "plain": (0.0, None)}[c["form"]]
    out_dtype = torch.promote_types(w_dt, dt) if c["form"] == "llama" else (dt if c["form"] == "gemma" else F32)
    return x, r, w, offset, round_dtype, out_dtype


def reference(x, r, w, eps, offset, round_dtype, out_dtype):
    h = f64(x) if r is None else rnd(f64(x) + f64(r), x.dtype)
    rstd = 1 / torch.sqrt((h * h).mean(-1, keepdim=True) + eps)
    n = h * rstd
    nr = rnd(n, round_dtype) if round_dtype is not None else n
    return h, rstd.squeeze(-1), n, nr, nr * (offset + f64(w))


@settings(max_examples=EXAMPLES, deadline=None)
@given(cases())
def test_forward_matches_float64(c):
    x, r, w, offset, round_dtype, out_dtype = inputs(c)
    eps = 1e-6
    with poisoned_outputs():
        h, y, rstd = K.rms_norm_forward(x.to(DEVICE), w.to(DEVICE), r.to(DEVICE) if r is not None else None, eps,
                                        offset, round_dtype, out_dtype, block=c["block"])
    h_ref, rstd_ref, _, nr, y_ref = reference(x, r, w, eps, offset, round_dtype, out_dtype)
    if r is not None:
        # the sum is computed in fp32 and rounded once: exactly eager's fp16/bf16 add, inf where it overflows
        assert h.dtype == x.dtype and torch.equal(f64(h), h_ref)
    else:
        assert h is None
    assert torch.isfinite(f64(rstd)).all() and torch.allclose(f64(rstd), rstd_ref, rtol=1e-5, atol=0)
    # the rounding of the normalized value may flip by one ulp of round_dtype when fp32 rstd differs
    # from float64 in its last bit: allow that ulp on the product's scale
    slack = (ULP[round_dtype] if round_dtype is not None else 0) * (nr * f64(w)).abs()
    out = f64(y)
    assert y.dtype == out_dtype and torch.isfinite(out).all()
    # plus a few fp32 ulps: rstd and the products are fp32
    bound = (1.01 * ULP[out_dtype] + 8 * ULP[F32]) * y_ref.abs() + 1.01 * slack + 1e-30
    bad = (out - rnd(y_ref, out_dtype)).abs() > bound
    assert not bad.any(), (out[bad][:4], y_ref[bad][:4])


def test_fp16_residual_add_beyond_65504_is_inf_like_eager_and_stats_stay_finite():
    x = torch.full((2, 96), 40000.0, dtype=F16)
    r = torch.full((2, 96), 30000.0, dtype=F16)
    r[1] = -30000.0
    w = torch.ones(96, dtype=F16)
    h, y, rstd = K.rms_norm_forward(x.to(DEVICE), w.to(DEVICE), r.to(DEVICE), 1e-6, 0.0, F16, F16)
    eager = r + x
    assert torch.equal(h.cpu(), eager) and torch.isinf(h[0]).all()
    # row 1: |h| = 10000, h² = 1e8 overflows fp16 but not the kernel's fp32 statistics
    assert torch.isfinite(y[1]).all() and torch.allclose(y[1].float().cpu(), torch.ones(96), atol=1e-3)


@settings(max_examples=EXAMPLES, deadline=None)
@given(cases())
def test_backward_matches_float64(c):
    x, _, w, offset, round_dtype, out_dtype = inputs(c)
    dt, eps = c["dtype"], 1e-6
    g = torch.Generator().manual_seed(c["seed"] + 1)
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64).to(out_dtype)
    dh = torch.randn(x.shape, generator=g, dtype=torch.float64).to(dt) if c["with_dh"] else None
    h = x
    rstd = K.rms_norm_forward(h.to(DEVICE), w.to(DEVICE), None, eps, offset, round_dtype, out_dtype)[2]
    with poisoned_outputs():
        dx, dw = K.rms_norm_backward(dy.to(DEVICE), dh.to(DEVICE) if dh is not None else None, h.to(DEVICE),
                                     w.to(DEVICE), rstd, offset, round_dtype, c["need_dw"], block=c["block"])
    hd, rs = f64(h), f64(rstd).unsqueeze(-1)  # the saved fp32 rstd is an input of the backward
    n = hd * rs
    gg = f64(dy) * (offset + f64(w))
    dx_ref = rs * (gg - n * (gg * n).mean(-1, keepdim=True)) + (f64(dh) if dh is not None else 0)
    scale = rs * (gg.abs() + (n.abs() * (gg * n).abs().mean(-1, keepdim=True))) + (f64(dh).abs() if dh is not None else 0)
    assert_close(dx, dx_ref, scale, dt, "dx")
    if c["need_dw"]:
        nr = rnd(n, round_dtype) if round_dtype is not None else n
        dw_ref = (f64(dy) * nr).sum(0)
        # the rounding of n may flip by one ulp of round_dtype (fp32 vs float64 rstd): per-term slack
        slack = (f64(dy).abs() * nr.abs()).sum(0) * ((ULP[round_dtype] if round_dtype else 0) + 1e-5)
        out = f64(dw)
        assert dw.dtype == w.dtype and torch.isfinite(out).all()
        assert ((out - dw_ref).abs() <= 1.01 * ULP[w.dtype] * dw_ref.abs() + slack + 1e-30).all()
    else:
        assert dw is None


@pytest.mark.parametrize("width", [4095, 96])
def test_odd_widths_one_and_several_blocks(width):
    """Default blocks (one block per row) and forced 256-blocks (several) agree: bit for bit in the
    interpreter; on the GPU the fp32 sum of squares is reduced in another order, so the normalised
    output may differ by one bf16 ulp (the residual sum is exact either way)."""
    g = torch.Generator().manual_seed(width)
    x = torch.randn(3, width, generator=g).to(BF16).to(DEVICE)
    r = torch.randn(3, width, generator=g).to(BF16).to(DEVICE)
    w = torch.randn(width, generator=g).to(BF16).to(DEVICE)
    one = K.rms_norm_forward(x, w, r, 1e-5, 0.0, BF16, BF16)
    many = K.rms_norm_forward(x, w, r, 1e-5, 0.0, BF16, BF16, block=256)
    if DEVICE == "cpu":
        assert all(torch.equal(a, b) for a, b in zip(one, many))
    else:
        assert torch.equal(one[0], many[0])  # the residual sum: no reduction involved
        for a, b in zip(one[1:], many[1:]):
            if a.is_floating_point() and a.dtype == BF16:
                assert ((f64(a) - f64(b)).abs() <= ULP[BF16] * f64(a).abs() + 1e-30).all()
            else:
                assert torch.allclose(f64(a), f64(b), rtol=1e-6, atol=0)
    h_ref, _, _, _, y_ref = reference(x.cpu(), r.cpu(), w.cpu(), 1e-5, 0.0, BF16, BF16)
    assert torch.equal(f64(one[0]), h_ref)
    assert (f64(one[1]) - rnd(y_ref, BF16)).abs().max() <= 2 * ULP[BF16] * y_ref.abs().max()


def test_launchers_decline_what_they_cannot_do():
    x, w = torch.randn(2, 8), torch.randn(8)
    assert "weight of 7" in K.check_rms_norm(x, torch.randn(7), None, None, F32)
    assert "dtype torch.float64" in K.check_rms_norm(x.double(), w, None, None, F32)
    assert "residual" in K.check_rms_norm(x, w, torch.randn(2, 8).half(), None, F32)
    assert "contiguous" in K.check_rms_norm(torch.randn(8, 2).t(), w, None, None, F32)
    assert "row width" in K.check_rms_norm(torch.randn(1, K.MAX_WIDTH + 1), torch.randn(K.MAX_WIDTH + 1), None, None, F32)
    assert "2-D" in K.check_rms_norm(torch.randn(2, 2, 8), w, None, None, F32)
    with pytest.raises(ValueError, match="not supported"):
        K.rms_norm_forward(x, torch.randn(7), None, 1e-6, 0.0, None, F32)
