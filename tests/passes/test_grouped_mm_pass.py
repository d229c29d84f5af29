"""grouped_mm pass and op: transformers' MoE fallback grouped matmul -> fxfuse::grouped_mm, whose
backward AOTAutograd can trace, so checkpointed MoE layers compile instead of running eagerly."""
import copy

import pytest
import torch
import torch.fx as fx
import transformers.integrations.moe  # noqa: F401  (registers torch.ops.transformers.grouped_mm_fallback)
from hypothesis import given, settings, strategies as st
from transformers import AutoConfig, AutoModelForCausalLM

import fxfuse
from fxfuse.runtime.ops import grouped_mm as op_module
from fxfuse.passes import grouped_mm as gp
from fxfuse.passes.manager import PassStats
from tiny import checkpointed, loss_and_grads, rel, tokens, with_lora

FALLBACK = torch.ops.transformers.grouped_mm_fallback.default
OURS = torch.ops.fxfuse.grouped_mm.default
BWD = torch.ops.fxfuse.grouped_mm_backward.default
DENSE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, max_position_embeddings=128)
MOE = {
    "qwen3_moe": dict(DENSE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16),
    "mixtral": dict(DENSE, num_local_experts=4, num_experts_per_tok=2),
}


# ---------------------------------------------------------------- the op


@st.composite
def grouped_case(draw):
    experts = draw(st.integers(1, 5))
    sizes = draw(st.lists(st.integers(0, 9), min_size=experts, max_size=experts))  # empty groups too
    tail = draw(st.integers(0, 3))  # rows past the last offset: left zero, as transformers does
    k, n = draw(st.integers(1, 33)), draw(st.integers(1, 33))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    scale = draw(st.sampled_from([1.0, 1e-3, 30.0]))
    layout = draw(st.sampled_from(["plain", "transposed"]))  # transformers passes weight.transpose(-2, -1)
    offs_dtype = draw(st.sampled_from([torch.int32, torch.int64]))
    return sizes, tail, k, n, dtype, scale, draw(st.integers(0, 2**16)), draw(st.booleans()), layout, offs_dtype


def _operands(sizes, tail, k, n, dtype, scale, seed, outliers=False, layout="plain", offs_dtype=torch.int32):
    g = torch.Generator().manual_seed(seed)
    rows = sum(sizes) + tail
    x = (torch.randn(rows, k, generator=g) * scale).to(dtype)
    if layout == "transposed":
        w = torch.randn(len(sizes), n, k, generator=g).to(dtype).transpose(1, 2)
    else:
        w = torch.randn(len(sizes), k, n, generator=g).to(dtype)
    if outliers and dtype == torch.float16 and rows:
        x[0, 0] = 60000.0  # near fp16's max: products overflow to inf in both implementations alike
    offs = torch.tensor(sizes, dtype=offs_dtype).cumsum(0).to(offs_dtype)
    return x, w, offs


def _reference64(x, w, offs):
    out, start = torch.zeros(x.shape[0], w.shape[2], dtype=torch.float64), 0
    for i, end in enumerate(offs.tolist()):
        out[start:end] = x[start:end].double() @ w[i].double()
        start = end
    return out


@settings(max_examples=40, deadline=None)
@given(grouped_case())
def test_op_is_bit_identical_to_transformers_and_close_to_float64(case):
    sizes, tail, k, n, dtype, scale, seed, outliers, layout, offs_dtype = case
    x, w, offs = _operands(sizes, tail, k, n, dtype, scale, seed, outliers, layout, offs_dtype)
    grad = torch.randn(x.shape[0], n, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    got = {}
    for name, op in (("ours", OURS), ("theirs", FALLBACK)):
        xi, wi = x.clone().requires_grad_(), w.detach().clone().requires_grad_()  # clone keeps the layout
        out = op(xi, wi, offs)
        out.backward(grad)
        got[name] = (out, xi.grad, wi.grad)
    for a, b in zip(got["ours"], got["theirs"]):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.nan_to_num(posinf=1, neginf=-1), b.nan_to_num(posinf=1, neginf=-1))
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf())
    if not outliers:
        out = got["ours"][0]
        assert not out.isnan().any()
        ref = _reference64(x, w, offs)
        tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
        if out.numel():
            assert (out.double() - ref).abs().max() <= tol * (ref.abs().max() + 1e-30) * 4
        assert not out[sum(sizes):].any()  # rows past the last offset stay zero


