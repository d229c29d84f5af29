"""`lora_linear_graph` (the LoRA op's math as graph ops) against float64, forward and backward.

No Triton here: plain torch ops. The CPU takes the upcast path; the split path (three bf16 parts
of each fp32 operand, one GEMM with fp32 output: what CUDA runs) is forced on the CPU by patching
`split_path`, with torch's fp32 GEMM standing in for mm's out_dtype (the same products).
"""
import math
import os
from unittest import mock

import pytest
import torch
from hypothesis import assume, given, settings, strategies as st

from fxfuse.runtime.ops import lora as lora_op
from fxfuse.runtime.ops import lora_graph as LG
from tiny import rel

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
# the outputs' own rounding, with room for the sums ahead of it
OUT_TOL = {F32: 1e-5, BF16: 1.6e-2, F16: 2e-3}


def _case(data):
    dtype = data.draw(st.sampled_from([F32, BF16, F16]), label="dtype")
    adapter = data.draw(st.sampled_from([F32, dtype]), label="adapter dtype")
    m = data.draw(st.integers(1, 70), label="M")
    k = data.draw(st.integers(1, 67), label="K")
    n_members = data.draw(st.integers(1, 3), label="members")
    ns = [data.draw(st.integers(1, 53), label="N") for _ in range(n_members)]
    rs = [data.draw(st.integers(1, 16), label="r") for _ in range(n_members)]
    bias = data.draw(st.booleans(), label="bias")
    mag = data.draw(st.sampled_from([1.0, 1e-3, 300.0]), label="input scale")
    scalings = [data.draw(st.sampled_from([0.5, 2.0, 16 / math.sqrt(r)]), label="s") for r in rs]
    lead = data.draw(st.sampled_from([(m,), (1, m)]), label="leading dims")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    x = rnd(*lead, k, scale=mag)
    if data.draw(st.booleans(), label="outlier"):  # one large activation, as LLM hidden states have
        x.view(-1, k)[0, 0] = 2e3 if dtype == F16 else 3e4
    ws = [rnd(n, k, scale=k ** -0.5) for n in ns]
    bs = [rnd(n) if bias else None for n in ns]
    a_s = [rnd(r, k, scale=k ** -0.5) for r in rs]
    b_s = [rnd(n, r, scale=0.1) for n, r in zip(ns, rs)]
    dys = [rnd(*lead, n) for n in ns]
    cast = lambda ts, dt: [t.to(dt) if t is not None else None for t in ts]  # noqa: E731
    return (x.to(dtype), cast(ws, dtype), cast(bs, dtype), cast(a_s, adapter), cast(b_s, adapter), scalings,
            cast(dys, dtype), dtype)


def _float64(x, ws, bs, a_s, b_s, scalings, dys):
    """Outputs and gradients (x, A's, B's) of the math in float64 from the same (rounded) inputs, and
    the same sums over absolute values: the scale each result's rounding error is relative to (a
    sum that cancels is not held to the relative error of its terms)."""
    def run(f):
        x64 = f(x).requires_grad_()
        a64 = [f(a).requires_grad_() for a in a_s]
        b64 = [f(b).requires_grad_() for b in b_s]
        ys = [x64 @ f(w).t() + (f(b) if b is not None else 0) + s * (x64 @ a.t()) @ bb.t()
              for w, b, a, bb, s in zip(ws, bs, a64, b64, scalings)]
        return ys, torch.autograd.grad(ys, [x64, *a64, *b64], [f(d) for d in dys])
    return run(lambda t: t.double()), run(lambda t: t.double().abs())


def _err(got, want, scale):
    """The error's norm relative to the norm of the result's absolute-value scale."""
    return ((got.double() - want).norm() / scale.norm().clamp_min(1e-30)).item()


def _graph(x, ws, bs, a_s, b_s, scalings, dys, out_dtype):
    x = x.clone().requires_grad_()
    a_s = [a.clone().requires_grad_() for a in a_s]
    b_s = [b.clone().requires_grad_() for b in b_s]
    ys = LG.lora_linear_graph(x, ws, bs, a_s, b_s, scalings, out_dtype)
    grads = torch.autograd.grad(ys, [x, *a_s, *b_s], dys)
    return ys, grads


