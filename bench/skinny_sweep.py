"""GPU time of fxfuse's LoRA skinny and weight-gradient kernels at the 8B shapes of one decoder layer,
as launched now (autotuned configs, split heuristics) and over a sweep of tile configs and splits:
which product is far from the memory roofline, and what would bring it closer. Device call; a timing
is never a test.

    python bench/skinny_sweep.py [--m 4096] [--budget 400] [--only g,dB]

Per product a JSON line with the current time, bytes moved and GB/s, then the sweep's best rows.
Timings are triton.testing.do_bench medians (L2 flushed before each call, as the step's big tensors
are not L2-resident either).
"""
import argparse
import json
import os
import time

import torch
import triton
from triton.testing import do_bench

from fxfuse.runtime.kernels import lora as K

ap = argparse.ArgumentParser()
ap.add_argument("--m", type=int, default=4096, help="tokens")
ap.add_argument("--budget", type=float, default=400.0, help="seconds for the sweep in all")
ap.add_argument("--only", default="", help="comma-separated product kinds: xa,g,dB,dA")
args = ap.parse_args()
only = set(filter(None, args.only.split(",")))
dev, bf16, f32, r, T = "cuda", torch.bfloat16, torch.float32, 16, args.m
HID, INTER = 4096, 14336
gen = torch.Generator(dev).manual_seed(0)


def rnd(*shape, dtype=bf16, scale=1.0):
    return (torch.randn(*shape, device=dev, generator=gen) * scale).to(dtype)


# (kind, name, function, x, y): skinny_matmul(x, y) or lowrank_weight_grad(x, y)
X, XD = rnd(T, HID), rnd(T, INTER)
problems = []
for name, ranks, x in (("qkv", 48, X), ("o", 16, X), ("gate/up", 32, X), ("down", 16, XD)):
    problems.append(("xa", name, "skinny", x, rnd(ranks, x.shape[1], dtype=f32, scale=0.02)))
for name, n in (("q", HID), ("k/v", 1024), ("o", HID), ("gate/up", INTER), ("down", HID)):
    dy = rnd(T, n)
    xa = rnd(T, 48, dtype=f32)
    problems.append(("g", name, "skinny", dy, rnd(n, r, dtype=f32, scale=0.02).t()))
    problems.append(("dB", name, "skinny", dy.t(), xa[:, :r].t()))
for name, ranks, x in (("qkv", 48, X), ("o", 16, X), ("gate/up", 32, X), ("down", 16, XD)):
    problems.append(("dA", name, "wgrad", rnd(T, ranks, dtype=f32), x))
problems = [p for p in problems if not only or p[0] in only]

SKINNY = [(4, 4, 64, 64), (4, 4, 64, 128), (4, 3, 128, 64), (8, 3, 128, 128), (8, 3, 256, 64),
          (4, 4, 32, 128), (4, 4, 32, 256), (4, 5, 64, 64), (8, 4, 64, 256), (4, 3, 128, 128),
          (8, 4, 128, 64), (4, 3, 256, 64), (8, 3, 256, 128)]
WGRAD = [(4, 4, 64, 64), (4, 4, 64, 128), (8, 3, 64, 256), (4, 3, 128, 64), (8, 3, 128, 128),
         (4, 4, 32, 128), (4, 4, 32, 256), (8, 4, 64, 128), (4, 5, 64, 64), (8, 3, 128, 256),
         (4, 3, 32, 64), (8, 4, 32, 256)]
SPLITS = (1, 2, 4, 8, 16)


def nbytes(*ts):
    return sum(t.numel() * t.element_size() for t in ts)


