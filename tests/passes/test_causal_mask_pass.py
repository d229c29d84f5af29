"""Causal-mask pass: materialised HF masks proven causal become SDPA's is_causal; everything else
(padding, packed sequences, sliding windows) is declined with a reason and keeps its mask."""
import copy

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

from fxfuse.passes.causal_mask import CausalMaskPass
from fxfuse.passes.mask_analysis import Pair, classify
from fxfuse.passes.manager import PassManager
from fxfuse.passes.pattern import Decline, canon, graphs_of
from tiny import SIZES, loss_and_grads, rel, tiny_model, tokens


def capture(model, pass_=None, **inputs):
    """Trace with dynamo, run the pass, return (before, after, stats) of the graph with SDPA sites;
    the loss and grads of the rewritten graph are returned too."""
    seen = []

    def backend(gm, example_inputs):
        before = copy.deepcopy(gm)
        stats = PassManager([pass_ or CausalMaskPass()]).run(gm)
        seen.append((before, gm, stats[0]))
        return gm.forward

    inputs = inputs or {"input_ids": tokens(), "labels": tokens()}
    loss, grads = loss_and_grads(torch.compile(model, backend=backend), **inputs)
    grads = {k.removeprefix("_orig_mod."): v for k, v in grads.items()}
    graphs = [s for s in seen if s[2].candidates]
    assert len(graphs) == 1, [s[2].candidates for s in seen]
    return (*graphs[0], loss, grads)


def sdpa_nodes(gm):
    return [n for _, g in graphs_of(gm) for n in g.graph.nodes if canon(n) and canon(n).kind == "sdpa"]


def square_bool_nodes(gm, t):
    """Nodes holding a [.., T, T] boolean tensor: the materialised mask and its producers."""
    out = []
    for _, g in graphs_of(gm):
        for n in g.graph.nodes:
            v = n.meta.get("example_value")
            if isinstance(v, torch.Tensor) and v.dtype == torch.bool and v.dim() == 4 and v.shape[-2:] == (t, t):
                out.append(n)
    return out


@pytest.mark.parametrize("gc", [False, True])
@pytest.mark.parametrize("eval_limit", [1 << 20, 4])  # 4: every [T, T] node goes the symbolic way
def test_llama_mask_proven_causal(gc, eval_limit):
    model = tiny_model(gc=gc)
    ref_loss, ref_grads = loss_and_grads(copy.deepcopy(model), input_ids=tokens(), labels=tokens())
    before, after, stats, loss, grads = capture(model, CausalMaskPass(eval_limit=eval_limit))
    assert stats.candidates == 2 and stats.rewritten == 2, [s.reason for s in stats.sites]
    assert all(s.group == f"{s.node}:is_causal" for s in stats.sites)
    for n in sdpa_nodes(before):
        assert canon(n).operands[3] is not None and not canon(n).attrs["is_causal"]
    for n in sdpa_nodes(after):
        assert canon(n).operands[3] is None and canon(n).attrs["is_causal"] is True
    # the [T, T] mask and its producers are gone, subgraph inputs included
    assert square_bool_nodes(before, 16) and not square_bool_nodes(after, 16)
    assert rel(loss, ref_loss) < 1e-6
    assert all(rel(grads[k], ref_grads[k]) < 1e-5 for k in ref_grads)


def test_padding_mask_declined_and_kept():
    model = tiny_model()
    ids = tokens()
    attn = torch.ones_like(ids)
    attn[0, :5] = 0
    labels = ids.masked_fill(attn == 0, -100)
    ref_loss, ref_grads = loss_and_grads(copy.deepcopy(model), input_ids=ids, attention_mask=attn, labels=labels)
    _, after, stats, loss, grads = capture(model, input_ids=ids, attention_mask=attn, labels=labels)
    assert stats.rewritten == 0 and stats.candidates == 2
    assert all("graph input" in s.reason and "attention_mask" in s.reason for s in stats.sites), stats.sites
    assert all(canon(n).operands[3] is not None for n in sdpa_nodes(after))
    assert rel(loss, ref_loss) < 1e-6 and all(rel(grads[k], ref_grads[k]) < 1e-5 for k in ref_grads)


