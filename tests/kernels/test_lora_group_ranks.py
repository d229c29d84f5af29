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


@pytest.mark.parametrize("expand", ["1", "0"])  # low-rank terms by one lowrank_expand a 3 members, or torch ops
@pytest.mark.parametrize("ranks, bias, dtype", [((16, 16, 16), False, torch.float32), ((8, 16, 4, 12), True, torch.float32),
                                               ((5,), True, torch.bfloat16), ((100, 100), False, torch.float16)])
def test_cublas_forward_with_and_without_lowrank_expand_equals_reference(monkeypatch, ranks, bias, dtype, expand):
    """The cuBLAS strategy (CUDA's) runs on the CPU too: the op's forward with the low-rank terms from
    `lowrank_expand` (one launch per 3 members) or from per-member torch ops matches the reference."""
    from fxfuse.runtime.kernels import lora_expand as KE
    monkeypatch.setenv("FXFUSE_LORA_GEMM", "cublas")
    monkeypatch.setenv("FXFUSE_LORA_EXPAND", expand)
    launches = []
    real = KE.lowrank_expand
    monkeypatch.setattr(KE, "lowrank_expand", lambda *a, **kw: launches.append(len(a[1])) or real(*a, **kw))
    g = torch.Generator().manual_seed(1)
    k, n = 40, 24
    x = torch.randn(3, 7, k, generator=g).to(DEVICE).to(dtype)
    ws = [(torch.randn(n + i, k, generator=g) * 0.2).to(DEVICE).to(dtype) for i, _ in enumerate(ranks)]
    bs_ = [(torch.randn(n + i, generator=g)).to(DEVICE).to(dtype) if bias else None for i, _ in enumerate(ranks)]
    As = [torch.randn(r, k, generator=g).to(DEVICE) * 0.1 for r in ranks]
    Bs = [torch.randn(n + i, r, generator=g).to(DEVICE) * 0.1 for i, r in enumerate(ranks)]
    args = (x, ws, bs_, As, Bs, [2.0] * len(ranks), [0.0] * len(ranks), None, dtype)
    got, want = L._forward_kernels(*args), L.lora_linear_reference(*args)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)
    # members split into launches of up to 3; chunks of the rank limit do not matter here
    assert launches == ([min(3, len(ranks) - c) for c in range(0, len(ranks), 3)] if expand == "1" else [])


def test_lowrank_expand_declines_mixed_adapter_dtypes_and_the_torch_path_runs(monkeypatch):
    """Members 0-2 could share a launch, member 3's B is fp16 while member 4's is fp32: the chunk of
    members 3-4 is declined, so no chunk launches (all are checked first) and the torch path runs."""
    from fxfuse.runtime.kernels import lora_expand as KE
    monkeypatch.setenv("FXFUSE_LORA_GEMM", "cublas")
    monkeypatch.setenv("FXFUSE_LORA_EXPAND", "1")
    launches = []
    real = KE.lowrank_expand
    monkeypatch.setattr(KE, "lowrank_expand", lambda *a, **kw: launches.append(1) or real(*a, **kw))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 16, generator=g).to(DEVICE)
    ws = [torch.randn(8, 16, generator=g).to(DEVICE) for _ in range(5)]
    As = [torch.randn(4, 16, generator=g).to(DEVICE) for _ in range(5)]
    Bs = [torch.randn(8, 4, generator=g).to(DEVICE) for _ in range(5)]
    Bs[3] = Bs[3].half()
    args = (x, ws, [None] * 5, As, Bs, [1.0] * 5, [0.0] * 5, None, torch.float32)
    for a, b in zip(L._forward_kernels(*args), L.lora_linear_reference(*args)):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    assert launches == []
