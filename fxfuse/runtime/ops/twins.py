"""Run-time twins of fxfuse's custom ops: `fxfuse_rt::<name>`, the same schema, implementation and
fake implementation as `fxfuse::<name>`, registered with the low-level `torch.library.Library` API
and without an autograd kernel.

Why: a `torch.library.custom_op` call goes through Python wrappers for autograd, redispatch and
an output-aliasing check before it reaches the implementation. `bench/dispatch_cost.py` (an op
with the LoRA op's signature and a trivial body, on the CI machine's CPU): 40.9 us a call as a
custom op, 17.0 us as a Library op without an autograd kernel, 4.7 us as a plain call (log
bench/logs/2026-12-02-cpu-dispatch-cost.txt).
On the H200's host the real LoRA forward op cost 760 us as a custom op and 679 us as its twin
(bench/op_overhead.py). A 4k training step of the 8B shape makes ~900 such calls, on a host that
is the step's bottleneck much of the time (bench/RESULTS.md).

The graphs Inductor compiles after AOTAutograd has partitioned them run without autograd, and
their ops need no autograd kernel: `retarget(graph)` (called by the Inductor partitioner hook,
frontends/backend.py) points their fxfuse calls at the twins. Everything else (tracing, eager use,
the `aot_eager` test path) keeps the custom ops, with their checks and autograd formulas.

The twins are registered when this module is imported (fxfuse imports it), so a process that
loads compiled graphs from the on-disk cache finds them. Registration reads two private attributes
of torch's CustomOpDef; if a torch release moves them, fxfuse warns once at import, `retarget`
changes nothing and `unavailable` says why (the custom ops keep working).
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.fx as fx
from torch._library.custom_ops import _maybe_get_opdef

from .. import env
from . import cross_entropy, grouped_mm, lora, offload, rms_norm, swiglu, tiled_mlp  # noqa: F401  (defines the ops)

SOURCE, TWIN = "fxfuse", "fxfuse_rt"
_LIB = torch.library.Library(TWIN, "DEF")
_twins: dict = {}  # fxfuse op overload -> its twin's overload
unavailable: Optional[str] = None  # why there are no twins, when registration failed


def _register(qualname: str) -> None:
    opdef = _maybe_get_opdef(qualname)
    impl, fake = getattr(opdef, "_init_fn", None), getattr(opdef, "_abstract_fn", None)
    if impl is None or fake is None:
        raise RuntimeError(f"{qualname}: its implementation or fake implementation is not reachable "
                           f"(torch {torch.__version__} changed CustomOpDef)")
    name = qualname.split("::")[1]
    source = getattr(torch.ops.fxfuse, name).default
    schema = str(source._schema).split("::", 1)[1]
    # the tags Inductor reads (cudagraph_unsafe: grouped_mm reads offsets on the host); pt2_compliant
    # only concerns dynamo, which never sees a twin
    _LIB.define(schema, tags=tuple(t for t in source.tags if t != torch.Tag.pt2_compliant_tag))
    # CompositeExplicitAutograd: one kernel for every device (the implementation picks its path)
    _LIB.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{TWIN}::{name}", fake, lib=_LIB)
    _twins[source] = getattr(torch.ops.fxfuse_rt, name).default


def _register_all() -> None:
    global unavailable
    from torch._library.custom_ops import OPDEFS
    try:
        for qualname in sorted(q for q in list(OPDEFS) if q.startswith(SOURCE + "::")):
            _register(qualname)
    except Exception as e:  # a torch change must not stop fxfuse from importing: the ops still work
        _twins.clear()
        unavailable = f"{type(e).__name__}: {e}"
        warnings.warn(f"fxfuse: run-time twins of the custom ops not registered, compiled graphs call the "
                      f"custom ops ({unavailable})", stacklevel=2)


def twin_of(op) -> "torch._ops.OpOverload | None":
    return _twins.get(op)


def enabled() -> bool:
    """FXFUSE_OP_TWINS=0 keeps the custom ops in compiled graphs (an escape hatch: the twins' effect
    on a whole training step is not measured yet, bench/RESULTS.md). Read at compile time."""
    return env.flag("FXFUSE_OP_TWINS", True)


def retarget(gm: fx.GraphModule) -> int:
    """Points the graph's fxfuse op calls at their twins; returns how many. For graphs that run
    without autograd only (partitioned forward and backward graphs)."""
    if not enabled() or unavailable is not None:
        return 0
    n = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _twins:
            node.target = _twins[node.target]
            n += 1
    if n:
        gm.recompile()
    return n


_register_all()
