"""The sink-attention pass: HF's eager attention with attention sinks (gpt-oss) ->
fxfuse::chunked_attention with sinks. Tiny gpt-oss in eager attention equal to eager (loss and
every LoRA gradient), op counts, declines with reasons (another slice, weights read elsewhere,
dropout in training, sinks that are not one per head), and a hypothesis fuzz of the rewritten
function (GQA via repeat_kv, odd sizes, scale forms, masks, with and without the max stabiliser;
the sinks' own gradient) against float64."""
import copy
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import fxfuse
from fxfuse.frontends.backend import make_backend
from fxfuse.frontends.report import Report
from fxfuse.passes.eager_attention import EagerAttentionPass
from fxfuse.passes.manager import PassManager
from fxfuse.passes.pattern import count_ops
from fxfuse.passes.sink_attention import SinkAttentionPass
from fxfuse.runtime.ops import chunked_attention as C
from tiny import loss_and_grads, rel, tokens

OP = "fxfuse.chunked_attention.default"


class _DenseMLP(torch.nn.Module):
    """gpt-oss's MLP interface (output, router scores) without experts."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.up, self.down = torch.nn.Linear(hidden, inter), torch.nn.Linear(inter, hidden)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.up(x))), None


@pytest.mark.parametrize("gc", [False, True])
def test_gpt_oss_equals_eager(gc):
    """With gradient checkpointing dynamo also traces the row max's unread `.indices`: part of the
    pattern, not a reader outside it (it was declined for that)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("gpt_oss", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                               max_position_embeddings=128, head_dim=16, num_local_experts=4, num_experts_per_tok=2)
    cfg._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(cfg)
    # a dense MLP in place of the MoE: its backward has a data-dependent op the compiler cannot trace
    # (a compile error, so dynamo would run the layer without fxfuse and nothing here would be tested)
    for layer in model.model.layers:
        layer.mlp = _DenseMLP(64, 96)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("sinks"):
                p.normal_()  # HF starts them at zero
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    ref = copy.deepcopy(model)
    opt = fxfuse.optimize(model, compiler="aot_eager", verbose=False,
                          passes=list(fxfuse.DEFAULT_PASSES) + ["sink_attention"])
    ids = tokens(2, 12)
    l_ref, g_ref = loss_and_grads(ref, input_ids=ids, labels=ids)
    l_opt, g_opt = loss_and_grads(opt, input_ids=ids, labels=ids)
    assert rel(l_opt, l_ref) < 1e-5 and not torch.isnan(l_opt)
    assert g_ref.keys() == g_opt.keys() and len(g_ref) == 2 * 4 * 2
    for name in g_ref:
        assert rel(g_opt[name], g_ref[name]) < 1e-5, name
    s = fxfuse.report(opt).summary()["sink_attention"]
    # dynamo breaks gpt-oss's graph in its MoE (grouped_mm), so attention lands in several graphs;
    # where a graph ends between the weights and their use, the weights are its output: declined
    assert s["rewritten"] >= 2 and all(s["declined"]), s
    assert all("read elsewhere" in r for r in s["declined"]), s


def run_pass(fn, *args):
    """fn through dynamo, eager_attention and sink_attention: (outputs, summary, op counts after)."""
    graphs = []

    class Spy(SinkAttentionPass):
        def run(self, gm, stats):
            super().run(gm, stats)
            graphs.append(gm)
    manager = PassManager([EagerAttentionPass(), Spy(rows=3)])
    report = Report(manager_uuid=manager.uuid(), pass_names=["eager_attention", "sink_attention"])
    torch._dynamo.reset()
    out = torch.compile(fn, backend=make_backend(manager, report, "aot_eager"), fullgraph=True)(*args)
    counts: dict = {}
    for gm in graphs:
        for k, v in count_ops(gm).items():
            counts[k] = counts.get(k, 0) + v
    return out, report.summary()["sink_attention"], counts


def attention(q, k, v, sinks, mask=None, scale=0.25, scale_kind="mul", groups=1, stabilise=True,
              keep=slice(None, -1), weights_out=False, p=0.0):
    """gpt-oss's eager_attention_forward, repeat_kv included."""
    if groups > 1:
        b, h, t, d = k.shape
        k = k[:, :, None].expand(b, h, groups, t, d).reshape(b, h * groups, t, d)
        v = v[:, :, None].expand(b, h, groups, t, d).reshape(b, h * groups, t, d)
    s = torch.matmul(q, k.transpose(2, 3))
    if scale_kind == "mul":
        s = s * scale
    elif scale_kind == "div":
        s = s / (1 / scale)
    if mask is not None:
        s = s + mask
    column = sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], -1)
    logits = torch.cat([s, column], dim=-1)
    if stabilise:
        logits = logits - logits.max(dim=-1, keepdim=True).values
    probs = torch.nn.functional.softmax(logits, dim=-1, dtype=logits.dtype)
    w = torch.nn.functional.dropout(probs[..., keep], p=p, training=True).to(v.dtype)
    out = torch.matmul(w, v)
    return (out, w) if weights_out else out


def causal(t, dtype=torch.float32):
    keep = torch.ones(t, t, dtype=torch.bool).tril()
    return torch.zeros(1, 1, t, t, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)


