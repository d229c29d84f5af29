"""How the skinny and weight-gradient launchers split their reduction: enough programs to fill the
GPU, and no more than two atomic partial sums in deterministic mode (two added to a zeroed output give
the same bits in either order; more do not)."""
import pytest
import torch

from fxfuse.runtime.kernels import lora as K

CPU = torch.device("cpu")


@pytest.fixture
def h200(monkeypatch):
    monkeypatch.setattr(K, "_num_sms", lambda device: 132)


@pytest.mark.parametrize("m,k,want", [
    (4096, 4096, 4),    # g of q/o/down (M tokens, K out_features) and dB of q/o/down (M out, K tokens)
    (1024, 4096, 4),    # dB of k/v: 8 row blocks, K/1024 caps it
    (14336, 4096, 3),   # dB of gate/up: 112 row blocks, 3 splits reach ~2 programs per SM
    (4096, 1024, 1),    # g of k/v: too little K to share
    (4096, 14336, 9),   # g of gate/up: 2 programs per SM
    (40000, 4096, 1),   # enough row blocks
])
def test_skinny_split_fills_the_gpu(h200, m, k, want):
    assert K._skinny_split(m, k, CPU) == want
    assert K._skinny_split(m, k, CPU, deterministic=True) == min(want, 2)


@pytest.mark.parametrize("m,k,want", [(4096, 4096, 8), (4096, 14336, 3), (1024, 4096, 2), (256, 4096, 1)])
def test_weight_grad_split_fills_the_gpu(h200, m, k, want):
    assert K._wgrad_split(m, k, CPU) == want
    assert K._wgrad_split(m, k, CPU, deterministic=True) == min(want, 2)


def test_layout_key_tells_a_transposed_read_from_a_row_major_one():
    x = torch.randn(8, 16)
    assert K._tune_layout(x, x) == 3
    assert K._tune_layout(x.t(), x) == 2
    assert K._tune_layout(x, x.t()) == 1
    assert K._tune_layout(x.t(), x.t()) == 0


def test_deterministic_mode_caps_the_launchers_splits(monkeypatch):
    """The plans a launcher remembers follow torch's deterministic switch, and both give the same sums."""
    monkeypatch.setattr(K, "_SKINNY_PLANS", {})
    monkeypatch.setattr(K, "_WGRAD_PLANS", {})
    gen = torch.Generator().manual_seed(0)
    x, a = torch.randn(40, 4096, generator=gen), torch.randn(8, 4096, generator=gen)
    g = torch.randn(4096, 8, generator=gen)
    ref_s = (x.double() @ a.double().t())
    ref_w = (g.double().t() @ x.t().contiguous().double())
    outs = {}
    was = torch.are_deterministic_algorithms_enabled()
    try:
        for det in (False, True):
            torch.use_deterministic_algorithms(det)
            outs[det] = (K.skinny_matmul(x, a), K.lowrank_weight_grad(g, x.t().contiguous()))
    finally:
        torch.use_deterministic_algorithms(was)
    splits = sorted(plan[3] for _, plan in K._SKINNY_PLANS.values())
    assert splits == [2, 4]  # interpreter: 4 "SMs", one row block, K/1024 = 4; capped at 2
    w_splits = sorted(plan[3] for _, plan in K._WGRAD_PLANS.values())
    assert w_splits == [2, 8]
    for s, w in outs.values():
        torch.testing.assert_close(s.double(), ref_s, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(w.double(), ref_w, rtol=1e-5, atol=1e-3)


def test_empty_sizes_do_not_split(h200):
    assert K._skinny_split(0, 4096, CPU) == 1
    assert K._wgrad_split(4096, 0, CPU) == 1
