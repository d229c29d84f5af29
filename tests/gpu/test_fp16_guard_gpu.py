"""On a CUDA device, through Inductor (with the activation offload and the LoRA kernels): the opt-in
fp16_guard pass keeps an fp16 Llama whose residual stream passes 65504 finite and equal to the fp32
model, and leaves an ordinary fp16 model within fp16 rounding of eager. The CPU tests
(tests/passes/test_fp16_guard.py) run it through aot_eager only."""
import copy

import pytest
import torch

import fxfuse
from tiny import (FUSED_OP, large_mlp_fp16_llama, large_moe_fp16, loss_and_grads, overflowing_fp16_llama, rel,
                  tiny_model, tokens)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (device machine)")

PASSES = list(fxfuse.DEFAULT_PASSES) + ["fp16_guard"]
LORA_MODES = {"graph ops": None, "fused op": FUSED_OP}


def _guarded_equals_fp32(model, lora):
    """eager fp16 overflows; fxfuse with the guard gives the fp32 model's loss, finite gradients."""
    eager16, eager32 = copy.deepcopy(model), copy.deepcopy(model).float()
    opt = fxfuse.optimize(model, verbose=False, passes=PASSES, pass_options=LORA_MODES[lora])
    ids = tokens(2, 12).cuda()
    l16, _ = loss_and_grads(eager16, input_ids=ids, labels=ids)
    l32, g32 = loss_and_grads(eager32, input_ids=ids, labels=ids)
    lg, g = loss_and_grads(opt, input_ids=ids, labels=ids)
    assert not torch.isfinite(l16)  # the premise: eager fp16 overflows
    assert torch.isfinite(lg) and rel(lg, l32) < 1e-3, (lg, l32)
    assert g.keys() == g32.keys() and all(torch.isfinite(v).all() for v in g.values())
    report = fxfuse.report(opt)
    assert not report.errors and report.runtime_fallbacks == 0
    return report


@pytest.mark.parametrize("lora", list(LORA_MODES))
@pytest.mark.parametrize("gc", [False, True])
def test_overflowing_stream_is_finite_and_matches_fp32(gc, lora):
    torch.manual_seed(0)
    s = _guarded_equals_fp32(overflowing_fp16_llama(gc).cuda(), lora).summary()["fp16_guard"]
    assert s["candidates"] == s["rewritten"] == 4


@pytest.mark.parametrize("lora", list(LORA_MODES))
def test_lora_branch_past_fp16_max_is_written_in_fp32(lora):
    """Each MLP's output alone passes 65504: its LoRA op (cuBLAS path, mm's fp32 output) or graph ops
    write fp32, so the loss is the fp32 model's."""
    torch.manual_seed(0)
    report = _guarded_equals_fp32(large_mlp_fp16_llama(gc=True).cuda(), lora)
    assert report.columns()["fp16_guard"]["fp32 LoRA outputs"] == 4


@pytest.mark.parametrize("arch,kind", [("mixtral", "grouped_mm"), ("qwen2_moe", "grouped_mm"), ("gpt_oss", "grouped_mm"),
                                       ("llama4_text", "bmm")])
def test_moe_branch_past_fp16_max_is_computed_in_fp32(arch, kind):
    """Experts whose down projections pass 65504: fxfuse::grouped_mm or bmm32 write fp32 (cuBLAS's
    fp32 output) and the expert sum is not rounded, so the loss is the fp32 model's."""
    report = _guarded_equals_fp32(large_moe_fp16(arch, gc=True).cuda(), "graph ops")
    assert report.columns()["fp16_guard"][f"fp32 {kind} outputs"] == 2


def test_plain_linear_branch_past_fp16_max_is_computed_in_fp32():
    """LoRA on q/v only: o_proj and down_proj are plain linears, computed by linear32 (mm's fp32 output)."""
    torch.manual_seed(0)
    report = _guarded_equals_fp32(large_mlp_fp16_llama(gc=True, targets=["q_proj", "v_proj"]).cuda(), "graph ops")
    assert report.columns()["fp16_guard"]["fp32 linear outputs"] == 4


@pytest.mark.parametrize("gc", [False, True])
def test_ordinary_fp16_model_equals_eager(gc):
    torch.manual_seed(0)
    model = tiny_model("llama", dtype=torch.float16, gc=gc).cuda()
    ref = copy.deepcopy(model)
    opt = fxfuse.optimize(model, verbose=False, passes=PASSES)
    ids = tokens(2, 12).cuda()
    l_ref, g_ref = loss_and_grads(ref, input_ids=ids, labels=ids)
    l_opt, g_opt = loss_and_grads(opt, input_ids=ids, labels=ids)
    assert rel(l_opt, l_ref) < 1e-3
    for k in g_ref:
        assert rel(g_opt[k], g_ref[k]) < 2e-2, k
    assert fxfuse.report(opt).summary()["fp16_guard"]["rewritten"] == 4
