"""What cudagraphs=True depends on and what it reports. The rewritten graph keeps what tells
AOTAutograd which inputs are the model's parameters: deepcopy (the backend rewrites a copy) drops
them, and without them CUDA graphs copy every weight into their own buffers on each replay (a second
copy of the model in memory, consistent with the +14 GiB measured on the 8B in the second session).
Graphs that Inductor runs without CUDA graphs are reported."""
import torch
import torch._functorch.aot_autograd as aot

import fxfuse
from tiny import clone, tiny_model, tokens


def _static_inputs(monkeypatch, model):
    seen = []
    real = aot._try_get_metadata_from_dynamo

    def spy(mod, *args, **kwargs):
        sources, static = real(mod, *args, **kwargs)
        placeholders = len(list(mod.graph.find_nodes(op="placeholder")))
        seen.append((placeholders, len(static)))
        return sources, static

    monkeypatch.setattr(aot, "_try_get_metadata_from_dynamo", spy)
    torch._dynamo.reset()
    ids = tokens(1, 8)
    model(input_ids=ids, labels=ids).loss.backward()
    monkeypatch.undo()
    return seen


def test_parameters_stay_static_inputs(monkeypatch):
    ref = tiny_model(gc=True)
    plain = _static_inputs(monkeypatch, torch.compile(clone(ref), backend="aot_eager"))
    fused = _static_inputs(monkeypatch, fxfuse.optimize(clone(ref), compiler="aot_eager", verbose=False))
    assert plain and sum(s for _, s in plain) > 10, plain  # the premise: dynamo marks the weights static
    # same inputs as torch.compile's graphs, and as many of them static
    assert sorted(fused) == sorted(plain), (fused, plain)


def test_cudagraphs_that_did_not_happen_are_reported():
    """cudagraphs=True on a CPU model: Inductor runs the graphs without CUDA graphs and only bumps a
    counter (no warning on the CPU); the report says so instead of staying silent."""
    torch._dynamo.reset()
    opt = fxfuse.optimize(tiny_model(), compiler="inductor", cudagraphs=True, verbose=False)
    ids = tokens(1, 8)
    opt(input_ids=ids, labels=ids).loss.backward()
    rep = fxfuse.report(opt)
    assert rep.cudagraphs and rep.cudagraph_skips >= 1 and rep.to_dict()["cudagraph_skips"] == rep.cudagraph_skips
    assert "WARNING: cudagraphs=True, but Inductor ran" in rep.table()
    plain = fxfuse.optimize(tiny_model(), compiler="aot_eager", verbose=False)
    plain(input_ids=ids, labels=ids)
    assert not fxfuse.report(plain).cudagraph_skips and "cudagraphs=True" not in fxfuse.report(plain).table()
