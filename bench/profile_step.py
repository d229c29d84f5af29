"""Profile one LoRA training step on a few Llama-3.1-8B-shaped layers: where the GPU time goes.

    python bench/profile_step.py VARIANT SEQ [--layers 2]

VARIANT: compile | fxfuse-lora | fxfuse (default passes) | hf. Prints step time (median of 5), the top CUDA kernels
of two profiled steps (so a slow op shows by name) and a breakdown by kernel family per step: GPU
busy time, idle time (host gaps) and launches. Same workload as bench_lora.py, fewer layers so it
compiles in seconds. --passes / --offload on|off pick fxfuse's passes and activation offload.
"""
import argparse
import os
import statistics
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import fxfuse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # gap_report

ap = argparse.ArgumentParser()
ap.add_argument("variant")
ap.add_argument("seq", type=int)
ap.add_argument("--layers", type=int, default=2)
ap.add_argument("--rows", type=int, default=22)
ap.add_argument("--passes", default=None, help="fxfuse variant: comma-separated passes (default: the variant's)")
ap.add_argument("--offload", choices=["on", "off"], default="on", help="fxfuse variant: activation offload")
ap.add_argument("--gaps", action="store_true", help="idle gaps of the compute stream: where it waits, and on what")
ap.add_argument("--gaps-only", action="store_true", help="with --gaps: skip the kernel table and breakdown (two "
                "profiled steps fewer: at 32 layers x 128k a step is ~40 s)")
ap.add_argument("--warm", type=int, default=2, help="steps after the first, before the timed ones")
ap.add_argument("--timed", type=int, default=5, help="timed steps (the median is printed)")
ap.add_argument("--host-fraction", type=float, default=None, help="fxfuse variant: the offload's host_fraction")
ap.add_argument("--gpu-gib", type=float, default=None, help="cap the allocator at this many GiB (as bench_lora.py)")
ap.add_argument("--no-hf-breaks", action="store_true",
                help="pass use_cache=False (HF's checkpointing sets it anyway, with a logger warning dynamo "
                     "cannot trace: a graph break) and skip enable_input_require_grads (not needed with "
                     "use_reentrant=False). Measured 2026-12-02: the logger break goes, requires_grad_() "
                     "breaks remain: transformers' gradient_checkpointing_enable installs that hook itself")
a = ap.parse_args()
if a.gaps_only and not a.gaps:
    ap.error("--gaps-only skips the kernel table in favour of --gaps: give --gaps too")
if a.timed < 1:
    ap.error("--timed needs at least one step (the median is printed)")

if a.gpu_gib:
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, a.gpu_gib * 2**30 / total))
cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=a.layers, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, attn_implementation="sdpa")
torch.manual_seed(0)
with torch.device("cuda"):
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=[
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
if not a.no_hf_breaks:
    model.enable_input_require_grads()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
if a.variant == "compile":
    fwd = torch.compile(model)
elif a.variant == "fxfuse-lora":
    fwd = fxfuse.optimize(model, passes=["lora"], verbose=False)
elif a.variant == "fxfuse":
    offload = a.offload == "on"
    if offload and a.host_fraction is not None:
        from fxfuse.passes.activation_offload import ActivationOffload
        offload = ActivationOffload(host_fraction=a.host_fraction)
    fwd = fxfuse.optimize(model, verbose=False, passes=a.passes.split(",") if a.passes else None,
                          offload_activations=offload)
elif a.variant == "hf":
    fwd = model
else:
    raise SystemExit(f"unknown variant {a.variant!r}")
x = torch.randint(0, cfg.vocab_size, (1, a.seq), device="cuda")


def step():
    # a marker kernel on the compute stream before each phase (forward, backward, optimizer):
    # gap_report splits the stream's busy and idle time by phase at them
    torch.cuda._sleep(1)
    out = fwd(input_ids=x, labels=x, **({"use_cache": False} if a.no_hf_breaks else {}))
    torch.cuda._sleep(1)
    out.loss.backward()
    torch.cuda._sleep(1)
    opt.step()
    opt.zero_grad(set_to_none=True)


t0 = time.perf_counter()
step()
torch.cuda.synchronize()
first = time.perf_counter() - t0
for _ in range(a.warm):
    step()
times = []
for _ in range(a.timed):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    times.append(time.perf_counter() - t0)
med = statistics.median(times)
label = a.variant + (" no-hf-breaks" if a.no_hf_breaks else "")
print(f"PROFILE {label} seq={a.seq} layers={a.layers} step_ms={med * 1e3:.1f} first_s={first:.1f} "
      f"tok_s={a.seq / med:.0f}", flush=True)
if not a.gaps_only:
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=a.rows, max_name_column_width=70))

    # Kernel families, first match wins: where a layer's GPU time goes, and how much of the step the GPU waits.
    # Inductor's kernels (triton_poi_/triton_red_/...) come first: their names carry the ops they fuse
    # ("triton_poi_fused_lora_linear_backward_mul_silu_..."), which would match fxfuse's LoRA family.
    FAMILIES = [("inductor fused", ("triton_",)),
                ("memcpy/offload", ("memcpy", "Memcpy", "copy_kernel", "CatArrayBatched")),
                ("flash attention", ("flash", "fmha", "attention")),
                ("fxfuse lora triton", ("_skinny", "_lowrank", "_lora", "_weight_grad")),
                ("fxfuse ce triton", ("_ce_", "cross_entropy", "_logsumexp")),
                ("gemm (cuBLAS)", ("gemm", "nvjet", "cutlass", "sm90_xmma", "sm80_xmma", "Kernel2")),
                ("adamw/foreach", ("foreach", "multi_tensor", "adam")),
                ("other", ("",))]
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    fam_us, fam_n = {}, {}
    for e in kernels:
        fam = next(f for f, keys in FAMILIES if any(k in e.name for k in keys))
        fam_us[fam] = fam_us.get(fam, 0.0) + e.device_time
        fam_n[fam] = fam_n.get(fam, 0) + 1
    busy = sum(fam_us.values()) / 2e3
    span = (max(e.time_range.end for e in kernels) - min(e.time_range.start for e in kernels)) / 2e3 if kernels else 0.0
    print(f"BREAKDOWN {a.variant} seq={a.seq} layers={a.layers} per step: kernel-sum {busy:.2f} ms, "
          f"first-to-last kernel {span:.2f} ms, launches {len(kernels) // 2}")
    for fam, us in sorted(fam_us.items(), key=lambda kv: -kv[1]):
        print(f"BREAKDOWN   {fam:<20} {us / 2e3:8.2f} ms  {fam_n[fam] // 2:5d} launches")
    # The 20 longest kernels by total time, full names (the table above truncates them).
    tot = {}
    for e in kernels:
        tot[e.name] = tot.get(e.name, 0.0) + e.device_time
    for name, us in sorted(tot.items(), key=lambda kv: -kv[1])[:20]:
        print(f"KERNEL {us / 2e3:8.3f} ms/step  {name[:160]}")
if a.gaps:  # CUDA activity only: recording host ops would add host time and inflate the gaps
    import gap_report
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as gprof:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    gap_report.report(gprof, steps=2)
if a.variant.startswith("fxfuse"):
    print(fxfuse.report(model).table())
