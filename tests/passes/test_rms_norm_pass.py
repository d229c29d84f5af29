"""RMSNorm pass on dynamo graphs: op counts before/after (gc off and on), residual fusion, the
Qwen3 q/k norms, the Gemma form, and declines with their reasons."""
import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from fxfuse.passes.lora import LoraPass
from fxfuse.passes.manager import PassManager
from fxfuse.passes.pattern import count_ops, graphs_of
from fxfuse.passes.rms_norm import RmsNormPass
from tiny import SIZES, tiny_model, tokens

OP = "fxfuse.rms_norm.default"


def capture(model, passes=None, inputs=None):
    """Trace with dynamo, run LoRA + RMSNorm; (before, after, rms stats) summed over graphs."""
    seen = []

    def backend(gm, example_inputs):
        before = copy.deepcopy(gm)
        stats = PassManager(passes or [LoraPass(), RmsNormPass()]).run(gm)
        seen.append((before, gm, stats[-1]))
        return gm.forward

    inputs = inputs or {"input_ids": tokens(), "labels": tokens()}
    out = torch.compile(model, backend=backend)(**inputs, use_cache=False) if isinstance(inputs, dict) \
        else torch.compile(model, backend=backend)(*inputs)
    return seen


def fused(gm):
    return [n for _, g in graphs_of(gm) for n in g.graph.nodes if n.target is torch.ops.fxfuse.rms_norm.default]


def totals(seen):
    before, after = {}, {}
    for b, a, _ in seen:
        for d, c in ((before, count_ops(b)), (after, count_ops(a))):
            for k, v in c.items():
                d[k] = d.get(k, 0) + v
    return before, after, [s for _, _, st in seen for s in st.sites], [n for _, a, _ in seen for n in fused(a)]


@pytest.mark.parametrize("gc, dtype", [(False, torch.float32), (True, torch.bfloat16)])
def test_llama_every_norm_rewritten_residual_adds_fused(gc, dtype):
    before, after, sites, nodes = totals(capture(tiny_model(gc=gc, dtype=dtype)))
    # 2 layers x (input, post-attention) + the final norm
    assert len(sites) == 5 and all(s.rewritten for s in sites), [s.reason for s in sites]
    assert before["rsqrt"] == 5 and "rsqrt" not in after and "pow" not in after and "mean" not in after
    assert after[OP] == 5
    with_residual = [n for n in nodes if n.args[2] is not None]
    # gc on: a checkpointed layer's input arrives as a placeholder and the final norm reads the
    # checkpoint's output, so only the post-attention adds (one per layer) are fused; gc off:
    # every norm but the first (the embeddings) reads a residual add
    assert len(with_residual) == (2 if gc else 4)
    # 14 LoRA sums, the 5 eps adds, the fused residual adds
    assert before["add"] - after["add"] == 14 + 5 + len(with_residual)
    # Llama form: eps from the graph, no offset, normalized value rounded to the input dtype
    assert {(n.args[3], n.args[4], n.args[5], n.args[6]) for n in nodes} == {(1e-6, 0.0, dtype, dtype)}
    if gc:
        assert sum("wrap_body" in s.graph for s in sites) == 4
    assert any(s.module.endswith("layers.0.post_attention_layernorm") for s in sites), [s.module for s in sites]


def _auto(arch, **extra):
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(arch, **SIZES, head_dim=16, **extra)
    return AutoModelForCausalLM.from_config(cfg)


def test_qwen3_qk_norms_over_head_dim():
    _, _, sites, nodes = totals(capture(_auto("qwen3"), passes=[RmsNormPass()]))
    assert len(sites) == 9 and all(s.rewritten for s in sites), [s.reason for s in sites]
    four_d = [n for n in nodes if n.args[0].meta["example_value"].dim() == 4]
    assert len(four_d) == 4 and all(n.args[1].meta["example_value"].shape == (16,) for n in four_d)
    assert {s.module.rsplit(".", 1)[-1] for s in sites} >= {"q_norm", "k_norm"}


def test_gemma_form_offset_one_no_intermediate_rounding():
    _, after, sites, nodes = totals(capture(_auto("gemma2"), passes=[RmsNormPass()]))
    # 2 layers x (input, post-attention, pre-feedforward, post-feedforward) + final
    assert len(sites) == 9 and all(s.rewritten for s in sites), [s.reason for s in sites]
    assert all(n.args[4] == 1.0 and n.args[5] is None for n in nodes)
    assert "type_as" not in after and "rsqrt" not in after
    # the pre-feedforward norm reads residual + post-attention-norm output: the add is fused
    assert sum(n.args[2] is not None for n in nodes) >= 2


class Norm(torch.nn.Module):
    """An RMSNorm with knobs that break one precondition each."""

    def __init__(self, dim=0, keepdim=True, exponent=2, eps=1e-5, weight_shape=(32,)):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(weight_shape))
        self.dim, self.keepdim, self.exponent, self.eps = dim, keepdim, exponent, eps

    def forward(self, x, eps_tensor):
        eps = eps_tensor if self.eps is None else self.eps
        h = x.to(torch.float32)
        var = h.pow(self.exponent).mean(self.dim, keepdim=self.keepdim)
        return self.weight * (h * torch.rsqrt(var + eps)).to(x.dtype)


@pytest.mark.parametrize("knobs, reason", [
    (dict(dim=0), "reduction is not a keepdim mean over the last dim"),
    (dict(dim=-1, exponent=3), "not a mean of squares"),
    (dict(dim=-1, eps=None), "eps is not a literal"),
    (dict(dim=-1, weight_shape=(8, 32)), "is not 1-D of the normalized width"),
])
def test_declines_with_reasons(knobs, reason):
    seen = capture(Norm(**knobs), passes=[RmsNormPass()], inputs=(torch.randn(8, 32), torch.tensor(1e-5)))
    sites = [s for _, _, st in seen for s in st.sites]
    assert len(sites) == 1 and not sites[0].rewritten and reason in sites[0].reason, sites
    assert "rsqrt" in count_ops(seen[0][1])


def test_float64_input_declined():
    seen = capture(Norm(dim=-1).double(), passes=[RmsNormPass()], inputs=(torch.randn(4, 32, dtype=torch.float64),
                                                                            torch.tensor(1e-5)))
    (site,) = [s for _, _, st in seen for s in st.sites]
    assert not site.rewritten and "float64" in site.reason


def test_non_convex_site_declined():
    class Leaky(Norm):
        def forward(self, x, eps_tensor):
            h = x.to(torch.float32)
            normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
            return self.weight * normed.to(x.dtype), normed.sum()  # normed also used outside

    seen = capture(Leaky(dim=-1), passes=[RmsNormPass()], inputs=(torch.randn(4, 32), torch.tensor(1e-5)))
    (site,) = [s for _, _, st in seen for s in st.sites]
    assert not site.rewritten and "users" in site.reason, site.reason
