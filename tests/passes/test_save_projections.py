"""Checkpoint policy save_projections: with the offload on, a checkpointed backward reads the output
projection's and the MLP gate/up op's outputs from the forward (offloaded) instead of recomputing
those LoRA ops; on the CPU (fp32, deterministic kernels) the gradients are bit-identical."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.fx as fx  # noqa: E402

import fxfuse  # noqa: E402
from fxfuse.passes import save_projections as sp  # noqa: E402
from fxfuse.passes.activation_offload import ActivationOffload  # noqa: E402
from fxfuse.passes.save_projections import schedule  # noqa: E402
from test_save_attention import (FUZZ_SHAPES, _count, _graphs, _layer_graph, assert_bit_identical,  # noqa: E402
                                 fuzz_sizes)  # (tests/passes is on the path)
from tiny import FUSED_OP, loss_and_grads, tiny_model, tokens  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
LORA = torch.ops.fxfuse.lora_linear.default
RELOAD = torch.ops.fxfuse.reload.default
GIB = 2**30
ROOMY = {"link_rate": 1e18, "tiers": None}  # a tiny model computes too little to hide any copy at the real ratio


# the fused LoRA op at any length: these policies act on it (tiny inputs are below LoraPass's
# default graph_ops_below, where the sites become graph ops)
OP = FUSED_OP


def _build(projections, seed=0, **model_kw):
    torch._dynamo.reset()
    torch.manual_seed(seed)
    model = tiny_model(gc=True, **model_kw)
    offload = ActivationOffload(min_bytes=0, devices=("cpu",), save_projections=projections)
    return fxfuse.optimize(model, compiler="aot_eager", verbose=False, offload_activations=offload, pass_options=OP)


def _layer_backward(seen):
    return _layer_graph(seen)[1]


def test_projections_are_saved_not_recomputed_and_grads_are_bit_identical(monkeypatch):
    seen = _graphs(monkeypatch)
    x = tokens()
    layers = 3
    on = _build(ROOMY, sizes={"num_hidden_layers": layers})
    loss_on, grads_on = loss_and_grads(on, input_ids=x, labels=x)
    bw_on = _layer_backward(seen)
    off = _build(False, sizes={"num_hidden_layers": layers})
    loss_off, grads_off = loss_and_grads(off, input_ids=x, labels=x)
    bw_off = _layer_backward(seen)

    # per layer the output projection and the grouped gate/up op are no longer run again
    assert _count(bw_on, LORA) == _count(bw_off, LORA) - 2 * layers
    # per layer o's output and xa, gate's and up's outputs and their xa move to the host
    assert _count(bw_on, RELOAD) == _count(bw_off, RELOAD) + 5 * layers
    sites = fxfuse.report(on).sites("save_projections")
    saved = [s for s in sites if s.rewritten]
    assert len(saved) == 2 * layers
    assert {s.module.rsplit(".", 1)[-1] for s in saved} >= {"o_proj"}
    # the down projection: its output only feeds the layer's output, saved at the boundary
    declined = [s for s in sites if not s.rewritten]
    assert len(declined) == layers
    assert {s.reason for s in declined} == {"its outputs feed only saved tensors: the backward recomputes its xa alone"}
    assert all("down_proj" in s.module for s in declined)
    assert "save_projections" not in fxfuse.report(off).pass_names
    assert fxfuse.report(on).columns()["save_projections"]["MiB saved"] > 0

    assert grads_on.keys() == grads_off.keys()
    assert_bit_identical(loss_on, grads_on, loss_off, grads_off)


def test_the_default_link_ratio_declines_what_a_tiny_model_cannot_hide(monkeypatch):
    """At the measured link/compute ratio a 16-token layer may offload a few KiB: every candidate
    is declined with the link reason and the backward is unchanged."""
    seen = _graphs(monkeypatch)
    x = tokens()
    model = _build(True)
    loss_and_grads(model, input_ids=x, labels=x)
    bw = _layer_backward(seen)
    sites = fxfuse.report(model).sites("save_projections")
    link = [s for s in sites if s.reason.startswith("host link: ")]
    assert not any(s.rewritten for s in sites)
    # every tier is tried by default: each layer's o and gate/up both meet the link
    assert len(link) == 4 and len(sites) == 6 and sum("o_proj" in s.module for s in link) == 2
    assert "MiB of copies pending at a layer's end, more than its forward carries" in link[0].reason
    loss_and_grads(_build(False), input_ids=x, labels=x)
    assert _count(bw, LORA) == _count(_layer_backward(seen), LORA)  # o and gate/up run again, as without


def test_tiers_1_saves_only_each_layers_smallest_candidate(monkeypatch):
    seen = _graphs(monkeypatch)
    x = tokens()
    layers = 2
    one = _build({"link_rate": 1e18, "tiers": 1}, sizes={"num_hidden_layers": layers})
    loss_one, grads_one = loss_and_grads(one, input_ids=x, labels=x)
    bw_one = _layer_backward(seen)
    off = _build(False, sizes={"num_hidden_layers": layers})
    loss_off, grads_off = loss_and_grads(off, input_ids=x, labels=x)
    bw_off = _layer_backward(seen)
    saved = [s for s in fxfuse.report(one).sites("save_projections") if s.rewritten]
    assert len(saved) == layers and all("o_proj" in s.module for s in saved)
    assert _count(bw_one, LORA) == _count(bw_off, LORA) - layers
    assert_bit_identical(loss_one, grads_one, loss_off, grads_off)
    tier = [s for s in fxfuse.report(one).sites("save_projections")
            if s.reason.startswith("not among this layer's 1 smallest candidates")]
    assert len(tier) == layers and all("gate_proj" in s.module or "up_proj" in s.module for s in tier)


def test_a_tight_host_budget_declines_with_the_reason(monkeypatch):
    monkeypatch.setattr(sp.SaveProjections, "_host_budget", lambda self, joint, backward: 0)
    x = tokens()
    model = _build(ROOMY)
    loss_and_grads(model, input_ids=x, labels=x)
    sites = fxfuse.report(model).sites("save_projections")
    host = [s for s in sites if s.reason.startswith("host memory: ")]
    assert len(host) == 4 and not any(s.rewritten for s in sites)


def test_the_host_budget_is_what_save_attention_left(monkeypatch):
    """Checked against save_attention's own planning: its budget less the sizes it reports saved."""
    from fxfuse.passes import save_attention as sa
    seen = {"sa": [], "sp": []}
    sa_budget, sp_budget = sa.SaveAttention._host_budget, sp.SaveProjections._host_budget
    monkeypatch.setattr(sa, "_host_bytes_available", lambda: 10**9)
    monkeypatch.setattr(sp, "_host_bytes_available", lambda: 10**9)
    monkeypatch.setattr(sa.SaveAttention, "_host_budget",
                        lambda self, joint: seen["sa"].append(sa_budget(self, joint)) or seen["sa"][-1])
    monkeypatch.setattr(sp.SaveProjections, "_host_budget",
                        lambda self, joint, bw: seen["sp"].append((sp_budget(self, joint, bw), joint, bw)) or seen["sp"][-1][0])
    x = tokens()
    model = _build(ROOMY, sizes={"num_hidden_layers": 2})
    loss_and_grads(model, input_ids=x, labels=x)
    # the decoder layers' graph is the one where save_attention planned something
    saved = fxfuse.report(model).columns()["save_attention"]["MiB saved"] * 2**20
    assert saved > 0
    budgets = [(b, (left, joint, bw)) for b, (left, joint, bw) in zip(seen["sa"], seen["sp"])
               if any(n.meta.get(sa.SAVED_BY) == "save_attention" for n in joint.graph.nodes)]
    assert len(budgets) == 1
    before, (left, joint, bw) = budgets[0]
    assert before > 0 and left == max(int(before - saved), 0)
    monkeypatch.setattr(sp, "_host_bytes_available", lambda: None)
    assert sp_budget(sp.SaveProjections(), joint, bw) is None


