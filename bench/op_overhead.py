"""Host-side cost of one `fxfuse::lora_linear` call (forward + backward op), the 1k bottleneck.

    python bench/op_overhead.py [--m 1024] [--calls 200] [--quick]

Times, for the 8B q/k/v group (x [M, 4096] bf16, fp32 r=16 adapters), called as the custom op, as
its run-time twin (what compiled graphs call) and directly: the GPU time per call (CUDA events,
synchronised) and the host time to *issue* a call (no sync; with a small M the GPU keeps up, so
that is the host's cost), then, without --quick, a cProfile of the host side, so the Python that
dominates is named, not guessed.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics

import torch

import fxfuse  # noqa: F401  (registers the ops)
from host_timing import interleaved_host_us, issue_us  # bench/ (the script's folder)

ap = argparse.ArgumentParser()
ap.add_argument("--m", type=int, default=1024)
ap.add_argument("--calls", type=int, default=200)
ap.add_argument("--quick", action="store_true", help="host issue time only, interleaved over --rounds; no profiles")
ap.add_argument("--rounds", type=int, default=5)
args = ap.parse_args()

dev, bf16 = "cuda", torch.bfloat16
torch.manual_seed(0)
h, kv, r = 4096, 1024, 16
x = torch.randn(args.m, h, device=dev, dtype=bf16)
ws = [torch.randn(n, h, device=dev, dtype=bf16) * 0.02 for n in (h, kv, kv)]
As = [torch.randn(r, h, device=dev) * 0.02 for _ in ws]
Bs = [torch.randn(w.shape[0], r, device=dev) * 0.02 for w in ws]
op, bwd = torch.ops.fxfuse.lora_linear.default, torch.ops.fxfuse.lora_linear_backward.default


def fwd():
    return op(x, ws, [None] * 3, As, Bs, [2.0] * 3, [0.0] * 3, None, bf16)


outs = fwd()
dys = [torch.randn_like(o) for o in outs[:3]]


def back():
    return bwd(dys, x, ws, As, Bs, outs[3], [2.0] * 3, [0.0] * 3, None, True)


from fxfuse.runtime.ops import lora as L  # noqa: E402


def fwd_direct():
    return L._forward_kernels(x, ws, [None] * 3, As, Bs, [2.0] * 3, [0.0] * 3, None, bf16)


def back_direct():
    return L._backward_kernels(dys, x, ws, As, Bs, outs[3], [2.0] * 3, [0.0] * 3, None, True)


from fxfuse.runtime.ops import twins  # noqa: E402

op_rt, bwd_rt = twins.twin_of(op), twins.twin_of(bwd)


def fwd_twin():  # what compiled graphs call (runtime/ops/twins.py)
    return op_rt(x, ws, [None] * 3, As, Bs, [2.0] * 3, [0.0] * 3, None, bf16)


def back_twin():
    return bwd_rt(dys, x, ws, As, Bs, outs[3], [2.0] * 3, [0.0] * 3, None, True)


VARIANTS = (("forward", fwd), ("backward", back), ("forward-twin", fwd_twin), ("backward-twin", back_twin),
            ("forward-direct", fwd_direct), ("backward-direct", back_direct))


if args.quick:
    for name, us in interleaved_host_us(VARIANTS, args.rounds, args.calls).items():
        print(json.dumps({"op": name, "m": args.m, "calls": args.calls, "rounds": args.rounds,
                          "host_us_median": round(statistics.median(us), 1), "host_us_min": round(min(us), 1)}))
    raise SystemExit(0)

for name, fn in VARIANTS:
    for _ in range(10):
        fn()
    host, wall = issue_us(fn, args.calls)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(args.calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    print(json.dumps({"op": name, "m": args.m, "host_us": round(host, 1), "wall_us": round(wall, 1),
                      "gpu_us": round(start.elapsed_time(end) * 1e3 / args.calls, 1)}))
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(50):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(8)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as tp:
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
    print(tp.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
