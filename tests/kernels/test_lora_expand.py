"""kernels/lora_expand.py `lowrank_expand`: each member's s·xa_j·B_jᵀ + bias_j (one launch for up to 3
members) against float64, with outputs poisoned, odd sizes, ranks, dtypes, layouts, fp16 outliers."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402

from fxfuse.runtime.kernels import lora_expand as E  # noqa: E402
from test_lora_kernels import (BF16, DEVICE, EXAMPLES, F16, F32, _ROUND_RTOL, assert_matches, dims, f64,  # noqa: E402
                               layouts, make, poisoned_outputs, scales)

pytestmark = [
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                       reason="needs TRITON_INTERPRET=1 or a CUDA device"),
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
]


@settings(deadline=None, max_examples=EXAMPLES // 2)
@given(m=dims, members=st.lists(st.tuples(dims, st.integers(1, 40), st.booleans(), scales()), min_size=1, max_size=3),
       out_dtype=st.sampled_from([F32, F16, BF16]), b_dtype=st.sampled_from([F32, BF16, F16]),
       lxa=layouts, lb=layouts, big=st.booleans(), data_seed=st.integers(0, 2**16))
def test_lowrank_expand_fuzz(m, members, out_dtype, b_dtype, lxa, lb, big, data_seed):
    gen = torch.Generator().manual_seed(data_seed)
    ranks = [r for _, r, _, _ in members]
    xa = make((m, sum(ranks)), F32, lxa, gen)
    bs = [make((n, r), b_dtype, lb, gen) for n, r, _, _ in members]
    # a bias may be a strided view ("sliced": every other element of a longer vector)
    biases = [make((1, n), b_dtype, lb, gen)[0] if has else None for n, _, has, _ in members]
    scales_ = [s for _, _, _, s in members]
    if big and out_dtype == F16:  # outputs up to ~6e4: the fp32 sum fits fp16, its rounding must too
        off, peak = 0, 0.0
        for b, s, r in zip(bs, scales_, ranks):
            peak = max(peak, (s * f64(xa[:, off:off + r]) @ f64(b).t()).abs().max().item())
            off += r
        if peak > 0:
            xa.mul_(6e4 / peak)  # in place: keeps the layout
        biases = [None] * len(bs)
    with poisoned_outputs():
        outs = E.lowrank_expand(xa, bs, scales_, biases, out_dtype)
    off = 0
    for out, b, bias, s, r in zip(outs, bs, biases, scales_, ranks):
        xa_j = f64(xa[:, off:off + r])
        off += r
        ref = s * xa_j @ f64(b).t()
        ref_abs = abs(s) * xa_j.abs() @ f64(b).abs().t()
        if bias is not None:
            ref, ref_abs = ref + f64(bias), ref_abs + f64(bias).abs()
        assert out.is_contiguous()
        assert_matches(out, ref, ref_abs, out_dtype)


def _ulps_off(got, exact):
    """Per element: how many bf16 ulps (at the exact value's magnitude) got is from it."""
    ulp = 2.0 ** (torch.floor(torch.log2(exact.abs().clamp_min(1e-30))) - 7)
    return (f64(got) - exact).abs() / ulp


def test_lowrank_expand_is_one_rounding_of_the_fp32_sum():
    """bf16 output within one ulp of the exact value everywhere: one rounding (or, in the
    interpreter, one truncation) of a near-exact fp32 sum. The torch path's three roundings (xa,
    s·B, the product) miss by up to ~1700 ulps on this data, where terms cancel."""
    gen = torch.Generator().manual_seed(0)
    xa = torch.randn(64, 16, generator=gen).to(DEVICE)
    b = torch.randn(48, 16, generator=gen).to(DEVICE)
    out, = E.lowrank_expand(xa, [b], [0.7], [None], BF16)
    exact = 0.7 * (f64(xa) @ f64(b).t())
    assert _ulps_off(out, exact).max() <= 1
    three = (xa.to(BF16).float() @ (0.7 * b).to(BF16).float().t()).to(BF16)  # what this test tells apart
    assert _ulps_off(three, exact).max() > 1


def test_lowrank_expand_rejects_what_it_cannot_launch():
    xa, b = torch.ones(4, 8, device=DEVICE), torch.ones(6, 8, device=DEVICE)
    cases = [([b] * 4, [1.0] * 4, [None] * 4, "1 to 3 members"),
             ([b, b.half()], [1.0, 1.0], [None, None], "share one dtype"),
             ([b], [1.0], [torch.ones(5, device=DEVICE)], "bias of 5 for 6 outputs"),
             ([b], [float("nan")], [None], "not a finite number"),
             ([torch.ones(6, 4, device=DEVICE)], [1.0], [None], "ranks sum to 4"),
             ([torch.ones(6, 129, device=DEVICE)], [1.0], [None], "rank 129"),
             ([b, b], [1.0, 1.0], [torch.ones(6, device=DEVICE), torch.ones(6, device=DEVICE).half()],
              "biases do not share")]
    for bs, ss, biases, why in cases:
        with pytest.raises(ValueError, match=why):
            E.lowrank_expand(xa, bs, ss, biases, F32)
    with pytest.raises(ValueError, match="out_dtype"):
        E.lowrank_expand(xa, [b], [1.0], [None], torch.int32)


def test_every_config_names_only_the_kernels_parameters():
    """The GPU autotunes over these plus `_safe_config`'s (which once added a BLOCK_K this kernel lacks)."""
    from fxfuse.runtime.kernels.lora import _safe_config
    params = set(E._lowrank_expand_kernel.arg_names)
    for cfg in [*E._EXPAND_CONFIGS, _safe_config(E._EXPAND_CONFIGS)]:
        assert set(cfg.kwargs) <= params, cfg.kwargs
