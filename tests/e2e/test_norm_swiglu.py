"""End to end with every pass (the defaults plus the opt-in RMSNorm + residual add and SwiGLU): tiny
Llama + LoRA through `fxfuse.optimize` gives eager's loss and every LoRA gradient."""

import fxfuse
from test_llama_lora import batch
from tiny import clone, loss_and_grads, rel, tiny_model


def test_fp32_loss_and_every_lora_grad_match_eager():
    """With checkpointing (the harder graph: every layer in a subgraph, recomputed in backward);
    tests/e2e/test_llama_lora.py runs the default passes without it too."""
    ref = tiny_model(gc=True)
    opt = fxfuse.optimize(clone(ref), passes=list(fxfuse.PASSES), compiler="aot_eager", verbose=False)
    inputs = batch(3, 16, pad_rows=(1,))
    l_ref, g_ref = loss_and_grads(ref, **inputs)
    l_opt, g_opt = loss_and_grads(opt, **inputs)
    assert g_ref.keys() == g_opt.keys() and len(g_ref) == 28
    assert rel(l_opt, l_ref) < 1e-5
    for name in g_ref:
        assert rel(g_opt[name], g_ref[name]) < 1e-5, name
    summary = fxfuse.report(opt).summary()
    assert summary["rms_norm"]["rewritten"] == summary["rms_norm"]["candidates"] == 5, summary
    assert summary["swiglu"]["rewritten"] == summary["swiglu"]["candidates"] == 2, summary
    runtime = fxfuse.report(opt).to_dict()["runtime"]
    assert fxfuse.report(opt).runtime_fallbacks == 0
    for op in ("fxfuse::rms_norm", "fxfuse::rms_norm_backward", "fxfuse::swiglu", "fxfuse::swiglu_backward"):
        assert runtime["kernel_calls"].get(op, 0) > 0, (op, runtime)


def test_trainable_norm_weights_get_eager_grads():
    """Norm weights that train (modules_to_save) get dw from the kernels; eager's grads to 1e-5."""
    ref = tiny_model(modules_to_save=["input_layernorm", "post_attention_layernorm", "norm"])
    opt = fxfuse.optimize(clone(ref), passes=list(fxfuse.PASSES), compiler="aot_eager", verbose=False)
    l_ref, g_ref = loss_and_grads(ref, **batch())
    l_opt, g_opt = loss_and_grads(opt, **batch())
    norms = [n for n in g_ref if "layernorm" in n or "norm.modules_to_save" in n]
    assert len(norms) == 5 and g_ref.keys() == g_opt.keys()
    assert rel(l_opt, l_ref) < 1e-5
    for name in g_ref:
        assert rel(g_opt[name], g_ref[name]) < 1e-5, name
    assert fxfuse.report(opt).summary()["rms_norm"]["rewritten"] == 5
