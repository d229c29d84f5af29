"""Micro-benchmark: fxfuse's RMSNorm (+ residual add) and SwiGLU ops against the same HF code run
eagerly and compiled by torch.compile (Inductor), forward and forward+backward.

Inductor already fuses these elementwise/row-reduction patterns, and fxfuse's custom ops are opaque
to it; whether the rms_norm / swiglu passes run by default is decided by this measurement.

    python bench/bench_norm_swiglu.py [--seqs 4096,16384] [--hidden 4096] [--inter 14336] [--iters 20]
    TRITON_INTERPRET=1 python bench/bench_norm_swiglu.py --tiny        # CPU: proves the script runs

Cases (bf16, Llama-3.1-8B shapes, T tokens): `add_rms_norm` (h = residual + x; y = norm(h); h is
returned too, as in a decoder layer), `rms_norm` (no residual), `swiglu` (silu(gate) * up, [T, I]).
The norm weight is frozen (LoRA) unless --train-weight. Per (case, T, impl) one JSON line:
fwd_ms and fwd_bwd_ms (median of --iters, CUDA events on the GPU), peak_mib (peak allocated during
one fwd+bwd above what the inputs hold), gbps (minimal bytes moved by fwd+bwd / time) and max_err
(largest |output - eager output| and |grad - eager grad|, in units of the output's dtype).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fxfuse.runtime import stats  # noqa: E402
from fxfuse.runtime.ops import rms_norm as _rms  # noqa: E402,F401  (registers the ops)
from fxfuse.runtime.ops import swiglu as _swiglu  # noqa: E402,F401

EPS = 1e-5


# ---------------------------------------------------------------- the HF code, and fxfuse's ops


def hf_add_rms_norm(x, residual, weight):
    h = residual + x
    hf = h.to(torch.float32)
    y = weight * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)
    return h, y


def hf_rms_norm(x, weight):
    hf = x.to(torch.float32)
    return weight * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)


def hf_swiglu(gate, up):
    return torch.nn.functional.silu(gate) * up


def fx_add_rms_norm(x, residual, weight):
    h, y, _ = torch.ops.fxfuse.rms_norm(x, weight, residual, EPS, 0.0, x.dtype, x.dtype)
    return h, y


def fx_rms_norm(x, weight):
    return torch.ops.fxfuse.rms_norm(x, weight, None, EPS, 0.0, x.dtype, x.dtype)[0]


def fx_swiglu(gate, up):
    return torch.ops.fxfuse.swiglu(gate, up, "silu")


CASES = {  # name: (hf fn, fxfuse fn, make inputs(T, H, I, dtype, device, train_weight) -> list)
    "add_rms_norm": (hf_add_rms_norm, fx_add_rms_norm, lambda t, h, i, dt, dev, tw: [
        torch.randn(t, h, dtype=dt, device=dev, requires_grad=True),
        torch.randn(t, h, dtype=dt, device=dev, requires_grad=True),
        (1 + 0.1 * torch.randn(h, device=dev)).to(dt).requires_grad_(tw)]),
    "rms_norm": (hf_rms_norm, fx_rms_norm, lambda t, h, i, dt, dev, tw: [
        torch.randn(t, h, dtype=dt, device=dev, requires_grad=True),
        (1 + 0.1 * torch.randn(h, device=dev)).to(dt).requires_grad_(tw)]),
    "swiglu": (hf_swiglu, fx_swiglu, lambda t, h, i, dt, dev, tw: [
        torch.randn(t, i, dtype=dt, device=dev, requires_grad=True),
        torch.randn(t, i, dtype=dt, device=dev, requires_grad=True)]),
}


def min_bytes(case, inputs):
    """Bytes fwd+bwd must at least move (each tensor read/written once per pass)."""
    e = inputs[0].element_size()
    n = inputs[0].numel()
    if case == "add_rms_norm":  # fwd: x, r -> h, y; bwd: dy, dh, h -> dx
        return e * n * (4 + 4)
    if case == "rms_norm":  # fwd: x -> y; bwd: dy, x -> dx
        return e * n * (2 + 3)
    return e * n * (3 + 5)  # swiglu fwd: g, u -> y; bwd: dy, g, u -> dg, du


# ---------------------------------------------------------------- timing


class Timer:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn, iters):
        times = []
        for _ in range(iters):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def run_case(fn, inputs, grads, timer, iters, device):
    def fwd():
        with torch.no_grad():
            fn(*inputs)

    def fwd_bwd():
        outs = fn(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.backward(outs, grads[:len(outs)])

    for _ in range(3):  # warm-up: compilation (a no-grad forward is its own graph), autotuning, allocator
        fwd()
        fwd_bwd()
    for t in inputs:
        t.grad = None
    peak = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fwd_bwd()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    for t in inputs:
        t.grad = None
    fwd_ms = timer(fwd, iters)

    def step():
        fwd_bwd()
        for t in inputs:
            t.grad = None

    return fwd_ms, timer(step, iters), peak


def outputs_and_grads(fn, inputs, grads):
    for t in inputs:
        t.grad = None
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, grads[:len(outs)])
    res = [o.detach().float() for o in outs] + [t.grad.float() for t in inputs if t.grad is not None]
    for t in inputs:
        t.grad = None
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqs", default="4096,16384")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--inter", type=int, default=14336)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--impls", default="eager,inductor,fxfuse")
    p.add_argument("--train-weight", action="store_true", help="norm weight requires grad (dw computed)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: T=16, H=96, I=160, fp32, 2 iters")
    args = p.parse_args(argv)
    if args.tiny:
        args.seqs, args.hidden, args.inter, args.dtype, args.iters = "16", 96, 160, "float32", 2
        import torch._inductor.config as inductor_config
        inductor_config.cpp.vec_isa_ok = True  # skip the CPU ISA probe (~12 s)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = getattr(torch, args.dtype)
    timer = Timer(device)
    info = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "dtype": args.dtype, "hidden": args.hidden, "inter": args.inter}
    for case in args.cases.split(","):
        hf_fn, fx_fn, make = CASES[case]
        impls = {"eager": hf_fn, "inductor": torch.compile(hf_fn, dynamic=False), "fxfuse": fx_fn}
        for t in (int(s) for s in args.seqs.split(",")):
            torch.manual_seed(0)
            inputs = make(t, args.hidden, args.inter, dtype, device, args.train_weight)
            outs = hf_fn(*inputs)
            grads = [torch.randn_like(o) for o in (outs if isinstance(outs, tuple) else (outs,))]
            del outs
            want = outputs_and_grads(hf_fn, inputs, grads)
            ulp = torch.finfo(dtype).eps
            for impl in args.impls.split(","):
                fn = impls[impl]
                stats.reset()
                got = outputs_and_grads(fn, inputs, grads)
                err = max(((a - b).abs() / b.abs().clamp_min(1.0)).max().item() for a, b in zip(got, want)) / ulp
                fwd_ms, fb_ms, peak = run_case(fn, inputs, grads, timer, args.iters, device)
                row = {**info, "case": case, "T": t, "impl": impl, "fwd_ms": round(fwd_ms, 4),
                       "fwd_bwd_ms": round(fb_ms, 4), "peak_mib": None if peak is None else round(peak, 1),
                       "gbps": round(min_bytes(case, inputs) / (fb_ms * 1e-3) / 1e9, 1),
                       "max_err_ulps": round(err, 2), "train_weight": args.train_weight}
                if impl == "fxfuse":
                    row["fallbacks"] = sum(stats.fallbacks.values())
                print(json.dumps(row), flush=True)
            del inputs, grads, want
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
