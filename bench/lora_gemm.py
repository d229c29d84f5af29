"""Per-shape GEMM choice of the LoRA op: fxfuse's fused Triton GEMM against cuBLAS, on the 8B shapes.

For every token count M and projection (N, K) of Llama-3.1-8B (q/o 4096x4096, k/v 1024x4096, gate/up
14336x4096, down 4096x14336), rank 16, bf16 activations and weights, fp32 adapters:

  fwd  Y  = X W^T + s XA B^T      X [M, K], W [N, K], XA [M, r] fp32, B [N, r] fp32
  bwd  dX = dY W + s G A          dY [M, N], W^T as a [K, N] view, G [M, r] fp32, A^T as a [K, r] view

each timed (triton.testing.do_bench, median) as
  triton  fused_lora_matmul(x, w, xa, b, scale=s): one GEMM, the low-rank term in its fp32 accumulator
  cublas  low = mm((xa*s).bf16, b.bf16^T); addmm(low, x, w^T): what fxfuse's op runs on the cuBLAS path
  floor   x @ w^T alone (the base GEMM, no LoRA at all)
TFLOP/s count 2*M*N*K (the base product) for all three, so they compare directly with the floor.

The memory-bound launchers are timed against their torch equivalents, in GB/s of compulsory traffic:
  skinny_matmul(x, A)         XA = X A^T (fwd), G = dY B (bwd), dB = dY^T XA (bwd, split-K)
  lowrank_weight_grad(g, x)   dA = G^T X
each with both dots of a bf16/fp32 pair (bf16x3: the default since 2026-12-02, and tf32x3), every split count, and
PEFT's own math (cast the bf16 operand to fp32, then mm).

Numerics: fused_lora_matmul and the cuBLAS path against float64 on one shape per direction (relative
L2 error, must stay below 1e-2), and the skinny / weight-gradient kernels likewise.

    python bench/lora_gemm.py [--ms 1024,4096,16384] [--rep 100]
    TRITON_INTERPRET=1 python bench/lora_gemm.py --tiny --device cpu     # CPU dry run, tiny shapes

Prints a table per section and one JSON line per measurement (lines starting with '{').
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from fxfuse.runtime.kernels import lora as K

BF16, F32, F64 = torch.bfloat16, torch.float32, torch.float64
RANK = 16
SCALE = 2.0
PROJ_8B = {"q/o": (4096, 4096), "k/v": (1024, 4096), "gate/up": (14336, 4096), "down": (4096, 14336)}
PROJ_TINY = {"q/o": (96, 96), "k/v": (32, 96), "gate/up": (160, 96), "down": (96, 160)}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ms", default="1024,4096,16384", help="token counts M")
    ap.add_argument("--rep", type=int, default=100, help="do_bench rep (ms)")
    ap.add_argument("--warmup", type=int, default=25, help="do_bench warmup (ms)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU / interpreter dry run)")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: numerics,gemm,membound")
    return ap.parse_args(argv)


class Timer:
    """do_bench median on CUDA; a plain wall-clock median elsewhere (interpreter dry runs)."""

    def __init__(self, device: torch.device, warmup: int, rep: int):
        self.cuda = device.type == "cuda"
        self.warmup, self.rep = warmup, rep

    def __call__(self, fn) -> float:
        if self.cuda:
            import triton.testing
            return float(triton.testing.do_bench(fn, warmup=self.warmup, rep=self.rep, return_mode="median"))
        fn()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)


def emit(row: dict) -> None:
    print(json.dumps(row), flush=True)


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.to(F64).cpu(), ref.to(F64).cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def operands(m: int, n: int, k: int, direction: str, dev: torch.device, gen: torch.Generator):
    """(x, w, xa, b) for fused_lora_matmul, laid out as the op passes them in each direction."""
    def randn(*shape, dtype, std=1.0):
        return (torch.randn(*shape, generator=gen, device=dev, dtype=F32) * std).to(dtype)

    if direction == "fwd":
        x = randn(m, k, dtype=BF16)
        w = randn(n, k, dtype=BF16, std=k ** -0.5)
        xa = randn(m, RANK, dtype=F32)
        b = randn(n, RANK, dtype=F32, std=0.1)
        return x, w, xa, b
    # dX = dY W + s G A: x = dY [M, N], w = W^T ([K, N] view of the [N, K] weight), b = A^T view.
    dy = randn(m, n, dtype=BF16)
    weight = randn(n, k, dtype=BF16, std=n ** -0.5)
    g = randn(m, RANK, dtype=F32)
    a = randn(RANK, k, dtype=F32, std=0.1)
    return dy, weight.t(), g, a.t()


def cublas_lora(x, w, xa, b, scale):
    low = torch.mm((xa * scale).to(x.dtype), b.to(x.dtype).t())
    return torch.addmm(low, x, w.t())


def bench_gemm(ms, projs, timer, dev, gen) -> list:
    rows = []
    print(f"\n== LoRA GEMM (r={RANK}, bf16 x/W, fp32 A/B): ms and TFLOP/s of 2MNK ==", flush=True)
    print(f"{'dir':<4} {'proj':<8} {'M':>6} {'N':>6} {'K':>6} | {'triton':>15} {'cublas':>15} {'floor':>15} | "
          f"{'winner':<7} {'vs floor':>8}", flush=True)
    for direction in ("fwd", "bwd"):
        for name, (n, k) in projs.items():
            for m in ms:
                x, w, xa, b = operands(m, n, k, direction, dev, gen)
                n_out, k_red = w.shape
                flops = 2 * m * n_out * k_red
                res = {}
                for impl, fn in (("triton", lambda: K.fused_lora_matmul(x, w, xa, b, scale=SCALE)),
                                 ("cublas", lambda: cublas_lora(x, w, xa, b, SCALE)),
                                 ("floor", lambda: x @ w.t())):
                    try:
                        ms_ = timer(fn)
                        res[impl] = ms_
                        rows.append(dict(bench="lora_gemm", dir=direction, proj=name, M=m, N=n_out, K=k_red, r=RANK,
                                         impl=impl, ms=round(ms_, 4), tflops=round(flops / ms_ / 1e9, 1)))
                    except Exception as exc:  # one failing launch must not hide the rest of the table
                        res[impl] = None
                        rows.append(dict(bench="lora_gemm", dir=direction, proj=name, M=m, N=n_out, K=k_red,
                                         r=RANK, impl=impl, error=f"{type(exc).__name__}: {str(exc)[:300]}"))
                    emit(rows[-1])
                timed = {i: t for i, t in res.items() if t is not None and i != "floor"}
                winner = min(timed, key=timed.get) if timed else "-"
                over = (f"{timed[winner] / res['floor'] - 1:+.1%}" if timed and res.get("floor") else "-")
                emit(dict(bench="lora_gemm_winner", dir=direction, proj=name, M=m, N=n_out, K=k_red, winner=winner,
                          **{f"{i}_ms": round(t, 4) if t is not None else None for i, t in res.items()},
                          mnk=m * n_out * k_red))

                def cell(impl):
                    t = res.get(impl)
                    return f"{t:7.3f}/{flops / t / 1e9:6.1f}" if t else f"{'error':>15}"
                print(f"{direction:<4} {name:<8} {m:>6} {n_out:>6} {k_red:>6} | {cell('triton'):>15} "
                      f"{cell('cublas'):>15} {cell('floor'):>15} | {winner:<7} {over:>8}", flush=True)
                del x, w, xa, b
    return rows


SPLITS = (1, 2, 4, 8, 16)


def bench_memory_bound(ms, projs, timer, dev, gen) -> None:
    """Each skinny / weight-gradient launch as the LoRA op issues it (grouped ranks included: q/k/v
    share one XA of rank 3r, gate/up one of 2r), timed with both fp32 dots (bf16x3, the default, and
    tf32x3) at the heuristic split, bf16x3 at every split count, and torch (PEFT's cast-then-mm)."""
    hidden, inter = projs["q/o"][1], projs["down"][1]
    print(f"\n== memory-bound launchers: ms (GB/s of compulsory traffic); split = K splits (skinny) or "
          f"M splits (dA) ==", flush=True)
    head = " ".join(f"{'split=' + str(s):>13}" for s in SPLITS)
    print(f"{'what':<30} {'M':>6} | {'auto bf16x3':>13} {'auto tf32x3':>13} {head} {'torch (peft)':>13}"
          f"   (split=N: bf16x3)",
          flush=True)
    outs = sorted({n for n, _ in projs.values()})
    for m in ms:
        cases = []
        for k, r, label in ((hidden, RANK, "XA  K=%d r=%d"), (hidden, 3 * RANK, "XA  K=%d r=%d (q/k/v)"),
                            (inter, RANK, "XA  K=%d r=%d (down)")):
            x = torch.randn(m, k, generator=gen, device=dev).to(BF16)
            a = torch.randn(r, k, generator=gen, device=dev) * k ** -0.5
            cases.append((label % (k, r), m * k * 2 + r * k * 4 + m * r * 4, "split_k",
                          lambda x=x, a=a, **kw: K.skinny_matmul(x, a, **kw), lambda x=x, a=a: x.float() @ a.t()))
        for n in outs:
            dy = torch.randn(m, n, generator=gen, device=dev).to(BF16)
            b = torch.randn(n, RANK, generator=gen, device=dev) * 0.1
            xa = torch.randn(m, RANK, generator=gen, device=dev)
            cases.append((f"G = dY B    N={n}", m * n * 2 + n * RANK * 4 + m * RANK * 4, "split_k",
                          lambda dy=dy, b=b, **kw: K.skinny_matmul(dy, b.t(), **kw), lambda dy=dy, b=b: dy.float() @ b))
            cases.append((f"dB = dY^T XA N={n}", m * n * 2 + m * RANK * 4 + n * RANK * 4, "split_k",
                          lambda dy=dy, xa=xa, **kw: K.skinny_matmul(dy.t(), xa.t(), scale=SCALE, **kw),
                          lambda dy=dy, xa=xa: SCALE * (dy.t().float() @ xa)))
        for k, r in ((hidden, RANK), (hidden, 3 * RANK), (inter, RANK)):
            x = torch.randn(m, k, generator=gen, device=dev).to(BF16)
            g = torch.randn(m, r, generator=gen, device=dev)
            cases.append((f"dA = G^T X  K={k} r={r}", m * k * 2 + m * r * 4 + r * k * 4, "split_m",
                          lambda g=g, x=x, **kw: K.lowrank_weight_grad(g, x, scale=SCALE, **kw),
                          lambda g=g, x=x: SCALE * (g.t() @ x.float())))
        for what, nbytes, split_arg, ours, torch_fn in cases:
            variants = [("bf16x3", dict(split_fp32=True)), ("tf32x3", dict(split_fp32=False))]
            variants += [(f"split={s}", {split_arg: s, "split_fp32": True}) for s in SPLITS]
            variants += [("torch_peft", None)]
            res = {}
            for impl, kw in variants:
                fn = torch_fn if kw is None else (lambda kw=kw: ours(**kw))
                try:
                    t = timer(fn)
                    res[impl] = t
                    emit(dict(bench="lora_membound", shape=what, M=m, impl=impl, ms=round(t, 4),
                              gbs=round(nbytes / t / 1e6, 1)))
                except Exception as exc:
                    res[impl] = None
                    emit(dict(bench="lora_membound", shape=what, M=m, impl=impl,
                              error=f"{type(exc).__name__}: {str(exc)[:300]}"))

            def cell(impl):
                t = res.get(impl)
                return f"{t:6.3f}({nbytes / t / 1e9:4.2f})" if t else f"{'error':>13}"
            print(f"{what:<30} {m:>6} | " + " ".join(f"{cell(i):>13}" for i, _ in variants), flush=True)


def numerics(projs, m, dev, gen) -> bool:
    print("\n== numerics vs float64 (relative L2; bound 1e-2) ==", flush=True)
    ok = True
    n, k = projs["q/o"]
    for direction in ("fwd", "bwd"):
        x, w, xa, b = operands(m, n, k, direction, dev, gen)
        ref = x.to(F64) @ w.to(F64).t() + SCALE * (xa.to(F64) @ b.to(F64).t())
        for impl, fn in (("triton", lambda: K.fused_lora_matmul(x, w, xa, b, scale=SCALE)),
                         ("cublas", lambda: cublas_lora(x, w, xa, b, SCALE))):
            err = rel_l2(fn(), ref)
            good = err < 1e-2
            ok &= good or impl != "triton"
            emit(dict(bench="lora_numerics", op="fused_lora_matmul" if impl == "triton" else "cublas_path",
                      dir=direction, M=m, N=w.shape[0], K=w.shape[1], rel_l2=err, ok=good))
            print(f"{impl:<7} {direction}: M={m} N={w.shape[0]} K={w.shape[1]} rel L2 {err:.2e} "
                  f"{'ok' if good else '!!!!!!!! TOO LARGE'}", flush=True)
    x = torch.randn(m, k, generator=gen, device=dev).to(BF16)
    a = torch.randn(RANK, k, generator=gen, device=dev)
    g = torch.randn(m, RANK, generator=gen, device=dev)
    checks = []
    for mode, split in (("bf16x3", True), ("tf32x3", False)):
        checks += [(f"skinny_matmul {mode}", K.skinny_matmul(x, a, split_fp32=split), x.to(F64) @ a.to(F64).t()),
                   (f"lowrank_weight_grad {mode}", K.lowrank_weight_grad(g, x, scale=SCALE, split_fp32=split),
                    SCALE * (g.to(F64).t() @ x.to(F64)))]
    for op, out, ref in checks:
        err = rel_l2(out, ref)
        good = err < 1e-4  # fp32 accumulation of exact bf16*fp32 products
        ok &= good
        emit(dict(bench="lora_numerics", op=op, M=m, K=k, rel_l2=err, ok=good))
        print(f"{op}: M={m} K={k} rel L2 {err:.2e} {'ok' if good else '!!!!!!!! TOO LARGE'}", flush=True)
    return ok


def main(argv=None) -> int:
    args = parse_args(argv)
    dev = torch.device(args.device)
    if (why := K.triton_available(dev)) is not None:
        sys.exit(f"fxfuse kernels cannot run on {dev}: {why}")
    ms = [int(s) for s in args.ms.split(",") if s]
    projs = PROJ_8B
    if args.tiny:
        ms, projs = [64], PROJ_TINY
    skip = set(filter(None, args.skip.split(",")))
    timer = Timer(dev, args.warmup, args.rep)
    gen = torch.Generator(dev).manual_seed(0)
    if dev.type == "cuda":
        print(f"device {torch.cuda.get_device_name(dev)}, torch {torch.__version__}", flush=True)
    ok = True
    if "numerics" not in skip:
        ok = numerics(projs, ms[0], dev, gen)
    if "gemm" not in skip:
        bench_gemm(ms, projs, timer, dev, gen)
    if "membound" not in skip:
        bench_memory_bound(ms, projs, timer, dev, gen)
    return 0 if ok else 3


if __name__ == "__main__":
    sys.exit(main())
