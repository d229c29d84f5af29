"""In one process, one compile: a LoRA training step of the 8B shape timed under run-time toggles,
interleaved over rounds, so that machine drift and process-to-process spread do not pass for an
effect (device call; a timing is never a test).

    python bench/runtime_ab.py [--seq 4096] [--steps 4] [--rounds 3] \
        --toggle NAME=ENV=VALUE[,ENV=VALUE...] [--toggle ...]

A toggle sets environment variables that fxfuse reads at run time (not at compile time), e.g.
`FXFUSE_CE_CHUNK_MIB=1024` (lm_head + cross-entropy chunk) or `FXFUSE_RELOAD_WAIT_AT_ISSUE=1`
(reloads wait where they are issued); `base` (no variables) always runs. Each round runs every
toggle for --steps steps, in a rotated order. Per toggle and round: the step times, when forward()
and backward() return on the host (near the step time, the host is the bottleneck) and the memory
peak of each phase; at the end, per toggle, the median over all its steps.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_lora import Device, build_model  # noqa: E402

import fxfuse  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--seq", type=int, default=4096)
ap.add_argument("--steps", type=int, default=4)
ap.add_argument("--rounds", type=int, default=3)
ap.add_argument("--toggle", action="append", default=[], help="NAME=ENV=VALUE[,ENV=VALUE...]")
args = ap.parse_args()
toggles = {"base": {}}
for spec in args.toggle:
    name, _, assigns = spec.partition("=")
    env = dict(a.split("=", 1) for a in assigns.split(",") if a)
    if not name or not env:
        sys.exit(f"--toggle {spec!r}: expected NAME=ENV=VALUE[,ENV=VALUE...]")
    toggles[name] = env

model, cfg = build_model("8b", "cuda", 16, True)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
fxfuse.optimize(model, offload_activations=True, verbose=False)
x = torch.randint(0, cfg.vocab_size, (1, args.seq), device="cuda",
                  generator=torch.Generator("cuda").manual_seed(args.seq))
peak = Device("cuda").phase_peak_gib  # the peak since its last call, in GiB


def run(env, n):
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    rows = []
    try:
        for _ in range(n):
            torch.cuda.synchronize()
            peak()
            t0 = time.perf_counter()
            out = model(input_ids=x, labels=x)
            t1, p_fwd = time.perf_counter(), peak()
            out.loss.backward()
            t2, p_bwd = time.perf_counter(), peak()
            opt.step()
            opt.zero_grad(set_to_none=True)
            p_opt = peak()
            torch.cuda.synchronize()
            rows.append((time.perf_counter() - t0, t1 - t0, t2 - t0, [p_fwd, p_bwd, p_opt]))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return rows


t = time.perf_counter()
run({}, 2)
print(f"compiled in {time.perf_counter() - t:.0f}s", flush=True)
every = {name: [] for name in toggles}
names = list(toggles)
for r in range(args.rounds):
    order = names[r % len(names):] + names[:r % len(names)]
    for name in order:
        rows = run(toggles[name], args.steps)
        every[name] += [row[0] for row in rows]
        print(json.dumps(dict(bench="runtime_ab", round=r, toggle=name, env=toggles[name], seq=args.seq,
                              steps=[round(row[0], 4) for row in rows], fwd_host=[round(row[1], 4) for row in rows],
                              bwd_host=[round(row[2], 4) for row in rows], phase_peaks_gib=rows[-1][3])), flush=True)
for name, times in every.items():
    med = statistics.median(times)
    print(json.dumps(dict(bench="runtime_ab", summary=name, env=toggles[name], seq=args.seq, n=len(times),
                          step_s=round(med, 4), tok_s=round(args.seq / med, 1), min_s=round(min(times), 4),
                          max_s=round(max(times), 4))), flush=True)
