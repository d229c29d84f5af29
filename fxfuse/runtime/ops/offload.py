"""Host offload of saved activations: `fxfuse::offload` (device -> pinned host memory) and
`fxfuse::reload` (host -> device), inserted by the activation-offload partitioner
(`fxfuse/passes/activation_offload.py`) into the forward and backward graphs that AOTAutograd
partitioned.

Both copies run on one side stream per device, so they overlap with the compute stream:
- offload(x, done, prev_host, sync): the side stream waits for x to be computed, copies it into
  pinned host memory and `record_stream`s x, so the allocator cannot hand x's memory out before the
  copy ends. Inductor may also reuse a dead buffer's storage inside the compiled graph, which the
  allocator never sees: so the sources in `done` (an earlier offload's, `lag` back) are inputs here,
  which keeps them alive up to this call, and the compute stream waits here for their copies (and,
  the side stream being in order, every copy before them). Waiting for the copy `lag` back, not
  the previous one, lets activations computed close together (q, k, v) copy back to back while the
  forward goes on. `prev_host` (the previous offload's output) is an input only to order the chain:
  without it a scheduler may run the offloads in another order. `sync` waits for every copy issued,
  this one too (the last offload of a graph: nothing later would keep the sources alive).
- reload(x, device, wait): allocated on the side stream (so the copy need not wait for compute work
  that still uses the memory) and copied there. With `wait` the compute stream waits for the copy at
  once; without it `reload_wait(out)` does, placed before out's first use: the partitioner issues a
  reload a few backward reads ahead of that use, and a wait at the issue would stall the compute
  stream there whenever the host was not far enough ahead for the copy to have finished (copy
  waits: 63 ms a profiled 4k step at lead 2 with the wait at the issue, 3.6 ms at lead 4 with it at
  the use; bench/RESULTS.md). `reload_wait` declares `out` mutated, so every reader of `out` is
  ordered after it.

On the CPU (tests) both are plain copies: the graph plumbing is the same, there are no streams.

Pinned host memory comes from `HostPool`, not PyTorch's caching host allocator: that one rounds
every block up to a power of two, so a 2.5 GiB layer input (320k tokens, 8B shape) pinned 4 GiB,
and 32 of them exceeded a 128 GiB host (the process was killed on the H200). The pool pins blocks
of the size asked for, rounded to whole pages (cudaHostRegister), and hands a block out again once
no tensor uses it. There is one pool per device, and copies into and out of its blocks all run on
that device's side stream, so a reused block is never written before the reload that read it has
finished.
"""
from __future__ import annotations

import bisect
import threading
from typing import Optional

import torch
from torch import Tensor

from .. import env, host_memory
from ..cuda_fast import current_device, current_stream, on_stream

OFFLOAD = "fxfuse::offload"
RELOAD = "fxfuse::reload"
RELOAD_WAIT = "fxfuse::reload_wait"

_side_streams: dict = {}


def side_stream(device: torch.device) -> "torch.cuda.Stream":
    index = device.index if device.index is not None else current_device()
    if index not in _side_streams:
        _side_streams[index] = torch.cuda.Stream(device=index)
    return _side_streams[index]


def _use_count(block: Tensor) -> int:
    return torch._C._storage_Use_Count(block.untyped_storage()._cdata)


def _cuda_register(block: Tensor) -> None:
    err = torch.cuda.cudart().cudaHostRegister(block.data_ptr(), block.numel(), 1)  # 1: portable
    code = int(getattr(err, "value", err))
    if code != 0:
        raise RuntimeError(f"cudaHostRegister of {block.numel() >> 20} MiB failed "
                           f"({torch.cuda.cudart().cudaGetErrorString(err)}, {code}): host memory for "
                           "activation offload could not be pinned")