def test_schedule_spreads_large_copies_by_the_link_and_stops_at_the_host_budget():
    # the 8B shape at 32k tokens as the pass sizes it (GiB): a layer's forward (2·T·218.1M LoRA-op
    # FLOPs + causal attention 8.8e12) carries 1.86 at 52 GB/s / 600 TFLOP/s; it offloads 0.885
    # already (its input 0.25, save_attention's 0.635); o's outputs 0.252, gate/up's 1.754
    regions = [(1.86 * GIB, 0.885 * GIB, [int(0.252 * GIB), int(1.754 * GIB)])] * 32
    out = schedule(regions, None)
    assert all(o is None for o, _ in out)  # every o
    mlp = [m is None for _, m in out]
    assert 10 <= sum(mlp) <= 16  # about 2 in 5
    assert not any(a and b for a, b in zip(mlp, mlp[1:]))  # never two in a row: the backlog drains
    for _, m in out:
        assert m is None or m[0] == "link"
    # a host budget for every o and 3 gate/ups: the o tier first, then the first gate/ups that fit
    out = schedule(regions, int(32 * 0.25 * GIB + 3.5 * 1.75 * GIB))
    assert all(o is None for o, _ in out)
    assert sum(m is None for _, m in out) == 3
    assert all(m is None or m[0] in ("host", "link") for _, m in out)
    assert any(m is not None and m[0] == "host" for _, m in out)
    # nothing fits a region whose forward is already busy copying
    assert schedule([(1.0, 1.0, [2])] * 3, None) == [[("link", 2.0)]] * 3
    # a later tier's take must not push a region an earlier tier filled over its allowance
    assert schedule([(10, 0, [15, 4]), (10, 0, [14, 4])], None) == [[None, ("link", 13.0)], [None, ("link", 13.0)]]
    # tiers=1: the first tier as before, the rest declined as such
    out = schedule(regions, None, tiers=1)
    assert all(o is None and m == ("tier", 1) for o, m in out)
    assert schedule([], 10) == [] and schedule([(5.0, 0.0, [])], None) == [[]]


