"""On a CUDA device, through Inductor: the MLP tiling pass (forced on with min_mib=0) gives the loss
and LoRA gradients of the same build without it, alone and together with activation offload (the
long-context configuration)."""
import pytest
import torch

import fxfuse
from fxfuse.passes.activation_offload import ActivationOffload
from tiny import FUSED_OP, clone, loss_and_grads, rel, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (device machine)")

SIZES = dict(hidden_size=512, intermediate_size=1408, num_attention_heads=8, num_key_value_heads=2,
             vocab_size=1024, num_hidden_layers=3)
OP = FUSED_OP


@pytest.mark.parametrize("offload", [False, True])
def test_tiled_mlp_matches_the_untiled_build(offload):
    ref = tiny_model(dtype=torch.bfloat16, gc=True, sizes=SIZES, r=16, lora_alpha=16).cuda()
    off = ActivationOffload(min_bytes=0) if offload else False
    plain = fxfuse.optimize(clone(ref), verbose=False, offload_activations=off,
                            pass_options={**OP, "mlp_tiling": {"min_mib": 1e9}})
    tiled = fxfuse.optimize(clone(ref), verbose=False, offload_activations=off,
                            pass_options={**OP, "mlp_tiling": {"min_mib": 0, "rows_per_chunk": 300}})
    ids = torch.randint(0, 1024, (2, 512), generator=torch.Generator().manual_seed(5)).cuda()
    for step in range(2):
        l_plain, g_plain = loss_and_grads(plain, input_ids=ids, labels=ids)
        l_tiled, g_tiled = loss_and_grads(tiled, input_ids=ids, labels=ids)
        assert torch.isfinite(l_tiled) and rel(l_tiled, l_plain) < 1e-3, (step, l_plain, l_tiled)
        assert g_plain.keys() == g_tiled.keys()
        for name in g_plain:
            assert rel(g_tiled[name], g_plain[name]) < 2e-2, (step, name, rel(g_tiled[name], g_plain[name]))
        for m in (plain, tiled):
            m.zero_grad(set_to_none=True)
    s = fxfuse.report(tiled).summary()["mlp_tiling"]
    assert s["rewritten"] == SIZES["num_hidden_layers"] and not s["declined"], s
    assert fxfuse.report(plain).summary()["mlp_tiling"]["rewritten"] == 0
    assert fxfuse.report(tiled).runtime_fallbacks == 0