def _cuda_unregister(block: Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(block.data_ptr())


class HostPool:
    """Pinned host blocks of the requested size rounded up to whole pages (page-aligned, so pinning
    covers no neighbouring heap memory), one pool per device. A block is handed out again, for a
    request of at least 1/`max_slack` of its size, once no tensor shares its storage; free blocks
    stay pinned until `release()`. The host tensors are internal to the offload graph: holding one's
    storage without a tensor (`t.untyped_storage()`) is not seen, so the pool must stay private."""

    def __init__(self, register=_cuda_register, unregister=_cuda_unregister, page: int = 4096,
                 max_slack: float = 1.25, available=host_memory.available_bytes, reserve: int = 2 << 30):
        """available() -> the host's available bytes (None: unknown); a new block must leave `reserve`
        of it, or `take` raises instead of pinning (pinned pages cannot be swapped: running the host
        out kills the process, and a plan made on a larger host, or cached, can ask for too much)."""
        self.register, self.unregister, self.page, self.max_slack = register, unregister, page, max_slack
        self.available, self.reserve = available, reserve
        # blocks by size: (page-aligned uint8 block, its use count when unused), sizes kept sorted
        self._buckets: dict[int, list[tuple[Tensor, int]]] = {}
        self._sizes: list[int] = []
        # per size, where the next search starts: a training step takes its blocks in the same order
        # each step, so the block after the last one taken is the free one (a whole scan per take
        # was quadratic: ~12 ms a step on the host at 160 offloads, on the forward's critical path)
        self._cursor: dict[int, int] = {}
        self._lock = threading.Lock()

    @property
    def blocks(self) -> list[tuple[Tensor, int]]:
        return [entry for size in list(self._sizes) for entry in self._buckets.get(size, ())]

    def _reuse(self, size: int) -> Optional[Tensor]:
        """The smallest free block of `size` up to `size * max_slack` bytes, or None."""
        i = bisect.bisect_left(self._sizes, size)
        while i < len(self._sizes) and self._sizes[i] <= size * self.max_slack:
            bucket_size = self._sizes[i]
            bucket, start = self._buckets[bucket_size], self._cursor.get(bucket_size, 0)
            for j in range(len(bucket)):
                k = (start + j) % len(bucket)
                block, idle = bucket[k]
                if _use_count(block) <= idle:
                    self._cursor[bucket_size] = k + 1
                    return block
            i += 1
        return None

    def take(self, x: Tensor) -> Tensor:
        """A host tensor with x's shape, strides and dtype in a free block (x is dense: contiguous,
        or a permutation of a contiguous layout)."""
        nbytes = x.numel() * x.element_size()
        size = max(-(-nbytes // self.page) * self.page, self.page)
        with self._lock:
            block = self._reuse(size)
            if block is None:
                self._check_host(size)
                raw = torch.empty(size + self.page, dtype=torch.uint8)
                start = -raw.data_ptr() % self.page
                block = raw[start:start + size]
                del raw
                self.register(block)
                if size not in self._buckets:  # the bucket first: `blocks` reads without the lock
                    self._buckets[size] = []
                    bisect.insort(self._sizes, size)
                self._buckets[size].append((block, _use_count(block)))
            return block[:nbytes].view(x.dtype).as_strided(x.size(), x.stride())

    def _check_host(self, size: int) -> None:
        left = self.available()
        if left is not None and size > left - self.reserve:
            raise RuntimeError(
                f"activation offload: pinning another {size / 2**20:.0f} MiB would leave "
                f"{(left - size) / 2**20:.0f} MiB of host memory (available {left / 2**20:.0f} MiB, "
                f"{self.pinned_bytes / 2**20:.0f} MiB pinned already, reserve {self.reserve / 2**20:.0f} MiB). "
                "The offload plan was sized at compile time for a host with more free memory (or came from "
                "the cache): free host memory, or optimize with a lower ActivationOffload(host_fraction=...) "
                "in a fresh cache directory (FXFUSE_CACHE_DIR)")

    def release(self) -> int:
        """Unpins and drops the free blocks; returns the bytes released. The caller makes sure no
        copy still reads them (torch.cuda.synchronize())."""
        gone = []
        with self._lock:
            for size in list(self._sizes):
                kept = []
                for b, idle in self._buckets[size]:
                    if _use_count(b) <= idle:
                        gone.append(b)
                    else:
                        kept.append((b, idle))
                if kept:
                    self._buckets[size] = kept
                else:
                    self._sizes.remove(size)
                    del self._buckets[size]
                self._cursor.pop(size, None)
        for b in gone:
            self.unregister(b)
        return sum(b.numel() for b in gone)

    @property
    def pinned_bytes(self) -> int:
        return sum(b.numel() for b, _ in self.blocks)


# Copies into and out of a pool's blocks are ordered by one device's side stream only: a pool per
# device, so a block freed by one device's reload is never rewritten by another device's offload.
host_pools: dict[int, HostPool] = {}


def host_pool(device: torch.device) -> HostPool:
    index = device.index if device.index is not None else current_device()
    return host_pools.setdefault(index, HostPool())


def release_host_memory() -> int:
    """Unpins the offload's free host blocks on every device (e.g. after training, before a
    different workload); returns the bytes released."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return sum(pool.release() for pool in host_pools.values())


# Per device: (source data_ptr, event recorded after its copy) of the copies not yet waited for.
_in_flight: dict[int, list] = {}


def _wait_for(compute, flight: list, done: list[Tensor]) -> None:
    """The compute stream waits for the copies of `done` (and those issued before them)."""
    ptrs = {t.data_ptr() for t in done}
    hit = max((i for i, (ptr, _) in enumerate(flight) if ptr in ptrs), default=None)
    if hit is None or len({p for p, _ in flight[:hit + 1]} & ptrs) < len(ptrs):
        compute.wait_stream(side_stream(compute.device))  # not found (cannot happen): wait for all
        flight.clear()
        return
    compute.wait_event(flight[hit][1])
    del flight[:hit + 1]


@torch.library.custom_op(OFFLOAD, mutates_args=())
def offload(x: Tensor, done: list[Tensor], prev_host: Optional[Tensor], sync: bool) -> Tensor:
    if x.device.type != "cuda":
        return x.clone()  # already on the host (CPU tests): a copy, as the device path makes
    compute = current_stream(x.device)
    side = side_stream(x.device)
    flight = _in_flight.setdefault(side.device_index, [])
    if prev_host is None and flight:  # a graph's first offload: an earlier run stopped midway
        compute.wait_stream(side)
        flight.clear()
    if done:
        _wait_for(compute, flight, done)  # their storage may be reused after this call
    side.wait_stream(compute)  # x is computed
    with on_stream(side):
        host = host_pool(x.device).take(x)
        host.copy_(x, non_blocking=True)
        event = torch.cuda.Event()
        event.record(side)
    x.record_stream(side)
    if sync:
        compute.wait_stream(side)
        flight.clear()
    else:
        flight.append((x.data_ptr(), event))
    return host


@offload.register_fake
def _(x, done, prev_host, sync):
    return torch.empty_strided(x.size(), x.stride(), dtype=x.dtype, device="cpu")


def _wait_at_issue() -> bool:
    """FXFUSE_RELOAD_WAIT_AT_ISSUE=1: every reload waits at its issue, as wait=True does, whatever
    the graph asks; for an A/B of the two placements in one compiled process (bench/runtime_ab.py)."""
    return env.flag("FXFUSE_RELOAD_WAIT_AT_ISSUE", False)


# Per device: reloads issued without a wait, by the reloaded tensor's data_ptr: the event recorded
# after its copy, which `reload_wait` makes the compute stream wait for.
_pending_reloads: dict[int, dict[int, "torch.cuda.Event"]] = {}


@torch.library.custom_op(RELOAD, mutates_args=())
def reload(x: Tensor, device: torch.device, wait: bool = True) -> Tensor:
    if device.type != "cuda":
        return x.clone()
    compute = current_stream(device)
    side = side_stream(device)
    with on_stream(side):
        out = torch.empty_strided(x.size(), x.stride(), dtype=x.dtype, device=device)
        out.copy_(x, non_blocking=True)
        if not wait:
            event = torch.cuda.Event()
            event.record(side)
    if wait or _wait_at_issue():
        compute.wait_stream(side)
    if not wait:  # reload_wait looks its event up (a no-op wait when the stream waited above)
        _pending_reloads.setdefault(side.device_index, {})[out.data_ptr()] = event
    out.record_stream(compute)
    return out


@reload.register_fake
def _(x, device, wait=True):
    return torch.empty_strided(x.size(), x.stride(), dtype=x.dtype, device=device)


@torch.library.custom_op(RELOAD_WAIT, mutates_args=("x",))
def reload_wait(x: Tensor) -> None:
    """The compute stream waits for x's copy, issued by `reload(..., wait=False)`. x is declared
    mutated (it is not written) so that the compiler orders every later reader of x after this."""
    if x.device.type != "cuda":
        return
    compute = current_stream(x.device)
    side = side_stream(x.device)
    event = _pending_reloads.get(side.device_index, {}).pop(x.data_ptr(), None)
    if event is None:  # not issued by reload(wait=False), or a 0-byte tensor (data_ptr 0): wait for every copy
        compute.wait_stream(side)
    else:
        compute.wait_event(event)


@reload_wait.register_fake
def _(x):
    return None
