"""Host-side timing shared by the launch-overhead scripts (op_overhead.py, launch_cost.py)."""
from __future__ import annotations

import time

import torch


def issue_us(fn, calls: int) -> tuple[float, float]:
    """(host, wall) us per call: the host time to issue `calls` calls (no sync inside), and the
    time until the GPU has drained them."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / calls
    return host * 1e6, wall * 1e6


def interleaved_host_us(named, rounds: int, calls: int, warmup: int = 10) -> dict:
    """Host us per call of each (name, fn), one sample per round, the order rotated each round so
    that a slow stretch of the host does not land on one of them."""
    for _, fn in named:
        for _ in range(warmup):
            fn()
    seen = {name: [] for name, _ in named}
    for r in range(rounds):
        for name, fn in named[r % len(named):] + named[:r % len(named)]:
            seen[name].append(issue_us(fn, calls)[0])
    return seen
