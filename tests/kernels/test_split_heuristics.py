"""How the skinny and weight-gradient launchers split their reduction: ~2 programs per SM, and at most
two atomic partial sums under torch.use_deterministic_algorithms (two added to a zeroed output give the
same bits in either order; more do not), explicit splits included."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from fxfuse.runtime.kernels import lora as K  # noqa: E402
from tiny import rel  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 or a CUDA device")
DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
CPU = torch.device("cpu")


@pytest.fixture
def sms(monkeypatch):
    """Pin the SM count the heuristics read (132: an H100/H200; 4 for the launcher tests)."""
    def pin(n):
        monkeypatch.setattr(K, "_num_sms", lambda device: n)
    return pin


@pytest.mark.parametrize("m,k,want", [
    (4096, 4096, 4),    # g of q/o/down (M tokens, K out_features) and dB of q/o/down (M out, K tokens)
    (1024, 4096, 4),    # dB of k/v: 8 row blocks, K/1024 caps it
    (14336, 4096, 3),   # dB of gate/up: 112 row blocks, 3 splits reach ~2 programs per SM
    (4096, 1024, 1),    # g of k/v: too little K to share
    (4096, 14336, 9),   # g of gate/up: 2 programs per SM
    (40000, 4096, 1),   # enough row blocks
    (0, 4096, 1),       # nothing to do (divided by zero before)
])
def test_skinny_split(sms, m, k, want):
    sms(132)
    assert K._skinny_split(m, k, CPU) == want
    assert K._skinny_split(m, k, CPU, deterministic=True) == min(want, K.DETERMINISTIC_MAX_SPLIT)


@pytest.mark.parametrize("m,k,want", [(4096, 4096, 8), (4096, 14336, 3), (1024, 4096, 2), (256, 4096, 1),
                                      (4096, 0, 1)])
def test_weight_grad_split(sms, m, k, want):
    sms(132)
    assert K._wgrad_split(m, k, CPU) == want
    assert K._wgrad_split(m, k, CPU, deterministic=True) == min(want, K.DETERMINISTIC_MAX_SPLIT)


def test_layout_key_tells_a_transposed_read_from_a_row_major_one():
    x = torch.randn(8, 16)
    assert K._tune_layout(x, x) == 3
    assert K._tune_layout(x.t(), x) == 2
    assert K._tune_layout(x, x.t()) == 1
    assert K._tune_layout(x.t(), x.t()) == 0


def _launched_splits(monkeypatch, deterministic, call):
    """The split grids of the launches `call` makes, with torch's deterministic switch as given."""
    grids = []
    real = K._launch
    monkeypatch.setattr(K, "_launch", lambda kern, grid, *a, **kw: grids.append(grid) or real(kern, grid, *a, **kw))
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: deterministic)
    out = call()
    monkeypatch.setattr(K, "_launch", real)
    return [g({"BLOCK_M": 32, "BLOCK_K": 32})[1] for g in grids], out


@pytest.mark.parametrize("deterministic", [False, True])
def test_launchers_follow_the_deterministic_switch(monkeypatch, sms, deterministic):
    """Heuristic and explicit splits are capped in deterministic mode; the sums stay right either way."""
    sms(4)
    monkeypatch.setattr(K, "_SKINNY_PLANS", {})
    monkeypatch.setattr(K, "_WGRAD_PLANS", {})
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 4096, generator=gen).to(DEVICE)
    a = torch.randn(8, 4096, generator=gen).to(DEVICE)
    g = torch.randn(4096, 8, generator=gen).to(DEVICE)
    xt = x.t().contiguous()
    cap = K.DETERMINISTIC_MAX_SPLIT if deterministic else 99
    cases = [  # (launch, float64 reference, expected split without the cap)
        (lambda: K.skinny_matmul(x, a), x.double() @ a.double().t(), 4),  # one row block, K/1024
        (lambda: K.skinny_matmul(x, a, split_k=8), x.double() @ a.double().t(), 8),
        (lambda: K.lowrank_weight_grad(g, xt), g.double().t() @ xt.double(), 8),  # M/512
        (lambda: K.lowrank_weight_grad(g, xt, split_m=16), g.double().t() @ xt.double(), 16),
        (lambda: K.skinny_matmul_group([x, x], [a, a], [1.0, 2.0])[1], 2 * (x.double() @ a.double().t()), 4),
    ]
    for launch, ref, want in cases:
        splits, out = _launched_splits(monkeypatch, deterministic, launch)
        assert splits == [min(want, cap)]
        assert rel(out, ref) < 1e-6


def test_zero_sizes_launch_nothing_and_return_zeros(sms):
    sms(132)
    a = torch.randn(8, 4096, device=DEVICE)
    out = K.skinny_matmul(torch.empty(0, 4096, device=DEVICE), a)
    assert out.shape == (0, 8)
    w = K.lowrank_weight_grad(torch.randn(4096, 8, device=DEVICE), torch.empty(4096, 0, device=DEVICE))
    assert w.shape == (8, 0)
    outs = K.skinny_matmul_group([torch.empty(0, 4096, device=DEVICE)], [a], [1.0])
    assert outs[0].shape == (0, 8)


def test_legacy_rule_is_the_old_caps_and_plans_follow_the_switch(monkeypatch, sms):
    """FXFUSE_LORA_SPLITS=legacy gives the rule before 2026-12-02 (K/2048 and no split below K=4096;
    M/1024), so one process can A/B the two; a typo raises."""
    sms(132)
    monkeypatch.setenv("FXFUSE_LORA_SPLITS", "legacy")
    assert [K._skinny_split(m, k, CPU) for m, k in [(4096, 4096), (1024, 4096), (4096, 2048), (4096, 14336)]] \
        == [2, 2, 1, 7]
    assert [K._wgrad_split(m, k, CPU) for m, k in [(4096, 4096), (4096, 14336)]] == [4, 3]
    monkeypatch.setenv("FXFUSE_LORA_SPLITS", "fast")
    with pytest.raises(ValueError, match="FXFUSE_LORA_SPLITS"):
        K._skinny_split(4096, 4096, CPU)
    sms(4)
    monkeypatch.setattr(K, "_SKINNY_PLANS", {})
    x, a = torch.randn(40, 8192, device=DEVICE), torch.randn(8, 8192, device=DEVICE)
    splits = {}
    for rule in ("fill", "legacy", "fill"):
        monkeypatch.setenv("FXFUSE_LORA_SPLITS", rule)
        got, out = _launched_splits(monkeypatch, False, lambda: K.skinny_matmul(x, a))
        splits.setdefault(rule, []).extend(got)
        assert rel(out, x.double() @ a.double().t()) < 1e-6
    assert splits == {"fill": [8, 8], "legacy": [4]}
