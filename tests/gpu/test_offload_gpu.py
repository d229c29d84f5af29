"""On a CUDA device: activation offload (pinned host copies on a side stream) gives the same loss and
LoRA gradients as the same build without it, and its ops round-trip exactly under load."""
import pytest
import torch

import fxfuse
from fxfuse.passes.activation_offload import ActivationOffload
from fxfuse.runtime.ops import offload as ops
from tiny import clone, loss_and_grads, rel, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (device machine)")


def test_offload_matches_the_same_build_without_it():
    sizes = dict(hidden_size=512, intermediate_size=1408, num_attention_heads=8, num_key_value_heads=2,
                 vocab_size=1024, num_hidden_layers=4)
    ref = tiny_model(dtype=torch.bfloat16, gc=True, sizes=sizes, r=16, lora_alpha=16).cuda()
    plain = fxfuse.optimize(clone(ref), verbose=False, offload_activations=False)
    # save_attention (on by default) saves q/k/v, the attention output and lse too, and offloads them
    off = fxfuse.optimize(clone(ref), verbose=False, offload_activations=ActivationOffload(min_bytes=0))
    ids = torch.randint(0, 1024, (2, 512), generator=torch.Generator().manual_seed(3)).cuda()
    pinned = []
    for step in range(3):  # later steps reuse pinned blocks and side-stream memory
        l_plain, g_plain = loss_and_grads(plain, input_ids=ids, labels=ids)
        l_off, g_off = loss_and_grads(off, input_ids=ids, labels=ids)
        pinned.append(ops.host_pool(torch.device("cuda")).pinned_bytes)
        assert torch.equal(l_plain, l_off), (step, l_plain, l_off)
        for name in g_plain:
            assert rel(g_off[name], g_plain[name]) < 1e-6, (step, name)
        for m in (plain, off):
            m.zero_grad(set_to_none=True)
    summary = fxfuse.report(off).summary()
    assert summary["save_attention"]["rewritten"] == 4, summary["save_attention"]
    # the inputs of decoder layers 1..3 at least, and each layer's q, k, v, output, lse
    assert summary["activation_offload"]["rewritten"] >= 3 + 4 * 5, summary["activation_offload"]
    assert pinned[0] > 0 and pinned[1] == pinned[2] == pinned[0], pinned  # blocks reused, not re-pinned


@pytest.mark.parametrize("lag", [1, 2, 3])
def test_round_trip_while_the_compute_stream_is_busy(lag):
    x = torch.randn(64, 1 << 16, device="cuda", dtype=torch.bfloat16)
    sources, hosts = [], []
    prev_host = None
    for i in range(6):
        y = x * (i + 1)
        if i % 2:
            y = y.view(64, 256, 256).transpose(0, 2)  # dense, not contiguous: copied with its strides
        busy = torch.randn(4096, 4096, device="cuda") @ torch.randn(4096, 4096, device="cuda")  # keep compute busy
        last = i == 5
        done = sources[max(i - lag, 0):i] if last else sources[i - lag:i - lag + 1] if i >= lag else []
        host = ops.offload(y, done, prev_host, last)
        hosts.append((host, y.clone()))
        sources.append(y)
        prev_host = host
        del busy
    assert not ops._in_flight.get(torch.cuda.current_device()), "the last offload waits for every copy"
    for host, want in hosts:
        assert host.device.type == "cpu" and host.is_pinned() and host.stride() == want.stride()
        back = ops.reload(host, x.device)
        assert torch.equal(back, want) and back.stride() == want.stride()
