"""Fuzz tests of the cross-entropy row kernel and the chunked fused linear+CE op against float64.

The float64 reference reads the same model-dtype logits the kernel reads (the lm_head GEMM rounds
them, as HF's does), so the kernel's own error is what is measured. Shapes stay small: the
interpreter's cost is per program (one per row) and per loop step (256-wide vocab blocks there,
so V up to 300 still takes two steps).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402

from fxfuse.runtime import stats  # noqa: E402
from fxfuse.runtime.kernels import cross_entropy as K  # noqa: E402
from fxfuse.runtime.ops import cross_entropy as ops  # noqa: E402

pytestmark = [
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                       reason="needs TRITON_INTERPRET=1 or a CUDA device"),
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
]

DEVICE = "cuda" if os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
EXAMPLES = int(os.environ.get("FXFUSE_FUZZ_EXAMPLES", 25))
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
# relative-norm bounds on gradients: the kernel rounds d logits to the storage dtype (the
# interpreter truncates bf16 stores: more than one rounding's worth)
# fp32: the kernel and float64 differ in exp/log rounding per element (measured up to ~1.05e-5 relative)
GRAD_TOL = {F32: 5e-5, F16: 2e-3, BF16: 2e-2}
SUBNORMAL = {F32: 2.0**-149, F16: 2.0**-24, BF16: 2.0**-133}  # smallest positive value of each dtype


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def targets(draw, rows, vocab, gen, ignore_index=-100):
    """Class indices with a drawn share of ignored rows (all of them included)."""
    share = draw(st.sampled_from([0.0, 0.3, 1.0]))
    t = torch.randint(0, vocab, (rows,), generator=gen)
    t[torch.rand(rows, generator=gen) < share] = ignore_index
    return t


def reference64(logits, target, reduction, softcap, ignore_index=-100):
    """float64 loss and d loss / d logits, by autograd on the upcast logits."""
    x = logits.double().detach().requires_grad_(True)
    z = torch.tanh(x / softcap) * softcap if softcap else x
    loss = F.cross_entropy(z, target, ignore_index=ignore_index, reduction=reduction)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad


@st.composite
def row_cases(draw):
    dtype = draw(st.sampled_from([F32, F16, BF16]))
    rows, vocab = draw(st.integers(1, 24)), draw(st.integers(1, 300))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    huge = dtype == F16 and draw(st.booleans())
    # logits near fp16's max: the online logsumexp must not overflow in fp32 either
    mag = 6e4 if huge else draw(st.sampled_from([1.0, 30.0]))
    logits = (torch.rand(rows, vocab, generator=gen, dtype=torch.float64) * 2 - 1) * mag
    ignore_index = draw(st.sampled_from([-100, 0]))
    return (logits.to(dtype), targets(draw, rows, vocab, gen, ignore_index), ignore_index,
            draw(st.sampled_from(["mean", "sum"])), draw(st.sampled_from([0.0, 0.0, 5.0])))


@settings(max_examples=EXAMPLES, deadline=None)
@given(row_cases())
def test_rows_loss_and_grad_match_float64(case):
    logits, target, ignore_index, reduction, softcap = case
    dtype = logits.dtype
    want_loss, want_grad = reference64(logits, target, reduction, softcap, ignore_index)
    n_valid = (target != ignore_index).sum().to(torch.float32)
    scale = (1.0 / n_valid if reduction == "mean" else torch.ones(())).reshape(1).to(DEVICE)
    buf = logits.clone().to(DEVICE)
    losses = torch.full((logits.shape[0],), float("nan"), device=DEVICE)  # unwritten rows fail
    K.cross_entropy_rows(buf, target.to(DEVICE), losses, scale, ignore_index=ignore_index, softcap=softcap,
                         with_grad=True)
    total = losses.double().sum()
    got = total / n_valid.double() if reduction == "mean" else total
    if n_valid == 0 and reduction == "mean":
        assert torch.isnan(got) and torch.isnan(want_loss)  # eager: mean over nothing is nan
        assert torch.equal(buf.cpu(), torch.zeros_like(buf.cpu()))  # and every gradient 0
        return
    assert torch.isfinite(losses).all()
    assert abs(got.item() - want_loss.item()) <= 1e-5 * max(1.0, abs(want_loss.item())), (got, want_loss)
    assert torch.isfinite(buf).all()
    # Softmax tails of huge logits fall below the storage dtype's range: each stored element may be
    # off by one subnormal step there, on top of the relative bound.
    err = (buf.cpu().double() - want_grad).norm()
    assert err <= GRAD_TOL[dtype] * want_grad.norm() + SUBNORMAL[dtype] * want_grad.numel() ** 0.5, err


@st.composite
def op_cases(draw):
    dtype = draw(st.sampled_from([F32, F16, BF16]))
    tokens, hidden, vocab = draw(st.integers(1, 33)), draw(st.integers(1, 40)), draw(st.integers(2, 300))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    h = torch.randn(tokens, hidden, generator=gen, dtype=torch.float64)
    w = torch.randn(vocab, hidden, generator=gen, dtype=torch.float64) / hidden ** 0.5 * 3
    return (h.to(dtype), w.to(dtype), targets(draw, tokens, vocab, gen), draw(st.sampled_from(["mean", "sum"])),
            draw(st.sampled_from([0.0, 0.0, 4.0])), draw(st.integers(1, tokens)))


@settings(max_examples=EXAMPLES, deadline=None)
@given(op_cases())
def test_chunked_linear_cross_entropy_matches_float64(case):
    h, w, target, reduction, softcap, rows = case
    # float64 truth from the model-dtype logits, multiplied as the op does (same device, same row
    # chunks: a GPU GEMM rounds differently from the CPU's, and by chunk size): the kernel's own
    # error is what is measured
    hd, wd = h.to(DEVICE), w.to(DEVICE)
    logits = torch.cat([hd[s:s + rows] @ wd.t() for s in range(0, h.shape[0], rows)]).cpu()
    want_loss, want_dlogits = reference64(logits, target, reduction, softcap)
    want_grad = want_dlogits @ w.double()
    loss, grad = ops.linear_cross_entropy_chunked(h.to(DEVICE), w.to(DEVICE), target.to(DEVICE), reduction, softcap,
                                                  -100, True, rows)
    assert loss.dtype == F32 and grad.dtype == h.dtype and grad.shape == h.shape
    if torch.isnan(want_loss):
        assert torch.isnan(loss) and (grad == 0).all()
        return
    assert abs(loss.item() - want_loss.item()) <= 1e-5 * max(1.0, abs(want_loss.item()))
    if want_grad.abs().max() > 0:
        assert rel(grad.cpu(), want_grad) < 2 * GRAD_TOL[h.dtype]
    else:
        assert (grad == 0).all()
    # no gradient asked: the same loss, and no [T, H] buffer
    loss_only, empty = ops.linear_cross_entropy_chunked(h.to(DEVICE), w.to(DEVICE), target.to(DEVICE), reduction,
                                                        softcap, -100, False, rows)
    assert torch.equal(loss_only, loss) and empty.numel() == 0


def test_op_autograd_matches_eager_and_reference():
    """The custom op under autograd: with_grad (gradient from the forward, scaled in backward) and
    without (recomputed in backward) both give eager HF's loss and hidden-state gradient."""
    gen = torch.Generator().manual_seed(0)
    h0 = torch.randn(2, 13, 20, generator=gen).to(DEVICE)
    w = torch.randn(150, 20, generator=gen).to(DEVICE)
    target = torch.randint(0, 150, (26,), generator=gen)
    target[:5] = -100
    target = target.to(DEVICE)
    h = h0.clone().requires_grad_(True)
    want = F.cross_entropy((h @ w.t()).float().view(-1, 150), target, reduction="sum") * 2.5
    want.backward()
    for with_grad in (True, False):
        stats.reset()
        hf = h0.clone().requires_grad_(True)
        loss, _ = torch.ops.fxfuse.linear_cross_entropy(hf.reshape(-1, 20), w, target, "sum", 0.0, -100, with_grad)
        (loss * 2.5).backward()
        assert rel(loss * 2.5, want) < 1e-6 and rel(hf.grad, h.grad) < 1e-5
        assert stats.kernel_calls[ops.OP] == (1 if with_grad else 2) and not stats.fallbacks
        ref_loss, ref_grad = ops.linear_cross_entropy_reference(h0.reshape(-1, 20), w, target, "sum", 0.0, -100, True)
        assert rel(ref_loss, loss) < 1e-6 and rel(ref_grad * 2.5, hf.grad.reshape(-1, 20)) < 1e-5
    wt = w.clone().requires_grad_(True)
    loss, _ = torch.ops.fxfuse.linear_cross_entropy(h0.reshape(-1, 20).requires_grad_(True), wt, target, "mean",
                                                    0.0, -100, True)
    with pytest.raises(NotImplementedError, match="no gradient for the lm_head weight"):
        loss.backward()


