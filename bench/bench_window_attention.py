"""Sliding-window attention, forward + backward: fxfuse::window_attention against what HF runs without
the pass (repeat_kv, then SDPA with the materialised [1, 1, T, T] band mask), on one GPU (device call;
a timing is never a test).

    python bench/bench_window_attention.py [--seqs 4096,8192,16384] [--window 4096] [--heads 32 --kv-heads 8 --dim 128]

One JSON line per (variant, T): median milliseconds of forward + backward over --reps runs (CUDA
events), and the peak memory above the inputs (GiB), the mask included for the HF variant.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F

import fxfuse  # noqa: F401  (registers the ops)

ap = argparse.ArgumentParser()
ap.add_argument("--seqs", default="4096,8192,16384")
ap.add_argument("--window", type=int, default=4096)
ap.add_argument("--heads", type=int, default=32)
ap.add_argument("--kv-heads", type=int, default=8)
ap.add_argument("--dim", type=int, default=128)
ap.add_argument("--chunk", type=int, default=256)
ap.add_argument("--reps", type=int, default=5)
ap.add_argument("--device", default="cuda", help="cpu: a dry run of the script (tiny sizes)")
args = ap.parse_args()


def hf(q, k, v, w, scale):
    # The mask is built inside the timed region (HF builds it once per forward, for all layers): a few
    # elementwise passes over T x T bools, small against the masked SDPA; it counts in HF's peak.
    t = q.shape[2]
    i = torch.arange(t, device=q.device)
    d = i[:, None] - i[None, :]
    mask = ((d >= 0) & (d < w))[None, None]
    rep = q.shape[1] // k.shape[1]
    k, v = (x.repeat_interleave(rep, dim=1) for x in (k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def fxfuse_window(q, k, v, w, scale):
    return torch.ops.fxfuse.window_attention(q, k, v, w, scale, args.chunk)


def timed(fn, t):
    gen = torch.Generator(device=args.device).manual_seed(t)
    mk = lambda h: torch.randn(1, h, t, args.dim, device=args.device, generator=gen,  # noqa: E731
                               dtype=torch.bfloat16).requires_grad_()
    q, k, v = mk(args.heads), mk(args.kv_heads), mk(args.kv_heads)
    grad = torch.randn(1, args.heads, t, args.dim, device=args.device, generator=gen, dtype=torch.bfloat16)
    scale = 1 / math.sqrt(args.dim)
    times = []
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.reps + 1):
        q.grad = k.grad = v.grad = None
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        out = fn(q, k, v, args.window, scale)
        out.backward(grad)
        if cuda:
            end.record()
            torch.cuda.synchronize()
        times.append(start.elapsed_time(end) if cuda else (time.perf_counter() - t0) * 1e3)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if cuda else float("nan")
    return statistics.median(times[1:]), peak, out.detach(), [x.grad for x in (q, k, v)]


for t in [int(s) for s in args.seqs.split(",")]:
    rows, outs = {}, {}
    for name, fn in (("hf_masked_sdpa", hf), ("fxfuse_window_attention", fxfuse_window)):
        try:
            ms, peak, out, grads = timed(fn, t)
            outs[name] = (out, grads)
            rows[name] = dict(ms=round(ms, 2), peak_gib=round(peak, 3))
        except torch.OutOfMemoryError as e:
            rows[name] = dict(oom=str(e).splitlines()[0][:200])
        if args.device == "cuda":
            torch.cuda.empty_cache()
    if len(outs) == 2:  # the two agree (relative L2 of the output and each gradient)
        (o1, g1), (o2, g2) = outs.values()
        rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
        rows["rel_out_grads"] = [round(rel(o2, o1), 5)] + [round(rel(a, b), 5) for a, b in zip(g2, g1)]
    print(json.dumps(dict(bench="window_attention", seq=t, window=args.window, heads=args.heads,
                          kv_heads=args.kv_heads, dim=args.dim, chunk=args.chunk, **rows)), flush=True)
