"""The fxfuse torch.compile backend: run the passes on dynamo's graph, then hand the rewritten
graph to Inductor (AOTAutograd for training) or to a lighter compiler for tests."""
from __future__ import annotations

import copy
import sys
from typing import Callable

import torch.fx as fx

from ..passes.manager import PassManager
from ..passes.pattern import graphs_of
from .report import Report

COMPILERS = ("inductor", "aot_eager", "eager")


def _node_count(gm: fx.GraphModule) -> int:
    return sum(len(g.graph.nodes) for _, g in graphs_of(gm))


def make_backend(manager: PassManager, report: Report, compiler: str = "inductor",
                 cudagraphs: bool = False) -> Callable:
    """compiler: 'inductor' (the real thing), 'aot_eager' (AOTAutograd with a pass-through
    compiler: same forward/backward split, no codegen; for fast tests), 'eager' (rewritten graph
    run as is). cudagraphs: Inductor replays each compiled graph as a CUDA graph (removes the
    per-op launch cost that dominates short sequences; costs memory pools)."""
    if compiler not in COMPILERS:
        raise ValueError(f"compiler must be one of {COMPILERS}, not {compiler!r}")

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
            return compile_fx(gm, example_inputs, config_patches={"triton.cudagraphs": True} if cudagraphs else None)
        if compiler == "aot_eager":
            from torch._dynamo.backends.debugging import aot_eager
            return aot_eager(gm, example_inputs)
        return gm.forward

    return fxfuse_backend
