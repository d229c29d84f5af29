"""On a CUDA device: an fp16 MoE model (its experts run transformers' fallback grouped matmul there,
since torch's grouped_mm takes only bf16 under torch.compile) compiles through Inductor with the
grouped_mm pass, and its loss and gradients equal eager's; bf16 takes torch's grouped_mm (no
candidate) and compiles too."""
import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import fxfuse
from tiny import checkpointed, loss_and_grads, rel, with_lora

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (device machine)")

CONFIG = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=512, max_position_embeddings=512, num_experts=8,
              num_experts_per_tok=2, moe_intermediate_size=128, head_dim=64)


@pytest.mark.parametrize("dtype,candidates", [(torch.float16, 4), (torch.bfloat16, 0)])
def test_moe_layers_compile_through_inductor_and_equal_eager(dtype, candidates):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen3_moe", **CONFIG)).to(dtype).cuda()
    model = checkpointed(with_lora(model, b_std=0.02, r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    ref = copy.deepcopy(model)
    opt = fxfuse.optimize(model, verbose=False)
    ids = torch.randint(0, 512, (2, 256), generator=torch.Generator().manual_seed(1)).cuda()
    l_ref, g_ref = loss_and_grads(ref, input_ids=ids, labels=ids)
    l_opt, g_opt = loss_and_grads(opt, input_ids=ids, labels=ids)
    assert torch.isfinite(l_opt) and rel(l_opt, l_ref) < 1e-3
    for name in g_ref:
        assert rel(g_opt[name], g_ref[name]) < 3e-2, name
    report = fxfuse.report(opt)
    assert not report.compile_errors and report.unseen_adapters() == {}, report.table()
    assert report.summary()["grouped_mm"]["rewritten"] == candidates, report.table()
