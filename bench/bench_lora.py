"""One LoRA training step on a Llama-3.1-8B-shaped model: fxfuse against HF+PEFT and torch.compile.

The workload is the peers' anchor (shared/anchors/bench_lora_anchor.py): random weights built on the
device and cast to bf16, PEFT LoRA r=16 alpha=16 dropout 0 on q,k,v,o,gate,up,down (fp32 adapters,
PEFT's default), batch 1, gradient checkpointing (use_reentrant=False) + enable_input_require_grads,
AdamW(lr=1e-4) over the trainable parameters, input_ids = labels = random tokens, 7 steps, median of
the last 5.

    python bench/bench_lora.py VARIANT SEQS [--size 8b|1b|tiny] [--device cuda|cpu] [--dynamic ...]

VARIANT: hf (sdpa, eager), compile (torch.compile(model), Inductor), fxfuse-lora
(fxfuse.optimize(model, passes=["lora"])), fxfuse (the default passes), fxfuse-cg (default passes, CUDA graphs),
fxfuse-offload (default passes + offload_activations=True). SEQS: comma-separated sequence lengths,
run one after the other in this process (as the anchor does); for a fresh process per length call
once per length (bench/run_gpu.sh FRESH=1). One JSON line per (variant, seq) on stdout.

FLOPs per step (T tokens, L layers; every LoRA linear has a frozen base W [N, K] and rank r; lm_head
[V, H]; attention heads*head_dim = D):
  tflops_4NT  = 4 * n_params * T / step        the anchor's figure (all parameters, embeddings included)
  tflops      = flops_step / step, where flops_step counts what the hardware must multiply:
      linears:   per token 2NK forward + 2NK recompute (checkpointing) + 2NK input gradient = 6NK
                 (the base is frozen: no weight gradient)
      LoRA:      per token 2r(N+K) forward + 2r(N+K) recompute + 4r(N+K) backward (dA, dB, g, dX) = 8r(N+K)
      lm_head:   per token 2VH forward + 2VH input gradient = 4VH (outside the checkpointed layers)
      attention: causal forward 2*T^2*D per layer (QK^T and PV, half the square); backward 2x forward
                 (dQ, dK, dV, dP); recompute 1x forward: 8*T^2*D per layer
  Without checkpointing (--no-gc) the recompute terms are dropped. Norms, RoPE, SwiGLU, softmax and the
  loss are not counted.

Env: FXFUSE_BENCH_COMPILER=inductor|aot_eager|eager picks the compiler behind `compile` and the
fxfuse variants (default: inductor on CUDA, aot_eager elsewhere). CPU dry run:
    TRITON_INTERPRET=1 python bench/bench_lora.py fxfuse-lora 32 --size tiny --device cpu
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from collections import Counter

import torch

VARIANTS = ("hf", "compile", "fxfuse-lora", "fxfuse", "fxfuse-cg", "fxfuse-offload")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072,
               tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, rope_theta=500000.0, max_position_embeddings=4096),
}
DYNAMIC = {"auto": None, "static": False, "dynamic": True}


def _fp32_dot():
    """The dot mode the LoRA kernels use (their default when FXFUSE_LORA_FP32_DOT is unset)."""
    from fxfuse.runtime.kernels.lora import _fp32_dot_env
    return _fp32_dot_env()


def _launch_path():
    """How the autotuned LoRA kernels launch in this process (FXFUSE_FAST_LAUNCH, Triton's version)."""
    from fxfuse.runtime.kernels.lora import launch_path_in_force
    return launch_path_in_force()


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("variant", help="|".join(VARIANTS))
    ap.add_argument("seqs", help="comma-separated sequence lengths, e.g. 1024,4096,16384")
    ap.add_argument("--gpu-gib", type=float, default=None,
                    help="cap the caching allocator at this many GiB (e.g. 79.1 to stand for an H100 80GB on an H200)")
    ap.add_argument("--size", choices=sorted(CONFIGS), default="8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=7,
                    help="steps per length; the median is over the steps after the first two (the last 5 of the default 7)")
    ap.add_argument("--offload-options", default=None,
                    help='fxfuse-offload: ActivationOffload keyword arguments as JSON, e.g. \'{"save_attention": false}\'')
    ap.add_argument("--progress", action="store_true", help="print when each phase of a step ends (long context)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dynamic", choices=sorted(DYNAMIC), default="auto",
                    help="torch.compile dynamic=: auto (None: static first, dynamic after a size change), "
                         "static (False: recompile per length), dynamic (True)")
    ap.add_argument("--no-gc", action="store_true", help="no gradient checkpointing")
    ap.add_argument("--warm-cache", action="store_true",
                    help="keep Inductor's on-disk cache (default: a fresh one per process, so the first "
                         "step's time is the real compile time)")
    ap.add_argument("--passes", default=None, help="fxfuse variants: comma-separated passes (default: the variant's)")
    ap.add_argument("--pass-options", default=None,
                    help='fxfuse variants: optimize()\'s pass_options as JSON, e.g. \'{"mlp_tiling": {"min_mib": 0}}\'')
    ap.add_argument("--host-fraction", type=float, default=None,
                    help="fxfuse-offload: share of the host's available memory offloads may pin (default: fxfuse's)")
    ap.add_argument("--trace-step", type=int, default=None,
                    help="record the allocator during this step (0-based) and print what is alive at its peak (slows that step; the row says which)")
    ap.add_argument("--inductor-config", default=None,
                    help='torch._inductor.config values set before compiling, as JSON, e.g. \'{"allow_buffer_reuse": false}\'')
    ap.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16",
                    help="the base model's dtype (fp16: for the opt-in fp16_guard pass; the anchor is bf16)")
    ap.add_argument("--label", default=None, help="name written as 'variant' (default: the variant)")
    return ap.parse_args(argv)


