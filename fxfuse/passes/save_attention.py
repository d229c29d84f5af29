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

Declined with a reason: attention outside checkpointed regions (already saved), an input that is a
graph input or not computed by an op, a tensor the offload could not move (a view, not dense, on a
device type it does not handle: saved on the device it would cost memory for nothing), a q/k/v
producer that also computes large outputs attention does not read (a parallel block's grouped
q/k/v + MLP op), and what would not fit the host memory the offload may pin
(its `host_fraction`, less the layer inputs checkpointing saves anyway, times `margin` = 0.5: at
320k tokens on the 8B shape the layer inputs alone take ~80 GiB, and a saved tensor the offload
cannot place stays on the GPU; with host_fraction 0.7 on a 124 GiB host that leaves ~3.4 GiB, less
than one layer's ~6.3 GiB block, so 320k runs as measured before this policy).
"""
from __future__ import annotations

import operator
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


def _ancestors(node: fx.Node, depth: int) -> set:
    seen, frontier = set(), [node]
    for _ in range(depth):
        frontier = [a for n in frontier for a in n.all_input_nodes if a not in seen]
        seen.update(frontier)
    return seen


class SaveAttention:
    name = "save_attention"

    def __init__(self, host_fraction: float = 0.5, margin: float = 0.5, devices: tuple[str, ...] = ("cuda",)):
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
        sites = [n for n in joint.graph.nodes if n.op == "call_function" and n.target in ops]
        if not sites:
            return
        left = self._host_budget(joint)
        for attn in sites:
            if not _recomputed(attn):
                stats.sites.append(self._site(attn, False, "not in a checkpointed region: the forward saves it already"))
                continue
            marks, why = self._marks(attn)
            size = sum(_nbytes(n.meta["val"]) or 0 for n in marks if isinstance(n.meta.get("val"), torch.Tensor))
            if why is None and left is not None:
                if size > left:
                    why = (f"host memory: its {size >> 20} MiB would not fit in the {left >> 20} MiB the offload "
                           "has left after the layer inputs")
                else:
                    left -= size
            if why is not None:
                stats.sites.append(self._site(attn, False, why))
                continue
            for n in marks:
                n.meta["recompute"] = CheckpointPolicy.MUST_SAVE
                n.meta[SAVED_BY] = self.name  # the offload places these after the layer inputs
            stats.sites.append(self._site(attn, True, group=attn.name))
            stats.add("MiB saved", size / 2**20)

    def _marks(self, attn: fx.Node) -> tuple[list[fx.Node], Optional[str]]:
        """The nodes to mark MUST_SAVE (the attention op, its tensor outputs, the producers of its
        q/k/v), or why not. Every tensor marked must be one the offload can move: a tensor saved
        on the GPU instead of recomputed would cost memory for nothing."""
        marks = [attn] + [u for u in attn.users
                          if u.target is operator.getitem and isinstance(u.meta.get("val"), torch.Tensor)]
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
                return [], f"its {name} is not computed by an op in the graph"
            if base.target is operator.getitem and not isinstance(getattr(base.args[0], "target", None),
                                                                  torch._ops.OpOverload):
                return [], f"its {name} is an item of {base.args[0].target}, not of an op"
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
                return [], (f"{producer.name} also computes {other >> 20} MiB attention does not read (e.g. a "
                            "parallel block's MLP): saving it whole would save that too")
            marks += [producer] + items
        marks = list(dict.fromkeys(marks))
        for n in marks:
            val = n.meta.get("val")
            # scalars (the attention's RNG seed/offset, on whatever device) cost nothing where they are
            if not isinstance(val, torch.Tensor) or (_nbytes(val) or 0) <= 256:
                continue
            if val.device.type not in self.config["devices"]:
                return [], f"on {val.device.type}, which the offload does not move ({self.config['devices']})"
            if _is_alias(n) or not _dense(val):
                return [], f"{n.name} could not be offloaded (a view, or not dense): it would stay on the device"
        return marks, None

    def _host_budget(self, joint: fx.GraphModule) -> Optional[int]:
        """Host bytes this policy may plan for: the offload's share less the checkpointed regions'
        boundary tensors (what min-cut saves anyway: the layer inputs), times the margin; None
        where the host's memory cannot be read."""
        available = _host_bytes_available()
        if available is None:
            return None
        boundary = 0
        for n in joint.graph.nodes:
            val = n.meta.get("val")
            if not isinstance(val, torch.Tensor) or n.op != "call_function":
                continue
            gid = n.meta.get("ac_graph_id")
            # a region's output read by a later region, or a tensor from outside read by a region
            if any(_recomputed(u) and u.meta.get("ac_graph_id") != gid for u in n.users):
                boundary += _nbytes(val) or 0
        return max(int((available * self.config["host_fraction"] - boundary) * self.config["margin"]), 0)

    def _site(self, node: fx.Node, rewritten: bool, reason: str = "", group: Optional[str] = None) -> Site:
        return Site(self.name, module_path(node), node.name, "aot", rewritten, reason, group, "policy")
