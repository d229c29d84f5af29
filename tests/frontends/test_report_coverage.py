"""The report accounts for every adapter layer: LoRA layers that ran outside the compiled graphs
(checked on the graphs' run-time inputs) are a warning, adapter kinds no pass handles a note, and a
graph the compiler failed on is a compile error whose sites are dropped (it never ran)."""
import pytest
import torch
import torch.fx as fx
from peft import LoHaConfig, get_peft_model
from torch._subclasses.fake_tensor import DataDependentOutputException

import fxfuse
from fxfuse.frontends.backend import make_backend
from fxfuse.frontends.optimize import build_manager
from fxfuse.frontends.report import Report
from tiny import clone, loss_and_grads, rel, tiny_model, tokens


def test_lora_layers_run_outside_the_compiled_graphs_are_a_warning():
    torch._dynamo.reset()
    ref = tiny_model()
    opt = clone(ref)
    layer = opt.base_model.model.model.layers[1]
    layer.forward = torch._dynamo.disable(layer.forward)  # a graph break: layer 1 runs eagerly
    opt = fxfuse.optimize(opt, compiler="aot_eager", verbose=False)
    rep = fxfuse.report(opt)
    assert len(rep.adapter_layers) == 14 and set(rep.adapter_layers.values()) == {"lora.Linear"}
    assert rep.unseen_adapters() == {}  # nothing compiled yet: nothing to say
    ids = tokens()
    l_ref, g_ref = loss_and_grads(ref, input_ids=ids, labels=ids)
    l_opt, g_opt = loss_and_grads(opt, input_ids=ids, labels=ids)
    assert rel(l_opt, l_ref) < 1e-5 and all(rel(g_opt[n], g_ref[n]) < 1e-4 for n in g_ref)
    unseen = rep.unseen_adapters()
    assert list(unseen) == ["lora.Linear"]
    assert sorted(unseen["lora.Linear"]) == sorted(n for n in rep.adapter_layers if ".layers.1." in n)
    assert rep.summary()["lora"]["candidates"] == 7  # layer 0's seven
    assert "WARNING: 7 of 14 lora.Linear adapter layer(s) ran outside the graphs fxfuse compiled" in rep.table()
    assert rep.to_dict()["unseen_adapters"] == unseen


def test_every_lora_layer_seen_gives_no_warning():
    torch._dynamo.reset()
    opt = fxfuse.optimize(tiny_model(), compiler="aot_eager", verbose=False)
    ids = tokens()
    opt(input_ids=ids, labels=ids).loss.backward()
    rep = fxfuse.report(opt)
    assert len(rep.adapter_layers) == 14 and rep.unseen_adapters() == {}
    assert "ran outside" not in rep.table() and rep.unmatched_lora() == []


def test_adapter_kinds_no_pass_handles_are_noted():
    torch._dynamo.reset()
    base = tiny_model(lora=False)
    ref = get_peft_model(base, LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    opt = fxfuse.optimize(clone(ref), compiler="aot_eager", verbose=False)
    ids = tokens()
    l_ref, _ = loss_and_grads(ref, input_ids=ids, labels=ids)
    l_opt, _ = loss_and_grads(opt, input_ids=ids, labels=ids)
    assert rel(l_opt, l_ref) < 1e-5
    rep = fxfuse.report(opt)
    assert rep.unseen_adapters() == {"loha.Linear": sorted(rep.adapter_layers)} and len(rep.adapter_layers) == 4
    table = rep.table()
    assert "note: 4 loha.Linear adapter layer(s): no fxfuse pass handles this adapter kind" in table
    assert "WARNING" not in table


@pytest.mark.parametrize("error, outcome", [
    (RuntimeError("compiler bug\nsecond line"), "RuntimeError: compiler bug; the error stops the call"),
    (DataDependentOutputException(torch.ops.aten._local_scalar_dense.default),
     "DataDependentOutputException: aten._local_scalar_dense.default; dynamo runs its code without fxfuse "
     "(a graph break, or eagerly)"),
])
def test_a_compiler_failure_is_reported_and_its_sites_dropped(monkeypatch, error, outcome):
    import torch._dynamo.backends.debugging as debugging

    def fails(gm, example_inputs):
        raise error

    monkeypatch.setattr(debugging, "aot_eager", fails)
    report = Report(pass_names=["lora"])
    backend = make_backend(build_manager(["lora"]), report, compiler="aot_eager")
    gm = fx.symbolic_trace(lambda x: torch.relu(x) + 1)
    with pytest.raises(type(error)):
        backend(gm, [torch.randn(3)])
    assert report.graphs == []  # the graph never ran: its sites are not counted
    assert report.compile_errors == [f"graph 0 (4 nodes): {outcome}"]
    assert f"COMPILE ERROR: graph 0 (4 nodes): {outcome}" in report.table()


def test_a_restart_is_no_compile_error(monkeypatch):
    import torch._dynamo.backends.debugging as debugging

    def restarts(gm, example_inputs):
        raise torch._dynamo.exc.RestartAnalysis("trace again")

    monkeypatch.setattr(debugging, "aot_eager", restarts)
    report = Report(pass_names=["lora"])
    backend = make_backend(build_manager(["lora"]), report, compiler="aot_eager")
    with pytest.raises(torch._dynamo.exc.RestartAnalysis):
        backend(fx.symbolic_trace(lambda x: x * 2), [torch.randn(3)])
    assert report.graphs == [] and report.compile_errors == []
