"""A LoRA group whose members' ranks add up to more than the kernels' MAX_RANK (q/k/v at r=64,
gate/up at r=128) runs its shared launches in chunks of members: forward and backward equal the
eager reference, with and without dropout, and with g/dB launched per product or grouped (4 members:
two grouped launches)."""
import os

import pytest
import torch

from fxfuse.runtime.kernels import lora as K
from fxfuse.runtime.ops import lora as L

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 or a CUDA device")
DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def test_rank_chunks():
    assert L.rank_chunks([16, 16, 16]) == [(0, 3)]
    assert L.rank_chunks([64, 64, 64]) == [(0, 2), (2, 3)]
    assert L.rank_chunks([128, 128]) == [(0, 1), (1, 2)]
    assert L.rank_chunks([100, 20, 8, 1]) == [(0, 3), (3, 4)]
    assert all(sum([100, 20, 8, 1][i:j]) <= K.MAX_RANK for i, j in L.rank_chunks([100, 20, 8, 1]))


@pytest.mark.parametrize("grouped", ["0", "1"])  # g and dB one launch per product, or per 3 members
@pytest.mark.parametrize("ranks, p", [((100, 100), 0.0), ((64, 64, 64), 0.0), ((100, 100), 0.1),
                                      ((8, 16, 4, 12), 0.0), ((5,), 0.0)])
def test_group_over_max_rank_equals_reference(monkeypatch, ranks, p, grouped):
    monkeypatch.setenv("FXFUSE_LORA_GROUPED_LAUNCH", grouped)
    launches = []
    real_group = K.skinny_matmul_group
    monkeypatch.setattr(K, "skinny_matmul_group", lambda *a, **kw: launches.append(1) or real_group(*a, **kw))
    g = torch.Generator().manual_seed(0)
    k, n = 40, 24
    x = torch.randn(2, 5, k, generator=g).to(DEVICE)
    ws = [torch.randn(n, k, generator=g).to(DEVICE) * 0.2 for _ in ranks]
    As = [torch.randn(r, k, generator=g).to(DEVICE) * 0.1 for r in ranks]
    Bs = [torch.randn(n, r, generator=g).to(DEVICE) * 0.1 for r in ranks]
    scal, ps, seed = [2.0] * len(ranks), [p] * len(ranks), torch.tensor(7)
    args = (x, ws, [None] * len(ranks), As, Bs, scal, ps, seed, torch.float32)
    got, want = L._forward_kernels(*args), L.lora_linear_reference(*args)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    dys = [torch.randn(2, 5, n, generator=g).to(DEVICE) for _ in ranks]
    bargs = (dys, x, ws, As, Bs, want[-1], scal, ps, seed, True)
    got, want = L._backward_kernels(*bargs), L.lora_linear_backward_reference(*bargs)
    assert got[0].shape == (sum(ranks), k) and len(got) == len(want) == len(ranks) + 2
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # grouped: a g and a dB launch per 3 members; else none
    assert len(launches) == (2 * -(-len(ranks) // K.GROUP_MAX) if grouped == "1" else 0)
