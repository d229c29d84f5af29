"""fp16_guard's residual branches in fp32 (fp32_branch.py): linear32 against float64, MoE and
plain-linear branches past 65504 in tiny models, and what the walk reports where it stops."""
import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st

import fxfuse
from fxfuse.passes.fp16_guard import Fp16GuardPass
from fxfuse.passes.manager import PassStats
from fxfuse.runtime.ops.wide_linear import bmm32, linear32
from tiny import (Fp16LinearBlock, eager16_eager32_optimized, large_mlp_fp16_llama, large_moe_fp16, loss_and_grads,
                  rel, tokens)

PASSES = list(fxfuse.DEFAULT_PASSES) + ["fp16_guard"]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 7), min_size=0, max_size=2), st.integers(1, 33), st.integers(1, 33),
       st.sampled_from([torch.float16, torch.bfloat16]), st.booleans(), st.sampled_from([1e-3, 1.0, 3e4]),
       st.integers(0, 2**16))
def test_linear32_is_the_unrounded_fp32_accumulator(lead, k, n, dtype, with_bias, scale, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*lead, k, generator=g) * scale).clamp(-6e4, 6e4).to(dtype).requires_grad_()
    w = torch.randn(n, k, generator=g).to(dtype).requires_grad_()
    b = (torch.randn(n, generator=g) * scale).clamp(-6e4, 6e4).to(dtype).requires_grad_() if with_bias else None
    y = linear32(x, w, b)
    assert y.dtype == torch.float32 and y.shape == (*lead, n)
    b64 = b.detach().double() if b is not None else None
    ref = torch.nn.functional.linear(x.detach().double(), w.detach().double(), b64)
    bound = x.detach().double().abs() @ w.detach().double().abs().T + (b64.abs() if b is not None else 0)
    assert torch.isfinite(y).all()
    assert ((y.double() - ref).abs() <= 1e-5 * bound + 1e-30).all()
    # the backward: the 16-bit linear's, fed the gradient rounded to 16 bits
    grad = torch.randn(*lead, n, generator=g)
    y.backward(grad)
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    torch.nn.functional.linear(xr, wr).backward(grad.to(dtype))
    for got, expect in ((x.grad, xr.grad), (w.grad, wr.grad)):  # dW past 65504 is inf in both
        assert got.dtype == dtype and torch.equal(got.isinf(), expect.isinf()) and not got.isnan().any()
        fin = torch.isfinite(expect)
        assert rel(got[fin].float(), expect[fin].float()) < 2e-3 + 1e-30
    if with_bias:
        assert b.grad.dtype == dtype and rel(b.grad.float(), grad.double().reshape(-1, n).sum(0)) < 1e-2


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(1, 9), st.integers(1, 17), st.integers(1, 17),
       st.sampled_from([torch.float16, torch.bfloat16]), st.sampled_from([1e-3, 1.0, 3e4]), st.integers(0, 2**16))
def test_bmm32_is_the_unrounded_fp32_accumulator(batch, m, k, n, dtype, scale, seed):
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(batch, m, k, generator=g) * scale).clamp(-6e4, 6e4).to(dtype).requires_grad_()
    b = torch.randn(batch, k, n, generator=g).to(dtype).requires_grad_()
    y = bmm32(a, b)
    assert y.dtype == torch.float32 and y.shape == (batch, m, n) and torch.isfinite(y).all()
    ref = torch.bmm(a.detach().double(), b.detach().double())
    bound = torch.bmm(a.detach().double().abs(), b.detach().double().abs())
    assert ((y.double() - ref).abs() <= 1e-5 * bound + 1e-30).all()
    # the backward: the 16-bit bmm's, fed the gradient rounded to 16 bits
    grad = torch.randn(batch, m, n, generator=g)
    y.backward(grad)
    ar, br = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    torch.bmm(ar, br).backward(grad.to(dtype))
    for got, expect in ((a.grad, ar.grad), (b.grad, br.grad)):  # past 65504: inf in both
        assert got.dtype == dtype and torch.equal(got.isinf(), expect.isinf()) and not got.isnan().any()
        fin = torch.isfinite(expect)
        assert rel(got[fin].float(), expect[fin].float()) < 2e-3 + 1e-30


