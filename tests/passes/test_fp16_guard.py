"""fp16_guard: a float16 model's residual stream carried in fp32 (opt-in pass)."""
import copy

import pytest
import torch

import fxfuse
from tiny import (FUSED_OP, Fp16LinearBlock, eager16_eager32_optimized, large_mlp_fp16_llama, loss_and_grads,
                  overflowing_fp16_llama, rel, tiny_model, tokens)

PASSES = list(fxfuse.DEFAULT_PASSES) + ["fp16_guard"]


@pytest.mark.parametrize("gc", [False, True])
def test_stream_past_fp16_max_stays_finite_and_matches_fp32(gc):
    torch.manual_seed(0)
    model = overflowing_fp16_llama(gc)
    ((l16, _), (l32, _), (lg, g)), opt = eager16_eager32_optimized(model, tokens(2, 12), compiler="aot_eager",
                                                                  verbose=False, passes=PASSES)
    assert not torch.isfinite(l16)  # the premise: eager fp16 overflows
    assert torch.isfinite(lg) and rel(lg, l32) < 1e-4
    assert g and all(torch.isfinite(v).all() for v in g.values())
    s = fxfuse.report(opt).summary()["fp16_guard"]
    assert s["candidates"] == s["rewritten"] == 4  # two residual adds a layer, two layers


@pytest.mark.parametrize("lora", ["graph ops", "fused op"])
def test_lora_branch_past_fp16_max_is_written_in_fp32(lora):
    """An MLP whose down projection alone passes 65504 (eager fp16: inf): its LoRA op writes fp32,
    so the sum with the fp32 stream is the fp32 model's."""
    torch.manual_seed(0)
    model = large_mlp_fp16_llama()
    eager16, eager32 = copy.deepcopy(model), copy.deepcopy(model).float()
    opt = fxfuse.optimize(model, compiler="aot_eager", verbose=False, passes=PASSES,
                          pass_options=FUSED_OP if lora == "fused op" else None)
    ids = tokens(2, 12)
    mlp_max = []
    hooks = [layer.mlp.register_forward_hook(lambda mod, args, out: mlp_max.append(out.abs().max()))
             for layer in eager32.base_model.model.model.layers]
    l32, _ = loss_and_grads(eager32, input_ids=ids, labels=ids)
    for h in hooks:
        h.remove()
    assert min(mlp_max) > 65504  # the premise: each MLP's output alone overflows fp16
    l16, _ = loss_and_grads(eager16, input_ids=ids, labels=ids)
    lg, g = loss_and_grads(opt, input_ids=ids, labels=ids)
    assert not torch.isfinite(l16)
    assert torch.isfinite(lg) and rel(lg, l32) < 1e-4, (lg, l32)
    assert g and all(torch.isfinite(v).all() for v in g.values())
    report = fxfuse.report(opt)
    # o_proj and down_proj in each of the two layers
    assert report.columns()["fp16_guard"]["fp32 LoRA outputs"] == 4, report.table()
    assert sum("LoRA branch is written in fp32" in s.reason for s in report.sites("fp16_guard")) == 4


@pytest.mark.parametrize("gc", [False, True])
def test_ordinary_fp16_model_equals_eager_within_fp16_rounding(gc):
    torch.manual_seed(0)
    model = tiny_model("llama", dtype=torch.float16, gc=gc)
    ref, ref32 = copy.deepcopy(model), copy.deepcopy(model).float()
    opt = fxfuse.optimize(model, compiler="aot_eager", verbose=False, passes=PASSES, pass_options=FUSED_OP)
    ids = tokens(2, 12)
    l_ref, g_ref = loss_and_grads(ref, input_ids=ids, labels=ids)
    l_opt, g_opt = loss_and_grads(opt, input_ids=ids, labels=ids)
    _, g32 = loss_and_grads(ref32, input_ids=ids, labels=ids)
    assert rel(l_opt, l_ref) < 1e-4
    for k in g_ref:
        assert rel(g_opt[k], g_ref[k]) < 1e-2, k
    # carrying the stream in fp32 is no further from fp32 than eager fp16 is (small slack)
    assert max(rel(g_opt[k], g32[k]) for k in g32) <= 1.2 * max(rel(g_ref[k], g32[k]) for k in g32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_no_candidates_outside_fp16(dtype):
    model = tiny_model("llama", dtype=dtype)
    opt = fxfuse.optimize(model, compiler="aot_eager", verbose=False, passes=PASSES)
    ids = tokens(1, 8)
    loss_and_grads(opt, input_ids=ids, labels=ids)
    assert fxfuse.report(opt).summary()["fp16_guard"]["candidates"] == 0


def test_in_place_op_on_the_stream_is_declined_and_nothing_changes():
    from fxfuse.passes.fp16_guard import Fp16GuardPass
    from fxfuse.passes.manager import PassStats

    class Block(Fp16LinearBlock):
        def forward(self, x):
            h = x + self.lin(x.to(torch.float32).to(torch.float16))  # a residual add over a "norm"
            out = h * 2
            h.add_(1)  # mutates the stream: promoting h would change what this writes
            return out, h

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch.compile(Block(), backend=backend)(torch.randn(2, 8, dtype=torch.float16))
    gm = graphs[0]
    before = gm.code
    stats = PassStats("fp16_guard", "")
    Fp16GuardPass().run(gm, stats)
    assert stats.candidates == 1 and stats.rewritten == 0
    assert "in-place" in stats.sites[0].reason
    assert gm.code == before


def test_residual_adds_fused_by_rms_norm_are_reported_as_declined():
    """With the rms_norm pass on, the residual adds live inside its op: the guard cannot carry them in
    fp32, and says so per add instead of reporting nothing."""
    model = tiny_model("llama", dtype=torch.float16)
    opt = fxfuse.optimize(model, compiler="aot_eager", verbose=False, passes=PASSES + ["rms_norm"])
    ids = tokens(1, 8)
    loss_and_grads(opt, input_ids=ids, labels=ids)
    s = fxfuse.report(opt).summary()["fp16_guard"]
    # each layer's two residual adds, fused into the next norm (post-attention, next layer's or final)
    assert s["rewritten"] == 0 and s["candidates"] == 4, s
    assert all("fused into fxfuse::rms_norm" in why for why in s["declined"]), s
