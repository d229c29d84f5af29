"""Host offload of saved activations: `fxfuse::offload` (device -> pinned host memory) and
`fxfuse::reload` (host -> device), inserted by the activation-offload partitioner
(`fxfuse/passes/activation_offload.py`) into the forward and backward graphs that AOTAutograd
partitioned.

Both copies run on one side stream per device, so they overlap with the compute stream:
- offload(x, prev, sync): the side stream waits for x to be computed, copies it into pinned host
  memory and `record_stream`s x, so the allocator cannot hand x's memory out before the copy ends.
  Inductor may also reuse a dead buffer's storage inside the compiled graph, which the allocator
  never sees: so `prev` (the previous offloaded tensor) is an input here, which keeps it alive up to
  this call, and the compute stream waits here for the copies already issued, prev's among them
  (long finished by then: a decoder layer ran in between). `prev_host` (the previous offload's
  output) is an input only to order the chain: without it a scheduler may run the offloads in
  another order. `sync` waits for this very copy (the last offload of a graph: nothing later would
  keep its source alive).
- reload(x, device): allocated on the side stream (so the copy need not wait for compute work that
  still uses the memory), copied, then the compute stream waits for it. The partitioner issues a
  reload one decoder layer before its first use; since the host runs ahead of the GPU, the copy has
  usually finished when the compute stream reaches the wait.

On the CPU (tests) both are plain copies: the graph plumbing is the same, there are no streams.

Pinned host memory comes from `HostPool`, not PyTorch's caching host allocator: that one rounds
every block up to a power of two, so a 2.5 GiB layer input (320k tokens, 8B shape) pinned 4 GiB,
and 32 of them exceeded a 128 GiB host (the process was killed on the H200). The pool pins blocks
of the exact size (cudaHostRegister) and hands a block out again once no tensor uses it; copies
into and out of it all run on the one side stream, so a reused block is never written before the
reload that read it has finished.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

OFFLOAD = "fxfuse::offload"
RELOAD = "fxfuse::reload"

_side_streams: dict = {}


def side_stream(device: torch.device) -> "torch.cuda.Stream":
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _side_streams:
        _side_streams[index] = torch.cuda.Stream(device=index)
    return _side_streams[index]


def _use_count(block: Tensor) -> int:
    return torch._C._storage_Use_Count(block.untyped_storage()._cdata)


def _cuda_register(block: Tensor) -> None:
    err = torch.cuda.cudart().cudaHostRegister(block.data_ptr(), block.numel(), 1)  # 1: portable
    if int(getattr(err, "value", err)) != 0:
        raise RuntimeError(f"cudaHostRegister of {block.numel() >> 20} MiB failed (cudaError {err}): "
                           "host memory for activation offload could not be pinned")


class HostPool:
    """Exact-size pinned host blocks, reused (smallest fitting free block first) once no tensor
    uses them; they stay pinned for the process, like the caching allocator's."""

    def __init__(self, register=_cuda_register):
        self.register = register
        self.blocks: list[tuple[Tensor, int]] = []  # (uint8 block, its use count when unused)

    def take(self, x: Tensor) -> Tensor:
        """A host tensor with x's shape and dtype (contiguous) in a free block."""
        nbytes = x.numel() * x.element_size()
        free = [b for b, idle in self.blocks if b.numel() >= nbytes and _use_count(b) <= idle]
        if free:
            block = min(free, key=Tensor.numel)
        else:
            block = torch.empty(max(nbytes, 1), dtype=torch.uint8)
            self.register(block)
            self.blocks.append((block, _use_count(block)))
        return block[:nbytes].view(x.dtype).view(x.shape)

    @property
    def pinned_bytes(self) -> int:
        return sum(b.numel() for b, _ in self.blocks)


host_pool = HostPool()


@torch.library.custom_op(OFFLOAD, mutates_args=())
def offload(x: Tensor, prev: Optional[Tensor], prev_host: Optional[Tensor], sync: bool) -> Tensor:
    if x.device.type != "cuda":
        return x.clone()  # already on the host (CPU tests): a copy, as the device path makes
    compute = torch.cuda.current_stream(x.device)
    side = side_stream(x.device)
    if prev is not None:
        compute.wait_stream(side)  # prev's copy is done: its storage may be reused after this call
    side.wait_stream(compute)  # x is computed
    with torch.cuda.stream(side):
        host = host_pool.take(x)
        host.copy_(x, non_blocking=True)
    x.record_stream(side)
    if sync:
        compute.wait_stream(side)
    return host


@offload.register_fake
def _(x, prev, prev_host, sync):
    return torch.empty_strided(x.size(), x.stride(), dtype=x.dtype, device="cpu")


@torch.library.custom_op(RELOAD, mutates_args=())
def reload(x: Tensor, device: torch.device) -> Tensor:
    if device.type != "cuda":
        return x.clone()
    compute = torch.cuda.current_stream(device)
    side = side_stream(device)
    with torch.cuda.stream(side):
        out = torch.empty_strided(x.size(), x.stride(), dtype=x.dtype, device=device)
        out.copy_(x, non_blocking=True)
    compute.wait_stream(side)
    out.record_stream(compute)
    return out


@reload.register_fake
def _(x, device):
    return torch.empty_strided(x.size(), x.stride(), dtype=x.dtype, device=device)
