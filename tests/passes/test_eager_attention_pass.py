"""The eager-attention pass: HF eager attention -> SDPA. Op counts before/after (checkpointing off
and on), loss and every LoRA gradient equal to eager per architecture, the additive eager mask
proven causal by causal_mask, declines with reasons (softcapping, sinks, dropout in training,
weights read elsewhere, mask dtype), and a hypothesis fuzz of the rewritten function against a
float64 reference."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import fxfuse
from fxfuse.frontends import hf
from fxfuse.frontends.backend import make_backend
from fxfuse.frontends.report import Report
from fxfuse.passes.causal_mask import CausalMaskPass
from fxfuse.passes.eager_attention import EagerAttentionPass
from fxfuse.passes.manager import PassManager
from fxfuse.passes.pattern import count_ops
from tiny import clone, loss_and_grads, rel, tokens


def eager_model(arch="llama", seed=0):
    torch.manual_seed(seed)
    cfg = hf.load_config(f"{arch}-tiny")
    cfg._attn_implementation = "eager"
    return hf.build_model(cfg, peft={"r": 4})


def ops(graphs):
    total: dict = {}
    for gm in graphs:
        for k, v in count_ops(gm).items():
            total[k] = total.get(k, 0) + v
    return total


@pytest.mark.parametrize("gc", [True])  # checkpoint subgraphs; without gc the same counts (CI time)
def test_op_counts(gc):
    model = eager_model()
    layers = model.config.num_hidden_layers
    before = hf.capture_graphs(clone(model), gradient_checkpointing=gc, passes=["lora"])
    after = hf.capture_graphs(clone(model), gradient_checkpointing=gc,
                              passes=["lora", "eager_attention", "causal_mask", "sdpa_gqa"])
    b, a = ops(before.after), ops(after.after)
    assert b["softmax"] == layers and "softmax" not in a
    assert b["matmul"] - a["matmul"] == 2 * layers  # q·kᵀ and weights·v per layer
    assert b.get("sdpa", 0) == 0 and a["sdpa"] == layers
    assert b["where"] >= 1 and "where" not in a  # the additive mask, proven causal, is gone
    s = after.report.summary()
    for name in ("eager_attention", "causal_mask", "sdpa_gqa"):
        assert s[name]["candidates"] == s[name]["rewritten"] == layers, (name, s[name])


@pytest.mark.parametrize("arch, gc", [("llama", True)])  # qwen2, mistral: same result on CPU (CI time)
def test_equal_to_eager(arch, gc):
    ref = eager_model(arch)
    if gc:
        ref.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ref.enable_input_require_grads()
    opt = fxfuse.optimize(clone(ref), compiler="aot_eager", verbose=False)
    ids = tokens(2, 16)
    l_ref, g_ref = loss_and_grads(ref, input_ids=ids, labels=ids)
    l_opt, g_opt = loss_and_grads(opt, input_ids=ids, labels=ids)
    assert rel(l_opt, l_ref) < 1e-5
    assert g_ref.keys() == g_opt.keys() and len(g_ref) > 0
    for name in g_ref:
        assert rel(g_opt[name], g_ref[name]) < 1e-5, name
    s = fxfuse.report(opt).summary()
    layers = ref.config.num_hidden_layers
    assert s["eager_attention"]["rewritten"] == layers and not s["eager_attention"]["declined"], s
    assert s["causal_mask"]["rewritten"] == layers, s  # the additive mask was proven causal


def run_passes(fn, *args, passes=("eager_attention",)):
    """fn through dynamo and the named passes (pass-through compiler): (outputs, report summary)."""
    built = {"eager_attention": EagerAttentionPass, "causal_mask": CausalMaskPass}
    manager = PassManager([built[p]() for p in passes])
    report = Report(manager_uuid=manager.uuid(), pass_names=list(passes))
    torch._dynamo.reset()
    out = torch.compile(fn, backend=make_backend(manager, report, "aot_eager"), fullgraph=True)(*args)
    return out, report.summary()


def qkv(b=1, h=2, t=5, d=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, t, d, generator=g).to(dtype) for _ in range(3)]


def test_softcapping_is_declined_with_the_reason():
    def f(q, k, v):  # as gemma2: softcap, then HF's additive mask (whose producers the walk must skip)
        s = torch.matmul(q, k.transpose(2, 3)) * 0.3
        s = torch.tanh(s / 50.0) * 50.0
        i = torch.arange(q.shape[-2])
        keep = (i[None, None, None, :] <= i[None, None, :, None]) & (i[None, None, None, :] >= 0)
        mask = torch.where(keep.expand(1, 1, -1, -1), torch.tensor(0.0), torch.finfo(q.dtype).min)
        return torch.matmul(torch.softmax(s + mask, dim=-1), v)
    out, s = run_passes(f, *qkv())
    assert s["eager_attention"]["rewritten"] == 0
    assert any("softcapping" in r for r in s["eager_attention"]["declined"]), s


def test_sinks_are_declined_with_the_reason():
    def f(q, k, v, sink):
        s = torch.matmul(q, k.transpose(2, 3))
        s = torch.cat([s, sink.expand(*s.shape[:-1], 1)], dim=-1)
        w = torch.softmax(s, dim=-1)[..., :-1]
        return torch.matmul(w, v)
    out, s = run_passes(f, *qkv(), torch.zeros(1, 2, 1, 1))
    assert s["eager_attention"]["rewritten"] == 0
    assert any("sinks" in r for r in s["eager_attention"]["declined"]), s


def test_gpt2_form_is_rewritten():
    """GPT-2's eager attention divides by a 0-d `torch.full` and casts with `.type(dtype)`; a `cat` in
    the mask's producers is not an extra softmax column."""
    def f(q, k, v):
        s = torch.matmul(q, k.transpose(-1, -2))
        s = s / torch.full([], v.size(-1) ** 0.5, dtype=s.dtype)
        t = q.shape[-2]
        keep = torch.cat([torch.ones(t, 1, dtype=torch.bool), torch.ones(t, t - 1, dtype=torch.bool).tril(-1)], dim=1)
        s = s + torch.where(keep, 0.0, torch.finfo(q.dtype).min)
        w = torch.nn.functional.softmax(s, dim=-1).type(v.dtype)
        return torch.matmul(w, v)
    args = qkv(t=6)
    out, s = run_passes(f, *args)
    assert s["eager_attention"]["rewritten"] == 1, s
    torch.testing.assert_close(out, f(*args), rtol=1e-5, atol=1e-6)