def build_model(size: str, device: str, rank: int, use_gc: bool, dtype: torch.dtype = torch.bfloat16):
    """The anchor's model: random init on the device, bf16 base (or `dtype`), fp32 LoRA adapters."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**CONFIGS[size], attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=TARGETS))
    if use_gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model, cfg


def lora_modules(model) -> list:
    """PEFT LoRA linears: modules holding lora_A / lora_B dicts and a base layer."""
    return [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")
            and isinstance(getattr(m, "lora_A"), torch.nn.ModuleDict)]


def step_flops(model, cfg, seq: int, use_gc: bool) -> int:
    """FLOPs the hardware must do in one step (see the module docstring)."""
    base_mult = 6 if use_gc else 4
    lora_mult = 8 if use_gc else 6
    per_token = 0
    for m in lora_modules(model):
        n, k = m.base_layer.weight.shape
        r = sum(a.weight.shape[0] for a in m.lora_A.values())
        per_token += base_mult * n * k + lora_mult * r * (n + k)
    v, h = model.get_output_embeddings().weight.shape
    per_token += 4 * v * h
    d = cfg.num_attention_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    attn_fwd = 2 * seq * seq * d  # causal QK^T + PV, one layer
    attn = (4 if use_gc else 3) * attn_fwd * cfg.num_hidden_layers
    return per_token * seq + attn


def dynamo_counters() -> dict:
    from torch._dynamo.utils import counters
    return {"unique_graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": Counter(counters["graph_break"])}


class Device:
    def __init__(self, name: str):
        self.dev = torch.device(name)
        self.cuda = self.dev.type == "cuda"
        self.run_peak = 0

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.dev)

    def reset(self):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.dev)
        self.run_peak = 0

    def peak_gib(self):
        if not self.cuda:
            return None
        return round(max(self.run_peak, torch.cuda.max_memory_allocated(self.dev)) / 2**30, 2)

    def phase_peak_gib(self):
        """The peak since the last call (the allocator's peak is reset; the run's peak is kept)."""
        if not self.cuda:
            return None
        peak = torch.cuda.max_memory_allocated(self.dev)
        self.run_peak = max(self.run_peak, peak)
        torch.cuda.reset_peak_memory_stats(self.dev)
        return round(peak / 2**30, 2)


def lora_check(summary: dict, expected: int) -> tuple[bool, str]:
    """fxfuse must rewrite every PEFT LoRA linear: candidates == rewritten, a whole multiple of the
    model's LoRA linears (graphs recompiled for a new length see them all again), none declined."""
    s = summary.get("lora", {})
    cand, rew = s.get("candidates", 0), s.get("rewritten", 0)
    ok = cand == rew and rew > 0 and rew % expected == 0 and not s.get("declined")
    return ok, f"lora {rew}/{cand} rewritten (expected a multiple of {expected}), declined {s.get('declined')}"


