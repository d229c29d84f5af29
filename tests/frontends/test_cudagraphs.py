"""What cudagraphs=True depends on and what it reports. The rewritten graph keeps what tells
AOTAutograd which inputs are the model's parameters: deepcopy (the backend rewrites a copy) drops
them, and without them CUDA graphs copy every weight into their own buffers on each replay (a second
copy of the model in memory; bench/RESULTS.md has the 8B numbers).
Graphs that Inductor runs without CUDA graphs are reported."""
import copy

import torch
import torch._functorch.aot_autograd as aot

import fxfuse
from fxfuse.frontends.backend import _carry_dynamo_metadata
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
    """cudagraphs=True on a CPU model: Inductor compiles the graphs without CUDA graphs and only bumps a
    counter (no warning on the CPU); the report says so instead of staying silent. A model optimized
    without cudagraphs=True, before the skips, stays quiet about them."""
    torch._dynamo.reset()
    plain = fxfuse.optimize(tiny_model(), compiler="aot_eager", verbose=False)
    opt = fxfuse.optimize(tiny_model(), compiler="inductor", cudagraphs=True, verbose=False)
    ids = tokens(1, 8)
    opt(input_ids=ids, labels=ids).loss.backward()
    rep = fxfuse.report(opt)
    assert rep.cudagraphs and rep.cudagraph_skips >= 1
    assert rep.to_dict()["cudagraphs"] and rep.to_dict()["cudagraph_skips"] >= 1
    assert "WARNING: cudagraphs=True, but Inductor compiled" in rep.table()
    plain(input_ids=ids, labels=ids)
    assert not fxfuse.report(plain).cudagraph_skips and "cudagraphs=True" not in fxfuse.report(plain).table()


def _dynamo_graph():
    """dynamo's graph module of a tiny LoRA model's forward (what the backend receives)."""
    seen = []
    torch._dynamo.reset()
    model = tiny_model()
    torch.compile(model, backend=lambda gm, _: seen.append(gm) or gm.forward)(input_ids=tokens(1, 8))
    return seen[0]


def test_carry_dynamo_metadata_only_onto_the_same_inputs():
    gm = _dynamo_graph()
    assert hasattr(gm, "_param_name_to_source")
    same = copy.deepcopy(gm)
    assert not hasattr(same, "_param_name_to_source")  # the premise: deepcopy drops it
    assert _carry_dynamo_metadata(gm, same)
    assert same._param_name_to_source is gm._param_name_to_source
    old, new = (list(g.graph.find_nodes(op="placeholder")) for g in (gm, same))
    assert [n._dynamo_source for n in new] == [n._dynamo_source for n in old]
    changed = copy.deepcopy(gm)
    changed.graph.placeholder("extra")
    assert not _carry_dynamo_metadata(gm, changed) and not hasattr(changed, "_param_name_to_source")
    assert _carry_dynamo_metadata(torch.fx.symbolic_trace(lambda x: x + 1), changed)  # not from dynamo


def test_a_pass_that_changes_the_inputs_leaves_the_graph_unchanged(monkeypatch):
    from fxfuse.passes.manager import PassManager
    real = PassManager.run

    def adds_an_input(self, gm):
        stats = real(self, gm)
        gm.graph.placeholder("extra")
        return stats

    monkeypatch.setattr(PassManager, "run", adds_an_input)
    torch._dynamo.reset()
    ref = tiny_model()
    opt = fxfuse.optimize(clone(ref), compiler="aot_eager", verbose=False)
    ids = tokens(1, 8)
    assert torch.equal(opt(input_ids=ids, labels=ids).loss, ref(input_ids=ids, labels=ids).loss)
    assert fxfuse.report(opt).errors == ["RuntimeError: a pass changed the graph's inputs"]
