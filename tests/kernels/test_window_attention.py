"""fxfuse::window_attention (causal sliding-window attention in query chunks, fp32 recomputed backward)
against float64 attention with the full band mask: outputs and q/k/v gradients, GQA, odd sizes,
windows shorter and longer than the sequence, chunks smaller and larger than the window; every
output element written (outputs start as NaN)."""
import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings, strategies as st

from fxfuse.runtime.ops import window_attention as W
from test_rms_norm_kernels import DEVICE, EXAMPLES, poisoned_outputs

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _err(a, b, natural: float):
    """The worst relative-norm error over the [batch, head] slices (a wrong row in any slice shows; an
    outlier in another slice does not hide it), each slice against its own norm but at least 5% of
    `natural` (the tensor's scale per element, from the inputs): a saturated softmax's dq is many orders
    below that scale, and fp32 rounding of the scores is not."""
    a, b = a.double().flatten(2), b.flatten(2)
    num, den = (a - b).norm(dim=-1), b.norm(dim=-1)
    floor = 0.05 * natural * b.shape[-1] ** 0.5
    return (num / den.clamp_min(max(floor, 1e-30))).max().item()


def _run(q, k, v, window, scale, chunk, rows, gen):
    """(name, the op's value, float64's, natural scale) for the output and q/k/v gradients; outputs
    start as NaN."""
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    with poisoned_outputs(), mock.patch.object(W, "BACKWARD_ROWS", rows):
        out = torch.ops.fxfuse.window_attention(*leaves, window, scale, chunk)
        grad = torch.randn(out.shape, generator=gen).to(out.device, out.dtype)
        out.backward(grad)
    ref_leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = W.reference(*ref_leaves, window, scale)
    ref.backward(grad.double())
    assert out.shape == ref.shape and out.dtype == q.dtype
    rms = {n: x.double().pow(2).mean().sqrt().item() for n, x in zip("qkvg", (q, k, v, grad))}
    d_p = rms["g"] * rms["v"] * q.shape[-1] ** 0.5  # a score gradient's scale
    natural = {"out": rms["v"], "q": scale * d_p * rms["k"], "k": scale * d_p * rms["q"], "v": rms["g"]}
    return [("out", out.detach(), ref.detach(), natural["out"])] + [
        (n, x.grad, r.grad, natural[n]) for n, x, r in zip("qkv", leaves, ref_leaves)]


@settings(max_examples=EXAMPLES, deadline=None)
@given(dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       batch=st.integers(1, 2), kv_heads=st.integers(1, 3), group=st.sampled_from([1, 2, 3]),
       t=st.integers(1, 70), d=st.sampled_from([8, 16, 13]), window=st.integers(1, 80),
       chunk=st.integers(1, 40), rows=st.integers(1, 40), mag=st.sampled_from([0.1, 1.0, 8.0]),
       seed=st.integers(0, 2**16))
def test_forward_and_backward_match_float64(dtype, batch, kv_heads, group, t, d, window, chunk, rows, mag, seed):
    gen = torch.Generator().manual_seed(seed)
    hq = kv_heads * group
    q, k, v = ((torch.randn(batch, h, t, d, generator=gen) * mag).to(DEVICE, dtype)
               for h in (hq, kv_heads, kv_heads))
    for name, got, want, natural in _run(q, k, v, window, 1 / math.sqrt(d), chunk, rows, gen):
        assert not got.isnan().any(), f"{name}: NaN (an element was not written)"
        err = _err(got, want, natural)
        assert err < TOL[dtype], f"{name}: {err}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_values_near_fp16_max_stay_finite_and_close(dtype):
    """v entries near fp16's max (the output is a convex mix of v rows, so it cannot overflow); the
    window (12) is longer than a backward block (patched to 5 rows) and a forward chunk (4)."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, h, 40, 16, generator=gen).to(DEVICE, dtype) for h in (4, 2, 2))
    v[0, 1, 7:30:3, :4] = 6.0e4
    for name, got, want, natural in _run(q, k, v, 12, 0.25, 4, 5, gen):
        assert got.isfinite().all(), name
        assert _err(got, want, natural) < TOL[dtype], name


@given(t=st.integers(0, 300), window=st.integers(1, 100), chunk=st.integers(1, 100))
def test_chunks_cover_every_query_once_and_every_key_the_window_reaches(t, window, chunk):
    covered, prev_end = [], 0
    for s, e, ks in W.chunks(t, window, chunk):
        assert s == prev_end and s < e <= t and e - s <= max(window, chunk)
        assert ks == max(0, s - window + 1)  # the first query's earliest key
        prev_end = e
        covered.append((s, e))
    assert prev_end == t
    blocks = list(W.row_blocks(t, window, chunk))  # the backward's: `chunk` rows whatever the window
    assert [b[0] for b in blocks] == list(range(0, t, chunk)) and (not blocks or blocks[-1][1] == t)
    assert all(e - s <= chunk and ks == max(0, s - window + 1) for s, e, ks in blocks)


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
