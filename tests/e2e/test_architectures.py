"""Architectures no issue names, LoRA on every linear (`all-linear`): each site is rewritten or
declined with a reason, and the model's loss and gradients equal eager's either way."""
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
ARCHS = {  # model_type: (config overrides (dropout off so eager and compiled see the same math), all rewritten?)
    "gpt2": (dict(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=128, resid_pdrop=0.0,
                  embd_pdrop=0.0, attn_pdrop=0.0), False),  # Conv1D base: not a linear
    "opt": (dict(hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
                 max_position_embeddings=128, word_embed_proj_dim=64, dropout=0.0, attention_dropout=0.0,
                 activation_dropout=0.0), True),
    "phi3": (dict(DENSE, pad_token_id=0), True),
    # logits scaled before the loss (granite: / logits_scaling, cohere: * logit_scale, tied embeddings)
    "granite": (dict(DENSE, embedding_multiplier=12.0, logits_scaling=4.0, residual_multiplier=0.5,
                     attention_multiplier=0.1), True),
    "cohere": (dict(DENSE), True),
    "gemma2": (dict(DENSE, head_dim=16), True),
    "qwen3": (dict(DENSE, head_dim=16), True),
    "gpt_neox": (dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      vocab_size=128, max_position_embeddings=128), True),
    "mixtral": (dict(DENSE, num_local_experts=4, num_experts_per_tok=2), True),
    "qwen3_moe": (dict(DENSE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16), True),
    "falcon": (dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128), False),  # x @ W.T
}
MOE = ("mixtral", "qwen3_moe")


@pytest.mark.parametrize("passes", ["defaults", "all"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_unlisted_architecture_is_rewritten_or_declined_never_wrong(arch, passes):
    """"all" adds the opt-in passes (rms_norm, swiglu), gradient checkpointing and the offload on CPU
    tensors, so that the partition-time policies (save_attention, recompute_lora_xa, the offload)
    run too: they also rewrite or decline. "defaults" at these 24 tokens turns the LoRA sites into
    graph ops (LoraPass's graph_ops_below); "all" keeps the fused op (graph_ops_below=0), so each
    architecture runs both."""
    overrides, all_rewritten = ARCHS[arch]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **overrides))
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    offload = False
    # MoE with LoRA on the experts under checkpointing: dynamo breaks the graph at PEFT's ParamWrapper
    # inside the checkpointed layers ("Unsupported function call") and runs them eagerly, so nothing
    # would be compiled or rewritten (tests/passes/test_grouped_mm_pass.py: attention-only LoRA)
    if passes == "all" and arch not in MOE:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        offload = ActivationOffload(min_bytes=0, devices=("cpu",))
    ref = copy.deepcopy(model)
    opt = fxfuse.optimize(model, compiler="aot_eager", verbose=False, offload_activations=offload,
                          passes=list(fxfuse.PASSES) if passes == "all" else None,
                          pass_options=FUSED_OP if passes == "all" else None)
    ids = tokens(2, 12)
    l_ref, g_ref = loss_and_grads(ref, input_ids=ids, labels=ids)
    l_opt, g_opt = loss_and_grads(opt, input_ids=ids, labels=ids)
    assert g_ref.keys() == g_opt.keys() and g_ref
    assert rel(l_opt, l_ref) < 1e-5
    for name in g_ref:
        assert rel(g_opt[name], g_ref[name]) < 1e-4, name
    report = fxfuse.report(opt)
    assert not report.errors, report.errors
    for name, s in report.summary().items():
        assert all(reason for reason in s["declined"]), (name, s)  # every decline says why
    if arch in ("granite", "cohere"):  # the scaled logits' head and loss are fused too
        assert report.summary()["fused_linear_cross_entropy"]["rewritten"] == 1, report.table()
    summary = report.summary()["lora"]
    assert summary["candidates"] > 0
    if arch in MOE:  # fp32 experts take transformers' fallback grouped matmul: the pass makes it traceable
        assert not report.compile_errors and report.summary()["grouped_mm"]["rewritten"] > 0, report.table()
    if all_rewritten:
        assert summary["rewritten"] == summary["candidates"], summary
        # every LoRA layer ran inside the compiled graphs; LoRA on MoE weights (PEFT's ParamWrapper:
        # the router and experts) is not a form the lora pass matches, and the report says so
        assert report.unseen_adapters() == {}, report.table()
        assert bool(report.unmatched_lora()) == (arch in MOE), report.table()
        if arch in MOE:  # and names the layer kind with why it has nothing to fuse
            assert "lora.ParamWrapper x1 (LoRA on a weight parameter" in report.table(), report.table()
    else:
        assert summary["rewritten"] == 0 and all(reason for reason in summary["declined"]), summary


def test_moe_layers_dynamo_runs_eagerly_under_checkpointing_are_a_warning():
    """mixtral with LoRA on its experts under checkpointing: dynamo breaks the graph inside the
    checkpointed MoE layers and runs them eagerly (see above); the results are eager's, and the
    report says which LoRA layers never ran through fxfuse's op, instead of a bare 0 candidates."""
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("mixtral", **ARCHS["mixtral"][0])
    model = get_peft_model(AutoModelForCausalLM.from_config(cfg), LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    ref = copy.deepcopy(model)
    opt = fxfuse.optimize(model, compiler="aot_eager", verbose=False)
    ids = tokens(2, 12)
    l_ref, _ = loss_and_grads(ref, input_ids=ids, labels=ids)
    l_opt, _ = loss_and_grads(opt, input_ids=ids, labels=ids)
    assert rel(l_opt, l_ref) < 1e-5
    report = fxfuse.report(opt)
    unseen = report.unseen_adapters()
    wrapped = unseen.get("lora.ParamWrapper", [])  # the router and the experts, 2 a layer
    assert len(report.adapter_layers) == 8 + 4 and len(wrapped) == 4, report.table()
    assert set(wrapped) | set(unseen.get("lora.Linear", [])) <= set(report.adapter_layers)
    assert "WARNING: 4 of 4 lora.ParamWrapper adapter layer(s) ran outside the graphs" in report.table()