def test_linear32_stays_finite_where_the_fp16_linear_overflows():
    x = torch.full((2, 8), 300.0, dtype=torch.float16)
    w = torch.full((4, 8), 100.0, dtype=torch.float16)  # each output 240000 > 65504
    assert torch.isinf(torch.nn.functional.linear(x, w)).all()
    assert torch.equal(linear32(x, w), torch.full((2, 4), 240000.0))


# where each architecture's experts live, and the column their widened matmuls count in
MOE = {"mixtral": ("mlp", "grouped_mm"), "qwen2_moe": ("mlp", "grouped_mm"), "gpt_oss": ("mlp", "grouped_mm"),
       "llama4_text": ("feed_forward", "bmm")}


@pytest.mark.parametrize("arch", list(MOE))
@pytest.mark.parametrize("gc", [False, True])
def test_moe_branch_past_fp16_max_is_computed_in_fp32(arch, gc):
    """Experts whose down projections pass 65504 (eager fp16: inf, then NaN): the guard has the
    grouped down projection write fp32 and drops the expert sum's rounding, so the loss is the fp32
    model's. Qwen2-MoE's shared expert (a LoRA site or a plain linear) joins the same branch."""
    model = large_moe_fp16(arch, gc=gc)
    eager16, eager32 = copy.deepcopy(model), copy.deepcopy(model).float()
    finite = []
    block, kind = MOE[arch]
    hooks = [getattr(layer, block).experts.register_forward_hook(lambda mod, args, out: finite.append(
        (torch.isfinite(args[0]).all().item(), torch.isfinite(out).all().item())))
        for layer in eager16.base_model.model.model.layers]
    ids = tokens(2, 12)
    l16, _ = loss_and_grads(eager16, input_ids=ids, labels=ids)
    for h in hooks:
        h.remove()
    assert (True, False) in finite  # the premise: finite tokens in, inf out of an fp16 MoE
    assert not torch.isfinite(l16)
    l32, _ = loss_and_grads(eager32, input_ids=ids, labels=ids)
    opt = fxfuse.optimize(model, compiler="aot_eager", verbose=False, passes=PASSES)
    lg, grads = loss_and_grads(opt, input_ids=ids, labels=ids)
    assert torch.isfinite(lg) and rel(lg, l32) < 1e-4, (lg, l32)
    assert grads and all(torch.isfinite(v).all() for v in grads.values())
    report = fxfuse.report(opt)
    cols = report.columns()["fp16_guard"]
    assert cols[f"fp32 {kind} outputs"] == 2, report.table()  # one MoE a layer, two layers
    notes = [s.reason for s in report.sites("fp16_guard")]
    assert sum(f"{kind} output" in n for n in notes) == 2 and not any("left in fp16" in n for n in notes), notes
    if arch == "qwen2_moe":  # the shared expert's down_proj is a LoRA site (all linears targeted)
        assert sum("LoRA op output" in n for n in notes) == 2, notes


def test_plain_linear_branch_past_fp16_max_is_computed_in_fp32():
    """LoRA on q/v only: o_proj and down_proj are plain linears, and the guard gives them fp32 outputs."""
    model = large_mlp_fp16_llama(targets=["q_proj", "v_proj"])
    ((l16, _), (l32, _), (lg, grads)), opt = eager16_eager32_optimized(model, tokens(2, 12), compiler="aot_eager",
                                                                       verbose=False, passes=PASSES)
    assert not torch.isfinite(l16)
    assert torch.isfinite(lg) and rel(lg, l32) < 1e-4, (lg, l32)
    assert grads and all(torch.isfinite(v).all() for v in grads.values())
    report = fxfuse.report(opt)
    assert report.columns()["fp16_guard"]["fp32 linear outputs"] == 4, report.table()


