"""The softcap-attention pass: HF's eager attention with logit softcapping (Gemma 2) ->
fxfuse::chunked_attention. Op counts before/after on tiny Gemma 2 in eager attention, loss and every
LoRA gradient equal to eager, declines with reasons (two caps, dropout in training, weights read
elsewhere, a mask the op does not take, a GELU's tanh is no candidate), and a hypothesis fuzz of the
rewritten function (GQA via repeat_kv, odd sizes, scale forms, masks) against float64."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import fxfuse
from fxfuse.frontends import hf
from fxfuse.frontends.backend import make_backend
from fxfuse.frontends.report import Report
from fxfuse.passes.eager_attention import EagerAttentionPass
from fxfuse.passes.manager import PassManager
from fxfuse.passes.pattern import count_ops
from fxfuse.passes.softcap_attention import SoftcapAttentionPass
from fxfuse.runtime.ops import chunked_attention as C
from tiny import clone, loss_and_grads, rel, tokens

PASSES = list(fxfuse.DEFAULT_PASSES) + ["softcap_attention"]


def gemma2_eager(seed=0, **overrides):
    from transformers import AutoConfig
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model("gemma2", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                               max_position_embeddings=128, head_dim=16, **overrides)
    cfg._attn_implementation = "eager"
    return hf.build_model(cfg, peft={"r": 4})


def ops(graphs):
    total: dict = {}
    for gm in graphs:
        for k, v in count_ops(gm).items():
            total[k] = total.get(k, 0) + v
    return total


def test_op_counts_on_gemma2():
    model = gemma2_eager()
    layers = model.config.num_hidden_layers
    before = hf.capture_graphs(clone(model), gradient_checkpointing=True, passes=["lora"])
    after = hf.capture_graphs(clone(model), gradient_checkpointing=True, passes=["lora", "eager_attention",
                                                                              "softcap_attention"])
    b, a = ops(before.after), ops(after.after)
    assert b["softmax"] == layers and "softmax" not in a
    assert b["matmul"] - a.get("matmul", 0) == 2 * layers  # q·kᵀ and weights·v per layer
    # attention's tanh per layer goes; the final-logit softcap's tanh stays
    assert b["tanh"] - a.get("tanh", 0) == layers
    assert a["fxfuse.chunked_attention.default"] == layers and "fxfuse.chunked_attention.default" not in b
    assert "expand" not in a or a["expand"] < b["expand"]  # repeat_kv: the op reads the kv heads
    s = after.report.summary()
    assert s["softcap_attention"]["candidates"] == s["softcap_attention"]["rewritten"] == layers, s
    assert s["eager_attention"]["rewritten"] == 0  # it declines them: SDPA has no softcap


@pytest.mark.parametrize("gc,left_padded", [(False, False), (True, False), (False, True)])
def test_gemma2_equals_eager(gc, left_padded):
    """Left padding: HF's mask drops every key of the padded query rows, where eager attends
    uniformly; the next padded position's label is real, so those rows' gradients count."""
    ref = gemma2_eager()
    if gc:
        ref.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ref.enable_input_require_grads()
    opt = fxfuse.optimize(clone(ref), compiler="aot_eager", verbose=False, passes=PASSES)
    ids = tokens(2, 16)
    inputs = {"input_ids": ids, "labels": ids}
    if left_padded:
        mask = torch.ones_like(ids)
        mask[1, :5] = 0
        inputs.update(attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    l_ref, g_ref = loss_and_grads(ref, **inputs)
    l_opt, g_opt = loss_and_grads(opt, **inputs)
    assert rel(l_opt, l_ref) < 1e-5 and not torch.isnan(l_opt)
    assert g_ref.keys() == g_opt.keys() and len(g_ref) > 0
    for name in g_ref:
        assert rel(g_opt[name], g_ref[name]) < 1e-5, name
    s = fxfuse.report(opt).summary()["softcap_attention"]
    assert s["rewritten"] == ref.config.num_hidden_layers and not s["declined"], s


def test_gemma2_attention_dropout_in_training_is_declined():
    model = gemma2_eager(attention_dropout=0.1)
    opt = fxfuse.optimize(model, compiler="aot_eager", verbose=False, passes=PASSES)
    ids = tokens(2, 8)
    opt.train()
    opt(input_ids=ids, labels=ids).loss.backward()
    s = fxfuse.report(opt).summary()["softcap_attention"]
    assert s["rewritten"] == 0 and s["candidates"] == 2
    assert any("dropout p=0.1 in training" in r for r in s["declined"]), s


def run_pass(fn, *args):
    """fn through dynamo, eager_attention and softcap_attention (pass-through compiler): (outputs, summary,
    op counts)."""
    graphs = []

    class Spy(SoftcapAttentionPass):  # the graph as the pass leaves it
        def run(self, gm, stats):
            super().run(gm, stats)
            graphs.append(gm)
    manager = PassManager([EagerAttentionPass(), Spy(rows=3)])
    report = Report(manager_uuid=manager.uuid(), pass_names=["eager_attention", "softcap_attention"])
    torch._dynamo.reset()
    out = torch.compile(fn, backend=make_backend(manager, report, "aot_eager"), fullgraph=True)(*args)
    return out, report.summary()["softcap_attention"], ops(graphs)


def attention(q, k, v, mask=None, scale=0.25, scale_kind="mul", cap=(30.0, 30.0), groups=1, weights_out=False):
    """HF's eager softcapped attention (Gemma 2's eager_attention_forward), repeat_kv included."""
    if groups > 1:
        b, h, t, d = k.shape
        k = k[:, :, None].expand(b, h, groups, t, d).reshape(b, h * groups, t, d)
        v = v[:, :, None].expand(b, h, groups, t, d).reshape(b, h * groups, t, d)
    s = torch.matmul(q, k.transpose(2, 3))
    if scale_kind == "mul":
        s = s * scale
    elif scale_kind == "div":
        s = s / (1 / scale)
    s = torch.tanh(s / cap[0]) * cap[1]
    if mask is not None:
        s = s + mask
    w = torch.nn.functional.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    w = torch.nn.functional.dropout(w, p=0.0, training=True)
    out = torch.matmul(w, v)
    return (out, w) if weights_out else out


def causal(t, dtype=torch.float32, tk=None):
    tk = tk or t
    keep = torch.ones(t, tk, dtype=torch.bool).tril(tk - t)
    return torch.zeros(1, 1, t, tk, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)


def qkv(b=1, hq=4, hk=2, t=7, d=8, seed=0, mag=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, h, t, d, generator=g) * mag).requires_grad_() for h in (hq, hk, hk)]


def test_two_different_caps_are_declined():
    _, s, _ = run_pass(lambda q, k, v: attention(q, k, v, cap=(30.0, 50.0)), *qkv(hk=4))
    assert s["rewritten"] == 0 and any("not one positive softcap" in r for r in s["declined"]), s


def test_weights_read_elsewhere_are_declined():
    _, s, _ = run_pass(lambda q, k, v: attention(q, k, v, weights_out=True), *qkv(hk=4))
    assert s["rewritten"] == 0 and s["candidates"] == 1, s
    assert any("read elsewhere" in r or "outside the pattern" in r or "users" in r for r in s["declined"]), s


def test_a_mask_the_op_does_not_take_is_declined():
    mask = causal(7)[0, 0]  # [T, T]: broadcasts in eager, the op takes 4-D masks
    _, s, _ = run_pass(lambda q, k, v: attention(q, k, v, mask=mask), *qkv(hk=4))
    assert s["rewritten"] == 0 and any("does not fit the scores" in r for r in s["declined"]), s


def test_a_gelu_tanh_is_not_a_candidate():
    def f(x):  # tanh-GELU written out (Gemma's MLP activation in HF's old form)
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    _, s, _ = run_pass(f, torch.randn(4, 8))
    assert s["candidates"] == 0


@settings(max_examples=10, deadline=None)
@given(b=st.integers(1, 2), hk=st.integers(1, 2), groups=st.sampled_from([1, 2, 3]), t=st.integers(1, 11),
       d=st.sampled_from([4, 8, 5]), scale_kind=st.sampled_from(["mul", "div", None]),
       cap=st.sampled_from([0.7, 20.0]), masked=st.booleans(), mag=st.sampled_from([0.5, 4.0]),
       seed=st.integers(0, 2**16))
def test_fuzz_rewritten_equals_float64(b, hk, groups, t, d, scale_kind, cap, masked, mag, seed):
    q, k, v = qkv(b, hk * groups, hk, t, d, seed, mag)
    mask = causal(t) if masked else None
    scale = 1 / math.sqrt(d)

    def f(q, k, v):
        return attention(q, k, v, mask=mask, scale=scale, scale_kind=scale_kind, cap=(cap, cap), groups=groups)
    out, s, counts = run_pass(f, q, k, v)
    assert s["rewritten"] == 1, s
    assert counts.get("fxfuse.chunked_attention.default") == 1 and "softmax" not in counts and "tanh" not in counts
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    got = torch.autograd.grad(out, (q, k, v), grad)
    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = C.reference(*ref_in, None if mask is None else mask.double(), None,
                      scale if scale_kind is not None else 1.0, cap)
    want = torch.autograd.grad(ref, ref_in, grad.double())
    assert not out.isnan().any()
    assert rel(out, ref) < 1e-5
    # elementwise, with an absolute floor at 1e-5 of each gradient's natural scale: a saturated
    # softmax or tanh leaves gradients orders below that scale whose fp32 error (the scores' rounding,
    # 1 - tanh²'s cancellation) is absolute, not relative to them; eager's fp32 is no closer there
    rms = [x.detach().double().pow(2).mean().sqrt().item() for x in (q, k, v, grad)]
    d_p = rms[3] * rms[2] * d ** 0.5  # a score gradient's scale
    eff = scale if scale_kind is not None else 1.0
    natural = {"q": eff * d_p * rms[1], "k": eff * d_p * rms[0], "v": rms[3]}
    for name, x, y in zip("qkv", got, want):
        torch.testing.assert_close(x, y.float(), rtol=1e-4, atol=1e-5 * natural[name], msg=name)
