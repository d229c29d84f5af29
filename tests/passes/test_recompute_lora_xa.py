"""Checkpoint policy recompute_lora_xa: a checkpointed backward that recomputes a LoRA op only for
its xa recomputes `fxfuse::lora_xa` instead (no base GEMM); results are bit-identical."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402

import fxfuse  # noqa: E402
from fxfuse.passes.activation_offload import ActivationOffload  # noqa: E402
from fxfuse.passes.recompute_lora_xa import RecomputeLoraXA  # noqa: E402
from fxfuse.runtime.ops import lora as ops  # noqa: E402
from tiny import FUSED_OP, loss_and_grads, tiny_model, tokens  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def _backward_graphs(monkeypatch):
    """Capture the backward graphs as the offload (the last partition-time policy) gets them."""
    seen = []
    run = ActivationOffload.run

    def spy(self, fw, bw, num_fwd_outputs, stats):
        seen.append(bw)
        run(self, fw, bw, num_fwd_outputs, stats)
    monkeypatch.setattr(ActivationOffload, "run", spy)
    return seen


def _count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


def _build(recompute_xa, layers=3, dropout=0.0, offload=True):
    torch._dynamo.reset()
    model = tiny_model(gc=True, sizes={"num_hidden_layers": layers}, lora_dropout=dropout)
    return fxfuse.optimize(model, compiler="aot_eager", verbose=False,
                           pass_options={"lora": {"recompute_xa": recompute_xa, "graph_ops_below": 0}},
                           offload_activations=ActivationOffload(min_bytes=0, devices=("cpu",), save_attention=False) if offload else False)


@pytest.mark.parametrize("dropout", [0.25])  # dropout on: xa's masks replay from the seed too (the fuzz covers 0)
def test_down_projection_recomputes_only_xa_and_grads_are_bit_identical(monkeypatch, dropout):
    seen = _backward_graphs(monkeypatch)
    x = tokens()
    torch.manual_seed(3)
    model_on = _build(True, dropout=dropout, offload=True)
    loss_on, grads_on = loss_and_grads(model_on, input_ids=x, labels=x)
    bw = seen[0]
    # 3 layers x 4 ops recomputed before; every down projection but the last layer's (its output
    # feeds the final norm outside the checkpointed regions, whose backward reads it) loses its GEMM
    assert _count(bw, torch.ops.fxfuse.lora_linear.default) == 3 * 4 - 2
    assert _count(bw, torch.ops.fxfuse.lora_xa.default) == 2
    # the offload ran after the policy, on the trimmed backward
    assert fxfuse.report(model_on).summary()["activation_offload"]["rewritten"] >= 1
    torch.manual_seed(3)
    model_off = _build(False, dropout=dropout, offload=True)
    first = len(seen)
    loss_off, grads_off = loss_and_grads(model_off, input_ids=x, labels=x)
    assert _count(seen[first], torch.ops.fxfuse.lora_linear.default) == 3 * 4
    assert "recompute_lora_xa" not in fxfuse.report(model_off).pass_names
    assert torch.equal(loss_on, loss_off)
    assert grads_on.keys() == grads_off.keys()
    for name in grads_on:
        assert torch.equal(grads_on[name], grads_off[name]), name


def test_report_names_what_it_trimmed_and_what_it_declined():
    model = _build(True, layers=2, offload=False)
    x = tokens()
    loss_and_grads(model, input_ids=x, labels=x)
    sites = fxfuse.report(model).sites("recompute_lora_xa")
    done = [s for s in sites if s.rewritten]
    assert [s.module.split("layers.")[-1] for s in done] == ["0.mlp.down_proj"]
    declined = {s.module.split("layers.")[-1]: s.reason for s in sites if not s.rewritten}
    assert declined["1.mlp.down_proj"] == "the backward reads its outputs: recomputed in full"
    assert declined["0.mlp.gate_proj"] == "the backward reads its outputs: recomputed in full"
    assert "recompute_lora_xa" in fxfuse.report(model).table()


def test_without_checkpointing_nothing_is_recomputed(monkeypatch):
    seen = _backward_graphs(monkeypatch)
    torch._dynamo.reset()
    model = fxfuse.optimize(tiny_model(gc=False), compiler="aot_eager", verbose=False,
                            pass_options=FUSED_OP, offload_activations=ActivationOffload(min_bytes=0, devices=("cpu",)))
    x = tokens()
    loss_and_grads(model, input_ids=x, labels=x)
    assert _count(seen[0], torch.ops.fxfuse.lora_linear.default) == 0
    assert fxfuse.report(model).sites("recompute_lora_xa") == []


def test_eager_compiler_has_no_partition_policy():
    torch._dynamo.reset()
    model = fxfuse.optimize(tiny_model(gc=True), compiler="eager", verbose=False)
    assert "recompute_lora_xa" not in fxfuse.report(model).pass_names


@settings(deadline=None, max_examples=30)
@given(m=st.integers(1, 70), k=st.integers(1, 70), ranks=st.lists(st.integers(1, 20), min_size=1, max_size=3),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), p=st.sampled_from([0.0, 0.3]),
       seed=st.integers(0, 2**31 - 1), mag=st.sampled_from([1.0, 3e4]))
def test_lora_xa_is_lora_linears_last_output(m, k, ranks, dtype, p, seed, mag):
    """Bit-identical to the op's xa (the same kernels on the same inputs) and close to float64."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=gen) * mag).clamp(-6e4, 6e4).to(dtype)  # outliers near fp16's max
    lora_as = [torch.randn(r, k, generator=gen) * 0.1 for r in ranks]
    weights = [torch.randn(5, k, generator=gen).to(dtype) for _ in ranks]
    lora_bs = [torch.randn(5, r, generator=gen) for r in ranks]
    ps = [p] * len(ranks)
    s = torch.tensor([seed % 1000])
    full = torch.ops.fxfuse.lora_linear(x, weights, [None] * len(ranks), lora_as, lora_bs, [1.0] * len(ranks),
                                        ps, s, dtype)
    xa = torch.ops.fxfuse.lora_xa(x, lora_as, ps, s)
    assert not torch.isnan(xa).any()
    assert torch.equal(xa, full[-1])
    ref = ops.lora_xa_reference(x.double(), [a.double() for a in lora_as], ps, s)
    err = (xa.double() - ref).norm() / ref.norm().clamp_min(1e-30)
    assert err < 1e-5, err
