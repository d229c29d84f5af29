"""fxfuse::chunked_attention (attention in blocks of query rows with logit softcapping, attention
sinks and HF's additive mask; fp32 recomputed backward) against HF's eager math in float64: outputs,
q/k/v and sink gradients, GQA, odd sizes, Tq != Tkv, caps small enough to bend every score, rows per
block from 1 up; every output element written (outputs start as NaN)."""
import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings, strategies as st

from fxfuse.runtime.ops import chunked_attention as C
from test_rms_norm_kernels import DEVICE, EXAMPLES, poisoned_outputs
from test_window_attention import _err

# fp32: scores reach ~230 here (mag 8, d 13, no mask over all keys), where one fp32 ulp is 1.5e-5,
# and P = exp(z - max) carries that error relative to itself
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _mask(kind, b, tq, tk, dtype, gen):
    """HF's additive mask in q's dtype: causal (bottom-right aligned when Tq < Tkv, as with a cache),
    random padding that keeps at least one key per row, causal with left padding (HF's mask for a
    left-padded batch: the padded query rows have every key masked, where eager attends uniformly);
    None for no mask."""
    if kind is None:
        return None
    if kind == "causal":
        keep = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq).view(1, 1, tq, tk)
    elif kind == "left_padding":
        pad = torch.randint(0, tk, (b,), generator=gen).view(b, 1, 1, 1)
        keep = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq).view(1, 1, tq, tk) & (torch.arange(tk) >= pad)
    else:
        keep = torch.rand(b, 1, tq, tk, generator=gen) < 0.6
        keep[..., 0] = True
    return torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min).to(DEVICE)


def _run(q, k, v, mask, sinks, scale, softcap, rows, gen):
    """(name, the op's value, float64's, natural scale) for the output and the gradients."""
    leaves = [x.clone().requires_grad_() for x in (q, k, v)] + ([sinks.clone().requires_grad_()] if sinks is not None else [])
    with poisoned_outputs():
        out, lse = torch.ops.fxfuse.chunked_attention(*leaves[:3], mask, leaves[3] if sinks is not None else None,
                                                      scale, softcap, rows)
        grad = torch.randn(out.shape, generator=gen).to(out.device, out.dtype)
        out.backward(grad)
    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    ref = C.reference(*ref_leaves[:3], mask, ref_leaves[3] if sinks is not None else None, scale, softcap)
    ref.backward(grad.double())
    assert out.shape == ref.shape and out.dtype == q.dtype
    # the log-sum-exp the op returns (each row's softmax normaliser): over the capped, masked scores
    # and the sink, against float64
    with torch.no_grad():
        q64, k64 = (x.detach().double() for x in (q, k))
        z = (q64 @ C._heads(k64, q.shape[1]).transpose(-1, -2)) * scale
        z = torch.tanh(z / softcap) * softcap if softcap else z
        z = z + mask.double() if mask is not None else z
        if sinks is not None:
            z = torch.cat([z, sinks.double().view(1, -1, 1, 1).expand(*z.shape[:-1], 1)], dim=-1)
        want_lse = torch.logsumexp(z, dim=-1)
    assert lse.shape == want_lse.shape and not lse.isnan().any()
    spread = z.amax(dim=-1).abs().clamp_min(1.0)  # fp32 rounds a logit of size |z| by ~|z| * 6e-8
    lse_tol = 1e-12 if q.dtype == torch.float64 else 1e-5
    assert ((lse.double() - want_lse).abs() / spread).max().item() < lse_tol
    rms = {n: x.double().pow(2).mean().sqrt().item() for n, x in zip("qkvg", (q, k, v, grad))}
    d_p = rms["g"] * rms["v"] * q.shape[-1] ** 0.5  # a score gradient's scale
    natural = {"out": rms["v"], "q": scale * d_p * rms["k"], "k": scale * d_p * rms["q"], "v": rms["g"],
               "sinks": d_p * q.shape[0] * q.shape[2]}
    names = "qkv" + ("s" if sinks is not None else "")
    return [("out", out.detach(), ref.detach(), natural["out"])] + [
        ("sinks" if n == "s" else n, x.grad, r.grad, natural["sinks" if n == "s" else n])
        for n, x, r in zip(names, leaves, ref_leaves)]


@settings(max_examples=EXAMPLES, deadline=None)
@given(dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]),
       batch=st.integers(1, 2), kv_heads=st.integers(1, 3), group=st.sampled_from([1, 2, 3]),
       tq=st.integers(1, 40), extra=st.sampled_from([0, 0, 5]), d=st.sampled_from([8, 16, 13]),
       softcap=st.sampled_from([0.0, 0.5, 5.0, 50.0]), sinks=st.booleans(),
       mask=st.sampled_from([None, "causal", "padding", "left_padding"]), rows=st.integers(1, 48),
       mag=st.sampled_from([0.1, 1.0, 8.0]), seed=st.integers(0, 2**16))
def test_forward_and_backward_match_float64(dtype, batch, kv_heads, group, tq, extra, d, softcap, sinks, mask,
                                            rows, mag, seed):
    gen = torch.Generator().manual_seed(seed)
    hq, tk = kv_heads * group, tq + extra
    q = (torch.randn(batch, hq, tq, d, generator=gen) * mag).to(DEVICE, dtype)
    k, v = ((torch.randn(batch, kv_heads, tk, d, generator=gen) * mag).to(DEVICE, dtype) for _ in range(2))
    s = (torch.randn(hq, generator=gen) * 2).to(DEVICE, dtype) if sinks else None
    m = _mask(mask, batch, tq, tk, dtype, gen)
    for name, got, want, natural in _run(q, k, v, m, s, 1 / math.sqrt(d), softcap, rows, gen):
        assert not got.isnan().any(), f"{name}: NaN (an element was not written)"
        tol = 1e-9 if dtype == torch.float64 else TOL[dtype]
        if name == "sinks":
            err = ((got.double() - want).abs() / (want.abs() + 0.05 * natural)).max().item()
        else:
            err = _err(got, want, natural)
        assert err < tol, f"{name}: {err}"


