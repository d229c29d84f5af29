"""`fxfuse.optimize(model)`: compile a model's forward through the fxfuse backend, in place."""
from __future__ import annotations

import sys
import time
import weakref
from typing import Iterable, Optional

import torch

from ..passes.activation_offload import ActivationOffload
from ..passes.causal_mask import CausalMaskPass
from ..passes.eager_attention import EagerAttentionPass
from ..passes.fp16_guard import Fp16GuardPass
from ..passes.fused_linear_cross_entropy import FusedLinearCrossEntropyPass
from ..passes.grouped_mm import GroupedMmPass
from ..passes.lora import LoraPass
from ..passes.manager import PassManager
from ..passes.mlp_tiling import MlpTilingPass
from ..passes.rms_norm import RmsNormPass
from ..passes.recompute_lora_xa import RecomputeLoraXA
from ..passes.sdpa_gqa import SdpaGqaPass
from ..passes.sliding_window import SlidingWindowPass
from ..passes.sink_attention import SinkAttentionPass
from ..passes.softcap_attention import SoftcapAttentionPass
from ..passes.swiglu import SwigluPass
from ..runtime import cache
from ..runtime.kernels import lora as lora_kernels
from .backend import PartitionPolicies, make_backend
from .report import Report, adapter_layers

# Passes in the order they run. Each entry builds a fresh pass.
PASSES = {
    "grouped_mm": GroupedMmPass,
    "lora": LoraPass,
    "mlp_tiling": MlpTilingPass,
    "eager_attention": EagerAttentionPass,
    "softcap_attention": SoftcapAttentionPass,
    "sink_attention": SinkAttentionPass,
    "causal_mask": CausalMaskPass,
    "sliding_window": SlidingWindowPass,
    "sdpa_gqa": SdpaGqaPass,
    "rms_norm": RmsNormPass,
    "swiglu": SwigluPass,
    "fused_linear_cross_entropy": FusedLinearCrossEntropyPass,
    "fp16_guard": Fp16GuardPass,  # last: the passes before it match the model's own dtypes
}

# What runs when no passes are named. grouped_mm: without it an MoE layer whose experts run
# transformers' fallback grouped matmul (fp16/fp32 experts, CPU) fails to compile and runs eagerly.
# rms_norm and swiglu are opt-in: on the H100 their ops lose to
# Inductor's own fusion of the same elementwise code (bench/RESULTS.md: 8388 vs 9150 tok/s at 4k).
# mlp_tiling only rewrites from a 4 GiB [tokens, intermediate] tensor up (~146k tokens on 8B).
# sdpa_gqa: GPU tests passed on an H200 (tests/gpu/test_sdpa_gqa_gpu.py); it cuts the layer's kernel
# time at 4k (2-layer profile 35.3 -> 34.0 ms) and the k/v copies at long context.
# eager_attention: models in eager attention get SDPA (O(T) memory instead of [B, H, T, T] scores);
# on SDPA models it finds no candidate.
# sliding_window is opt-in: its op ran 2.6-5.9x slower than the masked SDPA it replaces at 4k-16k
# tokens on an H200 (its backward recomputes in fp32 blocks); it saves memory only from ~16k.
# softcap_attention and sink_attention are opt-in: their op (eager math in fp32 row blocks) removes
# Gemma 2's and gpt-oss's O(T²) saved tensors, but ran 3.2-5.1x slower than eager on an H200.
DEFAULT_PASSES = ("grouped_mm", "lora", "mlp_tiling", "eager_attention", "causal_mask", "sdpa_gqa", "fused_linear_cross_entropy")

_REPORT_ATTR = "_fxfuse_report"


def build_manager(passes: Optional[Iterable[str]] = None, keep_logits: bool = True,
                  pass_options: Optional[dict] = None) -> PassManager:
    names = list(DEFAULT_PASSES) if passes is None else list(passes)
    unknown = [n for n in names if n not in PASSES]
    if unknown:
        raise ValueError(f"unknown pass(es) {unknown}; available: {list(PASSES)}")
    extra = dict(pass_options or {})
    if set(extra) - set(names):
        raise ValueError(f"pass_options for passes that do not run: {sorted(set(extra) - set(names))}")
    options = {"fused_linear_cross_entropy": {"keep_logits": keep_logits}}
    for name, opts in extra.items():
        options[name] = {**options.get(name, {}), **opts}
    built = []
    for n in PASSES:
        if n in names:
            try:
                built.append(PASSES[n](**options.get(n, {})))
            except TypeError as e:
                raise ValueError(f"bad options for pass {n!r}: {e}") from None
    return PassManager(built)


