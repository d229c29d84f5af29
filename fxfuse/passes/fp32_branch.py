"""fp32 residual branches for the fp16_guard pass: what computes a residual add's branch in fp32.

Why: the guard carries the stream in fp32, but a branch computed in fp16 (an MLP's or MoE's down
projection, a sandwich norm's output) is rounded to fp16 before it joins: past 65504 it is inf. Here
the branch is walked back from the add, through the ops that follow their input's dtype, to what
produced its fp16 values:

- sources that can write fp32 instead: a one-member LoRA op (its `out_dtype`), `fxfuse::grouped_mm`
  (an MoE's experts, `out_dtype`), a plain `F.linear` (-> `linear32`), `torch.bmm` (experts as one
  batched matmul, -> `bmm32`): each returns its fp32 accumulator, not rounded;
- casts to fp16 of a value that is fp32 (a norm computed in fp32, an MoE's fp32 expert sum): the
  branch reads the fp32 value instead.

The ops in between (views, gathers, masked_fill, sums, dropout, elementwise add/sub/mul/div/neg)
then compute in fp32 by type promotion. Operands followed: those of the op's own shape (a [S, 1]
routing weight is not followed; it multiplies the wide value as it is). Anything else with an fp16
value (an activation, an unrewritten `grouped_mm_fallback`, an in-place accumulation) is where the
walk stops, and it is reported: that part of the branch stays fp16. Readers of a widened value outside
the branch get an fp16 copy, so nothing else changes dtype. A branch value that something writes
into in place is left as it is, with the reason, except a source's output whose only in-place ops
are elementwise ones straight into it, with nothing viewing it (gpt-oss's `out.add_(bias)` on its
experts' output): those then compute in fp32.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx

from ..runtime.ops import grouped_mm as _grouped_op  # noqa: F401  (registers torch.ops.fxfuse.grouped_mm)
from ..runtime.ops import lora as _lora_op  # noqa: F401  (registers torch.ops.fxfuse.lora_linear)
from ..runtime.ops.lora_graph import lora_linear_graph
from .pattern import canon, example_value

# the LoRA ops (fused op, graph ops) and the position of their out_dtype argument
LORA_OUT_DTYPE_ARG = {torch.ops.fxfuse.lora_linear.default: 8, lora_linear_graph: 6}
GROUPED_MM = torch.ops.fxfuse.grouped_mm.default
# ops whose output is their first operand's values rearranged, selected or masked
_PASS_METHODS = {"view", "reshape", "transpose", "permute", "unsqueeze", "squeeze", "flatten", "unflatten",
                 "contiguous", "clone", "narrow", "select", "t", "expand", "view_as", "reshape_as", "masked_fill",
                 "neg", "__getitem__"}
_PASS_FUNCTIONS = {torch.reshape, torch.transpose, torch.permute, torch.unsqueeze, torch.squeeze, torch.flatten,
                   torch.narrow, torch.select, torch.t, torch.masked_fill, torch.neg, operator.neg, torch.clone}
_SUB = {operator.sub, torch.sub}
# in-place elementwise ops a widened source's output may take as they are (gpt-oss adds its experts'
# biases with `out.add_(bias)`): written into the fp32 output, they compute in fp32
_ELEMENTWISE_IN_PLACE = {"add_", "sub_", "mul_", "div_", "masked_fill_"}
_SUMS = {torch.sum}


@dataclass
class Branch:
    """What widening one branch changes (nothing is changed while it is worked out)."""
    sources: dict = field(default_factory=dict)  # node -> (kind, rewrite target node)
    casts: set = field(default_factory=set)  # fp16 casts whose branch readers read their input instead
    wide: set = field(default_factory=set)  # nodes whose value becomes fp32 (sources' outputs included)
    through: set = field(default_factory=set)  # fp32 nodes on the branch: they read widened values as they are
    in_place: set = field(default_factory=set)  # elementwise in-place ops on a widened source's output
    left: list = field(default_factory=list)  # (node, why) where the walk met fp16 it cannot widen

    def describe(self) -> str:
        kinds = [k for k, _ in self.sources.values()]
        if kinds and set(kinds) == {"LoRA op"} and not self.casts:
            notes = ["its LoRA branch is written in fp32"]
        elif kinds or self.casts:
            parts = [f"{kinds.count(k)} {k} output{'s' if kinds.count(k) > 1 else ''}" for k in sorted(set(kinds))]
            if self.casts:
                parts.append(f"{len(self.casts)} fp16 rounding{'s' if len(self.casts) > 1 else ''} dropped")
            notes = [f"its branch is computed in fp32 ({', '.join(parts)})"]
        else:
            notes = []
        notes += [f"branch left in fp16 at {n.name}: {why}" for n, why in self.left]
        return "; ".join(notes)


def _is16(node) -> bool:
    v = example_value(node)
    return isinstance(node, fx.Node) and isinstance(v, torch.Tensor) and v.dtype == torch.float16


def _is32(node) -> bool:
    v = example_value(node)
    return isinstance(node, fx.Node) and isinstance(v, torch.Tensor) and v.dtype == torch.float32


def _numel(node) -> Optional[int]:
    v = example_value(node)
    return v.numel() if isinstance(v, torch.Tensor) else None


def source(node: fx.Node) -> Optional[tuple]:
    """(kind, node to rewrite) when `node`'s fp16 value comes from an op that can write fp32."""
    if node.op != "call_function":
        return None
    if node.target is operator.getitem and node.args[1] == 0 and isinstance(node.args[0], fx.Node):
        op = node.args[0]
        idx = LORA_OUT_DTYPE_ARG.get(op.target) if op.op == "call_function" else None
        if idx is not None and len(op.args) > idx and op.args[idx] == torch.float16 and len(op.args[1]) == 1:
            return "LoRA op", op
        return None
    if node.target is GROUPED_MM and len(node.args) == 3 and not node.kwargs and _is16(node.args[0]):
        return "grouped_mm", node
    c = canon(node)
    if c is not None and c.kind == "linear" and _is16(c.operands[0]) and _is16(c.operands[1]) \
            and (c.operands[2] is None or _is16(c.operands[2])):
        return "linear", node
    if node.target is torch.bmm and len(node.args) == 2 and not node.kwargs and all(_is16(a) for a in node.args):
        return "bmm", node
    return None