def _offload(variant: str, args):
    if variant != "fxfuse-offload":
        return False
    opts = json.loads(args.offload_options) if args.offload_options else {}
    if args.host_fraction is not None:
        opts["host_fraction"] = args.host_fraction
    if not opts:
        return True
    from fxfuse.passes.activation_offload import ActivationOffload
    return ActivationOffload(**opts)


def _pinned_blocks():
    """Blocks in the activation offload's pinned-memory pools (None when fxfuse's offload is not loaded)."""
    mod = sys.modules.get("fxfuse.runtime.ops.offload")
    return None if mod is None else sum(len(p.blocks) for p in getattr(mod, "host_pools", {}).values())


def _progress(args, seq, phase, t0, dev):
    """With --progress: when each phase of a step ends (a long-context step runs minutes)."""
    if args.progress:
        dev.sync()
        print(f"[{seq} tokens] {phase} done {time.perf_counter() - t0:.1f}s into the step, peak {dev.peak_gib()} GiB",
              file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    variant = args.variant
    if variant not in VARIANTS:
        sys.exit(f"unknown variant {variant!r}; choose from {VARIANTS}")
    seqs = [int(s) for s in args.seqs.split(",") if s]
    # Inductor on CPU only slows a dry run down: default to aot_eager there (same fwd/bwd split).
    compiler = os.environ.get("FXFUSE_BENCH_COMPILER",
                              "inductor" if torch.device(args.device).type == "cuda" else "aot_eager")
    use_gc = not args.no_gc
    if not args.warm_cache and compiler == "inductor" and variant != "hf":
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fxfuse_bench_inductor_")
    dev = Device(args.device)
    if args.gpu_gib and dev.cuda:
        total = torch.cuda.get_device_properties(dev.dev).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.gpu_gib * 2**30 / total), torch.cuda.current_device())

    if args.inductor_config:
        import torch._inductor.config as inductor_config
        for key, value in json.loads(args.inductor_config).items():
            setattr(inductor_config, key, value)
    model, cfg = build_model(args.size, args.device, args.rank, use_gc,
                             {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    n_params = sum(p.numel() for p in model.parameters())
    n_lora = len(lora_modules(model))
    dynamic = DYNAMIC[args.dynamic]

    rep = None
    if variant == "hf":
        fwd = model
    elif variant == "compile":
        fwd = torch.compile(model, dynamic=dynamic) if compiler == "inductor" else \
            torch.compile(model, backend=compiler, dynamic=dynamic)
    else:
        import fxfuse
        passes = ["lora"] if variant == "fxfuse-lora" else None
        if args.passes:
            passes = args.passes.split(",")
        fxfuse.optimize(model, passes=passes, compiler=compiler, dynamic=dynamic, cudagraphs=variant == "fxfuse-cg",
                        offload_activations=_offload(variant, args),
                        pass_options=json.loads(args.pass_options) if args.pass_options else None)
        fwd = model
        rep = fxfuse.report(model)

    base = dict(variant=args.label or variant, passes=args.passes, pass_options=args.pass_options, inductor_config=args.inductor_config, size=args.size, dtype=args.dtype, gc=use_gc, rank=args.rank,
                compiler=None if variant == "hf" else compiler,
                dynamic=args.dynamic, automatic_dynamic_shapes=torch._dynamo.config.automatic_dynamic_shapes,
                cache="warm" if args.warm_cache else "cold", n_seqs_in_process=len(seqs),
                lora_gemm=os.environ.get("FXFUSE_LORA_GEMM", "auto"), fp32_dot=_fp32_dot(), fast_launch=_launch_path(), grouped_launch=os.environ.get("FXFUSE_LORA_GROUPED_LAUNCH") == "1", lowrank_expand=os.environ.get("FXFUSE_LORA_EXPAND") == "1", gpu_gib_cap=args.gpu_gib, host_fraction=args.host_fraction, offload_options=args.offload_options, device=torch.cuda.get_device_name(dev.dev)
                if dev.cuda else args.device, torch=torch.__version__)
    failures = []
    for index, seq in enumerate(seqs):
        # Own generator: the same tokens for every variant, whatever the variant drew from torch's RNG.
        gen = torch.Generator(dev.dev).manual_seed(seq)
        x = torch.randint(0, cfg.vocab_size, (1, seq), device=dev.dev, generator=gen)
        dev.reset()
        before = dynamo_counters()
        graphs_before = len(rep.graphs) if rep is not None else 0
        sites_before = len(rep.sites("lora")) if rep is not None else 0
        times, losses, out, phase, host, phase_peaks = [], [], None, "setup", [], []
        row = dict(base, seq=seq, seq_index=index, traced_step=args.trace_step)
        try:
            for step in range(args.steps):
                dev.sync()
                if dev.cuda and step == args.trace_step:
                    import memory_trace
                    baseline = memory_trace.start()
                t = time.perf_counter()
                phase = "forward"  # named in an OOM row
                out = fwd(input_ids=x, labels=x)
                host.append([time.perf_counter() - t])
                peaks = [dev.phase_peak_gib()]  # the allocator's stats are the host's: no sync needed
                _progress(args, seq, phase, t, dev)
                phase = "backward"
                out.loss.backward()
                host[-1].append(time.perf_counter() - t)
                peaks.append(dev.phase_peak_gib())
                _progress(args, seq, phase, t, dev)
                phase = "optimizer"
                opt.step()
                opt.zero_grad(set_to_none=True)
                peaks.append(dev.phase_peak_gib())
                phase_peaks.append(peaks)
                dev.sync()
                times.append(time.perf_counter() - t)
                host[-1].append(_pinned_blocks())
                losses.append(out.loss.item())
                if dev.cuda and step == args.trace_step:
                    dump = os.environ.get("FXFUSE_TRACE_DUMP")  # a .json.gz path for bench/memory_trace.py's events
                    print("\n".join(memory_trace.report(baseline, dump=dump)), file=sys.stderr, flush=True)
            tail = sorted(times[2:]) if len(times) > 2 else sorted(times)
            med = tail[len(tail) // 2]
            flops = step_flops(model, cfg, seq, use_gc)
            row.update(step_s=round(med, 4), tok_s=round(seq / med, 1), peak_gb=dev.peak_gib(),
                       # per step: the peak within forward, backward, optimizer step (GiB): which phase sets it
                       phase_peaks_gib=phase_peaks[1:],
                       tflops_4NT=round(4 * n_params * seq / med / 1e12, 1), tflops=round(flops / med / 1e12, 1),
                       flops_step=flops, first_step_s=round(times[0], 2),
                       compile_s=round(max(times[0] - med, 0.0), 2), second_step_s=round(times[1], 3)
                       if len(times) > 1 else None, loss_first=round(losses[0], 4), loss_last=round(losses[-1], 4),
                       step_times=[round(t, 4) for t in times[1:]],
                       # when forward() / backward() returned on the host, from the step's start: near the
                       # step time, the host is the bottleneck; pinned blocks should stop growing once warm
                       fwd_host_s=[round(h[0], 4) for h in host[1:]], bwd_host_s=[round(h[1], 4) for h in host[1:]],
                       pinned_blocks=[h[2] for h in host[1:]])
        except torch.OutOfMemoryError as exc:
            # the first line names the allocation that failed ("Tried to allocate ..."): where to cut next
            row.update(oom=True, peak_gb=dev.peak_gib(), steps_done=len(times), oom_phase=phase,
                       oom_message=str(exc).splitlines()[0][:300])
            print(f"OOM at {seq} tokens: {str(exc).splitlines()[0][:300]}", file=sys.stderr)
        except Exception as exc:  # a compiler failure for one length must not hide the others
            traceback.print_exc()
            row.update(error=f"{type(exc).__name__}: {str(exc)[:400]}", steps_done=len(times))
            if "out of memory" in str(exc).lower():  # an OOM wrapped by the compiler's own exception
                row.update(oom=True, peak_gb=dev.peak_gib())
        out = None
        opt.zero_grad(set_to_none=True)

        after = dynamo_counters()
        breaks = after["graph_breaks"] - before["graph_breaks"]
        row.update(dynamo_graphs=after["unique_graphs"] - before["unique_graphs"],
                   graph_breaks=sum(breaks.values()),
                   graph_break_reasons={k[:160]: v for k, v in breaks.items()})
        if rep is not None:
            summary = rep.summary()
            lora = summary.get("lora", {"candidates": 0, "rewritten": 0, "declined": {}})  # --passes without lora
            row.update(graphs=len(rep.graphs) - graphs_before, graphs_total=len(rep.graphs),
                       lora_candidates=lora["candidates"], lora_rewritten=lora["rewritten"],
                       lora_declined=lora["declined"], lora_new_sites=len(rep.sites("lora")) - sites_before,
                       lora_expected=n_lora, runtime_fallbacks=rep.runtime_fallbacks,
                       kernel_calls=sum(_kernel_calls().values()))
            if "mlp_tiling" in summary:
                row.update(mlp_tiled=summary["mlp_tiling"]["rewritten"], mlp_tiling_declined=summary["mlp_tiling"]["declined"])
            if "save_attention" in summary:
                row.update(save_attention=summary["save_attention"]["rewritten"],
                           save_attention_declined=summary["save_attention"]["declined"])
            if "activation_offload" in summary:
                off = summary["activation_offload"]
                row.update(offload_rewritten=off["rewritten"], offload_declined=off["declined"],
                           offload_mib=rep.columns()["activation_offload"].get("MiB offloaded", 0))
            ok, why = lora_check(summary, n_lora)
            # an A/B of the lora pass itself (left out, or declining by min_tokens) expects no rewrites
            ablated = "lora" not in summary or "min_tokens" in (json.loads(args.pass_options or "{}").get("lora") or {})
            if not ok and not ablated:
                failures.append(why)
                print(f"!!!!!!!! fxfuse LoRA CHECK FAILED at seq {seq}: {why}", file=sys.stderr, flush=True)
                print(rep.table(sites=True), file=sys.stderr, flush=True)
            if rep.runtime_fallbacks:
                why = f"{rep.runtime_fallbacks} run-time fallback(s) to the eager reference"
                failures.append(why)
                print(f"!!!!!!!! fxfuse FALLBACK CHECK FAILED at seq {seq}: {why}", file=sys.stderr, flush=True)
            row["checks_ok"] = (ok or ablated) and rep.runtime_fallbacks == 0
            row["lora_ablated"] = ablated
        else:
            row["graphs"] = row["dynamo_graphs"]
        print(json.dumps(row), flush=True)
        dev.reset()

    if rep is not None:
        print(rep.table(), file=sys.stderr, flush=True)
    if failures:
        print("!!!!!!!! fxfuse checks failed:\n  " + "\n  ".join(failures), file=sys.stderr, flush=True)
        return 3
    return 0


def _kernel_calls() -> Counter:
    from fxfuse.runtime import stats
    return stats.kernel_calls


if __name__ == "__main__":
    sys.exit(main())
