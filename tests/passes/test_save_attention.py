"""Checkpoint policy save_attention: with the offload on, a checkpointed backward reads the attention
block's q/k/v, output and lse from the forward (offloaded) instead of recomputing them; on the CPU
(fp32, deterministic kernels) the gradients are bit-identical to recomputing."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.fx as fx  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402

import fxfuse  # noqa: E402
from fxfuse.passes import activation_offload as ao  # noqa: E402
from fxfuse.passes.activation_offload import ActivationOffload  # noqa: E402
from tiny import FUSED_OP, loss_and_grads, tiny_model, tokens  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
ATTENTION = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default


# the fuzzed shapes of the policy tests (shared with test_save_projections)
FUZZ_SHAPES = lambda test: settings(max_examples=3, deadline=None)(given(  # noqa: E731
    layers=st.integers(1, 2), heads=st.sampled_from([(4, 2), (2, 2), (6, 3)]), head_dim=st.sampled_from([8, 12]),
    batch=st.integers(1, 2), seq=st.integers(3, 19), arch=st.sampled_from(["llama", "qwen2"]),
    dropout=st.sampled_from([0.0, 0.25]))(test))


def fuzz_sizes(layers, heads, head_dim):
    return dict(num_hidden_layers=layers, num_attention_heads=heads[0], num_key_value_heads=heads[1],
                hidden_size=heads[0] * head_dim, head_dim=head_dim)


def assert_bit_identical(loss_a, grads_a, loss_b, grads_b):
    assert torch.equal(loss_a, loss_b)
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


def _graphs(monkeypatch):
    """(forward, backward) graphs as the offload (the last partition-time policy) leaves them."""
    seen = []
    run = ActivationOffload.run

    def spy(self, fw, bw, num_fwd_outputs, stats):
        run(self, fw, bw, num_fwd_outputs, stats)
        seen.append((fw, bw))
    monkeypatch.setattr(ActivationOffload, "run", spy)
    return seen


def _count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


# the fused LoRA op at any length: these policies act on it (tiny inputs are below LoraPass's
# default graph_ops_below, where the sites become graph ops)
OP = FUSED_OP


def _build(save_attention=True, gc=True, seed=0, min_bytes=0, **model_kw):
    torch._dynamo.reset()
    torch.manual_seed(seed)
    model = tiny_model(gc=gc, **model_kw)
    offload = ActivationOffload(min_bytes=min_bytes, devices=("cpu",), save_attention=save_attention)
    return fxfuse.optimize(model, compiler="aot_eager", verbose=False, offload_activations=offload, pass_options=OP)


def _layer_graph(seen):
    """The decoder layers' graph (the one with the most reloads) among those just compiled."""
    graph = max(seen, key=lambda g: _count(g[1], torch.ops.fxfuse.reload.default))
    seen.clear()
    return graph


def test_attention_is_saved_not_recomputed_and_grads_are_bit_identical(monkeypatch):
    seen = _graphs(monkeypatch)
    x = tokens()
    layers = 3
    on = _build(True, sizes={"num_hidden_layers": layers})
    loss_on, grads_on = loss_and_grads(on, input_ids=x, labels=x)
    fw_on, bw_on = _layer_graph(seen)
    off = _build(False, sizes={"num_hidden_layers": layers})
    loss_off, grads_off = loss_and_grads(off, input_ids=x, labels=x)
    fw_off, bw_off = _layer_graph(seen)

    # without the policy the backward recomputes every layer's q/k/v LoRA op (min-cut keeps the CPU
    # attention op's outputs either way; on a GPU it recomputes cuDNN attention too)
    assert _count(bw_on, ATTENTION) == 0
    lora = torch.ops.fxfuse.lora_linear.default
    assert _count(bw_on, lora) == _count(bw_off, lora) - layers  # the grouped q/k/v op, once per layer
    # per layer q, k, v, xa, output, lse move to the host on top of the layer inputs
    reload = torch.ops.fxfuse.reload.default
    assert _count(bw_on, reload) == _count(bw_off, reload) + 6 * layers
    summary = fxfuse.report(on).summary()
    assert summary["save_attention"]["rewritten"] == layers == summary["save_attention"]["candidates"]
    assert "save_attention" not in fxfuse.report(off).pass_names
    assert "save_attention" in fxfuse.report(on).table()

    assert grads_on.keys() == grads_off.keys()
    assert_bit_identical(loss_on, grads_on, loss_off, grads_off)


