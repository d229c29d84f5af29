"""In one process, one compile: a LoRA training step of the 8B shape timed under run-time toggles,
interleaved over rounds, so that machine drift and process-to-process spread do not pass for an
effect (device call; a timing is never a test).

    python bench/runtime_ab.py [--seq 4096] [--steps 4] [--rounds 3] \
        --toggle NAME=ENV=VALUE[,ENV=VALUE...] [--toggle ...]

A toggle sets environment variables that fxfuse reads at run time (not at compile time), e.g.
`FXFUSE_CE_CHUNK_MIB=1024` (lm_head + cross-entropy chunk) or `FXFUSE_RELOAD_WAIT_AT_ISSUE=1`
(reloads wait where they are issued); `base` (no variables) always runs. `--gc` adds two toggles of
Python's cyclic garbage collector: `gc_off` (disabled during the steps) and `gc_frozen` (gc.freeze()
before them, gc.unfreeze() after: the objects compilation left behind are not scanned). Each round runs every
toggle for --steps steps, in a rotated order. Per toggle and round: the step times, when forward()
and backward() return on the host (near the step time, the host is the bottleneck) and the memory
peak of each phase; at the end, per toggle, the median over all its steps.
"""
import argparse
import gc
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
ap.add_argument("--gc", action="store_true", help="also toggle Python's garbage collector (gc_off, gc_frozen)")
args = ap.parse_args()
toggles = {"base": {}}
for spec in args.toggle:
    name, _, assigns = spec.partition("=")
    env = dict(a.split("=", 1) for a in assigns.split(",") if a)
    if not name or not env:
        sys.exit(f"--toggle {spec!r}: expected NAME=ENV=VALUE[,ENV=VALUE...]")
    toggles[name] = env
GC_TOGGLES = ("gc_off", "gc_frozen")
if args.gc:
    toggles.update({name: {} for name in GC_TOGGLES})
# every collection's generation and duration: how much of a step the collector takes
gc_log, gc_t = [], [0.0]


def _gc_timer(phase, info):
    if phase == "start":
        gc_t[0] = time.perf_counter()
    else:
        gc_log.append((info["generation"], time.perf_counter() - gc_t[0]))


gc.callbacks.append(_gc_timer)

model, cfg = build_model("8b", "cuda", 16, True)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
fxfuse.optimize(model, offload_activations=True, verbose=False)
x = torch.randint(0, cfg.vocab_size, (1, args.seq), device="cuda",
                  generator=torch.Generator("cuda").manual_seed(args.seq))
peak = Device("cuda").phase_peak_gib  # the peak since its last call, in GiB


def run(env, n, name=""):
    """n steps under a toggle: their (step, forward() returned, backward() returned, phase peaks) and the
    garbage collections during them (taken before the collector is switched back)."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    rows = []
    if name == "gc_off":
        gc.disable()
    elif name == "gc_frozen":
        gc.freeze()
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
        collections = list(gc_log)
    finally:
        if name == "gc_off":
            gc.enable()
        elif name == "gc_frozen":
            gc.unfreeze()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return rows, collections


t = time.perf_counter()
run({}, 2)
print(f"compiled in {time.perf_counter() - t:.0f}s", flush=True)
every = {name: [] for name in toggles}
names = list(toggles)
for r in range(args.rounds):
    order = names[r % len(names):] + names[:r % len(names)]
    for name in order:
        gc_log.clear()
        rows, collections = run(toggles[name], args.steps, name)
        every[name] += [row[0] for row in rows]
        gc_ms = [round(sum(d for g, d in collections if g == gen) * 1e3, 1) for gen in (0, 1, 2)]
        print(json.dumps(dict(bench="runtime_ab", round=r, toggle=name, env=toggles[name], seq=args.seq,
                              steps=[round(row[0], 4) for row in rows], fwd_host=[round(row[1], 4) for row in rows],
                              bwd_host=[round(row[2], 4) for row in rows], phase_peaks_gib=rows[-1][3],
                              gc_ms_by_generation=gc_ms, gen2_collections=sum(g == 2 for g, _ in collections))),
              flush=True)
for name, times in every.items():
    med = statistics.median(times)
    print(json.dumps(dict(bench="runtime_ab", summary=name, env=toggles[name], seq=args.seq, n=len(times),
                          step_s=round(med, 4), tok_s=round(args.seq / med, 1), min_s=round(min(times), 4),
                          max_s=round(max(times), 4))), flush=True)
