"""cuDNN causal attention forward/backward by memory layout of q/k/v and of the incoming gradient,
and the layouts the real compiled step hands it. Device call; one JSON line per case.

    python bench/bench_attention_layouts.py [--seqs 32768,65536] [--probe-seq 4096]

Why: in the 32k step profile (bench/logs/2026-12-03d-profile-32k-2layers.txt) cuDNN's backward took
45.7 ms per layer, against 41.2 ms in bench_sdpa_backends.py on contiguous [B, H, T, D] tensors. A
Llama layer's q/k/v are views of the projection's [B, T, H*D] output, transposed to [B, H, T, D]
("bshd" below: strides (T*H*D, D, H*D, 1)); the gradient of the output arrives in the same layout.
The probe (--probe-seq > 0) runs a step of a 2-layer Llama-3.1-8B-shaped LoRA model through
fxfuse.optimize under a dispatch mode that logs the strides reaching the attention ops.
"""
import argparse
import json
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

ap = argparse.ArgumentParser()
ap.add_argument("--seqs", default="32768,65536")
ap.add_argument("--heads", type=int, default=32)
ap.add_argument("--kv-heads", type=int, default=8)
ap.add_argument("--dim", type=int, default=128)
ap.add_argument("--reps", type=int, default=5)
ap.add_argument("--probe-seq", type=int, default=4096, help="0: skip the probe of the compiled step")
args = ap.parse_args()
dev = "cuda"


def tensor(h, t, layout, gen):
    """[1, h, t, D] in the given layout: bhsd contiguous, or bshd (a transposed [1, t, h, D])."""
    if layout == "bhsd":
        return torch.randn(1, h, t, args.dim, device=dev, generator=gen, dtype=torch.bfloat16)
    return torch.randn(1, t, h, args.dim, device=dev, generator=gen, dtype=torch.bfloat16).transpose(1, 2)


def kernels(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sorted({e.name[:90] for e in prof.events() if "sdpa" in e.name or "flash" in e.name})


def case(t, qkv_layout, grad_layout):
    gen = torch.Generator(device=dev).manual_seed(t)
    q = tensor(args.heads, t, qkv_layout, gen)
    k, v = tensor(args.kv_heads, t, qkv_layout, gen), tensor(args.kv_heads, t, qkv_layout, gen)
    grad = tensor(args.heads, t, grad_layout, gen)

    def step(times=None):
        qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
        e = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        e[0].record()
        out = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=True)
        e[1].record()
        out.backward(grad)
        e[2].record()
        torch.cuda.synchronize()
        if times is not None:
            times.append((e[0].elapsed_time(e[1]), e[1].elapsed_time(e[2])))
        return out

    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        out = step()
        times = []
        for _ in range(args.reps):
            step(times)
        names = kernels(step)
    flop_f = 4 * t * t * args.heads * args.dim / 2
    f, b = statistics.median(x[0] for x in times), statistics.median(x[1] for x in times)
    print(json.dumps({"T": t, "qkv": qkv_layout, "grad": grad_layout, "out_stride": list(out.stride()),
                      "fwd_ms": round(f, 2), "bwd_ms": round(b, 2), "fwd_tflops": round(flop_f / f / 1e9, 1),
                      "bwd_tflops": round(2.5 * flop_f / b / 1e9, 1), "kernels": names}), flush=True)


class StrideLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = {}

    def __torch_dispatch__(self, func, types, args_=(), kwargs=None):
        name = str(func)
        if "attention" in name:
            strides = [list(a.stride()) if isinstance(a, torch.Tensor) else None for a in args_]
            shapes = [list(a.shape) if isinstance(a, torch.Tensor) else None for a in args_]
            self.seen.setdefault(name, {"shapes": shapes, "strides": strides})
        return func(*args_, **(kwargs or {}))


def probe(t):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import fxfuse
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=2, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(dev, torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    model = fxfuse.optimize(model)
    ids = torch.randint(0, cfg.vocab_size, (1, t), device=dev)
    model(input_ids=ids, labels=ids).loss.backward()  # compile
    log = StrideLog()
    with log:
        model(input_ids=ids, labels=ids).loss.backward()
    for name, rec in log.seen.items():
        print(json.dumps({"probe_T": t, "op": name, **rec}), flush=True)
    if not log.seen:
        print(json.dumps({"probe_T": t, "op": None, "note": "no attention op seen by the dispatch mode"}))


for t in (int(s) for s in args.seqs.split(",")):
    for qkv_layout, grad_layout in (("bhsd", "bhsd"), ("bshd", "bshd"), ("bshd", "bhsd"), ("bhsd", "bshd")):
        case(t, qkv_layout, grad_layout)
        torch.cuda.empty_cache()
if args.probe_seq:
    probe(args.probe_seq)