def test_packed_position_ids_declined():
    ids = tokens(batch=1)
    pos = torch.cat([torch.arange(6), torch.arange(10)])[None]  # two packed sequences
    _, _, stats, _, _ = capture(tiny_model(), input_ids=ids, position_ids=pos, labels=ids)
    assert stats.rewritten == 0
    assert all("position_ids" in s.reason for s in stats.sites), stats.sites


@pytest.mark.parametrize("eval_limit", [1 << 20, 4])
def test_sliding_window_declined(eval_limit):
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(**SIZES, sliding_window=4))
    _, _, stats, _, _ = capture(model, CausalMaskPass(eval_limit=eval_limit))
    assert stats.candidates == 2 and stats.rewritten == 0
    assert all("not" in s.reason and "causal" in s.reason for s in stats.sites), stats.sites


def _pair(op, q, kv):
    return Pair(op, torch.tensor(q)[None, None, :, None], torch.tensor(kv)[None, None, None, :])


def test_classify_terms():
    shape = (1, 1, 4, 4)
    ar = [0, 1, 2, 3]
    assert classify(_pair("ge", ar, ar), shape) == "causal"
    assert classify(_pair("eq", [0] * 4, [0] * 4), shape) == "none"
    with pytest.raises(Decline, match="segments"):
        classify(_pair("eq", [0, 0, 1, 1], [0, 0, 1, 1]), shape)
    with pytest.raises(Decline, match="not causal"):
        classify(_pair("ge", ar, [a + 1 for a in ar]), shape)  # shifted: not the diagonal
    with pytest.raises(Decline, match="not causal"):
        classify(_pair("gt", ar, ar), shape)  # strict: the diagonal is masked
    with pytest.raises(Decline, match="not causal"):
        classify(_pair("ge", [0, 0, 1, 2], [0, 0, 1, 2]), shape)  # not strictly increasing
    assert classify(torch.ones(4, 4, dtype=torch.bool).tril()[None, None], shape) == "causal"
    with pytest.raises(Decline):
        classify(torch.ones(4, 4, dtype=torch.bool).triu()[None, None], shape)


def capture_dynamic(model, lengths, pass_=None, **extra):
    """Compile with dynamic=True (symbolic batch and length); run two lengths through one graph."""
    seen = []

    def backend(gm, example_inputs):
        stats = PassManager([pass_ or CausalMaskPass()]).run(gm)
        if stats[0].candidates:
            seen.append((gm, stats[0]))
        return gm.forward

    compiled = torch.compile(model, backend=backend, dynamic=True)
    results = []
    for t in lengths:
        ids = tokens(seq=t)
        loss, grads = loss_and_grads(compiled, input_ids=ids, labels=ids, **extra)
        results.append((loss, {k.removeprefix("_orig_mod."): v for k, v in grads.items()}))
        model.zero_grad(set_to_none=True)
    return seen, results


def test_symbolic_sizes_proven_causal():
    """A graph with symbolic batch and length: the affine analysis proves the mask causal, and the
    one graph serves two lengths with eager's loss and gradients."""
    model = tiny_model(gc=True)
    ref = copy.deepcopy(model)
    seen, results = capture_dynamic(model, [12, 21])
    assert len(seen) == 1, "one dynamic graph for both lengths"
    gm, stats = seen[0]
    assert stats.candidates == 2 and stats.rewritten == 2, [s.reason for s in stats.sites]
    assert any(isinstance(n.meta.get("example_value"), torch.SymInt) for n in gm.graph.nodes)
    assert all(canon(n).attrs["is_causal"] and canon(n).operands[3] is None for n in sdpa_nodes(gm))
    for t, (loss, grads) in zip([12, 21], results):
        ids = tokens(seq=t)
        ref_loss, ref_grads = loss_and_grads(ref, input_ids=ids, labels=ids)
        ref.zero_grad(set_to_none=True)
        assert rel(loss, ref_loss) < 1e-6
        assert all(rel(grads[k], ref_grads[k]) < 1e-5 for k in ref_grads)


def test_symbolic_sizes_sliding_window_declined():
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(**SIZES, sliding_window=4))
    seen, _ = capture_dynamic(model, [12])
    stats = seen[0][1]
    assert stats.rewritten == 0 and stats.candidates == 2
    assert all("not causal" in s.reason or "not analysed" in s.reason for s in stats.sites), stats.sites
