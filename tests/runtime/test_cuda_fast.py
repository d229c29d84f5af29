"""fxfuse.runtime.cuda_fast against fakes of torch's C stream getters and setter (CI has no GPU; the
offload GPU tests run it for real): the stream switch restores what was current at entry, also
after an exception; another device's stream goes through torch.cuda.stream; one Stream object per
stream."""
import types

import pytest
import torch

from fxfuse.runtime import cuda_fast


@pytest.fixture
def fake(monkeypatch):
    state = {"device": 0, "current": {0: (1, 0, 1), 1: (1, 1, 1)}, "sets": [], "ctx": []}
    monkeypatch.setattr(cuda_fast, "_get_device", lambda: state["device"])
    monkeypatch.setattr(cuda_fast, "_get_stream", lambda index: state["current"][index])

    def set_stream(stream_id, device_index, device_type):
        state["sets"].append((stream_id, device_index))
        state["current"][device_index] = (stream_id, device_index, device_type)

    monkeypatch.setattr(cuda_fast, "_set_stream", set_stream)
    monkeypatch.setattr(cuda_fast, "_streams", {})

    class FakeStream(types.SimpleNamespace):
        def __init__(self, stream_id, device_index, device_type):
            super().__init__(stream_id=stream_id, device_index=device_index, device_type=device_type)

    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)

    class FakeContext:
        def __init__(self, stream):
            self.stream = stream

        def __enter__(self):
            state["ctx"].append(("enter", self.stream.stream_id))

        def __exit__(self, *exc):
            state["ctx"].append(("exit", self.stream.stream_id))

    monkeypatch.setattr(torch.cuda, "stream", FakeContext)
    return state, FakeStream


def test_switch_and_restore(fake):
    state, Stream = fake
    side = Stream(7, 0, 1)
    with cuda_fast.on_stream(side):
        assert state["current"][0] == (7, 0, 1)
    assert state["current"][0] == (1, 0, 1) and state["sets"] == [(7, 0), (1, 0)]


def test_restores_the_stream_current_at_entry_after_an_exception(fake):
    state, Stream = fake
    state["current"][0] = (5, 0, 1)  # not the default stream
    with pytest.raises(RuntimeError):
        with cuda_fast.on_stream(Stream(7, 0, 1)):
            raise RuntimeError("copy failed")
    assert state["current"][0] == (5, 0, 1)


def test_a_stream_of_another_device_goes_through_torch_cuda_stream(fake):
    state, Stream = fake
    with cuda_fast.on_stream(Stream(9, 1, 1)):
        pass
    assert state["sets"] == [] and state["ctx"] == [("enter", 9), ("exit", 9)]


def test_current_stream_is_one_object_per_stream(fake):
    state, _ = fake
    dev = torch.device("cuda", 0)
    first = cuda_fast.current_stream(dev)
    assert cuda_fast.current_stream(dev) is first and (first.stream_id, first.device_index) == (1, 0)
    state["current"][0] = (4, 0, 1)
    assert cuda_fast.current_stream(dev).stream_id == 4
    state["device"] = 1  # an index-less device means the current one
    assert cuda_fast.current_stream(torch.device("cuda")).device_index == 1