@settings(max_examples=40, deadline=None)
@given(grouped_case(), st.sampled_from([1.0, 2e4]))
def test_fp32_output_from_16_bit_operands_is_the_unrounded_accumulator(case, boost):
    """out_dtype=float32 (the fp16 guard on an MoE's down projection): each group's fp32 products, not
    rounded to 16 bits, finite past 65504 (boost: fp16 products well past it); rows past the last
    offset zero; the fp32 gradient is rounded to the operands' dtype before the backward's products."""
    sizes, tail, k, n, dtype, scale, seed, _, layout, offs_dtype = case
    dtype = torch.float16 if dtype == torch.float32 else dtype
    x, w, offs = _operands(sizes, tail, k, n, dtype, scale, seed, False, layout, offs_dtype)
    x = (x.float() * boost).clamp(-6e4, 6e4).to(dtype)
    grad = torch.randn(x.shape[0], n, generator=torch.Generator().manual_seed(seed + 1))
    xi, wi = x.clone().requires_grad_(), w.detach().clone().requires_grad_()
    out = OURS(xi, wi, offs, torch.float32)
    out.backward(grad)
    assert out.dtype == torch.float32 and out.shape == (x.shape[0], n)
    ref = _reference64(x, w, offs)
    assert torch.isfinite(out).all()
    bound = _reference64(x.abs(), w.abs(), offs)  # |x|·|w|: the scale of each output's rounding error
    assert ((out.double() - ref).abs() <= 1e-5 * bound + 1e-30).all()
    assert not out[sum(sizes):].any()  # rows past the last offset stay zero
    # the backward: the 16-bit op's, fed the gradient rounded to 16 bits
    xr, wr = x.clone().requires_grad_(), w.detach().clone().requires_grad_()
    OURS(xr, wr, offs).backward(grad.to(dtype))
    for got, expect in ((xi.grad, xr.grad), (wi.grad, wr.grad)):
        assert got.dtype == dtype and torch.equal(got.nan_to_num(), expect.nan_to_num())


@pytest.mark.parametrize("need_input,need_weight", [(True, False), (False, True), (True, True)])
def test_backward_computes_only_the_gradients_asked_for(need_input, need_weight):
    x, w, offs = _operands([3, 0, 4], 1, 5, 6, torch.float32, 1.0, 0)
    grad = torch.randn(x.shape[0], 6)
    got = BWD(grad, x, w, offs, need_input, need_weight)
    assert len(got) == need_input + need_weight
    xr, wr = x.clone().requires_grad_(need_input), w.clone().requires_grad_(need_weight)
    FALLBACK(xr, wr, offs).backward(grad)
    expect = ([xr.grad] if need_input else []) + ([wr.grad] if need_weight else [])
    assert all(torch.equal(a, b) for a, b in zip(got, expect))


def test_frozen_experts_get_no_weight_gradient_and_their_input_is_not_saved(monkeypatch):
    """LoRA elsewhere: autograd asks for the input's gradient alone, and the input (tokens x top_k
    rows) is not kept for the backward; with trainable experts it is."""
    x, w, offs = _operands([3, 0, 4], 1, 5, 6, torch.float32, 1.0, 0, layout="transposed")
    for train_experts in (False, True):
        calls, saved = _spy(monkeypatch), []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = OURS(x.clone().requires_grad_(), w.detach().clone().requires_grad_(train_experts), offs)
        out.backward(torch.randn(x.shape[0], 6))
        assert calls == ["forward", (True, train_experts)]
        assert any(t.shape == x.shape for t in saved) == train_experts