def test_dropout_in_training_is_declined():
    def f(q, k, v):
        w = torch.nn.functional.softmax(torch.matmul(q, k.transpose(-1, -2)) * 0.5, dim=-1, dtype=torch.float32)
        w = torch.nn.functional.dropout(w.to(q.dtype), p=0.1, training=True)
        return torch.matmul(w, v)
    _, s = run_passes(f, *qkv())
    assert s["eager_attention"]["rewritten"] == 0
    assert any("dropout p=0.1 in training" in r for r in s["eager_attention"]["declined"]), s


def test_weights_read_elsewhere_are_declined():
    def f(q, k, v):
        w = torch.softmax(torch.matmul(q, k.transpose(2, 3)) * 0.5, dim=-1)
        return torch.matmul(w, v), w  # output_attentions
    _, s = run_passes(f, *qkv())
    assert s["eager_attention"]["rewritten"] == 0
    assert any("outside the pattern" in r or "users" in r for r in s["eager_attention"]["declined"]), s


def test_mask_in_another_dtype_is_declined():
    def f(q, k, v, mask):
        w = torch.softmax(torch.matmul(q, k.transpose(2, 3)) * 0.5 + mask, dim=-1, dtype=torch.float32)
        return torch.matmul(w.to(q.dtype), v)
    q, k, v = qkv(dtype=torch.bfloat16)
    _, s = run_passes(f, q, k, v, torch.zeros(1, 1, 5, 5))
    assert s["eager_attention"]["rewritten"] == 0
    assert any("mask dtype" in r for r in s["eager_attention"]["declined"]), s


def test_a_mask_from_a_graph_input_is_declined():
    """A padding mask can mask every key of a query row (left padding): eager then attends uniformly,
    and torch's fused CPU SDPA kernel returns wrong gradients for that row (torch 2.13)."""
    def f(q, k, v, mask):
        w = torch.softmax(torch.matmul(q, k.transpose(2, 3)) * 0.5 + mask, dim=-1, dtype=torch.float32)
        return torch.matmul(w.to(q.dtype), v)
    mask = torch.zeros(1, 1, 5, 5)
    mask[..., :2, :] = torch.finfo(torch.float32).min  # two query rows see no key
    _, s = run_passes(f, *qkv(), mask)
    assert s["eager_attention"]["rewritten"] == 0
    assert any(r.startswith("mask depends on graph input") and "every key masked" in r
               for r in s["eager_attention"]["declined"]), s


def test_left_padded_eager_model_keeps_eager_attention_and_its_gradients():
    model = eager_model()
    ref = clone(model)
    opt = fxfuse.optimize(model, compiler="aot_eager", verbose=False)
    ids = tokens(2, 12)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    labels = ids.masked_fill(mask == 0, -100)
    l_ref, g_ref = loss_and_grads(ref, input_ids=ids, attention_mask=mask, labels=labels)
    l_opt, g_opt = loss_and_grads(opt, input_ids=ids, attention_mask=mask, labels=labels)
    assert rel(l_opt, l_ref) < 1e-5
    for name in g_ref:
        assert rel(g_opt[name], g_ref[name]) < 1e-4, name
    summary = fxfuse.report(opt).summary()["eager_attention"]
    assert summary["rewritten"] == 0 and summary["candidates"] > 0, summary


def test_einsum_attention_is_reported_not_passed_over():
    def f(q, k, v):
        w = torch.softmax(torch.einsum("bhqd,bhkd->bhqk", q, k) * 0.5, dim=-1)
        return torch.einsum("bhqk,bhkd->bhqd", w, v)
    _, s = run_passes(f, *qkv())
    assert s["eager_attention"]["candidates"] == 1 and s["eager_attention"]["rewritten"] == 0, s
    assert any("einsum" in r for r in s["eager_attention"]["declined"]), s


