"""Where a training step's host time goes (device call; a timing is never a test).

    python bench/host_profile.py [--seq 1024] [--steps 3] [--top 45]

Builds the 8B-shaped LoRA model with fxfuse's defaults + activation offload (as bench_lora.py's
fxfuse-offload), compiles it, then runs --steps steps under cProfile. At short context the GPU
finishes its work before the host has issued the next, so the step time is host time; this says
which Python functions it is spent in. Prints the step times without and with the profiler (its
overhead inflates Python-heavy code, so read shares, not absolute times), the functions with the
most own time and with the most cumulative time, and own time summed by area (fxfuse's modules,
Inductor's generated code, torch's runtime wrappers, autograd, C calls).
"""
import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_lora import build_model  # noqa: E402

import fxfuse  # noqa: E402

# own time is summed by the first of these fragments found in a function's file name
AREAS = [
    ("fxfuse/runtime/kernels", "fxfuse kernels (launchers)"),
    ("fxfuse/runtime/ops", "fxfuse ops"),
    ("fxfuse/runtime", "fxfuse runtime (other)"),
    ("fxfuse", "fxfuse (other)"),
    ("torchinductor", "Inductor generated code"),
    ("triton", "triton"),
    ("torch/_inductor", "torch/_inductor"),
    ("torch/_functorch", "torch/_functorch (AOT runtime wrappers)"),
    ("torch/autograd", "torch/autograd"),
    ("torch/_dynamo", "torch/_dynamo"),
    ("torch/_ops", "torch/_ops (op dispatch)"),
    ("torch/_library", "torch/_library (custom ops)"),
    ("torch/cuda", "torch/cuda"),
    ("torch/", "torch (other)"),
    ("transformers", "transformers"),
    ("peft", "peft"),
    ("~", "C functions and methods"),
]


def area(filename: str) -> str:
    for frag, name in AREAS:
        if frag in filename:
            return name
    return "other"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=45)
    ap.add_argument("--size", default="8b", choices=["8b", "1b", "tiny"])
    ap.add_argument("--device", default="cuda", help="cpu: a rehearsal of this script (tiny model)")
    args = ap.parse_args()

    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model, cfg = build_model(args.size, args.device, 16, True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    fxfuse.optimize(model, offload_activations=True, verbose=False)
    x = torch.randint(0, cfg.vocab_size, (1, args.seq), device=args.device,
                      generator=torch.Generator(args.device).manual_seed(args.seq))

    def step():
        out = model(input_ids=x, labels=x)
        t1 = time.perf_counter()
        out.loss.backward()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return t1, t2

    def timed(n):
        rows = []
        for _ in range(n):
            sync()
            t0 = time.perf_counter()
            t1, t2 = step()
            t3 = time.perf_counter()
            sync()
            rows.append(dict(step=round(time.perf_counter() - t0, 4), fwd_host=round(t1 - t0, 4),
                             bwd_host=round(t2 - t0, 4), host=round(t3 - t0, 4)))
        return rows

    t = time.perf_counter()
    timed(2)
    print(f"compiled in {time.perf_counter() - t:.0f}s", flush=True)
    plain = timed(args.steps)
    prof = cProfile.Profile()
    sync()
    prof.enable()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    host = time.perf_counter() - t0
    prof.disable()
    sync()
    print(json.dumps(dict(bench="host_profile", seq=args.seq, steps_plain=plain,
                          profiled_host_s_per_step=round(host / args.steps, 4))), flush=True)

    st = pstats.Stats(prof)
    by_area = {}
    for (filename, _, _), (_, _, tt, _, _) in st.stats.items():
        by_area[area(filename)] = by_area.get(area(filename), 0.0) + tt
    total = sum(by_area.values())
    print(f"\nown time by area, per step (profiled; total {total / args.steps * 1e3:.1f} ms):")
    for name, tt in sorted(by_area.items(), key=lambda kv: -kv[1]):
        print(f"  {tt / args.steps * 1e3:8.2f} ms  {100 * tt / total:5.1f}%  {name}")
    for key in ("tottime", "cumulative"):
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(args.top)
        print(f"\n=== top {args.top} by {key} (all {args.steps} steps) ===")
        print("\n".join(line for line in buf.getvalue().splitlines() if line.strip())[:20000])


if __name__ == "__main__":
    main()
