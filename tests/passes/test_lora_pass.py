"""LoRA pass on dynamo graphs: op counts before/after, grouping, and declines with reasons."""
import copy

import pytest
import torch
import torch.nn.functional as F

from fxfuse.passes import lora as lora_pass
from fxfuse.passes.lora import LoraPass
from fxfuse.passes.manager import PassManager
from fxfuse.passes.pattern import count_ops, graphs_of
from fxfuse.runtime.ops.lora_graph import lora_linear_graph
from tiny import tiny_model, tokens

LORA_OP = "fxfuse.lora_linear.default"


def op_pass(**options):
    """The pass emitting the fused op at any token count (these tiny inputs are below the default
    graph_ops_below, where the sites become graph ops: tested below)."""
    return LoraPass(graph_ops_below=0, **options)


def test_short_inputs_become_graph_ops_by_default():
    assert LoraPass().config["graph_ops_below"] == lora_pass.GRAPH_OPS_BELOW == 2048
    _, after, stats = capture(tiny_model(), passes=[LoraPass()])
    assert stats.columns == {"graph-op groups": 8} and LORA_OP not in count_ops(after)


def capture(model, passes=None, **inputs):
    """Trace with dynamo, run the LoRA pass, return (before, after, stats) of the first graph with sites."""
    seen = []

    def backend(gm, example_inputs):
        before = copy.deepcopy(gm)
        stats = PassManager(passes or [op_pass()]).run(gm)
        seen.append((before, gm, stats[0]))
        return gm.forward

    inputs = inputs or {"input_ids": tokens(), "labels": tokens()}
    out = torch.compile(model, backend=backend)(**inputs, use_cache=False)
    out.loss.backward()
    graphs = [s for s in seen if s[2].candidates]
    assert len(graphs) == 1, [s[2].candidates for s in seen]
    return graphs[0]


def fused_nodes(gm):
    return [n for _, g in graphs_of(gm) for n in g.graph.nodes if n.target is torch.ops.fxfuse.lora_linear.default]


@pytest.mark.parametrize("gc", [False, True])
def test_llama_all_sites_grouped(gc):
    before, after, stats = capture(tiny_model(gc=gc))
    b, a = count_ops(before), count_ops(after)
    assert stats.candidates == 14 and stats.rewritten == 14
    # 14 LoRA sites x 3 linears go; lm_head stays (in its own graph when checkpointing breaks it off)
    assert b["linear"] - a.get("linear", 0) == 42 and a.get("linear", 0) == (0 if gc else 1)
    # per layer: q/k/v share an input, gate/up share one, o and down alone -> 4 groups x 2 layers
    assert a[LORA_OP] == 8 and LORA_OP not in b
    assert b["mul"] - a.get("mul", 0) == 14 and b["add"] - a.get("add", 0) == 14
    sizes = sorted(len(n.args[1]) for n in fused_nodes(after))
    assert sizes == [1, 1, 1, 1, 2, 2, 3, 3]
    if gc:
        assert any(name.startswith("wrap_body") for name, _ in graphs_of(after))
        assert all("wrap_body" in s.graph for s in stats.sites)
    modules = {s.module for s in stats.sites}
    assert any(m.endswith("layers.0.self_attn.q_proj") for m in modules), modules


def test_ungrouped_gives_one_op_per_site():
    _, after, stats = capture(tiny_model(), passes=[op_pass(group=False)])
    assert stats.rewritten == 14 and count_ops(after)[LORA_OP] == 14