def test_out_of_range_target_is_nan_not_a_number():
    logits = torch.randn(3, 10).to(DEVICE)
    losses = torch.zeros(3, device=DEVICE)
    K.cross_entropy_rows(logits, torch.tensor([1, 10, -5]).to(DEVICE), losses, torch.ones(1, device=DEVICE))
    assert torch.isfinite(losses[0]) and torch.isnan(losses[1:]).all()


def test_launcher_declines_what_it_cannot_do():
    x = torch.randn(4, 8, device=DEVICE)
    ok = dict(target=torch.zeros(4, dtype=torch.int64, device=DEVICE), losses=torch.zeros(4, device=DEVICE),
              scale=torch.ones(1, device=DEVICE))
    assert K.check_cross_entropy_rows(x, **ok) is None
    assert "contiguous" in K.check_cross_entropy_rows(x.t().contiguous().t(), **ok)
    assert "int64" in K.check_cross_entropy_rows(x, **{**ok, "target": ok["target"].int()})
    assert "softcap" in K.check_cross_entropy_rows(x, **ok, softcap=-1.0)
    assert "2-D" in K.check_cross_entropy_rows(x.int(), **ok)
    with pytest.raises(ValueError, match="not supported"):
        K.cross_entropy_rows(x, ok["target"][:3], ok["losses"], ok["scale"])


