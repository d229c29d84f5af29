"""The fxfuse torch.compile backend: run the passes on dynamo's graph, then hand the rewritten
graph to Inductor (AOTAutograd for training) or to a lighter compiler for tests."""
from __future__ import annotations

import copy
import hashlib
import inspect
import sys
from collections import Counter
from typing import Callable, Optional

import torch
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomPartitionerFn

from ..passes.activation_offload import ActivationOffload
from ..passes.lora import GRAPH_OP_COLUMN
from ..passes.manager import PassManager, PassStats, source_uuid
from ..passes.pattern import graphs_of
from ..passes.recompute_lora_xa import RecomputeLoraXA
from ..passes.save_attention import SaveAttention
from ..passes.save_projections import SaveProjections
from ..runtime import stats as runtime_stats
from ..runtime.ops import twins
from .report import Report

COMPILERS = ("inductor", "aot_eager", "eager")


def _carry_dynamo_metadata(src: fx.GraphModule, dst: fx.GraphModule) -> bool:
    """Give the rewritten copy what deepcopy drops and AOTAutograd reads to tell a parameter from a
    per-call input: the module's `_param_name_to_source` and each placeholder's `_dynamo_source`.
    Without them AOTAutograd sees no static inputs, so CUDA graphs copy every weight into their own
    buffers each replay (a second copy of the model in memory) and Inductor checks every weight's
    alignment on every call. False when the placeholders no longer match (then nothing is carried)."""
    if not hasattr(src, "_param_name_to_source"):
        return True  # not a dynamo graph (export, tests): nothing to carry
    old = list(src.graph.find_nodes(op="placeholder"))
    new = list(dst.graph.find_nodes(op="placeholder"))
    if [n.target for n in old] != [n.target for n in new]:
        return False
    dst._param_name_to_source = src._param_name_to_source
    for o, n in zip(old, new):
        if hasattr(o, "_dynamo_source"):
            n._dynamo_source = o._dynamo_source
    return True


def _noting_lora_inputs(compiled: Callable, example_inputs, report: Report) -> Callable:
    """`compiled`, noting at each call which PEFT LoRA A weights it runs with (the report's check of
    which layers ran outside the compiled graphs). The inputs at the positions where this graph's
    example inputs are LoRA A weights: a compiled frame reused for another layer gets that layer's."""
    layers = report.lora_weight_layers()
    found = {i: layers.get(runtime_stats.weight_key(t)) for i, t in enumerate(example_inputs)
             if isinstance(t, torch.Tensor) and not isinstance(t, torch._subclasses.FakeTensor)}
    positions = [i for i, name in found.items() if name is not None]
    names = {found[i] for i in positions}
    report.graphs[-1].lora_layers = len(names)
    report.graphs[-1].lora_kinds = dict(Counter(report.adapter_layers.get(n, "lora.?") for n in names))
    if not positions:
        return compiled
    note = runtime_stats.record_lora_weights

    def run(*args):
        # called with the inputs, or (boxed calling convention) with one list of them, which the
        # callee may clear: noted first. A graph's inputs are tensors and ints, never one list.
        inputs = args[0] if len(args) == 1 and isinstance(args[0], list) else args
        note([inputs[i] for i in positions])
        return compiled(*args)

    if hasattr(compiled, "_boxed_call"):
        run._boxed_call = compiled._boxed_call
    return run


def _node_count(gm: fx.GraphModule) -> int:
    return sum(len(g.graph.nodes) for _, g in graphs_of(gm))


