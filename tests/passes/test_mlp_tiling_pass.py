"""The MLP tiling pass: op counts before/after (checkpointing off and on), loss and every LoRA
gradient equal to eager, declines with reasons (size threshold, LoRA dropout, exact gelu), and the
size test as a guard under dynamic shapes (a length across the threshold recompiles)."""
import pytest
import torch

import fxfuse
from fxfuse.frontends import hf
from fxfuse.passes.lora import LoraPass
from fxfuse.passes.manager import PassManager
from fxfuse.passes.mlp_tiling import MlpTilingPass
from fxfuse.passes.pattern import count_ops
from tiny import FUSED_OP, clone, loss_and_grads, rel, tiny_model, tokens

# the fused LoRA op at any length (these tiny inputs are below LoraPass's default graph_ops_below,
# where gate and up become graph ops and the pass declines: tested below)
OP = FUSED_OP
TILE_ALL = {**OP, "mlp_tiling": {"min_mib": 0, "rows_per_chunk": 7}}


LORA, TILED = str(torch.ops.fxfuse.lora_linear.default), str(torch.ops.fxfuse.tiled_mlp.default)


def ops(cap, name):
    return sum(count_ops(gm).get(name, 0) for gm in cap.after)  # count_ops walks the subgraphs


@pytest.mark.parametrize("gc", [False, True])
def test_op_counts(gc, monkeypatch):
    from fxfuse.frontends import optimize as O
    monkeypatch.setitem(O.PASSES, "mlp_tiling", lambda: MlpTilingPass(min_mib=0, rows_per_chunk=5))
    before = hf.capture_graphs(hf.build_model(hf.load_config("llama-tiny"), peft={"r": 8}), gradient_checkpointing=gc,
                               passes=["lora"], pass_options=OP)
    after = hf.capture_graphs(hf.build_model(hf.load_config("llama-tiny"), peft={"r": 8}), gradient_checkpointing=gc,
                              passes=["lora", "mlp_tiling"], pass_options=OP)
    layers = hf.load_config("llama-tiny").num_hidden_layers
    assert ops(before, LORA) == 4 * layers and ops(before, "silu") == layers
    assert ops(after, TILED) == layers
    assert ops(after, LORA) == 2 * layers  # q/k/v and o remain
    assert ops(after, "silu") == 0
    s = after.report.summary()["mlp_tiling"]
    assert s["candidates"] == s["rewritten"] == layers


@pytest.mark.parametrize("arch, gc", [("llama", True), ("llama", False), ("qwen2", True)])
def test_equal_to_eager(arch, gc):
    ref = tiny_model(arch, gc=gc)
    opt = fxfuse.optimize(clone(ref), compiler="aot_eager", verbose=False, pass_options=TILE_ALL)
    ids = tokens(2, 16)
    l_ref, g_ref = loss_and_grads(ref, input_ids=ids, labels=ids)
    l_opt, g_opt = loss_and_grads(opt, input_ids=ids, labels=ids)
    assert rel(l_opt, l_ref) < 1e-5
    assert g_ref.keys() == g_opt.keys() and len(g_ref) == 28
    for name in g_ref:
        assert rel(g_opt[name], g_ref[name]) < 1e-5, name
    s = fxfuse.report(opt).summary()["mlp_tiling"]
    assert s["rewritten"] == 2 and not s["declined"]
    assert fxfuse.report(opt).runtime_fallbacks == 0


def test_declines_below_the_size_threshold_and_with_lora_dropout():
    ids = tokens(2, 16)
    for options, why in ((OP, "below min_mib=4096"), (None, "gate and up run as graph ops")):  # default: 4 GiB
        opt = fxfuse.optimize(tiny_model(), compiler="aot_eager", verbose=False, pass_options=options)
        loss_and_grads(opt, input_ids=ids, labels=ids)
        s = fxfuse.report(opt).summary()["mlp_tiling"]
        assert s["rewritten"] == 0 and s["declined"] and all(why in r for r in s["declined"]), s
        # by design at this size: `fxfuse demo` counts only other declines as failures
        assert all(site.check == "size" for site in fxfuse.report(opt).sites("mlp_tiling"))

    ref = tiny_model(lora_dropout=0.1)
    opt = fxfuse.optimize(clone(ref), compiler="aot_eager", verbose=False, pass_options=TILE_ALL)
    loss_and_grads(opt, input_ids=ids, labels=ids)
    s = fxfuse.report(opt).summary()["mlp_tiling"]
    assert s["rewritten"] == 0 and any("LoRA dropout" in r for r in s["declined"])