def test_declines_outside_checkpointed_regions_and_beyond_the_host_budget(monkeypatch):
    from fxfuse.passes import save_attention as sa
    x = tokens()
    plain = _build(True, gc=False)
    loss_and_grads(plain, input_ids=x, labels=x)
    sites = fxfuse.report(plain).sites("save_attention")
    assert sites and not any(s.rewritten for s in sites)
    assert {s.reason for s in sites} == {"not in a checkpointed region: the forward saves it already"}

    # the budget is the offload's share of the host less what checkpointing saves anyway
    budgets = []
    budget = sa.SaveAttention._host_budget
    monkeypatch.setattr(sa, "_host_bytes_available", lambda: 10**9)
    monkeypatch.setattr(sa.SaveAttention, "_host_budget", lambda self, joint: budgets.append(budget(self, joint)) or budgets[-1])
    free = _build(True, sizes={"num_hidden_layers": 3})
    loss_and_grads(free, input_ids=x, labels=x)
    # the decoder layers' graph: its boundaries are the 2 later layers' inputs ([2, 16, 64] fp32) and
    # the cos and sin every layer reads ([1, 16, 16] fp32 each); exact, so a budget that forgot the
    # boundaries (too large) or counted the saved tensors twice (too small) both fail
    assert budgets == [int((10**9 // 2 - 2 * (2 * 16 * 64 * 4) - 2 * (16 * 16 * 4)) * 0.9)]  # margin 0.9
    monkeypatch.setattr(sa, "_host_bytes_available", lambda: None)
    assert budget(sa.SaveAttention(), fx.symbolic_trace(lambda t: t + 1)) is None

    assert fxfuse.report(free).columns()["save_attention"]["q/k/v saved too"] == 3


def _sizes(monkeypatch, layers):
    """Per layer, the bytes of its output + lse and of its q/k/v as the policy counts them (the
    policy sizes every layer's output first, then every layer's q/k/v)."""
    from fxfuse.passes import save_attention as sa
    sizes = []
    count = sa._bytes_read_back
    monkeypatch.setattr(sa, "_bytes_read_back", lambda marks, bw: sizes.append(count(marks, bw)) or sizes[-1])
    loss_and_grads(_build(True, sizes={"num_hidden_layers": layers}), input_ids=tokens(), labels=tokens())
    monkeypatch.setattr(sa, "_bytes_read_back", count)
    sizes = sizes[-2 * layers:]  # the decoder layers' graph is compiled last
    # out [2, 4, 16, 16] fp32 and lse [2, 4, 16] fp32, as the CPU attention op returns them
    assert sizes[:layers] == [2 * 4 * 16 * 16 * 4 + 2 * 4 * 16 * 4] * layers
    return sizes[:layers], sizes[layers:]


@pytest.mark.parametrize("room", ["outputs, then q/k/v of one layer", "output of one layer"])
def test_a_tight_host_budget_saves_outputs_first_then_q_k_v(monkeypatch, room):
    """Every layer's output and lse come before any layer's q/k/v; a layer whose q/k/v do not fit
    recomputes them from its input; the gradients stay bit-identical either way."""
    from fxfuse.passes import save_attention as sa
    seen = _graphs(monkeypatch)
    out, qkv = _sizes(monkeypatch, 2)
    assert all(q > o for q, o in zip(qkv, out))  # q, k, v, xa
    budget = sum(out) + qkv[0] + qkv[1] // 2 if room.startswith("outputs") else out[0] + out[1] // 2
    monkeypatch.setattr(sa.SaveAttention, "_host_budget", lambda self, joint: budget)
    seen.clear()
    x = tokens()
    tight = _build(True, sizes={"num_hidden_layers": 2})
    loss_on, grads_on = loss_and_grads(tight, input_ids=x, labels=x)
    _, bw_on = _layer_graph(seen)
    sites = fxfuse.report(tight).sites("save_attention")
    columns = fxfuse.report(tight).columns()["save_attention"]
    off = _build(False, sizes={"num_hidden_layers": 2})
    loss_off, grads_off = loss_and_grads(off, input_ids=x, labels=x)
    _, bw_off = _layer_graph(seen)
    reload, lora = torch.ops.fxfuse.reload.default, torch.ops.fxfuse.lora_linear.default
    if room.startswith("outputs"):
        assert [s.rewritten for s in sites] == [True, True]
        assert sites[0].reason == "" and sites[1].reason.startswith("output and lse saved; q/k/v recomputed: host memory")
        assert "  note x1: output and lse saved; q/k/v recomputed: host memory" in fxfuse.report(tight).table()
        assert columns["q/k/v saved too"] == 1
        assert columns["MiB saved"] * 2**20 == pytest.approx(sum(out) + qkv[0])
        # layer 0: q, k, v, xa, output, lse; layer 1: output, lse (its q/k/v op runs again)
        assert _count(bw_on, reload) == _count(bw_off, reload) + 6 + 2
        assert _count(bw_on, lora) == _count(bw_off, lora) - 1
    else:
        assert [s.rewritten for s in sites] == [True, False]
        assert sites[0].reason.startswith("output and lse saved; q/k/v recomputed: host memory")
        assert sites[1].reason.startswith("host memory: its output and lse ")
        assert columns["q/k/v saved too"] == 0
        assert _count(bw_on, lora) == _count(bw_off, lora)
        assert _count(bw_on, reload) == _count(bw_off, reload) + 2  # layer 0's output and lse
    assert _count(bw_on, ATTENTION) == 0
    assert_bit_identical(loss_on, grads_on, loss_off, grads_off)


def test_offload_off_means_no_policy():
    model = tiny_model(gc=True)
    fxfuse.optimize(model, compiler="aot_eager", verbose=False, offload_activations=False)
    assert "save_attention" not in fxfuse.report(model).pass_names


@FUZZ_SHAPES
def test_fuzz_saved_equals_recomputed(layers, heads, head_dim, batch, seq, arch, dropout):
    """Random shapes, GQA ratios, odd head dims, q/k/v biases (qwen2), LoRA dropout (xa is saved
    with its dropout mask applied): the gradients equal recomputing's, bit for bit."""
    sizes = fuzz_sizes(layers, heads, head_dim)
    x = tokens(batch, seq)
    results = []
    for on in (True, False):
        model = _build(on, arch=arch, sizes=sizes, lora_dropout=dropout)
        results.append(loss_and_grads(model, input_ids=x, labels=x))
        assert fxfuse.report(model).summary().get("save_attention", {"rewritten": layers})["rewritten"] == layers
    (l_on, g_on), (l_off, g_off) = results
    assert not torch.isnan(l_on)
    assert_bit_identical(l_on, g_on, l_off, g_off)


def test_offload_copies_permuted_dense_tensors_and_fresh_items_not_views():
    assert ao._dense(torch.empty(2, 3, 4)) and ao._dense(torch.empty(2, 4, 3).transpose(1, 2))
    assert not ao._dense(torch.empty(4, 6)[:, :3]) and not ao._dense(torch.empty(3, 1).expand(3, 4))

    def f(x, y):
        a, b = torch.split(x, 2)
        out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default(y, y, y)
        return a, b, out[0], out[1]
    gm = fx.symbolic_trace(f)
    items = {n.name: n for n in gm.graph.nodes if n.op == "call_function" and n.target.__name__ == "getitem"}
    # split returns views of x (shares storage); the attention op's items are fresh tensors
    assert ao._is_alias(items["getitem"]) and ao._is_alias(items["getitem_1"])
    assert not ao._is_alias(items["getitem_2"]) and not ao._is_alias(items["getitem_3"])
