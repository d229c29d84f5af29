"""Causal attention forward and backward by SDPA backend, at long context, on one GPU (device call; a
timing is never a test).

    python bench/bench_sdpa_backends.py [--seqs 32768,65536,131072] [--heads 32 --kv-heads 8 --dim 128]

At 32k-128k the attention is most of a LoRA step (issue 4), so which of torch's fused backends runs
it matters. For each T and backend (cuDNN, flash, memory-efficient), with the kv heads read natively
(`enable_gqa=True`, what the sdpa_gqa pass emits) and repeated to the query heads (what HF emits
without it), one JSON line: median milliseconds of the forward and of the backward (CUDA events),
TFLOP/s of each (causal: half of 4*T^2*H*D forward, 2.5x that backward), which backend torch picks
by default, and the largest difference of output and gradients from the cuDNN run (relative to the
largest magnitude), so a faster backend that computes something else is visible.
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ap = argparse.ArgumentParser()
ap.add_argument("--seqs", default="32768,65536,131072")
ap.add_argument("--heads", type=int, default=32)
ap.add_argument("--kv-heads", type=int, default=8)
ap.add_argument("--dim", type=int, default=128)
ap.add_argument("--reps", type=int, default=3)
ap.add_argument("--backends", default="CUDNN_ATTENTION,FLASH_ATTENTION,EFFICIENT_ATTENTION")
ap.add_argument("--device", default="cuda", help="cpu: a dry run of the script (tiny sizes, math backend)")
args = ap.parse_args()
cuda = args.device == "cuda"


def inputs(t):
    gen = torch.Generator(device=args.device).manual_seed(t)
    dt = torch.bfloat16 if cuda else torch.float32
    mk = lambda h: torch.randn(1, h, t, args.dim, device=args.device, generator=gen, dtype=dt)  # noqa: E731
    return mk(args.heads), mk(args.kv_heads), mk(args.kv_heads), mk(args.heads)


def run(q, k, v, gqa):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    if gqa:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    else:
        rep = q.shape[1] // k.shape[1]
        out = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                             is_causal=True)
    return q, k, v, out


def timed(q, k, v, grad, gqa):
    fwd, bwd = [], []
    for _ in range(args.reps + 1):
        if cuda:
            e = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            e[0].record()
        qq, kk, vv, out = run(q, k, v, gqa)
        if cuda:
            e[1].record()
        out.backward(grad)
        if cuda:
            e[2].record()
            torch.cuda.synchronize()
            fwd.append(e[0].elapsed_time(e[1]))
            bwd.append(e[1].elapsed_time(e[2]))
    grads = (out.detach(), qq.grad, kk.grad, vv.grad)
    return statistics.median(fwd[1:] or [0.0]), statistics.median(bwd[1:] or [0.0]), grads


def rel(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


def default_backend(q, k, v, gqa):
    if not cuda:
        return "math"
    if gqa:
        kk, vv = k, v
    else:
        rep = q.shape[1] // k.shape[1]
        kk, vv = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    q = q.detach().requires_grad_()
    choice = torch._fused_sdp_choice(q, kk, vv, is_causal=True, enable_gqa=gqa)
    return str(SDPBackend(choice))


for t in (int(s) for s in args.seqs.split(",")):
    q, k, v, grad = inputs(t)
    flop_f = 4 * t * t * args.heads * args.dim / 2
    for gqa in (True, False):
        ref = None
        for name in args.backends.split(",") if cuda else ["MATH"]:
            backend = getattr(SDPBackend, name)
            row = {"T": t, "gqa": gqa, "backend": name}
            try:
                with sdpa_kernel([backend]):
                    f, b, grads = timed(q, k, v, grad, gqa)
            except RuntimeError as e:  # a backend that does not take these inputs says so
                row["error"] = str(e).splitlines()[0][:160]
                print(json.dumps(row), flush=True)
                continue
            ref = ref or grads
            row.update(fwd_ms=round(f, 2), bwd_ms=round(b, 2),
                       fwd_tflops=round(flop_f / f / 1e9, 1) if f else None,
                       bwd_tflops=round(2.5 * flop_f / b / 1e9, 1) if b else None,
                       diff_vs_first={n: round(rel(a, r), 5) for n, a, r in zip(("out", "dq", "dk", "dv"), grads, ref)},
                       default=default_backend(q, k, v, gqa))
            del grads
            print(json.dumps(row), flush=True)
        del ref
        if cuda:
            torch.cuda.empty_cache()
