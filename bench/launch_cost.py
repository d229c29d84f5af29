"""Host cost of each primitive a LoRA call issues, so launch work is aimed, not guessed.

    python bench/launch_cost.py [--m 256] [--calls 300]

Prints one JSON line per primitive: the host time to issue it (no sync inside the loop; a small M
keeps the GPU ahead) for torch's small ops, and a skinny LoRA matmul (one split, the default dot)
through fxfuse's wrapper, through the autotuner and through `JITFunction.run` with the tuned config. Then per-call host time of the whole q/k/v, gate/up and o groups (forward and
backward, called directly) and a cProfile of the q/k/v backward.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics

import torch

import fxfuse  # noqa: F401
from fxfuse.runtime.kernels import lora as K
from fxfuse.runtime.ops import lora as L
from host_timing import interleaved_host_us  # bench/ (the script's folder)

ap = argparse.ArgumentParser()
ap.add_argument("--m", type=int, default=256)
ap.add_argument("--calls", type=int, default=300)
ap.add_argument("--rounds", type=int, default=5)
args = ap.parse_args()

dev, bf16 = "cuda", torch.bfloat16
torch.manual_seed(0)
M, H, KV, I, R = args.m, 4096, 1024, 14336, 16
x = torch.randn(M, H, device=dev, dtype=bf16)
a = torch.randn(R, H, device=dev) * 0.02
As = [torch.randn(R, H, device=dev) * 0.02 for _ in range(3)]
small = torch.randn(M, R, device=dev)
bmat = torch.randn(H, R, device=dev, dtype=bf16)
out = torch.empty(M, H, device=dev, dtype=bf16)


def measure(named):
    for n, us in interleaved_host_us(named, args.rounds, args.calls).items():
        print(json.dumps({"bench": "launch_cost", "what": n, "m": M, "host_us_median": round(statistics.median(us), 1),
                          "host_us_min": round(min(us), 1)}))


# ---- the skinny kernel three ways (its compiled launcher takes Triton-internal arguments: not timed)
kern = K._skinny_kernel
xa_out = torch.empty(M, R, device=dev, dtype=torch.float32)


def skinny_args():
    return (x, a, xa_out, M, H, R, x.stride(0), x.stride(1), a.stride(0), a.stride(1), xa_out.stride(0),
            xa_out.stride(1), 1.0, 0.0, 0, K._bucket(M), K._bucket(H), K._tune_layout(x, a), 1)


upcast, precision, split = K._dot_mode(x.dtype, a.dtype, False)  # the dot skinny_matmul runs by default
skinny_meta = dict(BLOCK_R=16, HAS_DROPOUT=False, UPCAST=upcast, PRECISION=precision, SPLIT=split, ATOMIC=False)
grid = lambda meta: (K.cdiv(M, meta["BLOCK_M"]), 1)
kern[grid](*skinny_args(), **skinny_meta)  # tune once
best = kern.best_config.all_kwargs()
print(json.dumps({"bench": "launch_cost", "skinny_best_config": {k: str(v) for k, v in best.items()}}))
jit = kern.fn
fixed_grid = (K.cdiv(M, best["BLOCK_M"]), 1, 1)

prims = [
    ("torch.empty [M,16] f32", lambda: torch.empty(M, R, device=dev)),
    ("torch.zeros [M,16] f32", lambda: torch.zeros(M, R, device=dev)),
    ("small.to(bf16)", lambda: small.to(bf16)),
    ("torch.cat 3 A", lambda: torch.cat(As, dim=0)),
    ("torch.mm [M,16]x[16,4096]", lambda: torch.mm(small.to(bf16), bmat.t())),
    ("K.skinny_matmul (wrapper)", lambda: K.skinny_matmul(x, a, split_k=1)),
    ("kernel[grid] (autotuner)", lambda: kern[grid](*skinny_args(), **skinny_meta)),
    ("JITFunction.run (tuned config)", lambda: jit.run(*skinny_args(), grid=fixed_grid, warmup=False, **skinny_meta, **best)),
]
w_sq = torch.randn(H, H, device=dev, dtype=bf16) * 0.02
prims.append(("out.addmm_(x, w^T) [M,4096]", lambda: out.addmm_(x, w_sq.t())))
measure(prims)


# ---- whole groups, called directly (no custom-op layers)
def group(ns, k_in):
    xx = torch.randn(M, k_in, device=dev, dtype=bf16)
    ws = [torch.randn(n, k_in, device=dev, dtype=bf16) * 0.02 for n in ns]
    as_ = [torch.randn(R, k_in, device=dev) * 0.02 for _ in ns]
    bs = [torch.randn(n, R, device=dev) * 0.02 for n in ns]
    k = len(ns)
    fw = lambda: L._forward_kernels(xx, ws, [None] * k, as_, bs, [2.0] * k, [0.0] * k, None, bf16)
    outs = fw()
    dys = [torch.randn_like(o) for o in outs[:k]]
    bw = lambda: L._backward_kernels(dys, xx, ws, as_, bs, outs[k], [2.0] * k, [0.0] * k, None, True)
    xa = lambda: L._xa_kernels(xx, as_, [0.0] * k, None)
    return fw, bw, xa


qkv, gu, o = group((H, KV, KV), H), group((I, I), H), group((H,), H)
measure([("qkv forward", qkv[0]), ("qkv backward", qkv[1]), ("qkv xa", qkv[2]),
         ("gate/up forward", gu[0]), ("gate/up backward", gu[1]),
         ("o forward", o[0]), ("o backward", o[1])])

with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as tp:
    for f in (qkv[0], qkv[1]):
        f()
    torch.cuda.synchronize()
kernels = [e for e in tp.events() if e.device_type == torch.autograd.DeviceType.CUDA]
print(json.dumps({"bench": "launch_cost", "qkv_fwd_plus_bwd_gpu_launches": len(kernels),
                  "names": sorted({e.name[:60] for e in kernels})}))

prof = cProfile.Profile()
prof.enable()
for _ in range(100):
    qkv[1]()
prof.disable()
torch.cuda.synchronize()
pstats.Stats(prof).sort_stats("tottime").print_stats(22)
