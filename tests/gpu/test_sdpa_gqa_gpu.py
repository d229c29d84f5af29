"""On a CUDA device: the premise of the GQA pass (flash attention runs enable_gqa with no mask, bf16,
and gives repeat_kv's answer), and a model through Inductor with the pass equal to the same build
without it."""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import fxfuse
from tiny import clone, loss_and_grads, rel, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (device machine)")


def test_flash_runs_grouped_query_attention():
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 32, 1000, 128, device="cuda", dtype=torch.bfloat16, generator=gen, requires_grad=True)
    k, v = (torch.randn(1, 8, 1000, 128, device="cuda", dtype=torch.bfloat16, generator=gen, requires_grad=True)
            for _ in range(2))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises if flash cannot take it
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), is_causal=True)
    assert rel(out.float(), ref.float()) < 1e-2
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    want = torch.autograd.grad(ref.float().square().sum(), (q, k, v))
    for g, w in zip(grads, want):
        assert rel(g.float(), w.float()) < 2e-2


def test_model_with_the_pass_matches_the_build_without_it():
    sizes = dict(hidden_size=512, intermediate_size=1408, num_attention_heads=8, num_key_value_heads=2,
                 vocab_size=1024, num_hidden_layers=3)
    ref = tiny_model(dtype=torch.bfloat16, gc=True, sizes=sizes, r=16, lora_alpha=16).cuda()
    base = ["lora", "causal_mask", "fused_linear_cross_entropy"]
    plain = fxfuse.optimize(clone(ref), verbose=False, passes=base)
    gqa = fxfuse.optimize(clone(ref), verbose=False, passes=base + ["sdpa_gqa"])
    ids = torch.randint(0, 1024, (2, 512), generator=torch.Generator().manual_seed(7)).cuda()
    l_plain, g_plain = loss_and_grads(plain, input_ids=ids, labels=ids)
    l_gqa, g_gqa = loss_and_grads(gqa, input_ids=ids, labels=ids)
    assert rel(l_gqa, l_plain) < 1e-3
    for name in g_plain:
        assert rel(g_gqa[name], g_plain[name]) < 2e-2, name
    s = fxfuse.report(gqa).summary()["sdpa_gqa"]
    assert s["rewritten"] == sizes["num_hidden_layers"] and not s["declined"], s
