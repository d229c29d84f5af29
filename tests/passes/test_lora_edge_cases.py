"""Edge cases a reviewer found: each must be declined or handled, never wrong, never a crash."""
import torch
import torch.nn.functional as F

from fxfuse.passes.lora import LoraPass
from fxfuse.passes.manager import PassManager

LORA_OP = "fxfuse.lora_linear.default"


class Site(torch.nn.Module):
    def __init__(self, k=16, n=24, r=4):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(n, k), requires_grad=False)
        self.a = torch.nn.Parameter(torch.randn(r, k) * 0.1)
        self.b = torch.nn.Parameter(torch.randn(n, r) * 0.1)


def run(model, x, **autocast):
    seen = []

    def backend(gm, ex):
        seen.append(PassManager([LoraPass(graph_ops_below=0)]).run(gm)[0])  # the fused op at any length
        return gm.forward

    compiled = torch.compile(model, backend=backend)
    torch.manual_seed(0)
    out = compiled(x)
    return out, seen[0]


class InplaceDropout(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k = Site(), Site()

    def forward(self, x):
        outs = []
        for s in (self.q, self.k):
            base = F.linear(x, s.w)
            outs.append(base + F.linear(F.linear(F.dropout(x, 0.5, True, True), s.a), s.b) * 2.0)
        return outs[0].sum() + outs[1].sum()


def test_inplace_dropout_is_declined():
    _, stats = run(InplaceDropout(), torch.randn(3, 16))
    assert stats.rewritten == 0 and stats.candidates == 2
    assert all("in-place dropout" in s.reason for s in stats.declined)


class EvalDropoutTorchSpelling(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.s = Site()

    def forward(self, x):
        s = self.s
        low = F.linear(input=F.linear(input=torch.dropout(x, 0.3, train=False), weight=s.a), weight=s.b)
        return F.linear(x, s.w) + low * 0.5


def test_torch_dropout_train_keyword_and_keyword_linears():
    model = EvalDropoutTorchSpelling()
    x = torch.randn(3, 5, 16)
    out, stats = run(model, x)
    assert stats.rewritten == 1
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)  # eval dropout: no mask applied


class AutocastInside(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.s = Site()

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            s = self.s
            y = F.linear(x, s.w) + F.linear(F.linear(x, s.a), s.b) * 2.0
        return y.float().sum()


def test_autocast_entered_inside_the_compiled_region():
    model = AutocastInside()
    x = torch.randn(4, 16)
    out, stats = run(model, x)
    assert stats.rewritten == 1
    out.backward()
    ga = model.s.a.grad.clone()
    model.zero_grad()
    ref = model(x)
    ref.backward()
    assert abs(out.item() - ref.item()) <= 2e-2 * abs(ref.item())
    assert ((ga - model.s.a.grad).norm() / model.s.a.grad.norm()).item() < 5e-2


class LateWeight(torch.nn.Module):
    """k's weight is computed after q's output is used: one grouped op cannot sit anywhere valid."""

    def __init__(self):
        super().__init__()
        self.q, self.k = Site(), Site()

    def forward(self, x):
        q = F.linear(x, self.q.w) + F.linear(F.linear(x, self.q.a), self.q.b) * 2.0
        scale = q.detach().relu().mean()
        w = self.k.w * scale
        k = F.linear(x, w) + F.linear(F.linear(x, self.k.a), self.k.b) * 2.0
        return q.sum() + k.sum()


def test_group_that_cannot_be_placed_is_split():
    model = LateWeight()
    x = torch.randn(3, 16)
    out, stats = run(model, x)
    assert stats.rewritten == 2
    torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-4)


def test_device_move_is_not_a_cast():
    class Move(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.s = Site()

        def forward(self, x):
            s = self.s
            low = F.linear(F.linear(x.to(device="cpu", dtype=torch.float32), s.a), s.b)
            return F.linear(x, s.w) + low * 2.0

    _, stats = run(Move(), torch.randn(3, 16))
    # dynamo may fold the no-op move away; if it stays, the site must be declined, not rewritten
    assert stats.candidates == 1
    assert stats.rewritten == 1 or stats.declined[0].reason


def test_in_place_op_on_a_graph_op_output_equals_eager():
    """Llama 4's MoE adds the routed experts into its shared expert's output in place
    (`out.add_(routed)`); with the site as graph ops (the default at these sizes) that output used to
    be a custom Function's view, and autograd refused the in-place add while AOTAutograd traced."""
    import copy

    from peft import LoraConfig, get_peft_model

    import fxfuse
    from tiny import rel

    class Inplace(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(32, 32, bias=False)
            self.c = torch.nn.Linear(32, 32, bias=False)

        def forward(self, x):
            out = self.a(x)
            out.add_(self.c(x).sum(0, keepdim=True))
            return out.square().mean()

    torch.manual_seed(0)
    model = get_peft_model(Inplace(), LoraConfig(r=4, lora_alpha=8, target_modules=["a"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    ref = copy.deepcopy(model)
    opt = fxfuse.optimize(model, compiler="aot_eager", verbose=False)
    x = torch.randn(2, 8, 32)
    l_ref, l_opt = ref(x), opt(x)
    l_ref.backward()
    l_opt.backward()
    assert rel(l_opt, l_ref) < 1e-5
    report = fxfuse.report(opt)
    assert report.summary()["lora"]["rewritten"] == 1 and not report.errors, report.table()
    for (n, p), (_, q) in zip(ref.named_parameters(), opt.named_parameters()):
        if p.requires_grad:
            assert rel(q.grad, p.grad) < 1e-4, n


def test_lora_linear_feeding_another_lora_linear():
    """gemma3n's laurel block is `b(a(x))` with both linears LoRA-targeted: the second site reads the
    first one's output, which the first rewrite replaces. Both must be rewritten, equal to eager, with
    no pass error, as the fused op and as graph ops."""
    import copy

    from peft import LoraConfig, get_peft_model

    import fxfuse
    from tiny import rel

    class Chain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(32, 16, bias=False)
            self.b = torch.nn.Linear(16, 32, bias=True)

        def forward(self, x):
            return (self.b(self.a(x)) + x).square().mean()

    for below in (0, 2048):
        torch.manual_seed(0)
        model = get_peft_model(Chain(), LoraConfig(r=4, lora_alpha=8, target_modules=["a", "b"]))
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.05)
        ref = copy.deepcopy(model)
        opt = fxfuse.optimize(model, compiler="aot_eager", verbose=False,
                              pass_options={"lora": {"graph_ops_below": below}})
        x = torch.randn(2, 8, 32)
        l_ref, l_opt = ref(x), opt(x)
        l_ref.backward()
        l_opt.backward()
        report = fxfuse.report(opt)
        assert not report.errors, report.errors
        assert report.summary()["lora"]["rewritten"] == 2, report.table()
        assert rel(l_opt, l_ref) < 1e-5
        for (n, p), (_, q) in zip(ref.named_parameters(), opt.named_parameters()):
            if p.requires_grad:
                assert rel(q.grad, p.grad) < 1e-4, (below, n)


def _declines_equal_eager(model, make_inputs):
    import copy

    import fxfuse
    from tiny import rel

    ref = copy.deepcopy(model)
    opt = fxfuse.optimize(model, compiler="aot_eager", verbose=False)
    inputs = make_inputs()
    l_ref, l_opt = ref(**inputs).loss, opt(**inputs).loss
    l_ref.backward()
    l_opt.backward()
    assert rel(l_opt, l_ref) < 1e-5
    for (n, p), (_, q) in zip(ref.named_parameters(), opt.named_parameters()):
        if p.requires_grad:
            assert rel(q.grad, p.grad) < 1e-4, n
    report = fxfuse.report(opt)
    assert not report.errors and report.runtime_fallbacks == 0
    return report.summary()["lora"]


def test_conv1d_base_is_declined_with_a_reason_that_names_it():
    """GPT-2's Conv1D (PEFT fan_in_fan_out=True) is addmm + view, not a linear: declined, named."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from tiny import tokens, with_lora

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = with_lora(GPT2LMHeadModel(cfg), r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    ids = tokens(2, 8)
    s = _declines_equal_eager(model, lambda: dict(input_ids=ids, labels=ids))
    assert s["candidates"] >= 2 and s["rewritten"] == 0
    assert all("Conv1D" in why for why in s["declined"]), s


def test_second_active_adapter_is_declined_with_a_reason_that_names_it():
    """Two adapters active on q/v: the first is fused with the base linear, the second's term (added
    to the first's sum) is declined with a reason that says so."""
    from peft import LoraConfig

    from tiny import tiny_model, tokens

    model = tiny_model("llama", target_modules=["q_proj", "v_proj"])
    model.add_adapter("second", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    model.base_model.set_adapter(["default", "second"])
    for n, p in model.named_parameters():
        if "lora_B.second" in n:
            torch.nn.init.normal_(p, std=0.05)
    ids = tokens(2, 8)
    s = _declines_equal_eager(model, lambda: dict(input_ids=ids, labels=ids))
    assert s["rewritten"] == 4 and s["candidates"] == 8, s  # 2 layers x q, v x 2 adapters
    assert all("more than one adapter is active" in why for why in s["declined"]), s
