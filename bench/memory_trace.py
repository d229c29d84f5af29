"""What is alive on the GPU at the peak of one step: replays the allocator's trace (alloc / free
events recorded by torch.cuda.memory._record_memory_history) to the moment the allocated total was
highest, then groups the live blocks by where they were allocated. Used by bench_lora.py --trace-step.
"""
from __future__ import annotations

from collections import defaultdict

import torch

_SKIP = ("site-packages/torch/", "contextlib.py", "<frozen", "threading.py", "site-packages/triton/")


def start():
    torch.cuda.memory._record_memory_history(max_entries=4_000_000, stacks="python")
    return torch.cuda.memory_allocated()


def _where(frames, depth=3):
    mine = [f for f in frames if not any(s in f["filename"] for s in _SKIP)] or frames
    return " < ".join(f"{f['filename'].rsplit('/', 1)[-1]}:{f['line']}:{f['name']}" for f in mine[:depth])


def report(baseline: int, top: int = 25, dump: str | None = None) -> list[str]:
    """Stop recording; the lines to print (GiB). baseline: memory allocated when recording began.
    dump: a .json.gz path to write every alloc/free event (action, addr, size, allocation site six
    frames deep) for reading offline."""
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    events = [e for t in snap["device_traces"] for e in t if e["action"] in ("alloc", "free_completed")]
    if dump:
        import gzip
        import json
        with gzip.open(dump, "wt") as f:
            json.dump({"baseline": baseline, "events": [
                (e["action"], e["addr"], e["size"], _where(e["frames"], depth=6)) for e in events]}, f)
    total, peak, at = 0, 0, -1
    for i, e in enumerate(events):
        total += e["size"] if e["action"] == "alloc" else -e["size"]
        if total > peak:
            peak, at = total, i
    live = {}
    for e in events[:at + 1]:
        if e["action"] == "alloc":
            live[e["addr"]] = e
        else:
            live.pop(e["addr"], None)
    by = defaultdict(lambda: [0, 0, defaultdict(int)])
    for e in live.values():
        w = by[_where(e["frames"])]
        w[0] += e["size"]
        w[1] += 1
        w[2][e["size"]] += 1
    lines = [f"PEAKLIVE baseline {baseline / 2**30:.3f} GiB + {peak / 2**30:.3f} GiB allocated in the step "
             f"(event {at} of {len(events)}; frees of blocks allocated before the step count negative)"]
    for where, (size, n, sizes) in sorted(by.items(), key=lambda kv: -kv[1][0])[:top]:
        blocks = ", ".join(f"{c}x{b / 2**20:.2f}" for b, c in sorted(sizes.items(), key=lambda kv: -kv[0])[:6])
        lines.append(f"PEAKLIVE {size / 2**20:10.1f} MiB {n:5d} blocks  {where}  [MiB: {blocks}]")
    return lines
