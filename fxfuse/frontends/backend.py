"""The fxfuse torch.compile backend: run the passes on dynamo's graph, then hand the rewritten
graph to Inductor (AOTAutograd for training) or to a lighter compiler for tests."""
from __future__ import annotations

import copy
import sys
from typing import Callable, Optional

import torch
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomPartitionerFn

from ..passes.activation_offload import ActivationOffload, offload_partition_fn
from ..passes.manager import PassManager, PassStats
from ..passes.pattern import graphs_of
from .report import Report

COMPILERS = ("inductor", "aot_eager", "eager")


def _node_count(gm: fx.GraphModule) -> int:
    return sum(len(g.graph.nodes) for _, g in graphs_of(gm))


class OffloadPartitioner(CustomPartitionerFn):
    """Inductor's custom-partitioner hook: min-cut, then the activation offload. Inductor pickles
    it into its cache key: only the offload's uuid goes there."""

    def __init__(self, offload: ActivationOffload, on_stats):
        self.offload, self.on_stats = offload, on_stats

    def __call__(self, gm, joint_inputs, **kwargs):
        return offload_partition_fn(self.offload, self.on_stats)(gm, joint_inputs, **kwargs)

    def uuid(self):
        offload = getattr(self, "offload", None)
        return offload.uuid() if offload is not None else self.offload_uuid

    def __getstate__(self):
        return {"offload_uuid": self.uuid()}

    def __setstate__(self, state):  # an unpickled copy (a compile subprocess) only answers uuid()
        self.offload, self.on_stats, self.offload_uuid = None, None, state["offload_uuid"]

    # Inductor deep-copies its config (this object with it) before pickling the cache key. The default
    # deepcopy goes through __getstate__, which would leave a copy without `offload`.
    def __copy__(self):
        return OffloadPartitioner(self.offload, self.on_stats)

    def __deepcopy__(self, memo):
        return self.__copy__()


def _autograd_cache_hits() -> int:
    from torch._dynamo.utils import counters
    return counters["aot_autograd"]["autograd_cache_hit"]


def make_backend(manager: PassManager, report: Report, compiler: str = "inductor",
                 cudagraphs: bool = False, offload: Optional[ActivationOffload] = None) -> Callable:
    """compiler: 'inductor' (the real thing), 'aot_eager' (AOTAutograd with a pass-through
    compiler: same forward/backward split, no codegen; for fast tests), 'eager' (rewritten graph
    run as is). cudagraphs: Inductor replays each compiled graph as a CUDA graph (removes the
    per-op launch cost that dominates short sequences; costs memory pools). offload: moves the
    activations that training graphs save for backward to host memory (partition time)."""
    if compiler not in COMPILERS:
        raise ValueError(f"compiler must be one of {COMPILERS}, not {compiler!r}")
    if offload is not None and compiler == "eager":
        raise ValueError("activation offload needs AOTAutograd: compiler 'inductor' or 'aot_eager'")

    def record(stats):
        report.graphs[-1].passes.append(stats)

    def fxfuse_backend(gm: fx.GraphModule, example_inputs):
        before = _node_count(gm)
        work = copy.deepcopy(gm)  # a pass that fails midway must not leave a half-rewritten graph
        try:
            stats = manager.run(work)
            gm = work
        except Exception as e:  # a bug in a pass: compile the untouched graph, and say so
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            print(f"fxfuse: warning: passes failed on graph {len(report.graphs)}, compiling it "
                  f"unchanged: {reason}", file=sys.stderr)
            report.errors.append(reason)
            stats = []
        report.add_graph(before, _node_count(gm), stats)
        if compiler == "inductor":
            from torch._inductor.compile_fx import compile_fx
            patches = {"triton.cudagraphs": True} if cudagraphs else {}
            if offload is None:
                return compile_fx(gm, example_inputs, config_patches=patches or None)
            patches["custom_partitioner_fn"] = OffloadPartitioner(offload, record)
            graph, hits = report.graphs[-1], _autograd_cache_hits()
            compiled = compile_fx(gm, example_inputs, config_patches=patches)
            # only a training graph would have been partitioned (inference graphs never are)
            training = torch.is_grad_enabled() and any(
                isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs)
            if training and _autograd_cache_hits() > hits and not any(p.name == offload.name for p in graph.passes):
                # AOTAutograd's cache returned graphs partitioned (and offloaded) by an earlier process:
                # the partitioner did not run here, so there are no sites to report, only that.
                cached = PassStats(offload.name, offload.uuid())
                cached.add("graphs from cache")
                graph.passes.append(cached)
            return compiled
        if compiler == "aot_eager":
            if offload is not None:
                from functorch.compile import make_boxed_func
                from torch._dynamo.backends.common import aot_autograd
                nop = lambda g, _: make_boxed_func(g.forward)  # noqa: E731
                return aot_autograd(fw_compiler=nop, bw_compiler=nop,
                                    partition_fn=offload_partition_fn(offload, record))(gm, example_inputs)
            from torch._dynamo.backends.debugging import aot_eager
            return aot_eager(gm, example_inputs)
        return gm.forward

    return fxfuse_backend
