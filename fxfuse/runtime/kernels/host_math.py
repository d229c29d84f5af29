"""Integer helpers for kernel launchers, in plain Python.

`triton.cdiv` and `triton.next_power_of_2` are JIT-wrapped: each host call costs ~6 us of Python
(measured), and a LoRA launch made five of them. Launchers run hundreds of times per training step
on a host that is close to being the bottleneck, so they use these instead.
"""
from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n, as triton.next_power_of_2 (which gives 0 for 0)."""
    n = int(n)
    return n if n <= 1 else 1 << (n - 1).bit_length()
