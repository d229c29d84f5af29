"""fused_linear_cross_entropy pass on dynamo graphs: op counts before/after (checkpointing off and
on), the logits output replaced only when allowed, and declines with reasons."""
import copy

import pytest
import torch
import torch.nn.functional as F

from fxfuse.passes.fused_linear_cross_entropy import FusedLinearCrossEntropyPass
from fxfuse.passes.lora import LoraPass
from fxfuse.passes.manager import PassManager
from fxfuse.passes.pattern import count_ops, graphs_of
from tiny import tiny_model, tokens

CE_OP = "fxfuse.linear_cross_entropy.default"


def capture(model, keep_logits=False, grad=True, lora=None, **inputs):
    """Trace with dynamo, run LoRA + CE passes; (before, after, CE stats) of the graph with the loss."""
    seen = []

    def backend(gm, example_inputs):
        before = copy.deepcopy(gm)
        stats = PassManager([lora or LoraPass(), FusedLinearCrossEntropyPass(keep_logits=keep_logits)]).run(gm)
        seen.append((before, gm, stats[1]))
        return gm.forward

    inputs = inputs or {"input_ids": tokens(), "labels": tokens()}
    with torch.set_grad_enabled(grad):
        out = torch.compile(model, backend=backend)(**inputs)
    if grad:
        out.loss.backward() if hasattr(out, "loss") else out.backward()
    graphs = [s for s in seen if s[2].candidates]
    assert len(graphs) == 1, [s[2].candidates for s in seen]
    return graphs[0]


@pytest.mark.parametrize("gc, dtype", [(False, torch.bfloat16), (True, torch.float32)])
def test_llama_head_and_loss_become_one_op(gc, dtype):
    before, after, stats = capture(tiny_model(gc=gc, dtype=dtype), input_ids=tokens(), labels=tokens(),
                                   use_cache=False)
    b, a = count_ops(before), count_ops(after)
    assert stats.candidates == 1 and stats.rewritten == 1, stats.sites
    assert stats.sites[0].module.endswith("lm_head")
    assert b["cross_entropy"] == 1 and "cross_entropy" not in a
    assert a[CE_OP] == 1 and CE_OP not in b
    assert b["linear"] >= 1 and "linear" not in a  # LoRA sites fused, the lm_head GEMM moved into the op
    fused = next(n for _, g in graphs_of(after) for n in g.graph.nodes if n.target is torch.ops.fxfuse.linear_cross_entropy.default)
    assert fused.args[3:] == ("mean", 0.0, -100, True)
    # the logits graph output is now a zero-storage stand-in (the frontend's hook drops it)
    outs = list(next(n for n in after.graph.nodes if n.op == "output").all_input_nodes)
    assert any(n.op == "call_method" and n.target == "expand" for n in outs)
    assert not any(n.op == "call_function" and n.target is torch._C._nn.linear for n in outs)


def test_sum_reduction_keeps_the_division_by_num_items():
    ids = tokens()
    before, after, stats = capture(tiny_model(), input_ids=ids, labels=ids, use_cache=False,
                                   num_items_in_batch=torch.tensor(29))
    assert stats.rewritten == 1
    fused = next(n for n in after.graph.nodes if n.target is torch.ops.fxfuse.linear_cross_entropy.default)
    assert fused.args[3] == "sum"
    assert count_ops(after).get("truediv", 0) + count_ops(after).get("div", 0) >= 1


def reason(stats):
    assert stats.rewritten == 0 and stats.candidates == 1
    return stats.sites[0].reason


def test_declines_when_logits_are_kept_or_no_grad():
    inputs = dict(input_ids=tokens(), labels=tokens(), use_cache=False)
    _, after, stats = capture(tiny_model(), keep_logits=True, **inputs)
    assert "keep_logits=True" in reason(stats) and "cross_entropy" in count_ops(after)
    _, _, stats = capture(tiny_model().eval(), grad=False, **inputs)
    assert "loss needs no gradient" in reason(stats)


def test_declines_lora_and_trained_lm_head():
    inputs = dict(input_ids=tokens(), labels=tokens(), use_cache=False)
    targets = ["q_proj", "v_proj", "lm_head"]
    _, _, stats = capture(tiny_model(target_modules=targets), lora=LoraPass(graph_ops_below=0), **inputs)
    assert "LoRA target" in reason(stats)  # the fused op's output
    # the same head with the LoRA pass emitting graph ops (graph_ops_below) is named as well
    torch._dynamo.reset()
    _, _, stats = capture(tiny_model(target_modules=targets), lora=LoraPass(graph_ops_below=10**6), **inputs)
    assert "LoRA target" in reason(stats)
    _, _, stats = capture(tiny_model(modules_to_save=["lm_head"]), **inputs)
    assert "requires grad" in reason(stats)


