"""GPU time of a LoRA group's g and dB products at the 8B shapes: one launch per product, or grouped
(kernels/lora.py skinny_matmul_group, FXFUSE_LORA_GROUPED_LAUNCH=1). Device call:
    python bench/group_gpu_time.py [--m 4096]"""
import argparse
import json
import os

import torch

from fxfuse.runtime.ops import lora as L

ap = argparse.ArgumentParser()
ap.add_argument("--m", type=int, default=4096)
args = ap.parse_args()
dev, bf16, r = "cuda", torch.bfloat16, 16
for name, ns in (("qkv", (4096, 1024, 1024)), ("gate/up", (14336, 14336))):
    dys = [torch.randn(args.m, n, device=dev, dtype=bf16) for n in ns]
    bs = [torch.randn(n, r, device=dev) * 0.02 for n in ns]
    xa = torch.randn(args.m, r * len(ns), device=dev)
    row = {"bench": "group_gpu_time", "group": name, "m": args.m}
    for mode in ("0", "1", "0", "1"):
        os.environ["FXFUSE_LORA_GROUPED_LAUNCH"] = mode
        for _ in range(3):
            L._g_and_db(dys, bs, xa, [2.0] * len(ns))
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(20):
            L._g_and_db(dys, bs, xa, [2.0] * len(ns))
        end.record()
        torch.cuda.synchronize()
        row["grouped" if mode == "1" else "per_product"] = round(start.elapsed_time(end) * 1e3 / 20, 1)
    print(json.dumps(row), flush=True)