class PartitionPolicies:
    """What runs when AOTAutograd splits a training graph, in order: save_attention and
    save_projections mark what the joint graph must save (with the offload only: the saved tensors
    go to host memory), min-cut partitions the joint graph (the partitioner Inductor uses),
    recompute_lora_xa trims the backward's recomputation, then the activation offload rewrites the
    forward and backward graphs. Each reports its sites."""

    def __init__(self, recompute_xa: Optional[RecomputeLoraXA] = None, offload: Optional[ActivationOffload] = None):
        self.recompute_xa, self.offload = recompute_xa, offload
        on = offload.config if offload is not None else {}
        devices = tuple(on.get("devices", ()))
        self.save_attention = SaveAttention(on["host_fraction"], devices=devices) if on.get("save_attention") else None
        projections = on.get("save_projections")
        self.save_projections = (SaveProjections(host_fraction=on["host_fraction"], min_bytes=on["min_bytes"],
                                                 devices=devices, **(projections if isinstance(projections, dict) else {}))
                                 if projections not in (None, False) else None)

    @property
    def policies(self) -> list:
        return [p for p in (self.save_attention, self.save_projections, self.recompute_xa, self.offload) if p is not None]

    def uuid(self) -> str:
        # this class's code composes the policies: it feeds the cache key too
        own = hashlib.sha256(inspect.getsource(PartitionPolicies).encode()).hexdigest()[:8]
        return "-".join([own] + [p.uuid() for p in self.policies])

    def partition_fn(self, on_stats: Callable[[PassStats], None], partition: Optional[Callable] = None) -> Callable:
        if partition is None:
            from torch._functorch.partitioners import min_cut_rematerialization_partition as partition

        def partition_fn(joint: fx.GraphModule, joint_inputs, **kwargs):
            if self.save_attention is not None:
                stats = PassStats(self.save_attention.name, self.save_attention.uuid())
                self.save_attention.run(joint, stats)
                on_stats(stats)
            if self.save_projections is not None:
                stats = PassStats(self.save_projections.name, self.save_projections.uuid())
                self.save_projections.run(joint, stats, kwargs.get("num_fwd_outputs"))
                on_stats(stats)
            fw, bw = partition(joint, joint_inputs, **kwargs)
            if self.recompute_xa is not None:
                stats = PassStats(self.recompute_xa.name, self.recompute_xa.uuid())
                self.recompute_xa.run(bw, stats)
                on_stats(stats)
            if self.offload is not None:
                stats = PassStats(self.offload.name, self.offload.uuid())
                self.offload.run(fw, bw, kwargs["num_fwd_outputs"], stats)
                on_stats(stats)
            return fw, bw

        return partition_fn


class PolicyPartitioner(CustomPartitionerFn):
    """Inductor's custom-partitioner hook around `PartitionPolicies`. Inductor pickles it into its
    cache key: only the policies' uuid goes there. The partitioned graphs run without autograd:
    their fxfuse ops are pointed at the run-time twins (runtime/ops/twins.py: the same ops without
    custom_op's per-call Python layers)."""

    def __init__(self, policies: PartitionPolicies, on_stats):
        self.policies, self.on_stats = policies, on_stats

    def __call__(self, gm, joint_inputs, **kwargs):
        fw, bw = self.policies.partition_fn(self.on_stats)(gm, joint_inputs, **kwargs)
        twins.retarget(fw)
        twins.retarget(bw)
        return fw, bw

    def uuid(self):
        policies = getattr(self, "policies", None)
        if policies is None:
            return self.policies_uuid
        return policies.uuid() + "-" + source_uuid((twins.__name__,), {"twins": twins.enabled()})

    def __getstate__(self):
        return {"policies_uuid": self.uuid()}

    def __setstate__(self, state):  # an unpickled copy (a compile subprocess) only answers uuid()
        self.policies, self.on_stats, self.policies_uuid = None, None, state["policies_uuid"]

    # Inductor deep-copies its config (this object with it) before pickling the cache key. The default
    # deepcopy goes through __getstate__, which would leave a copy without `policies`.
    def __copy__(self):
        return PolicyPartitioner(self.policies, self.on_stats)

    def __deepcopy__(self, memo):
        return self.__copy__()


def _autograd_cache_hits() -> int:
    from torch._dynamo.utils import counters
    return counters["aot_autograd"]["autograd_cache_hit"]


