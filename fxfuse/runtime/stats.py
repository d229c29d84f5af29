"""Run-time counters: how often an op ran its Triton kernels, and how often (and why) it fell back
to its eager reference. Reports show these; the benchmark asserts zero fallbacks."""
from __future__ import annotations

from collections import Counter

kernel_calls: Counter = Counter()
fallbacks: Counter = Counter()  # key: (op name, reason)
# data_ptr() of every LoRA A weight a graph fxfuse compiled ran with (backend.py records the graphs'
# inputs): the report checks the model's LoRA layers against it. A layer never seen there ran outside
# the compiled graphs (a graph break, a compile error), unfused. The pointer alone: with CUDA's unified
# addressing host and device pointers do not coincide, and it is 5x cheaper per call than a
# (device, pointer) pair (27 against 130 us for 224 weights on the CI machine).
lora_weights_run: set = set()


def record_kernel(op: str) -> None:
    kernel_calls[op] += 1


def record_fallback(op: str, reason: str) -> None:
    fallbacks[(op, reason)] += 1


def weight_key(t) -> int:
    return t.data_ptr()


def record_lora_weights(tensors) -> None:
    lora_weights_run.update(map(weight_key, tensors))


def dispatch(op: str, device, kernels, reference, args):
    """Run the Triton kernels where they can run on `device`; else the eager reference, counted as a
    fallback with the reason (reports show it; the benchmark asserts there is none)."""
    from .kernels.lora import triton_available  # every kernel family shares this check

    why = triton_available(device)
    if why is None:
        record_kernel(op)
        return kernels(*args)
    record_fallback(op, why)
    return reference(*args)


def reset() -> None:
    kernel_calls.clear()
    fallbacks.clear()
    lora_weights_run.clear()


def snapshot() -> dict:
    return {
        "kernel_calls": dict(kernel_calls),
        "fallbacks": {f"{op}: {why}": n for (op, why), n in fallbacks.items()},
    }
