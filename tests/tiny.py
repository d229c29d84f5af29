"""Tiny random HF models with PEFT LoRA, and helpers to compare fxfuse with eager."""
from __future__ import annotations

import copy

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

# pass_options that keep the fused LoRA op at any length: these tiny inputs are below LoraPass's
# default graph_ops_below, where the sites become graph ops instead
FUSED_OP = {"lora": {"graph_ops_below": 0}}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SIZES = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, max_position_embeddings=128)


def tiny_model(arch="llama", dtype=torch.float32, gc=False, seed=0, lora=True, sizes=None, **lora_kwargs):
    torch.manual_seed(seed)
    dims = {**SIZES, **(sizes or {})}
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**dims))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**dims))
    else:
        raise ValueError(arch)
    model = model.to(dtype)
    if lora:
        kw = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS)
        kw.update(lora_kwargs)
        model = with_lora(model, **kw)
    return checkpointed(model) if gc else model


def with_lora(model, b_std=0.05, **lora_kwargs):
    """PEFT LoRA with random B: PEFT starts lora_B at zero, random B makes every LoRA gradient non-trivial."""
    model = get_peft_model(model, LoraConfig(**lora_kwargs))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=b_std)
    return model


def checkpointed(model):
    """Gradient checkpointing as the benchmarks and trainers turn it on (non-reentrant)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    return model


def _scaled(m: torch.nn.Module, factors: dict) -> torch.nn.Module:
    """`m` with the weights whose names end in a key of `factors` scaled by it."""
    with torch.no_grad():
        for n, p in m.named_parameters():
            for suffix, factor in factors.items():
                if n.endswith(suffix):
                    p.mul_(factor)
    return m


def _fp16_llama_scaled(gc: bool, factors: dict, targets=TARGETS) -> torch.nn.Module:
    """A tiny fp16 Llama with the base weights whose names end in a key of `factors` scaled by it."""
    return _scaled(tiny_model("llama", dtype=torch.float16, gc=gc, target_modules=targets), factors)


def overflowing_fp16_llama(gc=False):
    """A tiny fp16 Llama whose residual stream passes 65504 in layer 1 (eager: inf, then NaN)."""
    m = _fp16_llama_scaled(gc, {"o_proj.base_layer.weight": 3e5, "down_proj.base_layer.weight": 3e5})
    with torch.no_grad():
        emb = m.get_input_embeddings().weight
        emb.normal_(0, 1).mul_(2e4).clamp_(-6e4, 6e4)
    return m


def large_mlp_fp16_llama(gc=False, targets=TARGETS):
    """A tiny fp16 Llama whose MLP outputs alone pass 65504 (eager: inf in the down projection)."""
    mlp = ("gate_proj", "up_proj", "down_proj")
    # a LoRA site's base weight is `<name>.base_layer.weight`, a plain linear's `<name>.weight`
    names = {m: f"{m}.base_layer.weight" if m in targets else f"{m}.weight" for m in mlp}
    return _fp16_llama_scaled(gc, {names["gate_proj"]: 30, names["up_proj"]: 30, names["down_proj"]: 2e4}, targets)


MOE_SIZES = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48),
    # experts as one bmm, a shared expert the routed sum is added into in place
    "llama4_text": dict(head_dim=16, attention_chunk_size=4, num_local_experts=2, num_experts_per_tok=1,
                        intermediate_size_mlp=96, interleave_moe_layer_step=1, no_rope_layers=[1, 0],
                        bos_token_id=1, eos_token_id=2, pad_token_id=0),
    # expert biases added in place to the grouped matmul's output; attention sinks
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16, sliding_window=8,
                    layer_types=["sliding_attention", "full_attention"]),
}
MOE_SCALES = {"mixtral": (5e5, 5), "qwen2_moe": (5e5, 10), "llama4_text": (5e5, 10), "gpt_oss": (2e5, 5)}


def large_moe_fp16(arch, gc=False):
    """A tiny fp16 MoE (transformers' grouped experts; LoRA on every linear) whose experts' down
    projections pass 65504 (fp32: expert sums past 1e5 in layer 1; eager fp16: inf, then NaN)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **SIZES, **MOE_SIZES[arch]))
    down, gate_up = MOE_SCALES[arch]
    model = _scaled(model.to(torch.float16), {"experts.down_proj": down, "experts.gate_up_proj": gate_up})
    model = with_lora(model, r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS)
    return checkpointed(model) if gc else model


class Fp16LinearBlock(torch.nn.Module):
    """One fp16 `Linear(8, 8)` as `self.lin`: small graph-level tests subclass it with a forward."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8, dtype=torch.float16)


def clone(model):
    return copy.deepcopy(model)


def tokens(batch=2, seq=16, vocab=128, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def loss_and_grads(model, **inputs):
    """This call's loss and gradients: earlier calls' gradients are dropped first, not accumulated."""
    model.zero_grad(set_to_none=True)
    out = model(**inputs, use_cache=False)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads


def eager16_eager32_optimized(model, ids, **optimize_kwargs):
    """(loss, grads) of an eager fp16 copy, an eager fp32 copy and fxfuse.optimize(model), on `ids`,
    and the optimized model."""
    import fxfuse
    eager16, eager32 = copy.deepcopy(model), copy.deepcopy(model).float()
    opt = fxfuse.optimize(model, **optimize_kwargs)
    return [loss_and_grads(m, input_ids=ids, labels=ids) for m in (eager16, eager32, opt)], opt


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def delayed(side_stream):
    """A stand-in for fxfuse's offload `side_stream(device)` that queues ~1 ms of GPU sleep on the
    stream before whatever is issued next: every copy lands late, so a reader that does not wait for
    its reload reads memory not yet written (the GPU offload test and its repro use it)."""
    def late(device):
        stream = side_stream(device)
        with torch.cuda.stream(stream):
            torch.cuda._sleep(2_000_000)
        return stream
    return late