def make_backend(manager: PassManager, report: Report, compiler: str = "inductor",
                 cudagraphs: bool = False, offload: Optional[ActivationOffload] = None,
                 recompute_xa: Optional[RecomputeLoraXA] = None) -> Callable:
    """compiler: 'inductor' (the real thing), 'aot_eager' (AOTAutograd with a pass-through
    compiler: same forward/backward split, no codegen; for fast tests), 'eager' (rewritten graph
    run as is). cudagraphs: Inductor replays each compiled graph as a CUDA graph (removes the
    per-op launch cost that dominates short sequences; costs memory pools). offload: moves the
    activations that training graphs save for backward to host memory (partition time).
    recompute_xa: a checkpointed backward recomputes only the xa of a LoRA op whose outputs it does
    not read, not the op (partition time)."""
    if compiler not in COMPILERS:
        raise ValueError(f"compiler must be one of {COMPILERS}, not {compiler!r}")
    if offload is not None and compiler == "eager":
        raise ValueError("activation offload needs AOTAutograd: compiler 'inductor' or 'aot_eager'")
    policies = PartitionPolicies(recompute_xa if compiler != "eager" else None, offload)
    report.cudagraphs = cudagraphs

    def record(stats):
        report.graphs[-1].passes.append(stats)

    def fxfuse_backend(gm: fx.GraphModule, example_inputs):
        before = _node_count(gm)
        work = copy.deepcopy(gm)  # a pass that fails midway must not leave a half-rewritten graph
        try:
            stats = manager.run(work)
            if not _carry_dynamo_metadata(gm, work):
                raise RuntimeError("a pass changed the graph's inputs")
            gm = work
        except Exception as e:  # a bug in a pass: compile the untouched graph, and say so
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            print(f"fxfuse: warning: passes failed on graph {len(report.graphs)}, compiling it "
                  f"unchanged: {reason}", file=sys.stderr)
            report.errors.append(reason)
            stats = []
        report.add_graph(before, _node_count(gm), stats)
        try:
            compiled = compile_rewritten(gm, example_inputs)
        except Exception as e:
            # this graph will not run as compiled, so its sites did not happen: drop its record
            record = report.graphs.pop()
            if isinstance(e, torch._dynamo.exc.RestartAnalysis):  # dynamo traces again and retries
                raise
            reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            falls_back = torch._dynamo.config.suppress_errors or isinstance(
                e, getattr(torch._dynamo.exc, "exceptions_allowed_to_be_fallback", ()))
            outcome = ("dynamo runs its code without fxfuse (a graph break, or eagerly)" if falls_back
                       else "the error stops the call")
            report.compile_errors.append(f"graph {record.index} ({record.nodes_before} nodes): {reason}; {outcome}")
            print(f"fxfuse: warning: compiling graph {record.index} failed: {reason}; {outcome}", file=sys.stderr)
            raise
        return _noting_lora_inputs(compiled, example_inputs, report)

    def compile_rewritten(gm: fx.GraphModule, example_inputs):
        if compiler == "inductor":
            from torch._inductor.compile_fx import compile_fx
            patches = {"triton.cudagraphs": True} if cudagraphs else {}
            if any(p.columns.get(GRAPH_OP_COLUMN) for p in report.graphs[-1].passes):
                # Inductor keeps a dead buffer allocated until a later one of its size takes it over.
                # With the LoRA math as graph ops, [tokens, intermediate] buffers were kept across
                # layers that way: the 1k backward's peak 15.96 GiB, 15.88 with reuse off (H200,
                # bench/RESULTS.md). The caching allocator reuses the freed blocks instead.
                patches["allow_buffer_reuse"] = False
                report.graphs[-1].inductor_patches["allow_buffer_reuse"] = False
            if not policies.policies:
                return compile_fx(gm, example_inputs, config_patches=patches or None)
            patches["custom_partitioner_fn"] = PolicyPartitioner(policies, record)
            graph, hits = report.graphs[-1], _autograd_cache_hits()
            compiled = compile_fx(gm, example_inputs, config_patches=patches)
            # only a training graph would have been partitioned (inference graphs never are)
            training = torch.is_grad_enabled() and any(
                isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs)
            if training and _autograd_cache_hits() > hits:
                # AOTAutograd's cache returned graphs partitioned by an earlier process: the
                # policies did not run here, so there are no sites to report, only that.
                for policy in policies.policies:
                    if not any(p.name == policy.name for p in graph.passes):
                        cached = PassStats(policy.name, policy.uuid())
                        cached.add("graphs from cache")
                        graph.passes.append(cached)
            return compiled
        if compiler == "aot_eager":
            if policies.policies:
                from functorch.compile import make_boxed_func
                from torch._dynamo.backends.common import aot_autograd
                nop = lambda g, _: make_boxed_func(g.forward)  # noqa: E731
                return aot_autograd(fw_compiler=nop, bw_compiler=nop, keep_inference_input_mutations=True,
                                    partition_fn=policies.partition_fn(record))(gm, example_inputs)
            from torch._dynamo.backends.debugging import aot_eager
            return aot_eager(gm, example_inputs)
        return gm.forward

    return fxfuse_backend
