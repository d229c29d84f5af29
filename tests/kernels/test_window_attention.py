"""fxfuse::window_attention (causal sliding-window attention in query chunks, fp32 recomputed backward)
against float64 attention with the full band mask: outputs and q/k/v gradients, GQA, odd sizes,
windows shorter and longer than the sequence, chunks smaller and larger than the window; every
output element written (outputs start as NaN)."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from fxfuse.runtime.ops import window_attention as W
from test_rms_norm_kernels import DEVICE, EXAMPLES, poisoned_outputs

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _err(a, b):
    """max-abs error over max-abs value (absolute where the reference is ~0, e.g. window 1's dq)."""
    return ((a.double() - b).abs().max() / max(b.abs().max().item(), 1.0)).item()


@settings(max_examples=EXAMPLES, deadline=None)
@given(dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       batch=st.integers(1, 2), kv_heads=st.integers(1, 3), group=st.sampled_from([1, 2, 3]),
       t=st.integers(1, 70), d=st.sampled_from([8, 16, 13]), window=st.integers(1, 80),
       chunk=st.integers(1, 40), mag=st.sampled_from([0.1, 1.0, 8.0]), seed=st.integers(0, 2**16))
def test_forward_and_backward_match_float64(dtype, batch, kv_heads, group, t, d, window, chunk, mag, seed):
    gen = torch.Generator().manual_seed(seed)
    hq = kv_heads * group
    q, k, v = ((torch.randn(batch, h, t, d, generator=gen) * mag).to(DEVICE, dtype)
               for h in (hq, kv_heads, kv_heads))
    if t > 2:  # an fp16-range outlier in v (the output is a convex mix of v: no overflow)
        v[0, 0, t // 2, 0] = 6e4 if dtype == torch.float16 else 1e5
    scale = 1 / math.sqrt(d)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    with poisoned_outputs():
        out = torch.ops.fxfuse.window_attention(*leaves, window, scale, chunk)
        grad = torch.randn(out.shape, generator=gen).to(DEVICE, dtype)
        out.backward(grad)
    ref_leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = W.reference(*ref_leaves, window, scale)
    ref.backward(grad.double())
    assert out.shape == ref.shape and out.dtype == dtype
    for name, got, want in [("out", out.detach(), ref.detach())] + [
            (n, x.grad, r.grad) for n, x, r in zip("qkv", leaves, ref_leaves)]:
        assert not got.isnan().any(), f"{name}: NaN (an element was not written)"
        err = _err(got, want)
        assert err < TOL[dtype], f"{name}: {err}"


@given(t=st.integers(0, 300), window=st.integers(1, 100), chunk=st.integers(1, 100))
def test_chunks_cover_every_query_once_and_every_key_the_window_reaches(t, window, chunk):
    covered, prev_end = [], 0
    for s, e, ks in W.chunks(t, window, chunk):
        assert s == prev_end and s < e <= t and e - s <= max(window, chunk)
        assert ks == max(0, s - window + 1)  # the first query's earliest key
        prev_end = e
        covered.append((s, e))
    assert prev_end == t


def test_band_is_the_causal_window():
    b = W.band(3, 7, 1, 3, "cpu")  # queries 3..6, keys 1..6
    want = torch.tensor([[q - kv >= 0 and q - kv < 3 for kv in range(1, 7)] for q in range(3, 7)])
    assert torch.equal(b, want)


@pytest.mark.parametrize("args, match", [
    (((1, 4, 8, 8), (1, 3, 8, 8), (1, 3, 8, 8), 4, 4), "not a multiple"),
    (((1, 4, 8, 8), (1, 2, 9, 8), (1, 2, 9, 8), 4, 4), "queries against"),
    (((1, 4, 8, 8), (1, 2, 8, 8), (1, 2, 8, 8), 0, 4), "positive ints"),
    (((4, 8, 8), (2, 8, 8), (2, 8, 8), 4, 4), "B, H, T, D"),
])
def test_bad_inputs_raise_with_the_reason(args, match):
    qs, ks, vs, window, chunk = args
    with pytest.raises(ValueError, match=match):
        torch.ops.fxfuse.window_attention(torch.randn(qs), torch.randn(ks), torch.randn(vs), window, 0.3, chunk)