def test_scaling_rslora_and_per_module_ranks_read_from_graph():
    model = tiny_model(use_rslora=True, rank_pattern={"q_proj": 4, "down_proj": 2}, alpha_pattern={"v_proj": 3})
    _, after, stats = capture(model)
    assert stats.rewritten == 14
    want = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "scaling") and isinstance(mod.scaling, dict):
            want[mod.lora_A["default"].weight.shape[0], mod.base_layer.weight.shape[0], mod.scaling["default"]] = True
    got = {}
    for n in fused_nodes(after):
        for a_node, w_node, s in zip(n.args[3], n.args[1], n.args[5]):
            a = a_node.meta["example_value"]
            w = w_node.meta["example_value"]
            got[a.shape[0], w.shape[0], s] = True
    assert set(got) == set(want)
    assert {k[0] for k in got} == {2, 4, 8}


def test_dropout_train_and_eval():
    model = tiny_model(lora_dropout=0.1)
    _, after, stats = capture(model)
    assert stats.rewritten == 14
    node = fused_nodes(after)[0]
    assert set(node.args[6]) == {0.1} and node.args[7] is not None
    # the report says which sites train with dropout
    assert {s.reason for s in stats.sites} == {"dropout p=0.1: the mask is drawn in-kernel"}
    model.eval()
    torch._dynamo.reset()
    seen = []

    def backend(gm, ex):
        seen.append((gm, PassManager([op_pass()]).run(gm)[0]))
        return gm.forward

    torch.compile(model, backend=backend)(input_ids=tokens(), use_cache=False)
    node = fused_nodes(seen[0][0])[0]
    assert set(node.args[6]) == {0.0} and node.args[7] is None
    assert not any(s.reason for s in seen[0][1].sites)  # eval: no dropout, no note


def test_qwen2_bias_is_carried():
    _, after, stats = capture(tiny_model("qwen2"))
    assert stats.rewritten == 14
    biases = [b for n in fused_nodes(after) for b in n.args[2]]
    assert sum(b is not None for b in biases) == 6  # q/k/v in two layers


def test_dora_is_declined_with_reason():
    seen = []

    def backend(gm, ex):
        seen.append(PassManager([op_pass()]).run(gm)[0])
        return gm.forward

    torch.compile(tiny_model(use_dora=True), backend=backend)(input_ids=tokens(), use_cache=False)
    sites = [s for st in seen for s in st.sites]
    # DoRA graph-breaks per module; every low-rank chain is still seen and declined, never rewritten
    assert len(sites) >= 7 and not any(s.rewritten for s in sites)  # dynamo reuses identical fragments
    # the reasons name DoRA: its magnitude scale on the low-rank term, and its B·A weight norm
    # (with the pattern's own reason beside it)
    kinds = {r.split(" (pattern: ")[0] for r in (s.reason for s in sites)}
    assert kinds == {lora_pass.DORA_MAGNITUDE, lora_pass.DORA_WEIGHT_NORM}, kinds
    assert all(" (pattern: expected base + low-rank sum" in s.reason for s in sites), sites[0].reason
    assert all(s.module == "<inside a LoRA layer, after a graph break>" for s in sites), {s.module for s in sites}


def test_full_rank_adapter_is_declined_not_skipped():
    """r=64 on the 64-wide hidden size: lora_A does not project down on q/k/v/o/gate/up, so those
    are declined with the reason (they used to be no candidates at all, missing from the report);
    down_proj (96 wide) stays low-rank and is rewritten. Eager math runs for the declined ones."""
    before, after, stats = capture(tiny_model(r=64, lora_alpha=7))
    assert stats.candidates == 14 and stats.rewritten == 2
    declined = stats.declined
    assert len(declined) == 12 and all("lora_A [64x64] does not project down" in s.reason for s in declined)
    assert {s.module.rsplit(".", 1)[-1] for s in declined} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                               "up_proj"}
    assert count_ops(after).get(LORA_OP, 0) == 2