def test_chunk_rows_respects_the_budget(monkeypatch):
    assert ops.chunk_rows(16384, 128256, BF16) == 1024  # 256 MiB of bf16 chunk logits
    assert ops.chunk_rows(16384, 128256, F32) == 512
    assert ops.chunk_rows(16384, 128256, BF16, budget=1 << 30) == 4096
    monkeypatch.setenv("FXFUSE_CE_CHUNK_MIB", "1024")
    assert ops.chunk_rows(16384, 128256, BF16) == 4096
    for bad in ("0", "-5", "1.5", "lots"):
        monkeypatch.setenv("FXFUSE_CE_CHUNK_MIB", bad)
        with pytest.raises(ValueError, match="FXFUSE_CE_CHUNK_MIB"):
            ops.chunk_rows(16384, 128256, BF16)
    monkeypatch.delenv("FXFUSE_CE_CHUNK_MIB")
    assert ops.chunk_rows(100, 128256, BF16) == 100
    assert ops.chunk_rows(10, 1 << 40, F32) == 1


def test_chunk_rows_never_holds_every_token_on_the_default_budget(monkeypatch):
    # all 1024 tokens fit 256 MiB, but then every token's logits would be alive at once: two chunks
    assert ops.chunk_rows(1024, 128256, BF16) == 512
    assert ops.chunk_rows(1025, 128256, BF16) == 1024  # more than one chunk already: the budget decides
    assert ops.chunk_rows(1100, 1000, BF16) == 768  # half the tokens rounded up to 256 rows: 768 + 332
    assert ops.chunk_rows(ops.SPLIT_FROM_TOKENS - 1, 1000, BF16) == ops.SPLIT_FROM_TOKENS - 1  # too few
    assert ops.chunk_rows(2048, 128256, BF16) == 1024
    # an explicit budget is taken as is (A/B runs, ce_capture_memory.py)
    assert ops.chunk_rows(1024, 128256, BF16, budget=256 << 20) == 1024
    monkeypatch.setenv("FXFUSE_CE_CHUNK_MIB", "256")
    assert ops.chunk_rows(1024, 128256, BF16) == 1024


def test_op_split_in_halves_matches_the_reference(monkeypatch):
    """1024 tokens of a small vocab fit one chunk; the op runs them as two of 512 and matches the
    reference over every row."""
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(1024, 8, generator=gen).to(DEVICE)
    w = torch.randn(24, 8, generator=gen).to(DEVICE)
    target = torch.randint(0, 24, (1024,), generator=gen).to(DEVICE)
    target[::7] = -100
    assert ops.chunk_rows(1024, 24, F32) == 512
    rows_used, chunked = [], ops.linear_cross_entropy_chunked

    def spy(*args):
        rows_used.append(args[-1])
        return chunked(*args)

    monkeypatch.setattr(ops, "linear_cross_entropy_chunked", spy)
    loss, grad = torch.ops.fxfuse.linear_cross_entropy(h, w, target, "mean", 0.0, -100, True)
    assert rows_used == [512] and stats.kernel_calls[ops.OP] == 1 and not stats.fallbacks
    ref_loss, ref_grad = ops.linear_cross_entropy_reference(h, w, target, "mean", 0.0, -100, True)
    assert rel(loss, ref_loss) < 1e-6 and rel(grad, ref_grad) < 1e-5