def qkvs(b=1, hq=4, hk=2, t=7, d=8, seed=0, mag=1.0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = [(torch.randn(b, h, t, d, generator=g) * mag).requires_grad_() for h in (hq, hk, hk)]
    return q, k, v, (torch.randn(hq, generator=g) * 2).requires_grad_()


def test_another_slice_is_declined():
    _, s, _ = run_pass(lambda q, k, v, sk: attention(q, k, v, sk, keep=slice(1, None)), *qkvs(hk=4))
    assert s["rewritten"] == 0 and any("[..., :-1]" in r for r in s["declined"]), s


def test_weights_read_elsewhere_are_declined():
    _, s, _ = run_pass(lambda q, k, v, sk: attention(q, k, v, sk, weights_out=True), *qkvs(hk=4))
    assert s["rewritten"] == 0 and any("read elsewhere" in r for r in s["declined"]), s


def test_dropout_in_training_is_declined():
    _, s, _ = run_pass(lambda q, k, v, sk: attention(q, k, v, sk, p=0.1), *qkvs(hk=4))
    assert s["rewritten"] == 0 and any("dropout p=0.1 in training" in r for r in s["declined"]), s


def test_keyword_spellings_are_matched_not_crashed_on():
    """torch.cat(tensors=..., dim=...), torch.max(input=..., ...) and torch.amax: the pass reads
    operands by position or keyword (a crash in a pass would cost the graph every pass)."""
    def f(q, k, v, sk, use_amax):
        s = torch.matmul(q, k.transpose(2, 3)) * 0.25
        column = sk.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], -1)
        logits = torch.cat(tensors=[s, column], dim=-1)
        top = torch.amax(input=logits, dim=-1, keepdim=True) if use_amax else \
            torch.max(input=logits, dim=-1, keepdim=True).values
        w = torch.softmax(logits - top, dim=-1)[..., :-1]
        return torch.matmul(w, v)
    q, k, v, sinks = qkvs(hk=4)
    for use_amax in (False, True):
        out, s, counts = run_pass(lambda q, k, v, sk: f(q, k, v, sk, use_amax), q, k, v, sinks)
        assert s["rewritten"] == 1, s
        want = C.reference(q.double(), k.double(), v.double(), None, sinks.double(), 0.25, 0.0)
        assert rel(out, want) < 1e-5


def test_another_stabiliser_is_declined_with_the_reason():
    def f(q, k, v, sk):
        s = torch.matmul(q, k.transpose(2, 3))
        logits = torch.cat([s, sk.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], -1)], dim=-1)
        w = torch.softmax(logits - logits.mean(dim=-1, keepdim=True), dim=-1)[..., :-1]
        return torch.matmul(w, v)
    _, s, _ = run_pass(f, *qkvs(hk=4))
    assert s["candidates"] == 1 and s["rewritten"] == 0, s
    assert any("other than the row max" in r for r in s["declined"]), s


def test_sinks_that_are_not_one_per_head_are_declined():
    q, k, v, _ = qkvs(hk=4)
    sinks = torch.zeros(2, 2, requires_grad=True)  # 4 logits, but [2, 2]
    _, s, _ = run_pass(lambda q, k, v, sk: attention(q, k, v, sk), q, k, v, sinks)
    assert s["rewritten"] == 0 and any("one logit per query head" in r for r in s["declined"]), s


@settings(max_examples=10, deadline=None)
@given(b=st.integers(1, 2), hk=st.integers(1, 2), groups=st.sampled_from([1, 2, 3]), t=st.integers(1, 11),
       d=st.sampled_from([4, 8, 5]), scale_kind=st.sampled_from(["mul", "div", None]), masked=st.booleans(),
       stabilise=st.booleans(), mag=st.sampled_from([0.5, 3.0]), seed=st.integers(0, 2**16))
def test_fuzz_rewritten_equals_float64(b, hk, groups, t, d, scale_kind, masked, stabilise, mag, seed):
    q, k, v, sinks = qkvs(b, hk * groups, hk, t, d, seed, mag)
    mask = causal(t) if masked else None
    scale = 1 / math.sqrt(d)

    def f(q, k, v, sinks):
        return attention(q, k, v, sinks, mask=mask, scale=scale, scale_kind=scale_kind, groups=groups,
                         stabilise=stabilise)
    out, s, counts = run_pass(f, q, k, v, sinks)
    assert s["rewritten"] == 1, s
    assert counts.get(OP) == 1 and "softmax" not in counts and "cat" not in counts, counts
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    got = torch.autograd.grad(out, (q, k, v, sinks), grad)
    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v, sinks)]
    eff = scale if scale_kind is not None else 1.0
    ref = C.reference(*ref_in[:3], None if mask is None else mask.double(), ref_in[3], eff, 0.0)
    want = torch.autograd.grad(ref, ref_in, grad.double())
    assert not out.isnan().any() and rel(out, ref) < 1e-5
    # elementwise, with an absolute floor at 1e-5 of each gradient's natural scale (a saturated
    # softmax's gradients are orders below it, with fp32's absolute error)
    rms = [x.detach().double().pow(2).mean().sqrt().item() for x in (q, k, v, grad)]
    d_p = rms[3] * rms[2] * d ** 0.5
    natural = {"q": eff * d_p * rms[1], "k": eff * d_p * rms[0], "v": rms[3], "sinks": d_p * b * t}
    for name, x, y in zip(("q", "k", "v", "sinks"), got, want):
        torch.testing.assert_close(x, y.float(), rtol=1e-4, atol=1e-5 * natural[name], msg=name)
