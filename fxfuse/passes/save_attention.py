"""Checkpoint policy `save_attention`: under gradient checkpointing with the activation offload on,
the attention block's tensors (q, k, v as the attention op reads them, its output and log-sum-exp)
are saved for the backward, and offloaded to host memory, instead of recomputed.

Why: a checkpointed backward recomputes a decoder layer's forward up to what it needs. For the
attention backward that is q/k/v (the grouped q/k/v LoRA op: a base GEMM of 2·T·4096·6144 FLOP on
the Llama-3.1-8B shape, plus RoPE) and, where min-cut chooses to recompute it, the attention forward
(the O(T²) part: it does for cuDNN attention on the H200; it keeps the CPU attention op's outputs,
on the device). Saved, the backward reads them back from host memory: ~80 MiB per layer at 4k
tokens, copied on the offload's side stream while the GPU computes. The q/k/v op's `xa` (for the
adapters' dB) is one of its outputs and is saved with them. Measured on the H200 at 4k tokens:
+5% tokens/s in one call (9334 -> 9811), 11326 in the next.

It runs at partition time, before min-cut, on AOTAutograd's joint graph: each scaled-dot-product
attention op inside a checkpointed region (tagged recompute) is marked MUST_SAVE, with its tensor
outputs and the ops that produce its q/k/v (walking up through views to the op that computes the
tensor; a multi-output op such as the grouped LoRA op is marked whole, since min-cut cannot save
only some of its outputs while recomputing it). Min-cut then saves those tensors; the offload moves
them to the host.

Two tiers under a host budget: the budget is the host memory the offload may pin (its
`host_fraction`), less the layer inputs checkpointing saves anyway, times `margin` (0.9: the size
counted is what the backward reads, and a saved tensor the offload cannot place stays on the GPU).
First every layer's output and lse (the attention forward, O(T²), is what costs most to recompute),
then, where the rest allows, its q/k/v too (their producer, a GEMM, is ~20x cheaper to recompute at
64k tokens). At 64k on the 8B shape that is ~0.5 + ~0.75 GiB per layer; with the earlier one-tier
rule (whole blocks, margin 0.5, counting items the backward does not read) only 12 of 32 layers
fitted at 64k and 4 at 128k, and the rest recomputed their attention forward (~64 ms per layer at
64k, ~280 ms at 128k on the H200).

Declined with a reason: attention outside checkpointed regions (already saved), an output the
offload could not move (a view, not dense, on a device type it does not handle: saved on the device
it would cost memory for nothing), an output that does not fit the budget. Kept to output and lse,
with the reason: a q/k/v that is a graph input or not computed by an op, a q/k/v producer that also
computes large outputs attention does not read (a parallel block's grouped q/k/v + MLP op), q/k/v
beyond the budget.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx
from torch.utils.checkpoint import CheckpointPolicy

from .activation_offload import _dense, _host_bytes_available, _is_alias, _is_view, _nbytes, _views_item
from .manager import PassStats, Site, source_uuid
from .pattern import module_path

aten = torch.ops.aten
SAVED_BY = "fxfuse_saved_by"  # node meta: saved by a checkpoint policy, not by checkpointing itself


def _attention_ops() -> tuple:
    names = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")
    return tuple(getattr(aten, n).default for n in names if hasattr(aten, n))


def _recomputed(node: fx.Node) -> bool:
    return node.meta.get("recompute") in (CheckpointPolicy.PREFER_RECOMPUTE, CheckpointPolicy.MUST_RECOMPUTE)


def _backward_nodes(joint: fx.GraphModule) -> set:
    """The joint graph's backward: what depends on a tangent (an output's incoming gradient)."""
    backward = set()
    for n in joint.graph.nodes:  # in topological order
        if (n.op == "placeholder" and n.name.startswith("tangents")) or any(a in backward for a in n.all_input_nodes):
            backward.add(n)
    return backward


def _bytes_read_back(marks: list[fx.Node], backward: set) -> int:
    """Bytes of the marked tensors the backward reads: what min-cut will save. A multi-output op
    is marked whole, but its items only the forward reads (a LoRA op's pre-RoPE q/k) are not saved."""
    def read(n: fx.Node) -> bool:  # directly, or through views (the joint detaches what it saves)
        # and the items of split/unbind (a fused q/k/v projection's parts)
        return any(u in backward or ((_is_view(u) or _views_item(u)) and read(u)) for u in n.users)
    return sum(_nbytes(n.meta["val"]) or 0 for n in marks if isinstance(n.meta.get("val"), torch.Tensor) and read(n))


def boundary_bytes(joint: fx.GraphModule) -> int:
    """Bytes of the checkpointed regions' boundary tensors: what min-cut saves anyway (the layer inputs)."""
    total = 0
    for n in joint.graph.nodes:
        val = n.meta.get("val")
        if not isinstance(val, torch.Tensor) or n.op != "call_function":
            continue
        gid = n.meta.get("ac_graph_id")
        # a region's output read by a later region, or a tensor from outside read by a region
        if any(_recomputed(u) and u.meta.get("ac_graph_id") != gid for u in n.users):
            total += _nbytes(val) or 0
    return total


def _ancestors(node: fx.Node, depth: int) -> set:
    seen, frontier = set(), [node]
    for _ in range(depth):
        frontier = [a for n in frontier for a in n.all_input_nodes if a not in seen]
        seen.update(frontier)
    return seen


def unmovable(marks: list[fx.Node], devices) -> Optional[str]:
    """Why a marked tensor could not be offloaded, if one could not: saved on the GPU instead of
    recomputed it would cost memory for nothing."""
    for n in marks:
        val = n.meta.get("val")
        # scalars (the attention's RNG seed/offset, on whatever device) cost nothing where they are
        if not isinstance(val, torch.Tensor) or (_nbytes(val) or 0) <= 256:
            continue
        if val.device.type not in devices:
            return f"on {val.device.type}, which the offload does not move ({list(devices)})"
        if _is_alias(n) or not _dense(val):
            return f"{n.name} could not be offloaded (a view, or not dense): it would stay on the device"
    return None


@dataclass
class _Plan:
    """What the policy saves of one attention op: its outputs (or why not: `why`), and the ops that
    produce its q/k/v (or why not: `why_not_inputs`); `size` is the bytes saved."""
    attn: fx.Node
    outputs: Optional[list] = None
    inputs: Optional[list] = None
    why: Optional[str] = None
    why_not_inputs: Optional[str] = None
    size: int = 0


class SaveAttention:
    name = "save_attention"

    def __init__(self, host_fraction: float = 0.5, margin: float = 0.9, devices: tuple[str, ...] = ("cuda",)):
        """host_fraction: the offload's share of the host's available memory; what the layer inputs
        (the checkpointed regions' boundaries) take of it comes first. margin: the share of the
        rest this policy may plan for. The boundary sum is an estimate made before min-cut, and a
        saved tensor the offload cannot place stays on the GPU, so the policy keeps a reserve.
        devices: the device types the offload moves (the policy declines the others)."""
        if not 0 < margin <= 1:
            raise ValueError("margin must be in (0, 1]")
        self.config = {"policy": self.name, "host_fraction": host_fraction, "margin": margin,
                       "devices": list(devices)}

    def uuid(self) -> str:
        return source_uuid((type(self).__module__,), self.config)

    def run(self, joint: fx.GraphModule, stats: PassStats) -> None:
        ops = _attention_ops()
        plans = [_Plan(n) for n in joint.graph.nodes if n.op == "call_function" and n.target in ops]
        if not plans:
            return
        left = self._host_budget(joint)
        backward = _backward_nodes(joint)
        for plan in plans:
            if not _recomputed(plan.attn):
                plan.why = "not in a checkpointed region: the forward saves it already"
                continue
            outputs, plan.why = self._output_marks(plan.attn)
            if plan.why is None:
                plan.outputs = outputs
                plan.inputs, plan.why_not_inputs = self._input_marks(plan.attn)

        # Two tiers, so a tight host budget goes where it saves the most time per byte: first every
        # layer's attention output and lse (at 64k tokens on the 8B shape ~0.5 GiB per layer, and
        # the O(T²) attention forward is not recomputed), then q/k/v as well (~0.75 GiB more, and
        # the q/k/v projection, a ~20x cheaper GEMM, is not recomputed either).
        for plan in plans:
            if plan.outputs is None:
                continue
            size = _bytes_read_back(plan.outputs, backward)
            if left is not None and size > left:
                plan.why = (f"host memory: its output and lse ({size >> 20} MiB) would not fit in the "
                            f"{left >> 20} MiB the offload has left after the layer inputs")
                plan.outputs = None
                continue
            left = None if left is None else left - size
            plan.size = size
        for plan in plans:
            if plan.outputs is None or plan.inputs is None:
                continue
            size = _bytes_read_back([n for n in plan.inputs if n not in plan.outputs], backward)
            if left is not None and size > left:
                plan.why_not_inputs = (f"host memory: its q/k/v ({size >> 20} MiB) would not fit in the "
                                       f"{left >> 20} MiB left after every layer's output and lse")
                plan.inputs = None
                continue
            left = None if left is None else left - size
            plan.size += size

        for plan in plans:
            if plan.outputs is None:
                stats.sites.append(self._site(plan.attn, False, plan.why))
                continue
            for n in plan.outputs + (plan.inputs or []):
                n.meta["recompute"] = CheckpointPolicy.MUST_SAVE
                n.meta[SAVED_BY] = self.name  # the offload places these after the layer inputs
            note = "" if plan.inputs is not None else f"output and lse saved; q/k/v recomputed: {plan.why_not_inputs}"
            stats.sites.append(self._site(plan.attn, True, note, group=plan.attn.name))
            stats.add("MiB saved", plan.size / 2**20)
            stats.add("q/k/v saved too", plan.inputs is not None)

    def _output_marks(self, attn: fx.Node) -> tuple[list[fx.Node], Optional[str]]:
        """The attention op and its tensor outputs (output, lse), or why they cannot be saved."""
        marks = [attn] + [u for u in attn.users
                          if u.target is operator.getitem and isinstance(u.meta.get("val"), torch.Tensor)]
        return marks, self._unmovable(marks)

    def _input_marks(self, attn: fx.Node) -> tuple[Optional[list[fx.Node]], Optional[str]]:
        """The ops that produce the attention's q/k/v, to mark as well, or why not (then only the
        output and lse are saved, and the backward recomputes q/k/v from the layer input)."""
        marks = []
        bases = []
        for name, arg in zip("qkv", attn.args[:3]):
            base = arg
            # up through views, and items of ops that return views (split, unbind): the storage
            # is their input's
            while isinstance(base, fx.Node) and base.op == "call_function":
                if _is_view(base):
                    base = base.args[0]
                elif _views_item(base):
                    base = base.args[0].args[0]
                else:
                    break
            if not isinstance(base, fx.Node) or base.op != "call_function":
                return None, f"its {name} is not computed by an op in the graph"
            if base.target is operator.getitem and not isinstance(getattr(base.args[0], "target", None),
                                                                  torch._ops.OpOverload):
                return None, f"its {name} is an item of {base.args[0].target}, not of an op"
            if _recomputed(base):
                bases.append(base)
        near = _ancestors(attn, depth=24)
        qkv_bytes = sum(_nbytes(b.meta["val"]) or 0 for b in bases if isinstance(b.meta.get("val"), torch.Tensor))
        for base in bases:
            if base.target is not operator.getitem:
                marks.append(base)
                continue
            producer = base.args[0]  # one output of a multi-output op: the op is marked whole
            if not _recomputed(producer):
                continue
            items = [u for u in producer.users if u.target is operator.getitem]
            other = sum(_nbytes(u.meta["val"]) or 0 for u in items
                        if u not in near and isinstance(u.meta.get("val"), torch.Tensor))
            if other > qkv_bytes:  # a LoRA op's xa is ~1% of q/k/v; a parallel block's MLP is ~5x
                return None, (f"{producer.name} also computes {other >> 20} MiB attention does not read (e.g. a "
                              "parallel block's MLP): saving it whole would save that too")
            marks += [producer] + items
        marks = list(dict.fromkeys(marks))
        why = self._unmovable(marks)
        return (None, why) if why is not None else (marks, None)

    def _unmovable(self, marks: list[fx.Node]) -> Optional[str]:
        return unmovable(marks, self.config["devices"])

    def _host_budget(self, joint: fx.GraphModule) -> Optional[int]:
        """Host bytes this policy may plan for: the offload's share less the checkpointed regions'
        boundary tensors (what min-cut saves anyway: the layer inputs), times the margin; None
        where the host's memory cannot be read."""
        available = _host_bytes_available()
        if available is None:
            return None
        return max(int((available * self.config["host_fraction"] - boundary_bytes(joint)) * self.config["margin"]), 0)

    def _site(self, node: fx.Node, rewritten: bool, reason: str = "", group: Optional[str] = None) -> Site:
        return Site(self.name, module_path(node), node.name, "aot", rewritten, reason, group, "policy")
