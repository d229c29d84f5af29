"""On a CUDA device (run by bench/run_gpu.sh on the device machine): a bf16 Llama with PEFT's fp32
adapters, gradient checkpointing, full Inductor: fxfuse's loss and every LoRA gradient are as close
to a float64 run as eager's are. CPU runs skip this module: the same checks run on CPU in tests/e2e."""
import pytest
import torch

import fxfuse
from fxfuse.runtime import stats
from tiny import clone, loss_and_grads, rel, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (device machine)")


@pytest.mark.parametrize("graph_ops", [False, True])
def test_bf16_llama_matches_float64_as_well_as_eager(graph_ops):
    """graph_ops: LoraPass(graph_ops_below), the op's math as graph ops Inductor compiles."""
    sizes = dict(hidden_size=512, intermediate_size=1408, num_attention_heads=8, num_key_value_heads=2,
                 vocab_size=1024)
    ref = tiny_model(dtype=torch.bfloat16, gc=True, sizes=sizes, r=16, lora_alpha=16).cuda()
    options = {"lora": {"graph_ops_below": 4096 if graph_ops else 0}}
    opt = fxfuse.optimize(clone(ref), verbose=False, pass_options=options)
    stats.reset()
    exact = clone(ref).double()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 1024, (2, 256), generator=g).cuda()
    inputs = {"input_ids": ids, "labels": ids}
    l_ref, g_ref = loss_and_grads(ref, **inputs)
    l_opt, g_opt = loss_and_grads(opt, **inputs)
    l_64, g_64 = loss_and_grads(exact, **inputs)
    assert rel(l_opt, l_64) <= max(1e-3, 1.5 * rel(l_ref, l_64))
    worst = []
    for name in g_64:
        eager_err, ours = rel(g_ref[name], g_64[name]), rel(g_opt[name], g_64[name])
        worst.append((ours, eager_err, name))
        assert ours <= max(1e-2, 1.5 * eager_err), (name, ours, eager_err)
    print("worst LoRA grad error vs float64 (fxfuse, eager, name):", max(worst))
    summary = fxfuse.report(opt).summary()["lora"]
    assert summary["rewritten"] == summary["candidates"] == 14
    assert fxfuse.report(opt).runtime_fallbacks == 0
    if graph_ops:  # the compiled graphs call no LoRA op: its math is Inductor's
        calls = stats.snapshot()["kernel_calls"]
        assert not any("lora" in op for op in calls), calls