@pytest.mark.parametrize("sinks", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_query_rows_with_every_key_masked_match_eager(dtype, sinks):
    """A left-padded batch: HF's mask (finfo.min) drops every key of the padded query rows. Eager's
    softmax attends uniformly there (to the sink alone with sinks), and those rows' outputs reach the
    loss through the next layer, so their gradients count; a softmax shifted by the log-sum-exp,
    which rounds to finfo.min, would give every key 1."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, h, 12, 16, generator=gen).to(DEVICE, dtype) for h in (4, 2, 2))
    keep = torch.ones(12, 12, dtype=torch.bool).tril().view(1, 1, 12, 12) & (torch.arange(12) >= torch.tensor([0, 5]).view(2, 1, 1, 1))
    m = torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min).to(DEVICE)
    s = (torch.randn(4, generator=gen) * 2).to(DEVICE, dtype) if sinks else None
    for name, got, want, natural in _run(q, k, v, m, s, 0.25, 50.0, 5, gen):
        assert got.isfinite().all(), name
        if name == "sinks":
            err = ((got.double() - want).abs() / (want.abs() + 0.05 * natural)).max().item()
        else:
            err = _err(got, want, natural)
        assert err < TOL[dtype], f"{name}: {err}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_scores_beyond_fp16_max_are_capped_not_overflowed(dtype):
    """q and k near 300 make q·kᵀ ~ 1e6, beyond fp16's 65504: the op's fp32 scores meet the cap
    (Gemma 2's 50) before anything is rounded, so nothing is inf or NaN; v near fp16's max stays
    finite (the output is a convex mix of v rows)."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, h, 20, 16, generator=gen).to(DEVICE, dtype) for h in (4, 2, 2))
    q[0, 0, :5] = 300.0
    k[0, 0, :7] = 300.0
    v[0, 1, 7:20:3, :4] = 6.0e4
    m = _mask("causal", 1, 20, 20, dtype, gen)
    for name, got, want, natural in _run(q, k, v, m, None, 0.25, 50.0, 6, gen):
        assert got.isfinite().all(), name
        assert _err(got, want, natural) < TOL[dtype], name


def test_without_softcap_or_sinks_it_is_sdpa():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 33, 8, generator=gen, dtype=torch.float64).to(DEVICE) for _ in range(3))
    m = _mask("causal", 2, 33, 33, torch.float64, gen)
    out, _ = torch.ops.fxfuse.chunked_attention(q, k, v, m, None, 0.3, 0.0, 7)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=0.3)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


def test_block_size_does_not_change_the_answer_and_rows_bound_the_scores():
    """Blocks of 1, 7 and all rows give the same float64 output; the biggest fp32/f64 score tensor
    made has `rows` rows, not Tq."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 40, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    outs = [torch.ops.fxfuse.chunked_attention(q, k, v, None, None, 0.3, 5.0, r)[0] for r in (1, 7, 40)]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(outs[0], outs[2], rtol=1e-12, atol=1e-12)
    seen = []
    real = C._logits

    def spy(qb, *args):
        z, th = real(qb, *args)
        seen.append(z.shape)
        return z, th
    with mock.patch.object(C, "_logits", spy):
        torch.ops.fxfuse.chunked_attention(q.float(), k.float(), v.float(), None, None, 0.3, 5.0, 7)
    assert max(s[2] for s in seen) == 7 and len(seen) == math.ceil(40 / 7)


@pytest.mark.parametrize("change, match", [
    (dict(k=(1, 3, 8, 8), v=(1, 3, 8, 8)), "not a multiple"),
    (dict(q=(4, 8, 8)), "B, H, T, D"),
    (dict(mask=torch.zeros(1, 1, 8, 8, dtype=torch.bool)), "additive float mask"),
    (dict(mask=torch.zeros(1, 1, 4, 8)), "does not fit the scores"),
    (dict(sinks=torch.zeros(3)), "one float logit per query head"),
    (dict(softcap=-1.0), "softcap"),
    (dict(rows=0), "positive int"),
])
def test_bad_inputs_raise_with_the_reason(change, match):
    a = dict(q=(1, 4, 8, 8), k=(1, 2, 8, 8), v=(1, 2, 8, 8), mask=None, sinks=None, softcap=1.0, rows=4)
    a.update(change)
    with pytest.raises(ValueError, match=match):
        torch.ops.fxfuse.chunked_attention(torch.randn(a["q"]), torch.randn(a["k"]), torch.randn(a["v"]), a["mask"],
                                           a["sinks"], 0.3, a["softcap"], a["rows"])


def test_a_mask_that_wants_a_gradient_is_refused_in_the_backward():
    q, k, v = (torch.randn(1, 2, 6, 4, requires_grad=True) for _ in range(3))
    mask = torch.zeros(1, 1, 6, 6, requires_grad=True)
    out, _ = torch.ops.fxfuse.chunked_attention(q, k, v, mask, None, 0.5, 0.0, 4)
    with pytest.raises(NotImplementedError, match="mask's gradient"):
        out.sum().backward()
