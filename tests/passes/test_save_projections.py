"""Checkpoint policy save_projections: with the offload on, a checkpointed backward reads the output
projection's and the MLP gate/up op's outputs from the forward (offloaded) instead of recomputing
those LoRA ops; on the CPU (fp32, deterministic kernels) the gradients are bit-identical."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.fx as fx  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402

import fxfuse  # noqa: E402
from fxfuse.passes import save_projections as sp  # noqa: E402
from fxfuse.passes.activation_offload import ActivationOffload  # noqa: E402
from fxfuse.passes.save_projections import schedule  # noqa: E402
from tiny import loss_and_grads, tiny_model, tokens  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
LORA = torch.ops.fxfuse.lora_linear.default
RELOAD = torch.ops.fxfuse.reload.default
GIB = 2**30
ROOMY = {"link_rate": 1e18}  # a tiny model computes too little to hide any copy at the real ratio


def _graphs(monkeypatch):
    seen = []
    run = ActivationOffload.run

    def spy(self, fw, bw, num_fwd_outputs, stats):
        run(self, fw, bw, num_fwd_outputs, stats)
        seen.append((fw, bw))
    monkeypatch.setattr(ActivationOffload, "run", spy)
    return seen


def _count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


def _build(projections, seed=0, **model_kw):
    torch._dynamo.reset()
    torch.manual_seed(seed)
    model = tiny_model(gc=True, **model_kw)
    offload = ActivationOffload(min_bytes=0, devices=("cpu",), save_projections=projections)
    return fxfuse.optimize(model, compiler="aot_eager", verbose=False, offload_activations=offload)


def _layer_backward(seen):
    bw = max(seen, key=lambda g: _count(g[1], RELOAD))[1]
    seen.clear()
    return bw


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

    assert torch.equal(loss_on, loss_off)
    assert grads_on.keys() == grads_off.keys()
    for name in grads_on:
        assert torch.equal(grads_on[name], grads_off[name]), name


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
    assert len(link) == 4 and not any(s.rewritten for s in sites)
    assert "MiB of copies pending, more than this layer's forward carries" in link[0].reason
    loss_and_grads(_build(False), input_ids=x, labels=x)
    assert _count(bw, LORA) == _count(_layer_backward(seen), LORA)  # o and gate/up run again, as without


def test_a_tight_host_budget_declines_with_the_reason(monkeypatch):
    monkeypatch.setattr(sp.SaveProjections, "_host_budget", lambda self, joint, backward: 0)
    x = tokens()
    model = _build(ROOMY)
    loss_and_grads(model, input_ids=x, labels=x)
    sites = fxfuse.report(model).sites("save_projections")
    host = [s for s in sites if s.reason.startswith("host memory: ")]
    assert len(host) == 4 and not any(s.rewritten for s in sites)


def test_the_host_budget_is_what_save_attention_left(monkeypatch):
    from fxfuse.passes import save_attention as sa
    seen = []
    run, budget = sp.SaveProjections.run, sp.SaveProjections._host_budget
    monkeypatch.setattr(sp, "_host_bytes_available", lambda: 10**9)
    monkeypatch.setattr(sp.SaveProjections, "run", lambda self, joint, stats, n=None: seen.append((joint, n)) or
                        run(self, joint, stats, n))
    monkeypatch.setattr(sp.SaveProjections, "_host_budget",
                        lambda self, joint, bw: seen.append(budget(self, joint, bw)) or seen[-1])
    x = tokens()
    loss_and_grads(_build(ROOMY, sizes={"num_hidden_layers": 2}), input_ids=x, labels=x)
    # the decoder layers' graph: the one where save_attention marked something
    i = next(i for i, item in enumerate(seen) if isinstance(item, tuple)
             and any(n.meta.get(sa.SAVED_BY) == "save_attention" for n in item[0].graph.nodes))
    (joint, num_fwd_outputs), left = seen[i], seen[i + 1]
    bw = sp._not_forward(joint, num_fwd_outputs)
    boundary = sa.boundary_bytes(joint)
    planned = sp._bytes_read_back([n for n in joint.graph.nodes if n.meta.get(sa.SAVED_BY) == "save_attention"], bw)
    assert boundary > 0 and planned > 0
    # read before this policy marks anything: the layer inputs and save_attention's tensors count
    assert left == max(int((10**9 * 0.5 - boundary) * 0.9 - planned), 0)
    monkeypatch.setattr(sp, "_host_bytes_available", lambda: None)
    assert budget(sp.SaveProjections(), joint, bw) is None


def test_schedule_spreads_large_copies_by_the_link_and_stops_at_the_host_budget():
    # the 8B shape at 32k tokens (GiB): a layer's forward carries ~1.87 at 52 GB/s, offloads 0.9
    # already (input, attention output, q/k/v); o's output 0.25, gate/up 1.75
    regions = [(1.87 * GIB, 0.9 * GIB, [int(0.25 * GIB), int(1.75 * GIB)])] * 32
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


@settings(max_examples=3, deadline=None)
@given(layers=st.integers(1, 2), heads=st.sampled_from([(4, 2), (2, 2), (6, 3)]), head_dim=st.sampled_from([8, 12]),
       batch=st.integers(1, 2), seq=st.integers(3, 19), arch=st.sampled_from(["llama", "qwen2"]),
       dropout=st.sampled_from([0.0, 0.25]))
def test_fuzz_saved_equals_recomputed(layers, heads, head_dim, batch, seq, arch, dropout):
    """Random shapes, GQA ratios, odd head dims, q/k/v biases (qwen2), LoRA dropout (the saved
    outputs carry the forward's dropout mask): the gradients equal recomputing's, bit for bit."""
    sizes = dict(num_hidden_layers=layers, num_attention_heads=heads[0], num_key_value_heads=heads[1],
                 hidden_size=heads[0] * head_dim, head_dim=head_dim)
    x = tokens(batch, seq)
    results = []
    for on in (ROOMY, False):
        model = _build(on, arch=arch, sizes=sizes, lora_dropout=dropout)
        results.append(loss_and_grads(model, input_ids=x, labels=x))
        if on:
            assert fxfuse.report(model).summary()["save_projections"]["rewritten"] == 2 * layers
    (l_on, g_on), (l_off, g_off) = results
    assert torch.equal(l_on, l_off) and not torch.isnan(l_on)
    for name in g_on:
        assert torch.equal(g_on[name], g_off[name]), name
