"""Idle gaps of the compute stream in a profiled step (device-side; a timing is never a test).

The compute stream is the one with the most kernel time. A gap is time between two of its kernels;
each gap is labelled by what ended just before the next kernel started:
- `copy`: a host<->device copy on another stream ended within 20 us before it (the stream waited
  for an offload / reload copy);
- `host`: nothing did (the host had not issued the next kernel yet: launch / Python overhead, or a
  host-side wait).
Where the step launches a marker kernel (`torch.cuda._sleep`, "spin_kernel") on the compute
stream before its forward, backward and optimizer step, as profile_step.py does, busy and idle
time are also split by phase: a kernel or gap belongs to the phase of the last marker before it.
"""
from __future__ import annotations

import bisect
import json
import os
import tempfile
from collections import Counter, defaultdict


def _events(prof):
    with tempfile.TemporaryDirectory(prefix="fxfuse_trace_") as tmp:  # traces run to 100s of MB
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    kernels, copies = [], []
    for e in trace.get("traceEvents", []):
        if e.get("ph") != "X":
            continue
        cat = e.get("cat", "")
        args = e.get("args", {})
        row = (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), args.get("stream"), e.get("name", ""))
        if cat == "kernel" or cat == "gpu_memset":
            kernels.append(row)
        elif cat == "gpu_memcpy":
            copies.append(row)
    return kernels, copies


PHASES = ("forward", "backward", "optimizer")


def _phase_finder(markers):
    """t -> the phase of the last marker kernel at or before t (markers cycle through PHASES), or
    "before" ahead of the first marker."""
    starts = sorted(markers)

    def find(t):
        i = bisect.bisect_right(starts, t) - 1
        return PHASES[i % len(PHASES)] if i >= 0 else "before"
    return find


def report(prof, steps: int = 1, top: int = 12) -> None:
    kernels, copies = _events(prof)
    if not kernels:
        print("GAPS no kernels in the trace")
        return
    by_stream = defaultdict(float)
    for s, e, stream, _ in kernels:
        by_stream[stream] += e - s
    main = max(by_stream, key=by_stream.get)
    # a copy on the compute stream itself is its work (busy), not something it waits for
    ks = sorted(k for k in kernels + copies if k[2] == main)
    markers = [k[0] for k in ks if "spin_kernel" in k[3]]
    phase_of = _phase_finder(markers)
    copies = [c for c in copies if c[2] != main]
    copy_ends = sorted(c[1] for c in copies)
    copy_us = sum(c[1] - c[0] for c in copies)
    busy = sum(e - s for s, e, _, _ in ks)
    span = ks[-1][1] - ks[0][0]
    kinds, gaps, per_phase = Counter(), [], defaultdict(Counter)
    for k in ks:
        per_phase[phase_of(k[0])]["busy"] += k[1] - k[0]
    for prev, nxt in zip(ks, ks[1:]):
        gap = nxt[0] - prev[1]
        if gap <= 2:
            continue
        i = bisect.bisect_right(copy_ends, nxt[0]) - 1
        kind = "copy" if i >= 0 and copy_ends[i] >= nxt[0] - 20 and copy_ends[i] > prev[1] else "host"
        kinds[kind] += gap
        per_phase[phase_of(prev[1] + gap / 2)][kind] += gap
        gaps.append((gap, kind, prev[3], nxt[3]))
    print(f"GAPS compute stream {main}: per step busy {busy / steps / 1e3:.2f} ms, first-to-last {span / steps / 1e3:.2f} ms, "
          f"idle {(span - busy) / steps / 1e3:.2f} ms ({len(gaps) / steps:.0f} gaps > 2 us; the span holds "
          f"{steps - 1} of the {steps} step boundaries); "
          f"copies on other streams {copy_us / steps / 1e3:.2f} ms ({len(copies) // steps})")
    for kind, us in kinds.most_common():
        print(f"GAPS   idle waiting on {kind:<5} {us / steps / 1e3:8.2f} ms per step")
    if markers:
        for name, c in sorted(per_phase.items(), key=lambda kv: -sum(kv[1].values())):
            print(f"PHASE {name:<10} busy {c['busy'] / steps / 1e3:8.2f} ms, waiting on host {c['host'] / steps / 1e3:7.2f} ms, "
                  f"on copies {c['copy'] / steps / 1e3:7.2f} ms per step")
    for gap, kind, before, after in sorted(gaps, reverse=True)[:top]:
        print(f"GAP {gap:9.1f} us  {kind:<4}  after {before[:70]}  before {after[:70]}")
    sizes = ("<10us", "10-50us", "50-200us", ">=200us")
    hist = Counter()
    for gap, kind, _, _ in gaps:
        hist[sizes[0] if gap < 10 else sizes[1] if gap < 50 else sizes[2] if gap < 200 else sizes[3]] += gap
    print("GAPS by size (ms per step): " + ", ".join(f"{k} {hist[k] / steps / 1e3:.2f}" for k in sizes))
