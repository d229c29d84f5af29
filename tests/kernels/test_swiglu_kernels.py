"""Fuzz tests of the SwiGLU / GeGLU kernels against float64 references with HF's rounding points."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402

from fxfuse.runtime.kernels import swiglu as K  # noqa: E402
from test_rms_norm_kernels import DEVICE, EXAMPLES, ULP, f64, poisoned_outputs, rnd  # noqa: E402

pytestmark = [
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                       reason="needs TRITON_INTERPRET=1 or a CUDA device"),
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
]
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


def act64(g, activation):
    if activation == "silu":
        s = torch.sigmoid(g)
        return g * s, s * (1 + g * (1 - s))
    # 0.5·(1 + tanh(z)) written as sigmoid(2z): float64's 1 + tanh(z) cancels to 0 for z << 0
    c = math.sqrt(2 / math.pi)
    z = c * (g + 0.044715 * g ** 3)
    s = torch.sigmoid(2 * z)
    return g * s, s + g * 2 * s * (1 - s) * c * (1 + 3 * 0.044715 * g * g)


@settings(max_examples=EXAMPLES, deadline=None)
@given(dtype=st.sampled_from([F32, F16, BF16]), rows=st.sampled_from([1, 3]), width=st.sampled_from([1, 96, 4095, 77]),
       activation=st.sampled_from(["silu", "gelu_tanh"]), mag=st.sampled_from([1.0, 8.0, 100.0]),
       seed=st.integers(0, 2**16))
def test_forward_and_backward_match_float64(dtype, rows, width, activation, mag, seed):
    g = torch.Generator().manual_seed(seed)
    gate, up, dy = (torch.randn(rows, width, generator=g, dtype=torch.float64) * m for m in (mag, mag, 1.0))
    # near the fp16 maximum (|act(gate)·up| up to 4e4) without overflowing it, as eager would
    gate, up, dy = gate.clamp(-200, 200).to(dtype), up.clamp(-200, 200).to(dtype), dy.to(dtype)
    with poisoned_outputs():
        out = K.swiglu_forward(gate.to(DEVICE), up.to(DEVICE), activation)
        dg, du = K.swiglu_backward(dy.to(DEVICE), gate.to(DEVICE), up.to(DEVICE), activation)
    a, da = act64(f64(gate), activation)
    ar = rnd(a, dtype)  # HF rounds act(gate) before the product
    # one rounding of the dtype, plus fp32 exp(x) whose relative error grows with |x| (x is rounded)
    gd = f64(gate)
    x = gd.abs() if activation == "silu" else 2 * math.sqrt(2 / math.pi) * (gd + 0.044715 * gd ** 3).abs()
    tol = 1.01 * ULP[dtype] + 8 * ULP[F32] * (1 + x)
    tiny = torch.finfo(dtype).tiny * ULP[dtype]
    want = ar * f64(up)
    # act(gate) itself may round the other way when fp32 exp differs from float64's last bit
    slack = ULP[dtype] * (a.abs() * f64(up).abs()) if dtype != F32 else 0
    for name, got, ref, extra in (("out", out, want, slack), ("dup", du, f64(dy) * ar, ULP[dtype] * (f64(dy) * a).abs()),
                                  # act' cancels near its zero: bound by the terms' magnitude
                                  ("dgate", dg, f64(dy) * f64(up) * da,
                                   16 * ULP[F32] * (f64(dy) * f64(up)).abs() * (1 + f64(gate).abs()))):
        assert got.dtype == dtype and got.shape == gate.shape, name
        got = f64(got)
        assert torch.isfinite(got).all(), f"{name}: non-finite"
        bad = (got - ref).abs() > tol * ref.abs() + 1.01 * extra + tiny + 1e-6 * ULP[dtype] * f64(dy).abs()
        assert not bad.any(), (name, got[bad][:3], ref[bad][:3])


def test_launchers_decline_what_they_cannot_do():
    x = torch.randn(2, 8)
    assert "activation" in K.check_swiglu(x, x, "relu")
    assert "differs" in K.check_swiglu(x, torch.randn(1, 8), "silu")
    assert "differ" in K.check_swiglu(x, x.half(), "silu")
    assert "contiguous" in K.check_swiglu(torch.randn(8, 2).t(), torch.randn(2, 8), "silu")
    with pytest.raises(ValueError, match="not supported"):
        K.swiglu_forward(x, x, "relu")
