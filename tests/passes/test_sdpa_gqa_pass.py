"""The GQA pass: op counts before/after (checkpointing off and on), loss and every LoRA gradient
equal to eager per architecture, declines with reasons (a mask left in place, k/v read elsewhere,
fp32 on CUDA), and a hypothesis fuzz of the rewritten attention against a float64 reference."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import fxfuse
from fxfuse.frontends import hf
from fxfuse.frontends.backend import make_backend
from fxfuse.frontends.report import Report
import operator

import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

from fxfuse.passes.manager import PassManager
from fxfuse.passes.pattern import Decline, count_ops, graphs_of
from fxfuse.passes.pattern import repeat_source
from fxfuse.passes.sdpa_gqa import SdpaGqaPass, check
from tiny import clone, loss_and_grads, rel, tiny_model, tokens


def ops(graphs):
    total: dict = {}
    for gm in graphs:
        for k, v in count_ops(gm).items():
            total[k] = total.get(k, 0) + v
    return total


def gqa_calls(graphs):
    return sum(1 for gm in graphs for _, g in graphs_of(gm) for n in g.graph.nodes if n.kwargs.get("enable_gqa") is True)


@pytest.mark.parametrize("gc", [False, True])
def test_op_counts(gc):
    cfg = hf.load_config("llama-tiny")
    assert cfg.num_attention_heads > cfg.num_key_value_heads  # the tiny config is GQA
    before = hf.capture_graphs(hf.build_model(cfg, peft={"r": 8}), gradient_checkpointing=gc,
                               passes=["lora", "causal_mask"])
    after = hf.capture_graphs(hf.build_model(cfg, peft={"r": 8}), gradient_checkpointing=gc,
                              passes=["lora", "causal_mask", "sdpa_gqa"])
    layers = cfg.num_hidden_layers
    b, a = ops(before.after), ops(after.after)
    # two repeat_kv per layer (getitem, expand, reshape on k and on v) are gone; RoPE's expand stays
    assert b["expand"] - a.get("expand", 0) == 2 * layers
    assert b["view"] - a["view"] == 2 * layers  # count_ops folds reshape into view
    assert b["getitem"] - a["getitem"] == 2 * layers
    assert a["sdpa"] == b["sdpa"] == layers
    assert gqa_calls(after.after) == layers and gqa_calls(before.after) == 0
    s = after.report.summary()["sdpa_gqa"]
    assert s["candidates"] == s["rewritten"] == layers


@pytest.mark.parametrize("arch, gc", [("llama", True), ("llama", False), ("mistral", False)])  # more: e2e/
def test_equal_to_eager(arch, gc):
    if arch == "mistral":
        torch.manual_seed(0)
        ref = hf.build_model(hf.load_config("mistral-tiny"), peft={"r": 8})
    else:
        ref = tiny_model(arch, gc=gc)
    opt = fxfuse.optimize(clone(ref), compiler="aot_eager", verbose=False,
                          passes=["lora", "causal_mask", "sdpa_gqa", "fused_linear_cross_entropy"])
    ids = tokens(2, 16)
    l_ref, g_ref = loss_and_grads(ref, input_ids=ids, labels=ids)
    l_opt, g_opt = loss_and_grads(opt, input_ids=ids, labels=ids)
    assert rel(l_opt, l_ref) < 1e-5
    assert g_ref.keys() == g_opt.keys() and len(g_ref) > 0
    for name in g_ref:
        assert rel(g_opt[name], g_ref[name]) < 1e-5, name
    s = fxfuse.report(opt).summary()["sdpa_gqa"]
    assert s["rewritten"] == 2 and not s["declined"], s


def test_inductor_run_equals_eager():
    ref = tiny_model("llama", gc=True)
    opt = fxfuse.optimize(clone(ref), verbose=False, passes=["lora", "causal_mask", "sdpa_gqa"])
    ids = tokens(2, 16)
    l_ref, g_ref = loss_and_grads(ref, input_ids=ids, labels=ids)
    l_opt, g_opt = loss_and_grads(opt, input_ids=ids, labels=ids)
    assert rel(l_opt, l_ref) < 1e-5 and all(rel(g_opt[n], g_ref[n]) < 1e-4 for n in g_ref)
    assert fxfuse.report(opt).summary()["sdpa_gqa"]["rewritten"] == 2


def test_declined_while_a_mask_is_in_place():
    # without the causal-mask pass the traced mask stays: flash attention would not run
    cap = hf.capture_graphs(hf.build_model(hf.load_config("llama-tiny"), peft={"r": 8}), gradient_checkpointing=False,
                            passes=["sdpa_gqa"])
    s = cap.report.summary()["sdpa_gqa"]
    assert s["rewritten"] == 0 and s["candidates"] > 0
    assert list(s["declined"]) == ["a tensor mask: SDPA with enable_gqa and a mask runs the math kernel (O(T^2) memory)"]
    assert gqa_calls(cap.after) == 0


def repeat_kv(x, n):
    b, h, t, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n, t, d).reshape(b, h * n, t, d)


def run_pass(fn, *args):
    """fn through dynamo and the GQA pass alone (pass-through compiler); (outputs, PassStats)."""
    manager = PassManager([SdpaGqaPass()])
    report = Report(manager_uuid=manager.uuid(), pass_names=["sdpa_gqa"])
    torch._dynamo.reset()
    out = torch.compile(fn, backend=make_backend(manager, report, "aot_eager"), fullgraph=True)(*args)
    return out, report


def test_declined_when_the_repeated_kv_is_read_elsewhere():
    def f(q, k, v):
        kr = repeat_kv(k, 2)
        return F.scaled_dot_product_attention(q, kr, repeat_kv(v, 2), is_causal=True) + kr.sum()

    q, k, v = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    out, report = run_pass(f, q, k, v)
    assert torch.allclose(out, f(q, k, v))
    s = report.summary()["sdpa_gqa"]
    assert s["rewritten"] == 0 and any("read elsewhere" in r for r in s["declined"]), s


def test_a_tile_over_another_axis_is_declined_not_rewritten():
    # batch 1: expanding the batch axis n-fold then folding it into heads tiles the kv heads
    # (head h reads kv head h % Hkv), which enable_gqa's grouping (h // n) is not
    def f(q, k, v):
        def tile(x):
            b, h, t, d = x.shape
            return x[:, :, None, :, :].expand(2, h, 1, t, d).reshape(1, 2 * h, t, d)
        return F.scaled_dot_product_attention(q, tile(k), tile(v), is_causal=True)

    q, k, v = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    out, report = run_pass(f, q, k, v)
    assert torch.allclose(out, f(q, k, v), atol=1e-6)
    s = report.summary()["sdpa_gqa"]
    assert s["rewritten"] == 0 and any("repeat_kv's (B, Hkv, n, T, D)" in r for r in s["declined"]), s


def test_repeated_key_that_is_also_the_query_is_declined():
    def f(k, v):
        kr = repeat_kv(k, 1 + 1)
        return F.scaled_dot_product_attention(kr, kr, repeat_kv(v, 2), is_causal=True)

    k, v = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    out, report = run_pass(f, k, v)
    assert torch.allclose(out, f(k, v), atol=1e-6)
    assert not report.errors  # the pass declined; it did not fail (which would compile the graph unrewritten)
    s = report.summary()["sdpa_gqa"]
    assert s["rewritten"] == 0 and s["candidates"] == 1, s


def test_rewrites_after_an_automatic_dynamic_recompile():
    # the second length recompiles with symbolic sizes: HF's key.shape[-2] (for the mask slice) leaves
    # a dead size query on the repeated key once the mask is gone; it must not block the rewrite
    ref = tiny_model("llama", gc=True)
    opt = fxfuse.optimize(clone(ref), compiler="aot_eager", verbose=False, passes=["lora", "causal_mask", "sdpa_gqa"])
    for t in (12, 21, 17):
        ids = tokens(2, t)
        l_ref, g_ref = loss_and_grads(ref, input_ids=ids, labels=ids)
        l_opt, g_opt = loss_and_grads(opt, input_ids=ids, labels=ids)
        assert rel(l_opt, l_ref) < 1e-5 and all(rel(g_opt[n], g_ref[n]) < 1e-5 for n in g_ref), t
    report = fxfuse.report(opt)
    assert len(report.graphs) >= 2  # static, then dynamic
    s = report.summary()["sdpa_gqa"]
    assert s["rewritten"] == s["candidates"] == 2 * len([g for g in report.graphs if g.nodes_before > 100]), s


def test_multi_head_attention_is_not_a_candidate():
    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    q = torch.randn(1, 4, 8, 16)
    _, report = run_pass(f, q, q.clone(), q.clone())
    assert report.summary()["sdpa_gqa"]["candidates"] == 0


def test_fp32_on_cuda_is_declined():
    # graph nodes carrying fake CUDA values, as dynamo records them on a GPU machine
    with FakeTensorMode():
        q_val, k_val = torch.empty(1, 8, 16, 64, device="cuda"), torch.empty(1, 2, 16, 64, device="cuda")
        rep_val = torch.empty(1, 8, 16, 64, device="cuda")  # repeat_kv(k_val, 4)
    g = fx.Graph()
    q, k = g.placeholder("q"), g.placeholder("k")
    q.meta["example_value"], k.meta["example_value"] = q_val, k_val
    reps = []
    for _ in range(2):  # k and v: two repeats of one kv tensor
        item = g.call_function(operator.getitem, (k, (slice(None), slice(None), None, slice(None), slice(None))))
        grown = g.call_method("expand", (item, 1, 2, 4, 16, 64))
        with FakeTensorMode():
            grown.meta["example_value"] = torch.empty(1, 2, 4, 16, 64, device="cuda")
        rep = g.call_method("reshape", (grown, 1, 8, 16, 64))
        rep.meta["example_value"] = rep_val
        reps.append(rep)
    k_src, v_src = repeat_source(reps[0]), repeat_source(reps[1])
    assert k_src[0] is k and v_src[0] is k
    params = {"query": q, "key": reps[0], "value": reps[1], "attn_mask": None}
    with pytest.raises(Decline, match="fp32 attention on CUDA"):
        check(params, k_src, v_src)
    with FakeTensorMode():  # the same in bf16 passes the check
        q.meta["example_value"] = torch.empty(1, 8, 16, 64, device="cuda", dtype=torch.bfloat16)
    check(params, k_src, v_src)


@settings(max_examples=12, deadline=None)
@given(b=st.integers(1, 2), h_kv=st.integers(1, 3), n_rep=st.integers(2, 4), t=st.integers(1, 19),
       d=st.sampled_from([8, 13, 16]), causal=st.booleans(), scale=st.sampled_from([None, 0.3]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), big=st.booleans())
def test_fuzz_against_float64(b, h_kv, n_rep, t, d, causal, scale, dtype, big):
    def f(q, k, v):
        return F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), is_causal=causal, scale=scale)

    gen = torch.Generator().manual_seed(b * 1000 + t * 10 + d)
    mag = 60.0 if big else 1.0  # large logits: the softmax is nearly one-hot
    q = (torch.randn(b, h_kv * n_rep, t, d, generator=gen) * mag).to(dtype).requires_grad_()
    k = torch.randn(b, h_kv, t, d, generator=gen).to(dtype).requires_grad_()
    v = (torch.randn(b, h_kv, t, d, generator=gen) * 1e3).to(dtype).requires_grad_()
    out, report = run_pass(f, q, k, v)
    s = report.summary()["sdpa_gqa"]
    assert s["rewritten"] == 1, s
    gout = torch.randn(out.shape, generator=gen).to(dtype)
    out.backward(gout)
    # eager in the same dtype (no pass): the rounding any implementation has; float64: the truth
    qe, ke, ve = (x.detach().clone().requires_grad_() for x in (q, k, v))
    eager = f(qe, ke, ve)
    eager.backward(gout)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = f(q64, k64, v64)
    ref.backward(gout.double())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    pairs = [("out", out, eager, ref), ("dq", q.grad, qe.grad, q64.grad), ("dk", k.grad, ke.grad, k64.grad),
             ("dv", v.grad, ve.grad, v64.grad)]
    for name, got, same_dtype, want in pairs:
        assert got is not None and torch.isfinite(got).all(), name
        err, base = (got.double() - want).norm(), (same_dtype.double() - want).norm()
        # no worse than eager in the same dtype, up to a factor, plus a relative tolerance
        # (a gradient that is exactly 0, e.g. dq with one key, is rounding on both sides)
        assert err <= 4 * base + tol * want.norm() + 1e-30, (name, float(err), float(base), float(want.norm()))
