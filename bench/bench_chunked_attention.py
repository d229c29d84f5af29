"""Softcapped (Gemma 2) or sink (gpt-oss) attention, forward + backward: fxfuse::chunked_attention
against HF's eager math (repeat_kv, q·kᵀ · scale, softcap or the sink column, + the additive causal
mask, fp32 softmax, cast, matmul with v), on one GPU (device call; a timing is never a test).

    python bench/bench_chunked_attention.py [--seqs 2048,4096,8192] [--kind softcap|sinks]
        [--heads 16 --kv-heads 8 --dim 256] [--rows 256]

One JSON line per (variant, T): median milliseconds of forward + backward over --reps runs (CUDA
events), the peak memory above the inputs (GiB; HF's additive [1, 1, T, T] mask is an input of
both), and each variant's relative L2 error of the output and q/k/v gradients against float64
(computed on the GPU where it fits).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

import fxfuse  # noqa: F401  (registers the ops)
from fxfuse.runtime.ops import chunked_attention as C

ap = argparse.ArgumentParser()
ap.add_argument("--seqs", default="2048,4096,8192")
ap.add_argument("--kind", choices=["softcap", "sinks"], default="softcap")
ap.add_argument("--heads", type=int, default=16)  # Gemma 2 9B: 16 heads, 8 kv heads, head_dim 256
ap.add_argument("--kv-heads", type=int, default=8)
ap.add_argument("--dim", type=int, default=256)
ap.add_argument("--softcap", type=float, default=50.0)
ap.add_argument("--rows", type=int, default=C.ROWS)
ap.add_argument("--reps", type=int, default=5)
ap.add_argument("--f64-max-seq", type=int, default=4096, help="float64 reference up to this length")
ap.add_argument("--device", default="cuda", help="cpu: a dry run of the script (tiny sizes)")
args = ap.parse_args()


def hf_eager(q, k, v, mask, sinks, scale):
    rep = q.shape[1] // k.shape[1]
    k, v = (x.repeat_interleave(rep, dim=1) for x in (k, v))
    s = torch.matmul(q, k.transpose(2, 3)) * scale
    if args.kind == "softcap":
        s = torch.tanh(s / args.softcap) * args.softcap
        s = s + mask
        w = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    else:
        s = s + mask
        column = sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], -1)
        logits = torch.cat([s, column], dim=-1)
        logits = logits - logits.max(dim=-1, keepdim=True).values
        w = torch.softmax(logits, dim=-1, dtype=logits.dtype)[..., :-1].to(v.dtype)
    return torch.matmul(w, v)


def fxfuse_chunked(q, k, v, mask, sinks, scale):
    cap = args.softcap if args.kind == "softcap" else 0.0
    return torch.ops.fxfuse.chunked_attention(q, k, v, mask, sinks if args.kind == "sinks" else None, scale, cap,
                                              args.rows)[0]


def inputs(t):
    gen = torch.Generator(device=args.device).manual_seed(t)
    mk = lambda h: torch.randn(1, h, t, args.dim, device=args.device, generator=gen,  # noqa: E731
                               dtype=torch.bfloat16).requires_grad_()
    q, k, v = mk(args.heads), mk(args.kv_heads), mk(args.kv_heads)
    keep = torch.ones(t, t, dtype=torch.bool, device=args.device).tril()
    mask = torch.zeros(1, 1, t, t, dtype=torch.bfloat16, device=args.device).masked_fill(
        ~keep, torch.finfo(torch.bfloat16).min)
    sinks = torch.randn(args.heads, device=args.device, generator=gen, dtype=torch.bfloat16).requires_grad_()
    grad = torch.randn(1, args.heads, t, args.dim, device=args.device, generator=gen, dtype=torch.bfloat16)
    return q, k, v, mask, sinks, grad


def timed(fn, t):
    q, k, v, mask, sinks, grad = inputs(t)
    scale = 1 / math.sqrt(args.dim)
    times = []
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.reps + 1):
        q.grad = k.grad = v.grad = sinks.grad = None
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        out = fn(q, k, v, mask, sinks, scale)
        out.backward(grad)
        if cuda:
            end.record()
            torch.cuda.synchronize()
        times.append(start.elapsed_time(end) if cuda else (time.perf_counter() - t0) * 1e3)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else float("nan")
    return statistics.median(times[1:]), peak, out.detach(), [x.grad for x in (q, k, v)]


def float64_reference(t):
    q, k, v, mask, sinks, grad = inputs(t)
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v, sinks)]
    cap = args.softcap if args.kind == "softcap" else 0.0
    out = C.reference(*leaves[:3], mask.double(), leaves[3] if args.kind == "sinks" else None,
                      1 / math.sqrt(args.dim), cap)
    out.backward(grad.double())
    return out.detach(), [x.grad for x in leaves[:3]]


if args.device == "cpu":
    args.seqs, args.heads, args.kv_heads, args.dim, args.rows, args.reps = "64", 4, 2, 16, 16, 1

for t in [int(s) for s in args.seqs.split(",")]:
    rows, outs = {}, {}
    for name, fn in (("hf_eager", hf_eager), ("fxfuse_chunked_attention", fxfuse_chunked)):
        try:
            ms, peak, out, grads = timed(fn, t)
            outs[name] = (out, grads)
            rows[name] = dict(ms=round(ms, 2), peak_gib=round(peak, 3))
        except torch.OutOfMemoryError as e:
            rows[name] = dict(oom=str(e).splitlines()[0][:200])
        if args.device == "cuda":
            torch.cuda.empty_cache()
    if t <= args.f64_max_seq:
        ref_out, ref_grads = float64_reference(t)
        rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
        for name, (out, grads) in outs.items():
            rows[name]["rel_l2_vs_f64_out_dq_dk_dv"] = [round(rel(out, ref_out), 5)] + [
                round(rel(a, b), 5) for a, b in zip(grads, ref_grads)]
        del ref_out, ref_grads
        if args.device == "cuda":
            torch.cuda.empty_cache()
    print(json.dumps(dict(bench="chunked_attention", kind=args.kind, seq=t, heads=args.heads, kv_heads=args.kv_heads,
                          dim=args.dim, rows=args.rows, device=torch.cuda.get_device_name() if args.device == "cuda"
                          else "cpu", torch=torch.__version__, **rows)), flush=True)
