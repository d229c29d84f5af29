"""Causal attention at long context, one cuDNN call against the same attention split over the key
range (device call; a timing is never a test).

    python bench/bench_split_attention.py [--seqs 65536,131072] [--chunks 32768,65536]

Question it answers: the fifteenth session measured cuDNN's causal forward at 606-616 TFLOP/s up to
64k tokens but 542 at 128k, while its backward stays at 534-536 at every length. One kv head's
K and V are 32 MiB at 64k and 64 MiB at 128k (bf16, head dim 128): past the 50 MiB L2. Splitting the
queries and keys into chunks of C tokens (query chunk i: full attention over key chunks j < i, causal
over chunk i; merged by log-sum-exp) keeps every call's K and V at C tokens. The backward then runs
as one cuDNN call on the merged output and lse, so only the forward changes.

Per T and C, one JSON line: median ms of the one-call forward, of the split forward (merge
included), of the backward fed each forward's output and lse, TFLOP/s, and the largest difference of
the split's output, lse and gradients from the one call's (relative to the largest magnitude).
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch

ap = argparse.ArgumentParser()
ap.add_argument("--seqs", default="65536,131072")
ap.add_argument("--chunks", default="32768,65536")
ap.add_argument("--heads", type=int, default=32)
ap.add_argument("--kv-heads", type=int, default=8)
ap.add_argument("--dim", type=int, default=128)
ap.add_argument("--reps", type=int, default=3)
args = ap.parse_args()

fwd_op = torch.ops.aten._scaled_dot_product_cudnn_attention.default
bwd_op = torch.ops.aten._scaled_dot_product_cudnn_attention_backward.default


def attend(q, k, v, causal):
    r = fwd_op(q, k, v, None, True, 0.0, causal, False)
    return r[0], r[1].reshape(q.shape[0], q.shape[1], q.shape[2]).float(), r


def split_forward(q, k, v, c):
    """Output and lse of causal attention computed in query/key chunks of c tokens."""
    t = q.shape[2]
    outs, lses = [], []
    for i in range(0, t, c):
        qi = q[:, :, i:i + c]
        o_acc = l_acc = None
        for j in range(0, i + 1, c):
            o, l, _ = attend(qi, k[:, :, j:j + c], v[:, :, j:j + c], causal=(j == i))
            if o_acc is None:
                o_acc, l_acc = o.float(), l
                continue
            m = torch.maximum(l_acc, l)
            wa, wb = torch.exp(l_acc - m), torch.exp(l - m)
            s = wa + wb
            o_acc = o_acc * (wa / s)[..., None] + o.float() * (wb / s)[..., None]
            l_acc = m + torch.log(s)
        outs.append(o_acc)
        lses.append(l_acc)
    return torch.cat(outs, 2), torch.cat(lses, 2)


def backward(q, k, v, out, lse, grad, meta):
    _, _, cq, ck, mq, mk, seed, off, _ = meta
    lse4 = lse.reshape(meta[1].shape).to(meta[1].dtype)
    return bwd_op(grad, q, k, v, out, lse4, seed, off, None, cq, ck, mq, mk, 0.0, True)


def median_ms(fn, reps):
    ts = []
    for _ in range(reps + 1):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        res = fn()
        e1.record()
        torch.cuda.synchronize()
        ts.append(e0.elapsed_time(e1))
    return statistics.median(ts[1:]), res


def rel(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


def bhtd(h, t, gen):
    # the model's layout: [B, T, H, D] transposed to [B, H, T, D]
    return torch.randn(1, t, h, args.dim, device="cuda", dtype=torch.bfloat16, generator=gen).transpose(1, 2)


for t in map(int, args.seqs.split(",")):
    gen = torch.Generator(device="cuda").manual_seed(t)
    q, k, v, grad = bhtd(args.heads, t, gen), bhtd(args.kv_heads, t, gen), bhtd(args.kv_heads, t, gen), \
        bhtd(args.heads, t, gen)
    flop = 4 * t * t * args.heads * args.dim / 2
    ms_full, (out, lse, meta) = median_ms(lambda: attend(q, k, v, True), args.reps)
    ms_bwd, ref_grads = median_ms(lambda: backward(q, k, v, out, lse, grad, meta), args.reps)
    print(json.dumps({"T": t, "chunk": None, "fwd_ms": round(ms_full, 2), "fwd_tflops": round(flop / ms_full / 1e9),
                      "bwd_ms": round(ms_bwd, 2), "bwd_tflops": round(2.5 * flop / ms_bwd / 1e9),
                      "lse_shape": list(meta[1].shape), "out_strides": list(out.stride())}), flush=True)
    for c in map(int, args.chunks.split(",")):
        if c >= t or t % c:
            continue
        ms_split, (o32, l32) = median_ms(lambda: split_forward(q, k, v, c), args.reps)
        o_split = torch.empty_strided(out.shape, out.stride(), dtype=out.dtype, device=out.device)
        o_split.copy_(o32)
        ms_bwd2, grads = median_ms(lambda: backward(q, k, v, o_split, l32, grad, meta), args.reps)
        print(json.dumps({"T": t, "chunk": c, "fwd_ms": round(ms_split, 2),
                          "fwd_tflops": round(flop / ms_split / 1e9), "bwd_ms": round(ms_bwd2, 2),
                          "diff_out": rel(o_split, out), "diff_lse": float((l32 - lse).abs().max()),
                          "diff_dq_dk_dv": [rel(a, b) for a, b in zip(grads, ref_grads)]}), flush=True)
        del o32, l32, o_split, grads
    del q, k, v, grad, out, lse, meta, ref_grads
    torch.cuda.empty_cache()