def test_the_op_and_its_twin_keep_cuda_graphs_off():
    """Both ops read the offsets on the host: Inductor must not capture them in a CUDA graph."""
    from torch._inductor import utils
    from fxfuse.runtime.ops import twins
    for op in (OURS, BWD):
        for target in (op, twins.twin_of(op)):
            assert torch.Tag.cudagraph_unsafe in target.tags, target
            if hasattr(utils, "is_cudagraph_unsafe_fx_node"):  # how Inductor asks (torch 2.13)
                assert utils.is_cudagraph_unsafe_fx_node(fx.Graph().call_function(target, ())), target
    assert not twins.twin_of(torch.ops.fxfuse.lora_linear.default).tags  # others: no tag, as before


# ---------------------------------------------------------------- the pass, in a graph


def _graph(x_meta, w_meta, offs_meta, kwargs=False):
    g = fx.Graph()
    nodes = [g.placeholder(name) for name in ("x", "w", "offs")]
    for node, meta in zip(nodes, (x_meta, w_meta, offs_meta)):
        node.meta["example_value"] = meta
    call = g.call_function(FALLBACK, (), dict(zip(("input", "weight", "offs"), nodes))) if kwargs \
        else g.call_function(FALLBACK, tuple(nodes))
    g.output(call)
    return fx.GraphModule(torch.nn.Module(), g)


def _run(gm):
    stats = PassStats("grouped_mm", "")
    gp.GroupedMmPass().run(gm, stats)
    return stats.sites


def _count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


@pytest.mark.parametrize("kwargs", [False, True])
def test_the_call_is_rewritten_with_its_arguments(kwargs):
    gm = _graph(torch.empty(7, 4), torch.empty(3, 4, 5), torch.empty(3, dtype=torch.int64), kwargs)
    assert (_count(gm, FALLBACK), _count(gm, OURS)) == (1, 0)
    sites = _run(gm)
    assert (_count(gm, FALLBACK), _count(gm, OURS)) == (0, 1)
    assert len(sites) == 1 and sites[0].rewritten
    x, w, offs = torch.randn(7, 4), torch.randn(3, 4, 5), torch.tensor([2, 2, 6])
    gm.recompile()
    assert torch.equal(gm(x, w, offs), FALLBACK(x, w, offs))


@pytest.mark.parametrize("x,w,offs,reason", [
    (torch.empty(7, 4), torch.empty(3, 4, 5), torch.empty(3, dtype=torch.float32), "offsets of dtype"),
    (torch.empty(7, 4), torch.empty(3, 4, 5), torch.empty(2, dtype=torch.int32), "2 offsets for 3 experts"),
    (torch.empty(7, 4), torch.empty(3, 6, 5), torch.empty(3, dtype=torch.int32), "input width 4"),
    (torch.empty(7, 4), torch.empty(3, 4, 5, dtype=torch.float16), torch.empty(3, dtype=torch.int32),
     "input in torch.float32, experts in torch.float16"),
    (torch.empty(2, 7, 4), torch.empty(3, 4, 5), torch.empty(3, dtype=torch.int32), "not [tokens, in]"),
    (None, torch.empty(3, 4, 5), torch.empty(3, dtype=torch.int32), "no recorded value"),
])
def test_what_the_op_would_not_compute_alike_is_declined_with_the_reason(x, w, offs, reason):
    gm = _graph(x, w, offs)
    sites = _run(gm)
    assert len(sites) == 1 and not sites[0].rewritten and reason in sites[0].reason, sites[0].reason
    assert (_count(gm, FALLBACK), _count(gm, OURS)) == (1, 0)  # left as it was


# ---------------------------------------------------------------- models


def _spy(monkeypatch):
    """Records each call of fxfuse::grouped_mm's products: "forward", or the backward's
    (need_input, need_weight)."""
    calls = []
    fwd, bwd = op_module.forward_products, op_module.backward_products

    def forward(*args):
        calls.append("forward")
        return fwd(*args)

    def backward(*args):
        calls.append(tuple(args[-2:]))
        return bwd(*args)
    monkeypatch.setattr(op_module, "forward_products", forward)
    monkeypatch.setattr(op_module, "backward_products", backward)
    return calls