class Head(torch.nn.Module):
    """An lm_head + loss written by hand, to reach what HF models never trace."""

    def __init__(self, bias=False, softcap=None, dtype=torch.float32, scale=None, divisor=None, **ce_kwargs):
        super().__init__()
        self.lm_head = torch.nn.Linear(24, 77, bias=bias, dtype=dtype).requires_grad_(False)
        self.softcap, self.scale, self.divisor, self.ce_kwargs = softcap, scale, divisor, ce_kwargs

    def forward(self, hidden, labels):
        logits = self.lm_head(hidden)
        if self.scale is not None:
            logits = logits * self.scale
        if self.divisor is not None:
            logits = logits / self.divisor
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return F.cross_entropy(logits.float().view(-1, 77), labels.view(-1), **self.ce_kwargs)


def head_inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 77, (2, 9), generator=g)
    labels[0, :4] = -100
    return dict(hidden=torch.randn(2, 9, 24, generator=g, dtype=dtype).requires_grad_(True), labels=labels)


@pytest.mark.parametrize("kwargs, why", [
    (dict(label_smoothing=0.1), "label_smoothing"),
    (dict(reduction="none"), "reduction 'none'"),
    (dict(weight=torch.ones(77)), "class weights"),
    (dict(bias=True), "bias"),
    (dict(softcap=0), None),  # no softcap: rewritten
    (dict(ignore_index=3), None),
])
def test_cross_entropy_variants(kwargs, why):
    model = Head(**kwargs)
    _, after, stats = capture(model, **head_inputs()) if kwargs.get("reduction") != "none" else \
        capture(_Summed(model), **head_inputs())
    if why is None:
        assert stats.rewritten == 1, stats.sites
    else:
        assert why in reason(stats)


class _Summed(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, **kw):
        return self.inner(**kw).sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softcap_is_fused_and_matches_eager(dtype):
    import fxfuse
    ref = Head(softcap=2.0, dtype=dtype)
    with torch.no_grad():
        ref.lm_head.weight.mul_(8)  # logits well into tanh's saturation
    opt = fxfuse.optimize(copy.deepcopy(ref), compiler="aot_eager", verbose=False)
    inputs, inputs2 = head_inputs(dtype), head_inputs(dtype)
    want, got = ref(**inputs), opt(**inputs2)
    want.backward()
    got.backward()
    rep = fxfuse.report(opt).summary()["fused_linear_cross_entropy"]
    assert rep["rewritten"] == 1, fxfuse.report(opt).table(sites=True)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert abs(got.item() - want.item()) <= tol * abs(want.item())
    g_ref, g_opt = inputs["hidden"].grad.double(), inputs2["hidden"].grad.double()
    assert ((g_opt - g_ref).norm() / g_ref.norm()).item() < (1e-5 if dtype == torch.float32 else 3e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("how", [dict(scale=0.0625), dict(scale=0.3), dict(divisor=4.0), dict(divisor=3.0)])
def test_scaled_logits_are_fused_and_match_eager(how, dtype):
    """cohere's `logits * logit_scale`, granite's `logits / logits_scaling`: the op reads the hidden
    states scaled instead (exact in any dtype for powers of two, one rounding otherwise)."""
    import fxfuse
    ref = Head(dtype=dtype, **how)
    with torch.no_grad():
        ref.lm_head.weight.mul_(8)  # logits of a few units: the factor moves the loss
    opt = fxfuse.optimize(copy.deepcopy(ref), compiler="aot_eager", verbose=False)
    inputs, inputs2 = head_inputs(dtype), head_inputs(dtype)
    want, got = ref(**inputs), opt(**inputs2)
    want.backward()
    got.backward()
    assert fxfuse.report(opt).summary()["fused_linear_cross_entropy"]["rewritten"] == 1
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert abs(got.item() - want.item()) <= tol * abs(want.item())
    g_ref, g_opt = inputs["hidden"].grad.double(), inputs2["hidden"].grad.double()
    assert ((g_opt - g_ref).norm() / g_ref.norm()).item() < (1e-5 if dtype == torch.float32 else 3e-2)
    unscaled = Head(dtype=dtype)  # the premise: the factor changes the loss, so a dropped one fails
    unscaled.load_state_dict(ref.state_dict())
    assert abs(unscaled(**head_inputs(dtype)).item() - want.item()) > 10 * tol * abs(want.item())


def test_zero_or_tensor_scale_is_declined():
    _, _, stats = capture(Head(scale=0.0), **head_inputs())
    assert stats.rewritten == 0 and "scaled by 0.0: not a finite non-zero number" in reason(stats)
    head = Head()
    head.scale = torch.tensor(0.5)  # a tensor, not a constant of the graph
    _, _, stats = capture(head, **head_inputs())
    assert stats.rewritten == 0 and stats.candidates == 1 and reason(stats)


@pytest.mark.parametrize("how", [dict(scale=0.5), dict(divisor=4.0)])
def test_scaled_lora_head_is_declined_as_a_lora_target(how):
    from peft import LoraConfig, inject_adapter_in_model
    head = inject_adapter_in_model(LoraConfig(r=4, target_modules=["lm_head"]), Head(**how))
    _, _, stats = capture(head, **head_inputs())
    assert stats.rewritten == 0 and "lm_head is a LoRA target" in reason(stats)