def test_size_test_is_a_guard_under_dynamic_shapes():
    # [tokens, 96] fp32 = 384 bytes a token: tile from 32 tokens (12 KiB) up
    ref = tiny_model()
    opt = fxfuse.optimize(clone(ref), compiler="aot_eager", verbose=False,
                          pass_options={"mlp_tiling": {"min_mib": 32 * 384 / 2**20, "rows_per_chunk": 5}})
    rep = fxfuse.report(opt)
    seen = []
    for seq in (8, 16, 24, 9):  # 16, 32, 48, 18 tokens: static, dynamic (tiled), reused, recompiled
        graphs = len(rep.graphs)
        ids = tokens(2, seq)
        ref.zero_grad()
        opt.zero_grad()
        l_ref, g_ref = loss_and_grads(ref, input_ids=ids, labels=ids)
        l_opt, g_opt = loss_and_grads(opt, input_ids=ids, labels=ids)
        assert rel(l_opt, l_ref) < 1e-5 and all(rel(g_opt[n], g_ref[n]) < 1e-5 for n in g_ref)
        new = rep.sites("mlp_tiling")[sum(len(s) for s in seen):]
        seen.append(new)
        assert (len(rep.graphs) > graphs) == (seq != 24), seq
    assert [sorted({s.rewritten for s in sites}) for sites in seen] == [[False], [True], [], [False]]


def test_bad_pass_options_are_errors():
    with pytest.raises(ValueError, match="bad options"):
        fxfuse.optimize(tiny_model(), compiler="aot_eager", verbose=False, pass_options={"mlp_tiling": {"bogus": 1}})
    with pytest.raises(ValueError, match="do not run"):
        fxfuse.optimize(tiny_model(), compiler="aot_eager", verbose=False, passes=["lora"],
                        pass_options={"mlp_tiling": {}})
    with pytest.raises(ValueError):
        MlpTilingPass(min_mib=-1)


def test_up_traced_before_gate_still_activates_gate():
    """The LoRA group is [up, gate] when up_proj runs first: the op must still activate gate."""
    from peft import LoraConfig, get_peft_model

    class UpFirst(torch.nn.Module):
        def __init__(self, h=16, i=24):
            super().__init__()
            self.gate_proj = torch.nn.Linear(h, i, bias=False)
            self.up_proj = torch.nn.Linear(h, i, bias=False)
            self.down_proj = torch.nn.Linear(i, h, bias=False)

        def forward(self, x):
            u = self.up_proj(x)
            g = self.gate_proj(x)
            return self.down_proj(torch.nn.functional.silu(g) * u)

    torch.manual_seed(0)
    ref = get_peft_model(UpFirst(), LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"]))
    for name, p in ref.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    opt = fxfuse.optimize(clone(ref), compiler="aot_eager", verbose=False, passes=["lora", "mlp_tiling"],
                          pass_options={**OP, "mlp_tiling": {"min_mib": 0, "rows_per_chunk": 3}})
    x = torch.randn(2, 5, 16)
    y_ref, y_opt = ref(x), opt(x)
    assert fxfuse.report(opt).summary()["mlp_tiling"]["rewritten"] == 1
    assert rel(y_opt.detach(), y_ref.detach()) < 1e-5
    y_ref.square().sum().backward()
    y_opt.square().sum().backward()
    g_ref = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    g_opt = {n: p.grad for n, p in opt.named_parameters() if p.grad is not None}
    assert g_ref.keys() == g_opt.keys() and all(rel(g_opt[n], g_ref[n]) < 1e-5 for n in g_ref)


def test_declines_gate_and_up_emitted_as_graph_ops():
    """LoraPass(graph_ops_below) leaves no fxfuse::lora_linear for the tiled MLP: each MLP is a
    candidate declined with that reason, not missing from the report."""
    seen = []

    def backend(gm, ex):
        seen.append(PassManager([LoraPass(graph_ops_below=10**6), MlpTilingPass(min_mib=0)]).run(gm)[1])
        return gm.forward

    torch.compile(tiny_model(), backend=backend)(input_ids=tokens(), use_cache=False)
    sites = [s for st in seen for s in st.sites]
    assert len(sites) == 2 and not any(s.rewritten for s in sites)
    assert {s.reason for s in sites} == {"gate and up run as graph ops (LoraPass graph_ops_below): the tiled MLP "
                                        "is built from fxfuse::lora_linear groups"}
