"""MoE grouped-matmul pass: transformers' `grouped_mm_fallback` op -> `fxfuse::grouped_mm`, the same
math with a backward AOTAutograd can trace (runtime/ops/grouped_mm.py says why transformers' cannot).

Without it, every graph holding an MoE layer whose experts run the fallback (under torch.compile:
experts in fp16 or fp32; older GPUs and CPUs: runtime/ops/grouped_mm.py) fails to compile with
DataDependentOutputException, and the layer runs eagerly: its LoRA, attention and masks unfused. The pass matches the op call itself
(the candidate), wherever the model's experts module calls it; torch's own grouped_mm (bf16 experts
on a GPU) traces already and is not a candidate.

Declined with the reason: operands that are not [tokens, in] x [experts, in, out] with a 1-D integer
offsets tensor of one entry per expert, operands of different dtypes or devices, or a call with
no recorded values.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..runtime.ops import grouped_mm as grouped_mm_op  # noqa: F401  (registers torch.ops.fxfuse.grouped_mm)
from .manager import GraphPass, PassStats, Site
from .pattern import Decline, example_value, graphs_of, module_path, same_size


def _fallback_targets() -> tuple:
    """transformers' op, as the packet and its overload (dynamo records either); empty where this
    transformers has none."""
    try:
        packet = torch.ops.transformers.grouped_mm_fallback
        return (packet, packet.default)
    except (AttributeError, RuntimeError):
        return ()


# The pattern, as data: a call to one of these targets with (input, weight, offs), positional or by
# name; the replacement: the same arguments to REPLACEMENT.
ARGUMENTS = ("input", "weight", "offs")
REPLACEMENT = torch.ops.fxfuse.grouped_mm.default


def arguments(node: fx.Node) -> list:
    args = list(node.args) + [node.kwargs[n] for n in ARGUMENTS[len(node.args):] if n in node.kwargs]
    if len(args) != len(ARGUMENTS) or set(node.kwargs) - set(ARGUMENTS):
        raise Decline(f"called with {len(node.args)} positional and {sorted(node.kwargs)} keyword arguments, "
                      f"not ({', '.join(ARGUMENTS)})")
    return args


def check(args: list) -> None:
    """Declines what fxfuse::grouped_mm does not compute exactly as transformers' op."""
    x, w, offs = (example_value(a) for a in args)
    if not all(isinstance(t, torch.Tensor) for t in (x, w, offs)):
        raise Decline("input, weight or offsets has no recorded value")
    if x.dim() != 2 or w.dim() != 3 or offs.dim() != 1:
        raise Decline(f"shapes {tuple(x.shape)} x {tuple(w.shape)} with offsets {tuple(offs.shape)}: "
                      "not [tokens, in] x [experts, in, out] with 1-D offsets")
    if offs.dtype not in (torch.int32, torch.int64):
        raise Decline(f"offsets of dtype {offs.dtype}, not int32 or int64")
    if not same_size(offs.shape[0], w.shape[0]):
        raise Decline(f"{offs.shape[0]} offsets for {w.shape[0]} experts")
    if not same_size(x.shape[1], w.shape[1]):
        raise Decline(f"input width {x.shape[1]} against the experts' {w.shape[1]}")
    if x.dtype != w.dtype:
        raise Decline(f"input in {x.dtype}, experts in {w.dtype}")
    if len({x.device, w.device, offs.device}) != 1:
        raise Decline(f"operands on {x.device}, {w.device} and {offs.device}")


class GroupedMmPass(GraphPass):
    name = "grouped_mm"
    depends_on = ("fxfuse.passes.pattern", "fxfuse.runtime.ops.grouped_mm")

    def __init__(self):
        self.config = {}

    def run(self, gm: fx.GraphModule, stats: PassStats) -> None:
        targets = _fallback_targets()
        if not targets:
            return
        for gname, sub in graphs_of(gm):
            for node in list(sub.graph.nodes):
                if node.op != "call_function" or node.target not in targets:
                    continue
                site = Site(self.name, module_path(node), node.name, gname, False)
                stats.sites.append(site)
                try:
                    args = arguments(node)
                    check(args)
                except Decline as e:
                    site.reason, site.check = str(e), "check()"
                    continue
                node.target, node.args, node.kwargs = REPLACEMENT, tuple(args), {}
                site.rewritten, site.group = True, node.name
