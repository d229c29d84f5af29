"""The dense models issue 4 lists, with gradient checkpointing and every registered pass (the
defaults and the opt-in ones): loss and every LoRA gradient equal eager's, and each pass either
rewrote its sites or declined them with a reason (no pass failure)."""
import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

import fxfuse
from fxfuse.passes.activation_offload import ActivationOffload
from tiny import FUSED_OP, loss_and_grads, rel, tokens

DENSE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, max_position_embeddings=128)
MODELS = {  # model_type: (config overrides, passes that must rewrite something)
    "llama": (DENSE, {"lora", "causal_mask", "sdpa_gqa", "rms_norm", "swiglu", "fused_linear_cross_entropy"}),
    "qwen2": (DENSE, {"lora", "causal_mask", "sdpa_gqa", "rms_norm", "swiglu", "fused_linear_cross_entropy"}),
    "qwen3": (dict(DENSE, head_dim=16), {"lora", "causal_mask", "sdpa_gqa", "rms_norm", "swiglu", "fused_linear_cross_entropy"}),
    # a window shorter than the sequence: the mask is not causal-only, so causal_mask must decline and
    # sliding_window takes it
    "mistral": (dict(DENSE, sliding_window=8), {"lora", "sliding_window", "rms_norm", "swiglu",
                                                "fused_linear_cross_entropy"}),
    # softcapped final logits (gemma2), (1 + w) norms, sandwich norms, tanh-gelu; their sliding window
    # is longer than the sequence here, so the mask is exactly causal
    "gemma2": (dict(DENSE, head_dim=16), {"lora", "causal_mask", "sdpa_gqa", "rms_norm", "swiglu", "fused_linear_cross_entropy"}),
    # HF's eager attention, where Gemma 2 applies its attention-logit softcapping (HF's SDPA path
    # cannot): softcap_attention takes it
    "gemma2-eager": (dict(DENSE, head_dim=16), {"lora", "softcap_attention", "rms_norm", "swiglu",
                                                "fused_linear_cross_entropy"}),
    "gemma3_text": (dict(DENSE, head_dim=16), {"lora", "causal_mask", "sdpa_gqa", "rms_norm", "swiglu", "fused_linear_cross_entropy"}),
    # its local layers with a window shorter than the sequence (both tiny layers are local ones)
    "gemma3_text-window": (dict(DENSE, head_dim=16, sliding_window=5), {"lora", "sliding_window", "rms_norm", "swiglu",
                                                                       "fused_linear_cross_entropy"}),
}
WINDOWED = ("mistral", "gemma3_text-window")
NO_SDPA = WINDOWED + ("gemma2-eager",)  # their attention is another op: save_attention has no candidate


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_dense_model_every_pass_equals_eager(arch):
    overrides, must_rewrite = MODELS[arch]
    torch.manual_seed(0)
    config = AutoConfig.for_model(arch.split("-")[0], **overrides)
    if arch.endswith("-eager"):
        config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    ref = copy.deepcopy(model)
    # the offload on CPU tensors too, so that its partition-time policies (save_attention,
    # recompute_lora_xa, the offload itself) run on every architecture
    offload = ActivationOffload(min_bytes=0, devices=("cpu",))
    # the fused LoRA op (not the graph ops 24 tokens would get by default), which the policies and
    # the swiglu / mlp_tiling passes act on; tests/e2e/test_architectures.py runs the defaults
    opt = fxfuse.optimize(model, passes=list(fxfuse.PASSES), compiler="aot_eager", verbose=False,
                          offload_activations=offload, pass_options=FUSED_OP)
    ids = tokens(2, 12)
    l_ref, g_ref = loss_and_grads(ref, input_ids=ids, labels=ids)
    l_opt, g_opt = loss_and_grads(opt, input_ids=ids, labels=ids)
    assert g_ref.keys() == g_opt.keys() and len(g_ref) == 2 * 7 * 2
    assert rel(l_opt, l_ref) < 1e-5
    for name in g_ref:
        assert rel(g_opt[name], g_ref[name]) < 1e-4, name
    report = fxfuse.report(opt)
    assert not report.errors, report.errors
    summary = report.summary()
    for name, s in summary.items():
        assert all(reason for reason in s["declined"]), (name, s)  # every decline says why
    rewrote = {name for name, s in summary.items() if s["rewritten"] and s["rewritten"] == s["candidates"]}
    # every architecture's SDPA is saved for the backward; window (softcap) attention replaced it where it ran
    assert must_rewrite | ({"save_attention"} if arch not in NO_SDPA else set()) <= rewrote, summary
    assert summary["activation_offload"]["rewritten"] > 0, summary
    if arch in WINDOWED:
        assert summary["causal_mask"]["rewritten"] == 0 and summary["causal_mask"]["candidates"] > 0, summary
        # no SDPA left for the GQA pass: window attention reads the kv heads itself
        assert summary["sdpa_gqa"]["candidates"] == 0, summary
