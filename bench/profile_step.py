"""Profile one LoRA training step on a few Llama-3.1-8B-shaped layers: where the GPU time goes.

    python bench/profile_step.py VARIANT SEQ [--layers 2]

VARIANT: compile | fxfuse-lora | fxfuse (every pass) | hf. Prints step time (median of 5) and the top CUDA kernels of two
profiled steps, so a slow op shows by name. Same workload as bench_lora.py, fewer layers so it
compiles in seconds.
"""
import argparse
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import fxfuse

ap = argparse.ArgumentParser()
ap.add_argument("variant")
ap.add_argument("seq", type=int)
ap.add_argument("--layers", type=int, default=2)
ap.add_argument("--rows", type=int, default=22)
a = ap.parse_args()

cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=a.layers, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, attn_implementation="sdpa")
torch.manual_seed(0)
with torch.device("cuda"):
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=[
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
model.enable_input_require_grads()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
if a.variant == "compile":
    fwd = torch.compile(model)
elif a.variant == "fxfuse-lora":
    fwd = fxfuse.optimize(model, passes=["lora"], verbose=False)
elif a.variant == "fxfuse":
    fwd = fxfuse.optimize(model, verbose=False)
elif a.variant == "hf":
    fwd = model
else:
    raise SystemExit(f"unknown variant {a.variant!r}")
x = torch.randint(0, cfg.vocab_size, (1, a.seq), device="cuda")


def step():
    out = fwd(input_ids=x, labels=x)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


t0 = time.perf_counter()
step()
torch.cuda.synchronize()
first = time.perf_counter() - t0
for _ in range(2):
    step()
times = []
for _ in range(5):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    times.append(time.perf_counter() - t0)
med = statistics.median(times)
print(f"PROFILE {a.variant} seq={a.seq} layers={a.layers} step_ms={med * 1e3:.1f} first_s={first:.1f} "
      f"tok_s={a.seq / med:.0f}", flush=True)
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
    for _ in range(2):
        step()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=a.rows, max_name_column_width=70))
if a.variant.startswith("fxfuse"):
    print(fxfuse.report(model).table())