def _moe(arch, targets, gc=True):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **MOE[arch]))
    model = with_lora(model, r=4, lora_alpha=8, target_modules=targets)
    return checkpointed(model) if gc else model


def _equals_eager(model, monkeypatch):
    """Optimizes `model`, checks its loss and gradients against eager's; returns the report, the
    grouped-matmul calls of the optimized step (see _spy) and eager's gradients."""
    ref = copy.deepcopy(model)
    opt = fxfuse.optimize(model, compiler="aot_eager", verbose=False)
    ids = tokens(2, 12)
    l_ref, g_ref = loss_and_grads(ref, input_ids=ids, labels=ids)
    calls = _spy(monkeypatch)
    l_opt, g_opt = loss_and_grads(opt, input_ids=ids, labels=ids)
    assert rel(l_opt, l_ref) < 1e-5 and g_ref.keys() == g_opt.keys()
    for name in g_ref:
        assert rel(g_opt[name], g_ref[name]) < 1e-4, name
    return fxfuse.report(opt), calls, g_ref


@pytest.mark.parametrize("arch", sorted(MOE))
def test_checkpointed_moe_layers_compile_with_their_attention_lora_fused(arch, monkeypatch):
    report, calls, _ = _equals_eager(_moe(arch, ["q_proj", "k_proj", "v_proj", "o_proj"]), monkeypatch)
    assert not report.errors and not report.compile_errors, report.table()
    assert report.unseen_adapters() == {}, report.table()  # every adapter ran inside the graphs
    s = report.summary()
    assert s["grouped_mm"]["rewritten"] == s["grouped_mm"]["candidates"] == 2 * DENSE["num_hidden_layers"]
    assert s["lora"]["rewritten"] == s["lora"]["candidates"] == 4 * DENSE["num_hidden_layers"]
    # forward, the checkpoint's recompute, backward (transformers' op never ran: the spy saw every
    # grouped matmul); the experts are frozen: no weight gradient
    sites = 2 * DENSE["num_hidden_layers"]
    assert calls.count("forward") == 2 * sites
    assert [c for c in calls if c != "forward"] == [(True, False)] * sites


def test_lora_on_the_experts_gets_the_weight_gradient_and_equals_eager(monkeypatch):
    """all-linear on mixtral: PEFT wraps the experts' 3-D weights (W + scale·B·A per expert), so the
    grouped matmul's weight gradient is needed and reaches the adapters. Without checkpointing: under
    it dynamo breaks the graph at PEFT's ParamWrapper ("Unsupported function call") and the layers
    run eagerly, with the report's warning (tests/e2e/test_architectures.py)."""
    report, calls, g_ref = _equals_eager(_moe("mixtral", "all-linear", gc=False), monkeypatch)
    experts = [n for n in g_ref if "experts" in n]
    assert experts and all(g_ref[n].abs().sum() > 0 for n in experts)
    assert calls.count((True, True)) == 2 * DENSE["num_hidden_layers"]
    assert report.summary()["grouped_mm"]["rewritten"] == 2 * DENSE["num_hidden_layers"]


def test_without_the_pass_the_moe_layers_fail_to_compile_and_the_report_says_so():
    """The reason the pass is on by default: transformers' backward reads the offsets' values."""
    model = _moe("qwen3_moe", ["q_proj", "k_proj", "v_proj", "o_proj"])
    passes = [p for p in fxfuse.DEFAULT_PASSES if p != "grouped_mm"]
    opt = fxfuse.optimize(model, compiler="aot_eager", verbose=False, passes=passes)
    ids = tokens(2, 12)
    loss_and_grads(opt, input_ids=ids, labels=ids)
    report = fxfuse.report(opt)
    assert any("DataDependentOutputException" in e for e in report.compile_errors), report.table()
    assert report.unseen_adapters(), report.table()
