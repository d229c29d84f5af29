"""On a CUDA device: fxfuse::window_attention (SDPA's CUDA kernels per chunk with a band mask, the fp32
recomputed backward) against float64 attention with the full band mask, with GQA and several
chunks; and the op under torch.compile (Inductor) equal to it in eager."""
import math

import pytest
import torch

from fxfuse.runtime.ops import window_attention as W
from tiny import rel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (device machine)")


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 2e-2), (torch.float16, 4e-3), (torch.float32, 1e-4)])
def test_matches_float64_on_the_gpu(dtype, tol):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 8, 1100, 64, device="cuda", generator=gen).to(dtype).requires_grad_()
    k, v = (torch.randn(2, 2, 1100, 64, device="cuda", generator=gen).to(dtype).requires_grad_() for _ in range(2))
    out = torch.ops.fxfuse.window_attention(q, k, v, 300, 1 / math.sqrt(64), 256)  # 4 chunks of 300 rows
    grad = torch.randn(out.shape, device="cuda", generator=gen).to(dtype)
    out.backward(grad)
    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = W.reference(*ref_in, 300, 1 / math.sqrt(64))
    ref.backward(grad.double())
    assert rel(out.detach(), ref.detach()) < tol
    for x, r in zip((q, k, v), ref_in):
        assert rel(x.grad, r.grad) < tol


def test_compiled_equals_eager():
    gen = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(1, 4, 700, 64, device="cuda", generator=gen, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 4, 700, 64, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(2))
    fn = lambda q, k, v: torch.ops.fxfuse.window_attention(q, k, v, 128, 0.125, 256)  # noqa: E731
    eager = fn(q, k, v)
    compiled = torch.compile(fn, fullgraph=True)(q, k, v)
    assert torch.equal(eager, compiled)
