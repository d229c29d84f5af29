"""The current CUDA device and stream, and a stream switch, through the C getters and setter that
torch.cuda's Python wrappers call. The wrappers cost ~2-10 us a call (lazy-init checks, device-index
parsing, a new Stream object each time), and the LoRA launchers and the offload ops make thousands
of such calls in a training step (bench/RESULTS.md, host profile of a 1k step). CPU builds of torch
lack the C functions: there the public API is used (and monkeypatching it in tests still works)."""
from __future__ import annotations

import torch

_get_device = getattr(torch._C, "_cuda_getDevice", None)
_get_stream = getattr(torch._C, "_cuda_getCurrentStream", None)
_set_stream = getattr(torch._C, "_cuda_setStream", None)
_streams: dict = {}  # (stream_id, device_index, device_type) -> torch.cuda.Stream
_STREAMS_MAX = 64  # ids of PyTorch's pool streams are fixed for the process; external streams come and go


def current_device() -> int:
    return _get_device() if _get_device is not None else torch.cuda.current_device()


def current_stream(device: torch.device) -> "torch.cuda.Stream":
    """torch.cuda.current_stream(device), one Stream object per stream."""
    if _get_stream is None:
        return torch.cuda.current_stream(device)
    data = _get_stream(device.index if device.index is not None else current_device())
    stream = _streams.get(data)
    if stream is None:
        if len(_streams) >= _STREAMS_MAX:
            _streams.clear()
        stream = _streams[data] = torch.cuda.Stream(stream_id=data[0], device_index=data[1], device_type=data[2])
    return stream


class on_stream:
    """`with torch.cuda.stream(stream)`: the stream current on its device at entry is restored at exit
    (also on an exception). A stream of another device than the current one goes through
    torch.cuda.stream, which also switches the device."""

    def __init__(self, stream: "torch.cuda.Stream"):
        self.stream = stream
        fast = _set_stream is not None and _get_stream is not None and stream.device_index == current_device()
        self.ctx = None if fast else torch.cuda.stream(stream)
        self.saved = None

    def __enter__(self):
        if self.ctx is not None:
            return self.ctx.__enter__()
        self.saved = _get_stream(self.stream.device_index)
        _set_stream(self.stream.stream_id, self.stream.device_index, self.stream.device_type)

    def __exit__(self, *exc):
        if self.ctx is not None:
            return self.ctx.__exit__(*exc)
        _set_stream(*self.saved)