@pytest.mark.parametrize("with_base", [False, True])
def test_a_plain_two_linear_chain_is_no_candidate(with_base):
    """A bare bias-free linear(linear(x)) * 2 is not a LoRA linear of any rank: not reported. Added
    to a base linear of the same input it has LoRA's structure, and an 8-wide "lora_A" on an
    8-wide input is then a declined candidate."""
    class Chain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Linear(8, 8)
            self.a, self.b = torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 8, bias=False)

        def forward(self, x):
            chain = self.b(self.a(x)) * 2.0
            return self.w(x) + chain if with_base else chain

    seen = []
    torch.compile(Chain(), backend=lambda gm, ex: seen.append(PassManager([op_pass()]).run(gm)[0]) or gm.forward)(
        torch.randn(3, 8))
    sites = [s for st in seen for s in st.sites]
    if with_base:
        assert len(sites) == 1 and "lora_A [8x8] does not project down" in sites[0].reason
    else:
        assert sites == []


def test_trainable_base_bias_is_declined():
    _, _, stats = capture(tiny_model("qwen2", bias="all"))
    declined = [s for s in stats.declined]
    assert len(declined) == 6 and all("bias requires grad" in s.reason for s in declined)
    assert stats.rewritten == 8


def test_lora_bias_is_declined():
    _, _, stats = capture(tiny_model(lora_bias=True))
    assert stats.rewritten == 0 and stats.candidates == 14
    assert all("lora_bias=True" in s.reason for s in stats.declined), stats.declined[0].reason