def _drop_logits(module, args, kwargs, output):
    """Forward hook (keep_logits=False): an output whose loss will be backpropagated carries
    logits=None. The hook runs wherever dynamo's graph breaks put it, so the graph that computes
    the loss cannot see it; the pass keys on the same condition (the loss requires grad) and then
    returns a NaN stand-in for the logits, which this hook removes. A tuple output
    (`return_dict=False`: loss, logits, ...) gets None in the logits' place, and only where that
    place holds the stand-in (every stride 0), so another model's tuple is left as it is."""
    if isinstance(output, tuple):
        if (len(output) >= 2 and _is_backpropagated_loss(output[0]) and isinstance(output[1], torch.Tensor)
                and output[1].dim() > 0 and not any(output[1].stride())):
            return (output[0], None) + tuple(output[2:])
        return output
    loss = getattr(output, "loss", None)
    if _is_backpropagated_loss(loss) and getattr(output, "logits", None) is not None:
        output["logits"] = None
    return output


def _is_backpropagated_loss(loss) -> bool:
    return isinstance(loss, torch.Tensor) and loss.dim() == 0 and loss.requires_grad


def optimize(model: torch.nn.Module, *, passes: Optional[Iterable[str]] = None, compiler: str = "inductor",
             dynamic: Optional[bool] = None, cache_dir: Optional[str] = None, verbose: bool = True,
             cudagraphs: bool = False, keep_logits: bool = False,
             offload_activations: "bool | str | ActivationOffload" = "auto",
             pass_options: Optional[dict] = None) -> torch.nn.Module:
    """Compile `model` through fxfuse's torch.compile backend and return the same object.

    The passes rewrite dynamo's graphs (including checkpointed decoder layers) before Inductor
    compiles them; compilation happens at the first call. Parameters, names and state_dict keys
    are untouched (no `_orig_mod.` prefix). `fxfuse.report(model)` tells what was rewritten.
    `cudagraphs=True` (Inductor on CUDA only) replays the compiled graphs as CUDA graphs.

    keep_logits=False (default): a forward whose loss will be backpropagated (labels given, grad
    enabled) returns `logits=None`, so the lm_head + loss can be fused without materialising the
    logits. Eval / no_grad forwards keep their logits. keep_logits=True keeps them always (and the
    fused_linear_cross_entropy pass then declines).

    offload_activations: with gradient checkpointing, the activations training graphs save for the
    backward (each decoder layer's input) wait in pinned host memory, copied on a side stream that
    overlaps with compute (checkpoint policy `offload_saved`, fxfuse/passes/activation_offload.py;
    only CUDA tensors, only graphs with checkpointed regions). "auto" (default): on for a model on a
    CUDA device, except with compiler='eager' or cudagraphs=True, which cannot run it; True: on
    (CPU tensors are then declined with the reason), and those combinations are errors; False: off.
    An `ActivationOffload(...)` sets its options.

    pass_options: keyword arguments of a pass's constructor, by pass name, e.g.
    `{"mlp_tiling": {"min_mib": 1024}}`; they are part of the pass's uuid.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"fxfuse.optimize expects a torch.nn.Module, got {type(model).__name__}")
    if hasattr(model, _REPORT_ATTR):
        raise ValueError("this model was already optimized by fxfuse")
    manager = build_manager(passes, keep_logits=keep_logits, pass_options=pass_options)
    on_cuda = any(p.device.type == "cuda" for p in model.parameters())
    offload = _offload_for(offload_activations, compiler, cudagraphs, on_cuda)
    lora = next((p for p in manager.passes if p.name == "lora"), None)
    recompute_xa = RecomputeLoraXA() if lora is not None and lora.config["recompute_xa"] and compiler != "eager" else None
    policies = PartitionPolicies(recompute_xa, offload).policies
    uuid = "-".join([manager.uuid()] + [p.uuid() for p in policies])
    report = Report(manager_uuid=uuid, pass_names=[p.name for p in manager.passes] + [p.name for p in policies],
                    adapter_layers=adapter_layers(model), _model=weakref.ref(model))
    if compiler == "inductor":
        report.cache_dir = cache.use_cache_dir(report.manager_uuid, cache_dir)
    report.start()
    if cudagraphs and compiler != "inductor":
        raise ValueError("cudagraphs=True needs compiler='inductor'")
    backend = make_backend(manager, report, compiler, cudagraphs, offload, recompute_xa)
    if verbose:
        backend = _with_progress(backend, report)
        dev = next((p.device for p in model.parameters()), torch.device("cpu"))
        if (why := lora_kernels.triton_available(dev)) is not None:
            print(f"fxfuse: note: Triton kernels cannot run on {dev} ({why}); fused ops will run their "
                  "eager reference and count as fallbacks in the report", file=sys.stderr)
        print(f"fxfuse: passes {report.pass_names} (uuid {report.manager_uuid}), compiler {compiler}; "
              "graphs compile at the first call", file=sys.stderr)
    if not keep_logits:
        model.register_forward_hook(_drop_logits, with_kwargs=True)
    model.compile(backend=backend, dynamic=dynamic)
    _wrap_compiled_call(model, report)
    object.__setattr__(model, _REPORT_ATTR, report)
    return model


def _wrap_compiled_call(model: torch.nn.Module, report: Report) -> None:
    """The compiled forward, with two additions:
    - Python floats trace as constants. Dynamo does not specialize floats (`specialize_float=False`):
      once the same code recompiles with another value (a second model with another LoRA alpha,
      another adapter, an earlier `optimize` in the process), it makes the float a graph input, and
      a LoRA scaling that is not a number cannot be fused (every site was declined). Scoped to this
      model's calls, so other compiled code keeps dynamo's default.
    - forward calls are counted, so the report can say when calls ran and nothing compiled (dynamo
      ran the frames eagerly: its recompile limit, reached by earlier models in the process)."""
    compiled = model._compiled_call_impl

    def call(*args, **kwargs):
        report.forward_calls += 1
        with torch._dynamo.config.patch(specialize_float=True):
            return compiled(*args, **kwargs)

    model._compiled_call_impl = call


def _offload_for(choice, compiler: str, cudagraphs: bool, on_cuda: bool) -> Optional[ActivationOffload]:
    if choice is False or choice is None:
        return None
    if choice == "auto":
        return ActivationOffload() if on_cuda and compiler != "eager" and not cudagraphs else None
    if choice is True or isinstance(choice, ActivationOffload):
        if cudagraphs:
            raise ValueError("offload_activations and cudagraphs=True do not combine (side-stream copies)")
        if compiler == "eager":
            raise ValueError("offload_activations needs AOTAutograd: compiler 'inductor' or 'aot_eager'")
        return choice if isinstance(choice, ActivationOffload) else ActivationOffload()
    raise ValueError(f"offload_activations must be 'auto', True, False or an ActivationOffload, not {choice!r}")


def report(model: torch.nn.Module) -> Report:
    """The report of an optimized model (filled in as its graphs compile)."""
    rep = getattr(model, _REPORT_ATTR, None)
    if rep is None:
        raise ValueError("this model was not optimized by fxfuse (call fxfuse.optimize(model) first)")
    return rep


def _with_progress(backend, report: Report):
    def run(gm, example_inputs):
        t0 = time.perf_counter()
        print(f"fxfuse: graph {len(report.graphs)}: running passes and compiling "
              f"({len(gm.graph.nodes)} top-level nodes)...", file=sys.stderr, flush=True)
        compiled = backend(gm, example_inputs)
        rec = report.graphs[-1]
        done = ", ".join(f"{p.name} {p.rewritten}/{p.candidates}" for p in rec.passes)
        print(f"fxfuse: graph {rec.index}: rewrote {done} in {time.perf_counter() - t0:.1f}s",
              file=sys.stderr, flush=True)
        return compiled
    return run
