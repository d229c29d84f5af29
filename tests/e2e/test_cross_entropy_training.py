"""End to end: optimize() with the fused lm_head + loss gives eager's loss and every LoRA gradient,
drops the logits only from outputs whose loss is backpropagated, and keeps them otherwise."""
import pytest
import torch

import fxfuse
from tiny import clone, loss_and_grads, rel, tiny_model, tokens


def ce_summary(model):
    return fxfuse.report(model).summary()["fused_linear_cross_entropy"]


@pytest.mark.parametrize("arch, gc", [("llama", True), ("qwen2", False)])
def test_loss_grads_and_logits_match_eager(arch, gc):
    ref = tiny_model(arch, gc=gc)
    opt = fxfuse.optimize(clone(ref), compiler="aot_eager", verbose=False)
    ids = tokens(2, 16)
    labels = ids.clone()
    labels[1, :6] = -100
    # like the Trainer: loss summed, then divided by the batch's token count (in the graph)
    inputs = dict(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(27))
    l_ref, g_ref = loss_and_grads(ref, **inputs)
    out = opt(**inputs, use_cache=False)
    assert out.logits is None  # training step with labels: the logits were never materialised
    out.loss.backward()
    g_opt = {n: p.grad for n, p in opt.named_parameters() if p.grad is not None}
    assert g_ref.keys() == g_opt.keys() and len(g_ref) == 28
    assert rel(out.loss.detach(), l_ref) < 1e-5
    for name in g_ref:
        assert rel(g_opt[name], g_ref[name]) < 1e-5, name
    assert ce_summary(opt)["rewritten"] == 1 and fxfuse.report(opt).runtime_fallbacks == 0

    opt.eval()
    ref.eval()
    with torch.no_grad():
        got, want = opt(input_ids=ids, labels=labels, use_cache=False), ref(input_ids=ids, labels=labels, use_cache=False)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    assert rel(got.loss, want.loss) < 1e-5
    declined = ce_summary(opt)["declined"]
    assert any("loss needs no gradient" in why for why in declined), declined


def test_keep_logits_returns_them_in_training():
    ref = tiny_model()
    opt = fxfuse.optimize(clone(ref), compiler="aot_eager", verbose=False, keep_logits=True)
    ids = tokens()
    got, want = opt(input_ids=ids, labels=ids, use_cache=False), ref(input_ids=ids, labels=ids, use_cache=False)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    assert rel(got.loss.detach(), want.loss.detach()) < 1e-5
    assert ce_summary(opt)["rewritten"] == 0
    assert any("keep_logits=True" in why for why in ce_summary(opt)["declined"])


def test_tuple_output_has_none_for_the_dropped_logits():
    """return_dict=False: the training output is (loss, None, ...), never the pass's NaN stand-in;
    without labels the tuple starts with the real logits."""
    ref = tiny_model()
    opt = fxfuse.optimize(clone(ref), compiler="aot_eager", verbose=False)
    ids = tokens()
    out = opt(input_ids=ids, labels=ids, use_cache=False, return_dict=False)
    want = ref(input_ids=ids, labels=ids, use_cache=False, return_dict=False)
    assert isinstance(out, tuple) and out[1] is None and len(out) == len(want)
    assert rel(out[0].detach(), want[0].detach()) < 1e-5
    assert ce_summary(opt)["rewritten"] == 1
    got = opt(input_ids=ids, use_cache=False, return_dict=False)
    torch.testing.assert_close(got[0], ref(input_ids=ids, use_cache=False, return_dict=False)[0], rtol=1e-5, atol=1e-5)