@pytest.mark.parametrize("split", [False, True])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_outputs_and_gradients_match_float64(split, data):
    x, ws, bs, a_s, b_s, scalings, dys, dtype = _case(data)
    (want_y, want_g), (scale_y, scale_g) = _float64(x, ws, bs, a_s, b_s, scalings, dys)
    targets = [(y, dtype) for y in want_y] + [(g, t.dtype) for g, t in zip(want_g, [x, *a_s, *b_s])]
    # a float64 result that does not fit its dtype (fp16 adapters, large inputs): nothing to compare
    assume(all(torch.isfinite(v.to(dt)).all() for v, dt in targets))
    with mock.patch.object(LG, "split_path", lambda t: split and t.dtype == BF16):
        ys, grads = _graph(x, ws, bs, a_s, b_s, scalings, dys, dtype)
    tol = OUT_TOL[dtype]
    for y, want, scale in zip(ys, want_y, scale_y):
        assert y.dtype == dtype and y.shape == want.shape
        assert torch.isfinite(y).all()
        assert _err(y, want, scale) <= tol, (_err(y, want, scale), tol)
    gx, *g_ab = grads
    assert gx.dtype == dtype and torch.isfinite(gx).all()
    # dx sums one rounding per member in the activation dtype, as eager autograd does
    assert _err(gx, want_g[0], scale_g[0]) <= tol * (len(ws) + 1)
    for g, want, scale, t in zip(g_ab, want_g[1:], scale_g[1:], [*a_s, *b_s]):
        assert g.dtype == t.dtype and g.shape == t.shape and torch.isfinite(g).all()
        # fp32 adapters: fp32 products of exact activation-dtype operands (dy, x) with fp32 ones (bf16x3
        # on the split path); adapters in the activation dtype round the gradient once more
        grad_tol = 1e-5 if t.dtype == F32 else OUT_TOL[t.dtype]
        assert _err(g, want, scale) <= grad_tol * 4, (_err(g, want, scale), grad_tol)


@pytest.mark.parametrize("compiled", [False, True])
def test_split3_is_exact_eager_and_under_inductor(compiled):
    """Under Inductor a bf16 round trip inside one kernel is not rounded (emulate_precision_casts
    off): a split by casts came out as hi alone there. The bit-mask split is exact both ways."""
    t = torch.randn(64, 33) * torch.logspace(-30, 30, 33)
    split = torch.compile(LG.split3, backend="inductor", fullgraph=True) if compiled else LG.split3
    parts = split(t)
    assert all(p.dtype == BF16 for p in parts)
    assert torch.equal(sum(p.double() for p in parts), t.double())
    assert (parts[1] != 0).any() and (parts[2] != 0).any()


def test_split_path_under_inductor_is_as_precise_as_eager():
    """The whole Function compiled (forward and backward graphs, split path forced): fp32
    adapters' gradients stay at fp32 precision against float64, as eagerly."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 37, 48, generator=g).to(BF16)
    ws = [(torch.randn(n, 48, generator=g) * 0.1).to(BF16) for n in (40, 24)]
    a_s = [torch.randn(r, 48, generator=g) * 0.1 for r in (8, 4)]
    b_s = [torch.randn(n, r, generator=g) * 0.1 for n, r in ((40, 8), (24, 4))]
    dys = [torch.randn(2, 37, n, generator=g).to(BF16) for n in (40, 24)]
    (_, want_g), (_, scale_g) = _float64(x, ws, [None, None], a_s, b_s, [2.0, 0.5], dys)

    def step(x, *ab):
        ys = LG.lora_linear_graph(x, ws, [None, None], list(ab[:2]), list(ab[2:]), [2.0, 0.5], BF16)
        return torch.autograd.grad(ys, [x, *ab], dys)

    with mock.patch.object(LG, "split_path", lambda t: t.dtype == BF16):
        for fn in (step, torch.compile(step, backend="inductor")):
            leaves = [x.clone().requires_grad_()] + [t.clone().requires_grad_() for t in a_s + b_s]
            grads = fn(*leaves)
            for got, want, scale in zip(grads[1:], want_g[1:], scale_g[1:]):
                assert _err(got, want, scale) <= 1e-6, _err(got, want, scale)


def test_dot32_split_equals_the_upcast_product():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(37, 29, generator=g).to(BF16)
    b = torch.randn(29, 11, generator=g)
    exact = a.double() @ b.double()
    assert rel(LG.dot32(a, b, split=True), exact) < 1e-6
    assert rel(LG.dot32(a, b, split=False), exact) < 1e-6


def test_same_semantics_as_the_fused_op_reference():
    """The graph ops compute what `fxfuse::lora_linear`'s reference computes (fp32 here)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, 24, generator=g)
    ws = [torch.randn(n, 24, generator=g) for n in (10, 7)]
    bs = [torch.randn(10, generator=g), None]
    a_s = [torch.randn(r, 24, generator=g) for r in (4, 3)]
    b_s = [torch.randn(n, r, generator=g) for n, r in ((10, 4), (7, 3))]
    x.requires_grad_()
    for t in a_s + b_s:
        t.requires_grad_()
    ys = LG.lora_linear_graph(x, ws, bs, a_s, b_s, [2.0, 0.5], F32)
    ref = lora_op.lora_linear_reference(x, ws, bs, a_s, b_s, [2.0, 0.5], [0.0, 0.0], None, F32)
    for y, r in zip(ys, ref[:2]):
        assert rel(y, r) < 1e-6
    dys = [torch.randn(y.shape, generator=g) for y in ys]
    got = torch.autograd.grad(ys, [*a_s, *b_s, x], dys)
    d_a, *rest = lora_op.lora_linear_backward_reference(dys, x, ws, a_s, b_s, ref[2], [2.0, 0.5], [0.0, 0.0], None,
                                                         True)
    want = [d_a[:4], d_a[4:], *rest]
    for a, b in zip(got, want):
        assert rel(a, b) < 1e-6