def current(fn, x, y):
    """(ms, output, the config and split the launcher picked) of the launcher as the op calls it."""
    f, kern = ((K.skinny_matmul, K._skinny_kernel) if fn == "skinny" else
               (K.lowrank_weight_grad, K._lowrank_wgrad_kernel))
    out = f(x, y)
    # one launch through the autotuner itself: its best_config is then this call's pick (a direct launch
    # does not touch it); the split is the launcher's plan
    saved = os.environ.get("FXFUSE_FAST_LAUNCH")
    os.environ["FXFUSE_FAST_LAUNCH"] = "0"
    try:
        f(x, y)
    finally:
        os.environ.pop("FXFUSE_FAST_LAUNCH") if saved is None else os.environ.update(FXFUSE_FAST_LAUNCH=saved)
    cfg = getattr(kern, "best_config", None)
    picked = dict(warps=cfg.num_warps, stages=cfg.num_stages, **cfg.kwargs) if cfg else {}
    _, plan = (K._skinny_plan if fn == "skinny" else K._wgrad_plan)(x, y, 1.0, 0.0, False, None, None)
    return do_bench(lambda: f(x, y), warmup=5, rep=40), out, dict(picked, split=plan[3])


def launcher(fn, x, y, split, cfg):
    """A launch of the kernel's JITFunction with one config and split, as skinny_matmul /
    lowrank_weight_grad would make it (their plan's arguments)."""
    w, s, bm, bk = cfg
    if fn == "skinny":
        _, plan = K._skinny_plan(x, y, 1.0, 0.0, False, split, None)
        m, k, rr, split, atomic, _, meta = plan
        kern, shape, args = K._skinny_kernel, (m, rr), K._skinny_args
        grid = (triton.cdiv(m, bm), split)
    else:
        _, plan = K._wgrad_plan(x, y, 1.0, 0.0, False, split, None)
        m, k, rr, split, atomic, _, meta = plan
        kern, shape, args = K._lowrank_wgrad_kernel, (rr, k), K._wgrad_args
        grid = (triton.cdiv(k, bk), split)
    jit = getattr(kern, "fn", kern)

    def run():
        out = (torch.zeros if atomic else torch.empty)(shape, device=dev, dtype=f32)
        jit[grid](*args(x, y, out, 0, plan), **meta, BLOCK_M=bm, BLOCK_K=bk, num_warps=w, num_stages=s)
        return out
    return run


t_start = time.perf_counter()
rows = []
for kind, name, fn, x, y in problems:
    t, ref, picked = current(fn, x, y)
    exact = x.double() @ y.double().t() if fn == "skinny" else x.double().t() @ y.double()
    err = ((ref.double() - exact).abs().max() / exact.abs().max()).item()
    moved = nbytes(x, y, ref)
    row = dict(bench="skinny_sweep", kind=kind, name=name, m=T, x=list(x.shape), y=list(y.shape),
               now_us=round(t * 1e3, 1), mbytes=round(moved / 1e6, 1), now_gbs=round(moved / t / 1e6),
               now_config=picked, rel_err_vs_fp64=float(f"{err:.2e}"))
    rows.append((row, fn, x, y, ref))
    print(json.dumps(row), flush=True)
print(f"current: {sum(r[0]['now_us'] for r in rows):.0f} us for one layer's products", flush=True)
if args.budget <= 0:
    raise SystemExit(0)
# the sweep, slowest products (by GB/s) first, until the budget is spent
for row, fn, x, y, ref in sorted(rows, key=lambda rw: rw[0]["now_gbs"]):
    best = []
    for cfg in (SKINNY if fn == "skinny" else WGRAD):
        for split in SPLITS:
            if time.perf_counter() - t_start > args.budget:
                break
            try:
                run = launcher(fn, x, y, split, cfg)
                got = run()
                err = ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
                if not err < 1e-3:
                    best.append((float("inf"), cfg, split, f"wrong (rel {err:.1e})"))
                    continue
                best.append((do_bench(run, warmup=3, rep=20) * 1e3, cfg, split, ""))
            except triton.runtime.errors.OutOfResources:
                continue
    best.sort(key=lambda b: b[0])
    print(json.dumps(dict(bench="skinny_sweep", kind=row["kind"], name=row["name"], now_us=row["now_us"],
                          best=[dict(us=round(us, 1), warps=c[0], stages=c[1], BLOCK_M=c[2], BLOCK_K=c[3],
                                     split=s, gbs=round(row["mbytes"] * 1e3 / us) if us < float("inf") else 0,
                                     note=n) for us, c, s, n in best[:4]])), flush=True)
print(f"sweep done in {time.perf_counter() - t_start:.0f}s", flush=True)
