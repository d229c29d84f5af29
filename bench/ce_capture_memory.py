"""Peak memory of the lm_head + cross-entropy op while a CUDA graph records it, with a fresh logits
tensor per chunk against one reused chunk buffer (what the op does). Device call; prints one JSON line per (variant, chunk MiB): MiB allocated above the inputs at
the peak of an eager call and of a recorded one.

    python bench/ce_capture_memory.py [--tokens 1024] [--vocab 128256] [--hidden 4096]
"""
import argparse
import json

import torch

from fxfuse.runtime.kernels import cross_entropy as K
from fxfuse.runtime.ops import cross_entropy as ce

ap = argparse.ArgumentParser()
ap.add_argument("--tokens", type=int, default=1024)
ap.add_argument("--vocab", type=int, default=128256)
ap.add_argument("--hidden", type=int, default=4096)
args = ap.parse_args()


def fresh_chunks(hidden, weight, target, rows):  # a new logits tensor per chunk
    tokens, h = hidden.shape
    losses = torch.empty(tokens, device=hidden.device)
    scale = 1.0 / (target != -100).sum().to(torch.float32)
    grad = hidden.new_empty((tokens, h))
    for start in range(0, tokens, rows):
        end = min(tokens, start + rows)
        logits = torch.mm(hidden[start:end], weight.t())
        K.cross_entropy_rows(logits, target[start:end], losses[start:end], scale, with_grad=True)
        torch.mm(logits, weight, out=grad[start:end])
    return losses.sum() * scale, grad


def reused_buffer(hidden, weight, target, rows):
    return ce.linear_cross_entropy_chunked(hidden, weight, target, "mean", 0.0, -100, True, rows)


dev = "cuda"
hidden = torch.randn(args.tokens, args.hidden, device=dev, dtype=torch.bfloat16)
weight = torch.randn(args.vocab, args.hidden, device=dev, dtype=torch.bfloat16) * 0.02
target = torch.randint(0, args.vocab, (args.tokens,), device=dev)
for mib in (256, 128, 64):
    rows = ce.chunk_rows(args.tokens, args.vocab, hidden.dtype, mib << 20)
    for name, fn in (("fresh_chunks", fresh_chunks), ("reused_buffer", reused_buffer)):
        row = {"variant": name, "chunk_mib": mib, "rows": rows}
        for mode in ("eager", "graph"):
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            if mode == "eager":
                out = fn(hidden, weight, target, rows)
            else:
                fn(hidden, weight, target, rows)  # warm up (Triton compile) outside the capture
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    out = fn(hidden, weight, target, rows)
                g.replay()
            torch.cuda.synchronize()
            row[f"{mode}_peak_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
            if mode == "graph":
                del g
            del out
        print(json.dumps(row), flush=True)