def test_member_lists_must_agree():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="one entry per member"):
        LG.lora_linear_graph(x, [torch.randn(3, 8)], [], [torch.randn(2, 8)], [torch.randn(3, 2)], [1.0], F32)


def test_autocast_leaves_the_products_alone():
    """Under autocast the fp32 products would run in bf16; the pass already chose the dtypes."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g).to(BF16).requires_grad_()
    w = [torch.randn(48, 32, generator=g).to(BF16)]
    a = [torch.randn(8, 32, generator=g).requires_grad_()]
    b = [torch.randn(48, 8, generator=g).requires_grad_()]

    def run():
        y = LG.lora_linear_graph(x, w, [None], a, b, [2.0], BF16)[0]
        return [y, *torch.autograd.grad(y.float().sum(), [x, a[0], b[0]])]

    plain = run()
    with torch.autocast("cpu", dtype=BF16):
        cast = run()
    for p, c in zip(plain, cast):
        assert p.dtype == c.dtype and torch.equal(p, c)


def test_meta_tensors_give_shapes_forward_and_backward():
    """`fxfuse inspect` runs full-size models on the meta device: the graph ops must not enter
    autocast there (torch.autocast('meta') raises)."""
    x = torch.empty(3, 5, 64, device="meta", requires_grad=True)
    w = [torch.empty(48, 64, device="meta"), torch.empty(16, 64, device="meta")]
    a = [torch.empty(4, 64, device="meta", requires_grad=True), torch.empty(8, 64, device="meta", requires_grad=True)]
    b = [torch.empty(48, 4, device="meta", requires_grad=True), torch.empty(16, 8, device="meta", requires_grad=True)]
    outs = LG.lora_linear_graph(x, w, [None, None], a, b, [2.0, 0.5], torch.float32)
    assert [tuple(o.shape) for o in outs[:2]] == [(3, 5, 48), (3, 5, 16)]
    (outs[0].sum() + outs[1].sum()).backward()
    assert x.grad.shape == x.shape and [t.grad.shape for t in (*a, *b)] == [t.shape for t in (*a, *b)]


def _op(x, ws, bs, a_s, b_s, scalings, dys, out_dtype):
    x = x.clone().requires_grad_()
    a_s = [a.clone().requires_grad_() for a in a_s]
    b_s = [b.clone().requires_grad_() for b in b_s]
    ys = torch.ops.fxfuse.lora_linear(x, ws, bs, a_s, b_s, scalings, [0.0] * len(ws), None, out_dtype)[:len(ws)]
    grads = torch.autograd.grad(ys, [x, *a_s, *b_s], dys)
    return ys, grads


@pytest.mark.parametrize("impl", ["graph ops", "op, fused kernel", "op, cuBLAS path"])
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_fp32_outputs_from_16_bit_activations_are_not_rounded_to_16_bits(impl, data):
    """out_dtype=fp32 with fp16/bf16 activations (the fp16 guard's LoRA sites that join an fp32
    residual stream): outputs within fp32 rounding of float64, also past fp16's 65504."""
    x, ws, bs, a_s, b_s, scalings, dys, dtype = _case(data)
    assume(dtype != F32)
    dys = [d.float() for d in dys]  # the outputs' gradients come in their dtype
    if data.draw(st.booleans(), label="outputs past 65504"):
        (y64, _), _ = _float64(x, ws, bs, a_s, b_s, scalings, dys)
        peak = max(y.abs().max().item() for y in y64)
        assume(peak > 0)
        ws = [(w.double() * (2e5 / peak)).to(dtype) for w in ws]
        bs = [(b.double() * (2e5 / peak)).to(dtype) if b is not None else None for b in bs]
        assume(all(torch.isfinite(t).all() for t in ws + [b for b in bs if b is not None]))
    (want_y, want_g), (scale_y, scale_g) = _float64(x, ws, bs, a_s, b_s, scalings, dys)
    strategy = {"graph ops": "auto", "op, fused kernel": "triton", "op, cuBLAS path": "cublas"}[impl]
    with mock.patch.dict(os.environ, {"FXFUSE_LORA_GEMM": strategy}):
        ys, grads = (_graph if impl == "graph ops" else _op)(x, ws, bs, a_s, b_s, scalings, dys, F32)
    for y, want, scale in zip(ys, want_y, scale_y):
        assert y.dtype == F32 and y.shape == want.shape and torch.isfinite(y).all()
        # far below the activation dtype's own rounding (fp16 2e-3 / bf16 1.6e-2 above)
        assert _err(y, want, scale) <= 1e-4, (_err(y, want, scale), impl)
    # the adapters' gradients (dy is rounded to the activation dtype first, as for a 16-bit output)
    for g, want, scale, t in zip(grads[1:], want_g[1:], scale_g[1:], [*a_s, *b_s]):
        if torch.isfinite(want.to(t.dtype)).all():
            assert g.dtype == t.dtype and torch.isfinite(g).all()
            assert _err(g, want, scale) <= 4 * OUT_TOL[dtype], (_err(g, want, scale), impl)
