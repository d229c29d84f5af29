"""In one process, one compile: a 4k LoRA step of the 8B shape timed under runtime toggles, to find
host-side costs that a whole-step number hides (device call; a timing is never a test).

    python bench/runtime_ab.py [SEQ] [STEPS]

Per toggle: the step time and how long forward() and backward() take to return on the host (when the
host is the bottleneck they approach the step time), and new pinned blocks per step (the offload pool
should reuse its blocks once warm).
"""
import cProfile
import gc
import inspect
import io
import json
import os
import pstats
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_lora import _pinned_blocks as blocks, build_model  # noqa: E402

import fxfuse  # noqa: E402
import fxfuse.runtime.ops.offload  # noqa: E402,F401  (blocks() counts its pools)

seq = int(sys.argv[1]) if len(sys.argv) > 1 else 4096
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 6
model, cfg = build_model("8b", "cuda", 16, True)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
fxfuse.optimize(model, offload_activations=True, verbose=False)
x = torch.randint(0, cfg.vocab_size, (1, seq), device="cuda", generator=torch.Generator("cuda").manual_seed(seq))


def run(tag, n):
    rows = []
    for _ in range(n):
        torch.cuda.synchronize()
        b0 = blocks()
        t0 = time.perf_counter()
        out = model(input_ids=x, labels=x)
        t1 = time.perf_counter()
        out.loss.backward()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        t3 = time.perf_counter()
        rows.append((t3 - t0, t1 - t0, t2 - t1, blocks() - b0))
    med = statistics.median(r[0] for r in rows)
    print(json.dumps(dict(bench="runtime_ab", toggle=tag, seq=seq, step_s=round(med, 4), tok_s=round(seq / med, 1),
                          steps=[round(r[0], 4) for r in rows], fwd_host=[round(r[1], 4) for r in rows],
                          bwd_host=[round(r[2], 4) for r in rows], new_blocks=[r[3] for r in rows])), flush=True)


t = time.perf_counter()
run("warmup (compile)", 2)
print(f"compiled in {time.perf_counter() - t:.0f}s", flush=True)
wrapped = model._compiled_call_impl
unwrapped = inspect.getclosurevars(wrapped).nonlocals["compiled"]


def plain_wrap(*args, **kwargs):  # the wrap's Python call without its config patch
    return unwrapped(*args, **kwargs)


run("default", steps)
model._compiled_call_impl = unwrapped
run("no specialize_float wrap", steps)
model._compiled_call_impl = plain_wrap
run("plain Python wrap, no config patch", steps)
model._compiled_call_impl = unwrapped
before = torch._dynamo.config.specialize_float
torch._dynamo.config.specialize_float = True
run("no wrap, specialize_float=True set globally", steps)
torch._dynamo.config.specialize_float = before
model._compiled_call_impl = wrapped
gc.collect()
gc.disable()
run("gc disabled", steps)
gc.enable()
run("default again", steps)

# Where the host's time goes in one step, with and without the wrap (top functions by own time).
for tag, impl in (("wrapped", wrapped), ("unwrapped", unwrapped)):
    model._compiled_call_impl = impl
    run(f"{tag} (before profile)", 1)
    prof = cProfile.Profile()
    torch.cuda.synchronize()
    prof.enable()
    out = model(input_ids=x, labels=x)
    out.loss.backward()
    opt.step()
    torch.cuda.synchronize()
    prof.disable()
    opt.zero_grad(set_to_none=True)
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
    print(f"==== cProfile, {tag}, one step ====\n{buf.getvalue()}", flush=True)
model._compiled_call_impl = wrapped