class Handwritten(torch.nn.Module):
    """Same math as PEFT, spelled with kwargs, methods and torch.* calls; plus a non-convex site."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(24, 16), requires_grad=False)
        self.a = torch.nn.Parameter(torch.randn(4, 16) * 0.1)
        self.b = torch.nn.Parameter(torch.randn(24, 4) * 0.1)
        self.w2 = torch.nn.Parameter(torch.randn(24, 16), requires_grad=False)
        self.a2 = torch.nn.Parameter(torch.randn(4, 16) * 0.1)
        self.b2 = torch.nn.Parameter(torch.randn(24, 4) * 0.1)

    def forward(self, x):
        base = F.linear(input=x, weight=self.w)
        low = torch.nn.functional.linear(F.linear(x.to(dtype=torch.float32), self.a), self.b)
        y = torch.add(low.mul(0.5), base)
        base2 = F.linear(x, self.w2)
        mid = F.linear(x, self.a2)
        y2 = base2 + F.linear(mid, self.b2) * 2.0
        return y.sum() + y2.sum() + mid.sum()  # `mid` escapes: the second site is not convex


def test_spellings_and_convexity():
    seen = []

    def backend(gm, ex):
        before = count_ops(gm)
        seen.append((before, PassManager([op_pass()]).run(gm)[0], count_ops(gm)))
        return gm.forward

    model = Handwritten()
    x = torch.randn(3, 5, 16)
    ref = model(x)
    out = torch.compile(model, backend=backend)(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    before, stats, after = seen[0]
    assert stats.candidates == 2 and stats.rewritten == 1
    assert "not convex" in stats.declined[0].reason
    assert after[LORA_OP] == 1 and after["linear"] == before["linear"] - 3


def test_min_tokens_declines_short_inputs_with_the_reason_and_keeps_longer_ones():
    """tokens() is [2, 16]: 32 rows. min_tokens=33 declines every site (the graph keeps PEFT's
    linears), min_tokens=32 rewrites them all."""
    _, after, stats = capture(tiny_model(), passes=[op_pass(min_tokens=33)])
    assert stats.rewritten == 0 and len(stats.sites) == 14 and LORA_OP not in count_ops(after)
    assert {s.reason for s in stats.sites} == {
        "32 tokens < min_tokens=33: the fused op's host time per call would exceed what it saves; "
        "PEFT's own linears are left to the compiler"}
    assert {s.check for s in stats.sites} == {"min_tokens"}
    torch._dynamo.reset()
    _, after, stats = capture(tiny_model(), passes=[op_pass(min_tokens=32)])
    assert stats.rewritten == 14 and count_ops(after)[LORA_OP] > 0


def test_min_tokens_keeps_sites_whose_token_count_is_symbolic():
    """A second length recompiles with a symbolic token count (dynamo's automatic dynamic shapes):
    the count is unknown, so no site is declined for it; the first, static graph's are."""
    seen = []

    def backend(gm, ex):
        seen.append(PassManager([op_pass(min_tokens=10**6)]).run(gm)[0])
        return gm.forward

    model = torch.compile(tiny_model(), backend=backend)
    for seq in (16, 24):
        model(input_ids=tokens(seq=seq), use_cache=False)
    first, last = seen[0].sites, seen[-1].sites
    assert first and not any(s.rewritten for s in first)
    assert len(last) == 14 and all(s.rewritten for s in last), [s.reason for s in last]
    # and the report says min_tokens could not apply there
    assert {s.reason for s in last} == {"min_tokens=1000000 not applied: the token count is symbolic (dynamic shapes)"}


@pytest.mark.parametrize("bad", [-1, 1.5, "8"])
def test_min_tokens_must_be_a_non_negative_int(bad):
    with pytest.raises(ValueError, match="min_tokens"):
        op_pass(min_tokens=bad)


def graph_op_nodes(gm):
    return [n for _, g in graphs_of(gm) for n in g.graph.nodes if n.target is lora_linear_graph]


def test_graph_ops_below_emits_the_ops_math_as_graph_ops_for_short_inputs():
    """tokens() is [2, 16]: 32 rows. graph_ops_below=33 makes every group graph ops (no custom op
    left), each site says why; graph_ops_below=32 keeps the fused ops."""
    _, after, stats = capture(tiny_model(), passes=[LoraPass(graph_ops_below=33)])
    assert stats.rewritten == 14 and LORA_OP not in count_ops(after)
    assert sorted(len(n.args[1]) for n in graph_op_nodes(after)) == [1, 1, 1, 1, 2, 2, 3, 3]
    assert stats.columns == {"graph-op groups": 8}
    assert {s.reason for s in stats.sites} == {
        "graph ops (32 tokens < graph_ops_below=33): the compiler schedules them"}
    torch._dynamo.reset()
    _, after, stats = capture(tiny_model(), passes=[LoraPass(graph_ops_below=32)])
    assert stats.rewritten == 14 and count_ops(after)[LORA_OP] == 8 and not graph_op_nodes(after)


def test_graph_ops_below_keeps_the_fused_op_for_dropout_and_says_why():
    _, after, stats = capture(tiny_model(lora_dropout=0.1), passes=[LoraPass(graph_ops_below=10**6)])
    assert stats.rewritten == 14 and count_ops(after)[LORA_OP] == 8 and not graph_op_nodes(after)
    assert {s.reason for s in stats.sites} == {
        "dropout p=0.1: the mask is drawn in-kernel; kept as the fused op below graph_ops_below=1000000: graph ops "
        "draw no dropout mask"}


def test_graph_ops_below_keeps_the_fused_op_for_a_symbolic_token_count():
    seen = []

    def backend(gm, ex):
        seen.append((PassManager([LoraPass(graph_ops_below=10**6)]).run(gm)[0], gm))
        return gm.forward

    model = torch.compile(tiny_model(), backend=backend)
    for seq in (16, 24):
        model(input_ids=tokens(seq=seq), use_cache=False)
    (_, first_gm), (last, last_gm) = seen[0], seen[-1]
    assert graph_op_nodes(first_gm) and not fused_nodes(first_gm)
    assert fused_nodes(last_gm) and not graph_op_nodes(last_gm)
    assert {s.reason for s in last.sites} == {
        "graph_ops_below=1000000 not applied (kept as the fused op): the token count is symbolic (dynamic shapes)"}


@pytest.mark.parametrize("bad", [-1, 2.0, None])
def test_graph_ops_below_must_be_a_non_negative_int(bad):
    with pytest.raises(ValueError, match="graph_ops_below"):
        LoraPass(graph_ops_below=bad)
