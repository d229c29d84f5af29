"""Does the pinned pool grow from step to step? (tests/gpu/test_offload_gpu.py's first test failed on
2026-12-02 at its gradient check, which precedes its pinned-bytes check; this rules the pool out.) Per build and step: pinned bytes, blocks, blocks
still in use after the step, and the same after gc.collect(), so a reference cycle that holds host
tensors shows. Device call:  python bench/repro/offload_pool_growth.py"""
import gc
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests"))
import fxfuse  # noqa: E402
from fxfuse.passes.activation_offload import ActivationOffload  # noqa: E402
from fxfuse.runtime.ops import offload as ops  # noqa: E402
from tiny import clone, loss_and_grads, tiny_model  # noqa: E402

SIZES = dict(hidden_size=512, intermediate_size=1408, num_attention_heads=8, num_key_value_heads=2,
             vocab_size=1024, num_hidden_layers=4)


def busy(pool):
    return sum(ops._use_count(b) > idle for b, idle in pool.blocks)


ref = tiny_model(dtype=torch.bfloat16, gc=True, sizes=SIZES, r=16, lora_alpha=16).cuda()
ids = torch.randint(0, 1024, (2, 512), generator=torch.Generator().manual_seed(3)).cuda()
for name, opts in (("wait_at_use", {}), ("wait_at_issue", {"wait_at_use": False})):
    pool = ops.host_pool(torch.device("cuda"))
    torch.cuda.synchronize()
    pool.release()
    model = fxfuse.optimize(clone(ref), verbose=False, offload_activations=ActivationOffload(min_bytes=0, save_attention=False, **opts))
    for step in range(4):
        loss_and_grads(model, input_ids=ids, labels=ids)
        model.zero_grad(set_to_none=True)
        row = {"build": name, "step": step, "pinned": pool.pinned_bytes, "blocks": len(pool.blocks), "busy": busy(pool)}
        gc.collect()
        row["busy_after_gc"] = busy(pool)
        print(json.dumps(row), flush=True)
    del model
