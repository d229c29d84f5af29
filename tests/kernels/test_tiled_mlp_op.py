"""`fxfuse::tiled_mlp` against the untiled composition of the same ops (grouped gate/up LoRA op,
act(gate) * up, down LoRA op) under autograd: chunking over tokens must change nothing but the
summation order of the LoRA weight gradients. Random shapes incl. odd sizes, chunk sizes from 1
row to more than all rows, fp32 and bf16 bases with fp32 adapters or adapters in the base dtype,
silu and tanh-gelu."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402

from fxfuse.runtime.ops import tiled_mlp as T  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 or a CUDA device")
DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
EXAMPLES = int(os.environ.get("FXFUSE_FUZZ_EXAMPLES", 12))
TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2}


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def untiled(x, ws, as_, bs, ss, activation, dtype):
    g, u, _ = torch.ops.fxfuse.lora_linear(x, ws[:2], [None, None], as_[:2], bs[:2], ss[:2], [0.0, 0.0], None, dtype)
    h = T._act(g, activation) * u
    y, _ = torch.ops.fxfuse.lora_linear(h, [ws[2]], [None], [as_[2]], [bs[2]], [ss[2]], [0.0], None, dtype)
    return y


@st.composite
def cases(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    m, h, i, r = draw(st.integers(1, 40)), draw(st.integers(2, 24)), draw(st.integers(2, 40)), draw(st.integers(1, 8))
    lead = draw(st.sampled_from([(m,), (1, m), (2, (m + 1) // 2)]))
    rows = draw(st.integers(1, 50))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(*lead, h, generator=gen).to(dtype)
    ws = [(torch.randn(i, h, generator=gen) / h ** 0.5).to(dtype), (torch.randn(i, h, generator=gen) / h ** 0.5).to(dtype),
          (torch.randn(h, i, generator=gen) / i ** 0.5).to(dtype)]
    # PEFT's default fp32 adapters, or adapters in the base dtype (bf16 adapters over a bf16 base)
    ad = draw(st.sampled_from([torch.float32, dtype]))
    as_ = [(torch.randn(r, h, generator=gen) / h ** 0.5).to(ad), (torch.randn(r, h, generator=gen) / h ** 0.5).to(ad),
           (torch.randn(r, i, generator=gen) / i ** 0.5).to(ad)]
    bs = [torch.randn(i, r, generator=gen).to(ad), torch.randn(i, r, generator=gen).to(ad),
          torch.randn(h, r, generator=gen).to(ad)]
    ss = [draw(st.sampled_from([0.5, 2.0])) for _ in range(3)]
    return x, ws, as_, bs, ss, draw(st.sampled_from(list(T.ACTIVATIONS))), rows


@settings(max_examples=EXAMPLES, deadline=None)
@given(cases())
def test_tiled_equals_untiled_forward_and_backward(case):
    x, ws, as_, bs, ss, activation, rows = case
    dtype = x.dtype
    dev = lambda ts: [t.to(DEVICE).requires_grad_(True) for t in ts]  # noqa: E731  (the adapters)
    ws_d = [w.to(DEVICE) for w in ws]
    results = []
    for tiled in (True, False):
        xd = x.to(DEVICE).requires_grad_(True)
        ad, bd = dev(as_), dev(bs)
        y = (T.tiled_mlp(xd, ws_d, ad, bd, ss, activation, rows, dtype, dtype) if tiled
             else untiled(xd, ws_d, ad, bd, ss, activation, dtype))
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(dtype).to(DEVICE)
        y.backward(dy)
        results.append([y.detach(), xd.grad] + [t.grad for t in ad + bd])
    for name, got, want in zip(["y", "dx", "dA_gate", "dA_up", "dA_down", "dB_gate", "dB_up", "dB_down"], *results):
        assert torch.isfinite(got).all(), name
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert rel(got, want) <= TOL[dtype], (name, rel(got, want))


def test_bad_input_is_an_error():
    x = torch.randn(4, 8)
    ws = [torch.randn(6, 8), torch.randn(6, 8), torch.randn(8, 6)]
    as_, bs = [torch.randn(2, 8), torch.randn(2, 8), torch.randn(2, 6)], [torch.randn(6, 2), torch.randn(6, 2), torch.randn(8, 2)]
    with pytest.raises(ValueError, match="activation"):
        T.tiled_mlp(x, ws, as_, bs, [1.0] * 3, "relu", 2, x.dtype, x.dtype)
    with pytest.raises(ValueError, match="rows_per_chunk"):
        T.tiled_mlp(x, ws, as_, bs, [1.0] * 3, "silu", 0, x.dtype, x.dtype)
    with pytest.raises(ValueError, match="gated MLP"):
        T.tiled_mlp(x, [ws[0], ws[1], torch.randn(7, 6)], as_, bs, [1.0] * 3, "silu", 2, x.dtype, x.dtype)