def _followed(node: fx.Node) -> Optional[list]:
    """The operands whose dtype `node`'s value follows and whose widening widens it; None for an op
    this walk does not go through."""
    t, args = node.target, node.args
    if node.op == "call_method" and t in _PASS_METHODS or node.op == "call_function" and t in _PASS_FUNCTIONS:
        return [args[0]] if args and isinstance(args[0], fx.Node) and not node.kwargs.get("out") else None
    if node.op == "call_function" and t is operator.getitem:
        return [args[0]] if isinstance(example_value(args[0]), torch.Tensor) else None
    if (node.op == "call_method" and t == "sum" or node.op == "call_function" and t in _SUMS) \
            and node.kwargs.get("dtype") is None:
        return [args[0]]
    c = canon(node)
    if c is not None and c.kind == "dropout" and not c.attrs["inplace"]:
        return [c.operands[0]]
    is_sub = (node.op == "call_function" and t in _SUB or node.op == "call_method" and t == "sub") \
        and len(args) == 2 and not node.kwargs
    if is_sub or (c is not None and c.kind in ("add", "mul", "div")):
        size = _numel(node)
        return [a for a in args if isinstance(a, fx.Node) and _numel(a) == size]
    return None


def _own_in_place(node: fx.Node, mutation) -> Optional[list]:
    """The in-place ops on `node` when all are elementwise ones written straight into it, and nothing
    else writes into it or into a view of it (a wider `node` then changes only their precision); None
    otherwise."""
    ops = []
    for u in node.users:
        name = u.target if u.op == "call_method" else getattr(u.target, "__name__", "")
        if u.op == "call_method" and name in _ELEMENTWISE_IN_PLACE and u.args[:1] == (node,) \
                and not any(a is node for a in u.args[1:]) and not u.kwargs:
            ops.append(u)
        elif (name.endswith("_") and not name.startswith("_")) or u.target is operator.setitem \
                or u.kwargs.get("out") is node or mutation(u) is not None:
            return None
    return ops


def _cast16(node: fx.Node) -> Optional[fx.Node]:
    """The input of a cast to fp16 (`.to`, `.half()`, `.type`, `.type_as`), else None."""
    c = canon(node)
    return c.operands[0] if c is not None and c.kind == "to" and c.attrs["dtype"] == torch.float16 else None


def plan(branch: fx.Node, stop: set, mutation) -> Branch:
    """How to compute `branch` (an fp16 residual-add operand) in fp32. `stop`: nodes the walk does not
    enter (the stream, other residual adds); `mutation(node)`: an in-place op on node, or None."""
    found, seen, todo = Branch(), set(), [branch]
    reads: dict = {}  # node -> the followed operands it reads
    while todo:
        n = todo.pop()
        if n in seen or not isinstance(n, fx.Node) or n in stop:
            continue
        seen.add(n)
        if _is32(n):
            # fp32 already (an expert sum, a norm's math): walk on to fp16 values it upcasts or promotes
            c = canon(n)
            upcast = c is not None and c.kind == "to" and c.attrs["dtype"] == torch.float32
            ops = [c.operands[0]] if upcast else _followed(n)
            if ops:  # it promotes (or casts) what it reads: a widened operand changes nothing else
                found.through.add(n)
                todo.extend(ops)
            continue
        if not _is16(n):
            continue
        bad = mutation(n)
        src = source(n)
        own = _own_in_place(n, mutation) if bad is not None and src is not None else None
        if bad is not None and not own:
            op_name = getattr(bad.target, "__name__", bad.target)
            found.left.append((n, f"in-place {op_name} ({bad.name}) writes into it"))
            continue
        if src is not None:
            found.sources[n] = src
            for op in own or ():  # what they add into it is part of the branch too (llama 4's routed experts)
                found.in_place.add(op)
                size = _numel(n)
                todo.extend(a for a in op.args[1:] if isinstance(a, fx.Node) and _numel(a) == size)
            continue
        if n.op in ("placeholder", "get_attr"):
            continue  # a given value (a weight, a bias, an input): nothing here computes it
        x = _cast16(n)
        ops = [x] if x is not None else _followed(n)
        if not ops:
            name = getattr(n.target, "__name__", str(n.target))
            why = f"in-place {name} into an fp16 buffer" if name.endswith("_") and not name.startswith("_") else \
                f"{name} is not an op the guard widens through"
            found.left.append((n, why))
            continue
        reads[n] = ops
        todo.extend(ops)
    # which nodes end up fp32, in graph order (a node's operands come first)
    graph_order = {n: i for i, n in enumerate(branch.graph.nodes)}
    for n in sorted(reads, key=graph_order.__getitem__):
        wide = any(a in found.sources or a in found.wide or a in found.casts or _is32(a) for a in reads[n])
        if not wide:
            continue
        if _cast16(n) is not None:
            found.casts.add(n)
        else:
            found.wide.add(n)
    found.wide |= set(found.sources) | found.in_place  # an in-place op's result is its (now fp32) operand
    if branch not in found.wide and branch not in found.casts:
        return Branch(left=found.left)
    return found
