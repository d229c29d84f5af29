"""Run-time counters: how often an op ran its Triton kernels, and how often (and why) it fell back
to its eager reference. Reports show these; the benchmark asserts zero fallbacks."""
from __future__ import annotations

from collections import Counter

kernel_calls: Counter = Counter()
fallbacks: Counter = Counter()  # key: (op name, reason)


def record_kernel(op: str) -> None:
    kernel_calls[op] += 1


def record_fallback(op: str, reason: str) -> None:
    fallbacks[(op, reason)] += 1


def reset() -> None:
    kernel_calls.clear()
    fallbacks.clear()


def snapshot() -> dict:
    return {
        "kernel_calls": dict(kernel_calls),
        "fallbacks": {f"{op}: {why}": n for (op, why), n in fallbacks.items()},
    }
