"""SwiGLU pass: silu(gate) * up after the LoRA pass (gate/up are getitems of one grouped LoRA op),
Gemma's tanh-gelu, and declines with reasons."""
import pytest
import torch

from fxfuse.passes.lora import LoraPass
from fxfuse.passes.pattern import count_ops, graphs_of
from fxfuse.passes.swiglu import SwigluPass
from test_rms_norm_pass import _auto, capture, totals
from tiny import tiny_model

OP = "fxfuse.swiglu.default"


@pytest.mark.parametrize("gc", [False, True])
def test_llama_swiglu_reads_grouped_lora_outputs(gc):
    seen = capture(tiny_model(gc=gc), passes=[LoraPass(graph_ops_below=0), SwigluPass()])  # the fused op's groups
    before, after, sites, _ = totals(seen)
    assert len(sites) == 2 and all(s.rewritten for s in sites), [s.reason for s in sites]
    assert before["silu"] == 2 and "silu" not in after and after[OP] == 2
    swiglus = [n for _, a, _ in seen for _, g in graphs_of(a) for n in g.graph.nodes if n.target is torch.ops.fxfuse.swiglu.default]
    assert len(swiglus) == 2
    for n in swiglus:
        gate, up = n.args[:2]
        assert gate.args[0] is up.args[0] and gate.args[0].target is torch.ops.fxfuse.lora_linear.default
        assert (gate.args[1], up.args[1], n.args[2]) == (0, 1, "silu")
    assert all(s.module.endswith("mlp") for s in sites), [s.module for s in sites]


def test_gemma_tanh_gelu():
    _, after, sites, _ = totals(capture(_auto("gemma2"), passes=[SwigluPass()]))
    assert len(sites) == 2 and all(s.rewritten for s in sites) and after[OP] == 2
    assert "gelu" not in after


class Mlp(torch.nn.Module):
    def __init__(self, act):
        super().__init__()
        self.act = act

    def forward(self, gate, up):
        a = self.act(gate)
        return a * up


@pytest.mark.parametrize("act, up_shape, dtype, reason", [
    (lambda g: torch.nn.functional.gelu(g), (4, 32), torch.float32, "approximate='none'"),
    (torch.nn.functional.silu, (1, 32), torch.float32, "broadcasting"),
    (torch.nn.functional.silu, (4, 32), torch.float64, "float64"),
])
def test_declines_with_reasons(act, up_shape, dtype, reason):
    seen = capture(Mlp(act), passes=[SwigluPass()], inputs=(torch.randn(4, 32, dtype=dtype),
                                                           torch.randn(up_shape, dtype=dtype)))
    sites = [s for _, _, st in seen for s in st.sites]
    assert len(sites) == 1 and not sites[0].rewritten and reason in sites[0].reason, sites
    assert OP not in count_ops(seen[0][1])


def test_activation_used_elsewhere_is_declined():
    class Leaky(torch.nn.Module):
        def forward(self, gate, up):
            a = torch.nn.functional.silu(gate)
            return a * up, a.sum()

    seen = capture(Leaky(), passes=[SwigluPass()], inputs=(torch.randn(4, 32), torch.randn(4, 32)))
    (site,) = [s for _, _, st in seen for s in st.sites]
    assert not site.rewritten and "users" in site.reason