def test_attention_flops_halve_when_causal():
    q = torch.empty(2, 4, 16, 8)
    k = torch.empty(2, 4, 24, 8)
    g = fx.Graph()
    qn, kn = g.placeholder("q"), g.placeholder("k")
    qn.meta["val"], kn.meta["val"] = q, k
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    full = g.call_function(op, (qn, kn, kn), {"is_causal": False})
    causal = g.call_function(op, (qn, kn, kn, 0.0, True))
    assert sp._attention_flops(full) == 4 * 2 * 4 * 16 * 24 * 8
    assert sp._attention_flops(causal) == 4 * 2 * 4 * 16 * 24 * 8 // 2
    # every SDPA op the policies know, is_causal passed by position where its schema puts it
    for target in sp._attention_ops():
        names = [a.name for a in target._schema.arguments]
        args = [qn, kn, kn] + [None] * (names.index("is_causal") - 3) + [True]
        assert sp._attention_flops(g.call_function(target, tuple(args))) == 4 * 2 * 4 * 16 * 24 * 8 // 2, target


@FUZZ_SHAPES
def test_fuzz_saved_equals_recomputed(layers, heads, head_dim, batch, seq, arch, dropout):
    """Random shapes, GQA ratios, odd head dims, q/k/v biases (qwen2), LoRA dropout (the saved
    outputs carry the forward's dropout mask): the gradients equal recomputing's, bit for bit."""
    sizes = fuzz_sizes(layers, heads, head_dim)
    x = tokens(batch, seq)
    results = []
    for on in (ROOMY, False):
        model = _build(on, arch=arch, sizes=sizes, lora_dropout=dropout)
        results.append(loss_and_grads(model, input_ids=x, labels=x))
        if on:
            assert fxfuse.report(model).summary()["save_projections"]["rewritten"] == 2 * layers
    (l_on, g_on), (l_off, g_off) = results
    assert not torch.isnan(l_on)
    assert_bit_identical(l_on, g_on, l_off, g_off)


def test_options_are_checked():
    with pytest.raises(ValueError, match="host_fraction"):
        ActivationOffload(save_projections={"host_fraction": 0.95})  # the offload's own option, not the policy's
    with pytest.raises(ValueError, match="tiers"):
        sp.SaveProjections(tiers=0)
    with pytest.raises(ValueError, match="link_rate"):
        sp.SaveProjections(link_rate=0)
    assert ActivationOffload(save_projections={"tiers": None}).config["save_projections"] == {"tiers": None}
    assert ActivationOffload(save_projections=False).config["save_projections"] is False
