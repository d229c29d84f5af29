"""Micro-benchmark: lm_head + cross-entropy, forward + backward w.r.t. the hidden states.

Compares, on a Llama-3-8B head (H=4096, V=128256, bf16, frozen lm_head):
  hf        eager `F.cross_entropy(linear(h, W).float(), labels)` as HF computes it
  compile   torch.compile of the same function
  fxfuse    `fxfuse::linear_cross_entropy` (chunked GEMM + Triton row kernel)
Prints one JSON line per (impl, T): median fwd+bwd ms over CUDA events, peak memory above the
inputs, and the loss / gradient error against the hf result of the same T.

    python bench/bench_cross_entropy.py                # H100: T in 1k, 4k, 16k
    python bench/bench_cross_entropy.py --tiny         # CPU smoke run (TRITON_INTERPRET=1 is set)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

if "--tiny" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from fxfuse.runtime import stats  # noqa: E402
from fxfuse.runtime.ops import cross_entropy as ce  # noqa: E402,F401  (registers the op)


def hf_loss(hidden, weight, labels):
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100)


def fxfuse_loss(hidden, weight, labels):
    loss, _ = torch.ops.fxfuse.linear_cross_entropy(hidden.view(-1, hidden.shape[-1]), weight, labels.view(-1),
                                                    "mean", 0.0, -100, hidden.requires_grad)
    return loss


class Timer:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            torch.cuda.synchronize()
            self.ms = self.start.elapsed_time(self.end)
        else:
            self.ms = (time.perf_counter() - self.t0) * 1e3


def step(fn, hidden, weight, labels):
    h = hidden.detach().requires_grad_(True)
    loss = fn(h, weight, labels)
    loss.backward()
    return loss.detach(), h.grad


def run(name, fn, hidden, weight, labels, reps, ref):
    dev = hidden.device
    for _ in range(2):  # warm-up: compile, autotune, allocator
        step(fn, hidden, weight, labels)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(reps):
        with Timer(dev) as t:
            loss, grad = step(fn, hidden, weight, labels)
        times.append(t.ms)
        del grad
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if dev.type == "cuda" else None
    loss, grad = step(fn, hidden, weight, labels)
    row = {"impl": name, "T": hidden.shape[0], "H": hidden.shape[1], "V": weight.shape[0],
           "dtype": str(hidden.dtype).removeprefix("torch."), "device": torch.cuda.get_device_name(dev)
           if dev.type == "cuda" else "cpu", "ms_fwd_bwd": round(sorted(times)[len(times) // 2], 3),
           "peak_gib_above_inputs": None if peak is None else round(peak, 3), "loss": loss.item()}
    if ref is not None:
        row["loss_abs_err_vs_hf"] = abs(loss.item() - ref[0].item())
        row["grad_rel_err_vs_hf"] = ((grad.float() - ref[1].float()).norm() / ref[1].float().norm()).item()
    return row, (loss, grad)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="small shapes on CPU (smoke test of this script)")
    p.add_argument("--tokens", type=int, nargs="*", default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--impls", default="hf,compile,fxfuse")
    args = p.parse_args(argv)
    if args.tiny:
        dev, dtype, hdim, vocab = torch.device("cpu"), torch.float32, 64, 1000
        token_counts, reps = args.tokens or [37, 128], args.reps or 2
    else:
        if not torch.cuda.is_available():
            p.error("needs a CUDA device (or --tiny)")
        dev, dtype, hdim, vocab = torch.device("cuda"), torch.bfloat16, 4096, 128256
        token_counts, reps = args.tokens or [1024, 4096, 16384], args.reps or 10
    impls = {"hf": hf_loss, "compile": torch.compile(hf_loss), "fxfuse": fxfuse_loss}
    g = torch.Generator(device=dev).manual_seed(0)
    weight = (torch.randn(vocab, hdim, device=dev, generator=g) / hdim ** 0.5).to(dtype)
    for t in token_counts:
        hidden = torch.randn(t, hdim, device=dev, generator=g).to(dtype)
        labels = torch.randint(0, vocab, (t,), device=dev, generator=g)
        labels[: t // 10] = -100  # some ignored prompt tokens
        ref = None
        for name in args.impls.split(","):
            stats.reset()
            try:
                row, result = run(name, impls[name], hidden, weight, labels, reps, ref)
            except torch.cuda.OutOfMemoryError:
                row, result = {"impl": name, "T": t, "error": "OOM"}, None
                torch.cuda.empty_cache()
            if name == "fxfuse":
                row["fallbacks"] = sum(stats.fallbacks.values())
            if name == "hf" and result is not None:
                ref = result
            print(json.dumps(row), flush=True)
            if name == "fxfuse" and row.get("fallbacks"):
                raise SystemExit(f"fxfuse fell back to its eager reference: {dict(stats.fallbacks)}")


if __name__ == "__main__":
    main()