def test_a_softmax_not_fed_by_a_matmul_is_not_a_candidate():
    def f(x, w):
        return torch.softmax(torch.nn.functional.linear(x, w), dim=-1)  # a router
    _, s = run_passes(f, torch.randn(4, 8), torch.randn(3, 8))
    assert s["eager_attention"]["candidates"] == 0


@pytest.mark.parametrize("masked_value, causal, proven", [
    (torch.finfo(torch.float32).min, True, True),   # HF's eager mask, causal
    (torch.finfo(torch.float32).min, False, False),  # a window: not causal
    (-65504.0, True, False),  # fp16's min is not far enough below the scores
])
def test_causal_mask_reads_the_additive_mask(masked_value, causal, proven):
    def f(q, k, v):
        t = q.shape[-2]
        i = torch.arange(t)
        keep = i[None, None, None, :] <= i[None, None, :, None]
        if not causal:
            keep = keep & (i[None, None, :, None] - i[None, None, None, :] < 2)
        mask = torch.where(keep, torch.tensor(0.0, dtype=q.dtype), masked_value)
        w = torch.softmax(torch.matmul(q, k.transpose(2, 3)) * 0.25 + mask, dim=-1)
        return torch.matmul(w, v)
    args = qkv(t=6)
    out, s = run_passes(f, *args, passes=("eager_attention", "causal_mask"))
    assert s["eager_attention"]["rewritten"] == 1
    assert s["causal_mask"]["rewritten"] == int(proven), s
    if not proven:
        assert s["causal_mask"]["declined"], s
    torch.testing.assert_close(out, f(*args), rtol=1e-5, atol=1e-6)


def reference(q, k, v, scale, mask):
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    if mask is not None:
        s = s + mask.double()
    return torch.softmax(s, dim=-1) @ v.double()


@settings(deadline=None, max_examples=15)
@given(b=st.integers(1, 2), h=st.integers(1, 3), tq=st.integers(1, 9), tk=st.integers(1, 9),
       d=st.sampled_from([1, 4, 7, 16]), dv=st.sampled_from([3, 8]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       scale_kind=st.sampled_from(["mul", "div", "none"]), mask_kind=st.sampled_from(["none", "causal", "random"]),
       big=st.booleans(), seed=st.integers(0, 2**16))
def test_fuzz_against_float64(b, h, tq, tk, d, dv, dtype, scale_kind, mask_kind, big, seed):
    g = torch.Generator().manual_seed(seed)
    mag = 30.0 if big else 1.0
    q = (torch.randn(b, h, tq, d, generator=g) * mag).to(dtype)
    k = (torch.randn(b, h, tk, d, generator=g)).to(dtype)
    v = (torch.randn(b, h, tk, dv, generator=g) * mag).to(dtype)
    scale = 1 / math.sqrt(d)
    mask = None
    if mask_kind == "causal":
        keep = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq)
        keep[:, 0] = True  # every row keeps a key
        mask = torch.where(keep, 0.0, torch.finfo(dtype).min).to(dtype)[None, None]
    elif mask_kind == "random":
        mask = (torch.randn(b, 1, tq, tk, generator=g) * 3).to(dtype)

    def f(q, k, v, *m):
        s = torch.matmul(q, k.transpose(2, 3))
        if scale_kind == "mul":
            s = s * scale
        elif scale_kind == "div":
            s = s / (1 / scale)
        if mask_kind == "causal":  # built in the graph from sizes, as HF does without a padding mask
            i, j = torch.arange(s.shape[-2]), torch.arange(s.shape[-1])
            keep = (j[None, :] <= i[:, None] + (s.shape[-1] - s.shape[-2])) | (j[None, :] == 0)
            s = s + torch.where(keep, 0.0, torch.finfo(s.dtype).min).to(s.dtype)[None, None]
        elif m:  # a mask passed in: declined (see test_a_mask_from_a_graph_input_is_declined)
            s = s + m[0]
        w = torch.nn.functional.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        w = torch.nn.functional.dropout(w, p=0.0, training=True)
        return torch.matmul(w, v)

    for t in (q, k, v):
        t.requires_grad_()
    args = (q, k, v) + ((mask,) if mask_kind == "random" else ())
    out, s = run_passes(f, *args)
    if mask_kind == "random":
        assert s["eager_attention"]["rewritten"] == 0, s
        assert torch.equal(out, f(*args))
        return
    assert s["eager_attention"]["rewritten"] == 1, s
    want = reference(q.detach(), k.detach(), v.detach(), scale if scale_kind != "none" else 1.0, mask)
    assert torch.isfinite(out).all()
    err = (out.detach().double() - want).abs().max().item()
    size = 1 + want.abs().max().item()
    if dtype == torch.float32:
        assert err <= 1e-5 * size, err
    else:  # eager rounds the scores to bf16; SDPA must be no further from float64 than eager is
        eager_err = (f(*args).detach().double() - want).abs().max().item()
        assert err <= eager_err + 1e-2 * size, (err, eager_err)
    out.sum().backward()  # the rewritten graph also differentiates
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
