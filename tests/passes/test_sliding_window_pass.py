"""Sliding-window pass: HF's materialised causal sliding-window mask -> fxfuse::window_attention
(no [T, T] mask left, kv heads read without repeat_kv), loss and gradients equal eager's; every other
mask declined with the reason."""
import copy

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

from fxfuse.passes.mask_analysis import Aff, Conj, Pair, SymCmp
from fxfuse.passes.manager import PassManager
from fxfuse.passes.pattern import Decline, count_ops
from fxfuse.passes.sliding_window import SlidingWindowPass, band_window, window_of
from test_causal_mask_pass import _pair, capture, capture_dynamic, square_bool_nodes
from tiny import SIZES, loss_and_grads, rel, tokens

WINDOW_OP = "fxfuse.window_attention.default"


def mistral(window=4):
    torch.manual_seed(0)
    return MistralForCausalLM(MistralConfig(**SIZES, sliding_window=window))


@pytest.mark.parametrize("eval_limit", [1 << 20, 4])  # 4: the [T, T] producers go the symbolic way
@pytest.mark.parametrize("chunk", [3, 1024])  # several chunks per sequence, one
def test_mistral_window_becomes_window_attention(eval_limit, chunk):
    model = mistral()
    ref_loss, ref_grads = loss_and_grads(copy.deepcopy(model), input_ids=tokens(), labels=tokens())
    before, after, stats, loss, grads = capture(model, SlidingWindowPass(chunk=chunk, eval_limit=eval_limit))
    assert stats.candidates == 2 and stats.rewritten == 2, [s.reason for s in stats.sites]
    assert all(s.group.endswith(":window 4") for s in stats.sites)
    ops_before, ops_after = count_ops(before), count_ops(after)
    assert ops_before["sdpa"] == 2 and "sdpa" not in ops_after and ops_after[WINDOW_OP] == 2
    assert square_bool_nodes(before, 16) and not square_bool_nodes(after, 16)  # the mask is gone
    # the op reads the 2 kv heads themselves: repeat_kv's expands are gone
    assert ops_after.get("expand", 0) < ops_before.get("expand", 0)
    for n in after.graph.nodes:
        if n.op == "call_function" and str(n.target) == WINDOW_OP:
            assert n.args[1].meta["example_value"].shape[1] == SIZES["num_key_value_heads"]
    assert rel(loss, ref_loss) < 1e-6
    assert all(rel(grads[k], ref_grads[k]) < 1e-5 for k in ref_grads)


def test_window_longer_than_the_sequence_is_left_to_causal_mask():
    _, _, stats, _, _ = capture(mistral(window=64), SlidingWindowPass())
    assert stats.candidates == 2 and stats.rewritten == 0 and all("no window" in s.reason or "no sliding-window" in s.reason
                                        for s in stats.sites), stats.sites


def test_padding_mask_declined():
    ids = tokens()
    attention_mask = torch.ones_like(ids)
    attention_mask[0, :3] = 0
    _, _, stats, _, _ = capture(mistral(), SlidingWindowPass(), input_ids=ids, labels=ids,
                                attention_mask=attention_mask)
    assert stats.candidates == 2 and stats.rewritten == 0 and all("attention_mask" in s.reason or "graph input" in s.reason
                                        for s in stats.sites), stats.sites


def test_symbolic_sizes_declined_with_the_reason():
    """With dynamic=True dynamo turns the attention dropout (0.0) into a symbolic float: nothing proves
    it is 0, so the site is declined, and the masked SDPA stays (loss and grads unchanged)."""
    model = mistral()
    ref = copy.deepcopy(model)
    seen, results = capture_dynamic(model, [12], SlidingWindowPass())
    stats = seen[0][1]
    assert stats.candidates == 2 and stats.rewritten == 0
    assert all("dropout" in s.reason for s in stats.sites), stats.sites
    ids = tokens(seq=12)
    ref_loss, _ = loss_and_grads(ref, input_ids=ids, labels=ids)
    assert rel(results[0][0], ref_loss) < 1e-6


def test_automatic_dynamic_graph_is_rewritten_too():
    """torch.compile's default: a static graph first, then one with a symbolic length after the length
    changes (the dropout stays a constant there). Both graphs get window attention; one graph serves
    two more lengths with eager's loss and gradients."""
    model = mistral()
    ref = copy.deepcopy(model)
    seen = []

    def backend(gm, example_inputs):
        stats = PassManager([SlidingWindowPass(chunk=5)]).run(gm)
        if stats[0].candidates:
            seen.append(stats[0])
        return gm.forward

    compiled = torch.compile(model, backend=backend)
    for t in (16, 12, 21):
        ids = tokens(seq=t)
        loss, grads = loss_and_grads(compiled, input_ids=ids, labels=ids)
        ref_loss, ref_grads = loss_and_grads(ref, input_ids=ids, labels=ids)
        grads = {k.removeprefix("_orig_mod."): v for k, v in grads.items()}
        assert rel(loss, ref_loss) < 1e-6
        assert all(rel(grads[k], ref_grads[k]) < 1e-5 for k in ref_grads)
    assert len(seen) == 2 and all(s.candidates == 2 and s.rewritten == 2 for s in seen), seen


def test_window_terms():
    shape = (1, 1, 6, 6)
    ar = list(range(6))
    causal = _pair("ge", ar, ar)
    assert window_of(Conj([causal, _pair("lt", [a - 3 for a in ar], ar)]), shape) == 3
    assert window_of(Conj([causal, _pair("le", [a - 3 for a in ar], ar)]), shape) == 4
    band = torch.ones(6, 6, dtype=torch.bool).tril() & ~torch.ones(6, 6, dtype=torch.bool).tril(-2)
    assert band_window(band[None, None], shape) == 2 and window_of(band[None, None], shape) == 2
    sym = SymCmp("gt", Aff((1, 1, 6, 6), (0, 0, -1, 1), 5))  # kv - q + 5 > 0
    assert window_of(Conj([causal, sym]), shape) == 5
    with pytest.raises(Decline, match="without the causal term"):
        window_of(_pair("lt", [a - 3 for a in ar], ar), shape)  # a band that also looks ahead
    with pytest.raises(Decline, match="not consecutive"):
        odd = [0, 2, 4, 6, 8, 10]
        window_of(Conj([_pair("ge", odd, odd), _pair("lt", [a - 3 for a in odd], odd)]), shape)
    with pytest.raises(Decline, match="floating-point"):  # q - 2.5 < kv: width 3, not int(2.5)
        window_of(Conj([causal, Pair("lt", torch.tensor([a - 2.5 for a in ar])[None, None, :, None],
                                     torch.tensor(ar, dtype=torch.float)[None, None, None, :])]), shape)
    with pytest.raises(Decline, match="constant width"):
        window_of(Conj([causal, _pair("lt", [0, 0, 0, 1, 2, 3], ar)]), shape)
    with pytest.raises(Decline, match="no sliding-window term"):
        window_of(causal, shape)
    with pytest.raises(Decline, match="sliding-window band"):
        band_window(torch.ones(6, 6, dtype=torch.bool).triu()[None, None], shape)


def test_bad_chunk_raises():
    with pytest.raises(ValueError, match="chunk"):
        SlidingWindowPass(chunk=0)
