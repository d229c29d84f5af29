"""Several optimized models in one process (sweeps, a second adapter config): each is rewritten as if
it were alone, and a forward that dynamo runs eagerly is reported, not silent."""
import torch

import fxfuse
from tiny import clone, loss_and_grads, rel, tiny_model, tokens


def test_second_model_with_another_lora_alpha_is_still_fused():
    """Dynamo makes a float that changed between compiles of the same code a graph input; the
    LoRA scaling must stay a constant, or every site of the second model is declined."""
    ids = tokens(2, 12)
    for alpha in (16, 8):  # no dynamo reset between models, as in one training process
        ref = tiny_model(lora_alpha=alpha)
        opt = fxfuse.optimize(clone(ref), compiler="aot_eager", verbose=False)
        l_ref, g_ref = loss_and_grads(ref, input_ids=ids, labels=ids)
        l_opt, g_opt = loss_and_grads(opt, input_ids=ids, labels=ids)
        s = fxfuse.report(opt).summary()["lora"]
        assert s["candidates"] == s["rewritten"] == 14 and not s["declined"], (alpha, s)
        assert rel(l_opt, l_ref) < 1e-5
        assert all(rel(g_opt[n], g_ref[n]) < 1e-5 for n in g_ref), alpha


def test_forward_run_eagerly_is_reported():
    opt = fxfuse.optimize(tiny_model(), compiler="aot_eager", verbose=False)
    ids = tokens(1, 8)
    with torch.compiler.set_stance("force_eager"):  # as when dynamo's recompile limit is reached
        opt(input_ids=ids, labels=ids)
    rep = fxfuse.report(opt)
    assert rep.forward_calls == 1 and rep.nothing_compiled and rep.to_dict()["nothing_compiled"]
    assert "WARNING: 1 forward call(s) and no graph compiled" in rep.table()
    opt(input_ids=ids, labels=ids)  # compiled now
    assert not fxfuse.report(opt).nothing_compiled and "WARNING" not in fxfuse.report(opt).table()
