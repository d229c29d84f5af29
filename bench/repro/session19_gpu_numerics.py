"""Nineteenth session: on CUDA, do the LoRA gradients of Inductor-lowered PEFT linears (lora pass
declined: min_tokens) and of fxfuse's op agree with eager's? One step's gradients against an fp32
eager copy of the same model, then a 6-step AdamW loss trajectory, per variant. A 4-layer Llama
shape (hidden 1024), bf16 weights, fp32 adapters (PEFT's default), r=16, checkpointed, 1024 tokens.
    python bench/repro/session19_gpu_numerics.py eager compile fxfuse fxfuse-min fxfuse-graph
(fxfuse-graph, twentieth session: the op's math as graph ops, LoraPass(graph_ops_below).)"""
import copy, sys, warnings
import torch
warnings.filterwarnings("ignore")
import fxfuse
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

torch.manual_seed(0)
cfg = AutoConfig.for_model("llama", hidden_size=1024, intermediate_size=3584, num_hidden_layers=4, num_attention_heads=8,
                           num_key_value_heads=2, vocab_size=32000, max_position_embeddings=2048)
base = AutoModelForCausalLM.from_config(cfg).to("cuda", torch.bfloat16)
base = get_peft_model(base, LoraConfig(r=16, lora_alpha=16, target_modules="all-linear"))
for n, p in base.named_parameters():
    if "lora" in n:
        p.data = p.data.float()
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)  # non-zero B: every adapter gradient is non-trivial
base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
base.enable_input_require_grads()
ids = torch.randint(0, 32000, (1, 1024), generator=torch.Generator().manual_seed(1)).cuda()


def grads(m):
    m.zero_grad(set_to_none=True)
    m(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    return {n: p.grad.double().clone() for n, p in m.named_parameters() if p.grad is not None}


ref_model = copy.deepcopy(base).float()
ref = grads(ref_model)
del ref_model
for kind in sys.argv[1:]:
    torch._dynamo.reset()
    m = copy.deepcopy(base)
    if kind == "compile":
        m = torch.compile(m)
    elif kind == "fxfuse":
        m = fxfuse.optimize(m, verbose=False)
    elif kind == "fxfuse-min":
        m = fxfuse.optimize(m, verbose=False, pass_options={"lora": {"min_tokens": 10**6}})
    elif kind == "fxfuse-graph":
        m = fxfuse.optimize(m, verbose=False, pass_options={"lora": {"graph_ops_below": 10**6}})
    g = grads(m)
    errs = sorted(((g[n] - ref[n]).norm() / ref[n].norm()).item() for n in ref)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
    losses = []
    for _ in range(6):
        loss = m(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
    print(f"{kind}: grad rel err vs fp32 eager: median {errs[len(errs) // 2]:.3g} max {errs[-1]:.3g}; losses {losses}",
          flush=True)
