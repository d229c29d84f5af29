"""Per-call host cost of the ways an op can be registered, with the LoRA op's signature (13 tensor
arguments in lists, 4 outputs) and a trivial body, so only dispatch is timed. CPU; no GPU needed.

    python bench/dispatch_cost.py [--calls 20000]

Rows: a plain Python call; `torch.library.custom_op` with an autograd formula (fxfuse's ops); a
`torch.library.Library` op with `register_autograd`; a Library op without an autograd kernel
(fxfuse's run-time twins, runtime/ops/twins.py). Under no_grad, as compiled graphs run.
"""
import argparse
import json
import time
from typing import List, Optional

import torch
from torch import Tensor

ap = argparse.ArgumentParser()
ap.add_argument("--calls", type=int, default=20000)
args = ap.parse_args()


def body(x, ws, bs, As, Bs, sc, ps, seed, dt):
    return [torch.empty(3) for _ in range(4)]


@torch.library.custom_op("fxfuse_bench::custom", mutates_args=())
def custom(x: Tensor, ws: List[Tensor], bs: List[Optional[Tensor]], As: List[Tensor], Bs: List[Tensor],
           sc: List[float], ps: List[float], seed: Optional[Tensor], dt: torch.dtype) -> List[Tensor]:
    return body(x, ws, bs, As, Bs, sc, ps, seed, dt)


def _backward(ctx, grads):
    return (None,) * 9


def _setup(ctx, inputs, output):
    pass


torch.library.register_autograd("fxfuse_bench::custom", _backward, setup_context=_setup)
SCHEMA = ("(Tensor x, Tensor[] ws, Tensor?[] bs, Tensor[] As, Tensor[] Bs, float[] sc, float[] ps, Tensor? seed, "
          "ScalarType dt) -> Tensor[]")
lib = torch.library.Library("fxfuse_bench2", "DEF")
for name in ("with_autograd", "no_autograd"):
    lib.define(name + SCHEMA)
    lib.impl(name, body, "CompositeExplicitAutograd")
torch.library.register_autograd("fxfuse_bench2::with_autograd", _backward, setup_context=_setup)

t = [torch.randn(4, 4) for _ in range(13)]
call_args = (t[0], t[1:4], [None] * 3, t[4:7], t[7:10], [2.0] * 3, [0.0] * 3, None, torch.bfloat16)
rows = [("plain call", body), ("custom_op + autograd", torch.ops.fxfuse_bench.custom.default),
        ("Library op + register_autograd", torch.ops.fxfuse_bench2.with_autograd.default),
        ("Library op, no autograd kernel (twin)", torch.ops.fxfuse_bench2.no_autograd.default)]
with torch.no_grad():
    for name, fn in rows:
        for _ in range(1000):
            fn(*call_args)
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(args.calls):
                fn(*call_args)
            best = min(best, (time.perf_counter() - t0) / args.calls)
        print(json.dumps({"bench": "dispatch_cost", "row": name, "us_per_call": round(best * 1e6, 2),
                          "torch": torch.__version__}))