def test_sandwich_norm_branch_reads_the_norms_fp32_result():
    """Gemma 2: each branch ends in a norm computed in fp32 and cast back (`type_as`): the guard drops
    that rounding (and widens the LoRA site before the norm); results stay within fp16 rounding."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from tiny import SIZES, TARGETS, with_lora
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("gemma2", **SIZES, head_dim=16)
    model = with_lora(AutoModelForCausalLM.from_config(cfg).to(torch.float16), r=8, lora_alpha=16,
                      target_modules=TARGETS)
    ((l16, g16), (l32, g32), (lg, g)), opt = eager16_eager32_optimized(model, tokens(2, 12), compiler="aot_eager",
                                                                       verbose=False, passes=PASSES)
    assert rel(lg, l32) < 1e-4 and rel(lg, l16) < 1e-4
    assert max(rel(g[k], g32[k]) for k in g32) <= 1.2 * max(rel(g16[k], g32[k]) for k in g32)
    report = fxfuse.report(opt)
    assert report.columns()["fp16_guard"]["fp16 roundings dropped"] == 4, report.table()
    assert all("1 fp16 rounding dropped" in s.reason for s in report.sites("fp16_guard"))


def _guarded(block, *inputs):
    """(block's output with the guard run on its graph, the graph, the pass's stats)."""
    graphs, stats = [], PassStats("fp16_guard", "")

    def backend(gm, example_inputs):
        Fp16GuardPass().run(gm, stats)
        gm.recompile()
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    out = torch.compile(block, backend=backend)(*inputs)
    return out, graphs[0], stats


def test_an_in_place_expert_accumulation_is_left_fp16_and_the_note_says_where():
    """Experts that accumulate with index_add_ into an fp16 buffer (transformers' eager experts): the
    buffer is written in place, so the walk stops there; the stream is still guarded."""
    class Block(Fp16LinearBlock):
        def forward(self, x, idx):
            y = self.lin(x.to(torch.float32).to(torch.float16))  # a "norm", then the expert
            return x + torch.zeros_like(x).index_add_(0, idx, y)

    _, gm, stats = _guarded(Block(), torch.randn(4, 8, dtype=torch.float16), torch.tensor([1, 0, 3, 2]))
    assert stats.candidates == stats.rewritten == 1
    note = stats.sites[0].reason
    assert "branch left in fp16 at" in note and "in-place index_add_" in note, note
    assert "linear32" not in gm.code  # nothing past the buffer was widened


def test_an_op_the_walk_does_not_know_is_reported_and_the_rest_is_widened():
    """A branch `tanh(a) + lin(h)`: the linear is widened, tanh's fp16 output stays (the note names it)."""
    class Block(Fp16LinearBlock):
        def forward(self, x):
            h = x.to(torch.float32).to(torch.float16)
            return x + (torch.tanh(h) + self.lin(h))

    x = torch.randn(4, 8, dtype=torch.float16)
    block = Block()
    out, gm, stats = _guarded(block, x)
    note = stats.sites[0].reason
    assert "1 linear output" in note and "branch left in fp16 at" in note and "tanh" in note, note
    assert stats.columns["fp32 linear outputs"] == 1 and "linear32" in gm.code
    assert out.dtype == torch.float16  # a graph's outputs keep their dtype
    ref = x.double() + torch.tanh(x.double()) + torch.nn.functional.linear(x.double(), block.lin.weight.double(),
                                                                           block.lin.bias.double())
    assert rel(out, ref) < 1e-3


def test_an_in_place_bias_add_on_a_widened_output_runs_in_fp32():
    """gpt-oss adds its experts' biases in place (`out.add_(bias)`) on the grouped matmul's output: the
    output is widened all the same, and the in-place add writes into the fp32 tensor."""
    class Block(Fp16LinearBlock):
        def forward(self, x):
            y = torch.nn.functional.linear(x.to(torch.float32).to(torch.float16), self.lin.weight)
            y.add_(self.lin.bias)
            return (x + y).float()  # the stream, read in fp32

    block = Block()
    with torch.no_grad():
        block.lin.weight.fill_(100.0)  # each output 8 * 100 * 100 = 80000 > 65504
        block.lin.bias.fill_(1.0)
    x = torch.full((2, 8), 100.0, dtype=torch.float16)
    assert torch.isinf(block(x)).all()  # eager fp16
    out, gm, stats = _guarded(block, x)
    note = stats.sites[0].reason
    assert "1 linear output" in note and "left in fp16" not in note, note
    assert torch.equal(out, torch.full((2, 8), 80101.0))


def test_a_residual_add_split_from_its_norm_by_a_graph_break_is_reported():
    """After a graph break the add's graph holds two inputs and an add: no norm shows which is the
    stream. It stays fp16, and the report says so instead of leaving it out."""
    class Block(Fp16LinearBlock):
        def forward(self, x):
            y = self.lin(x.to(torch.float32).to(torch.float16))
            torch._dynamo.graph_break()
            return x + y

    _, _, stats = _guarded(Block(), torch.randn(2, 8, dtype=torch.float16))
    declined = [s for s in stats.sites if not s.rewritten]
    assert len(declined) == 1 and "graph break" in declined[0].reason, stats.sites
