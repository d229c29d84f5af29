"""Checkpoint policy `recompute_lora_xa`: where a checkpointed backward recomputes a LoRA op only
for its low-rank activation `xa = drop(x)·Aᵀ`, recompute just that (`fxfuse::lora_xa`), not the op.

Why: `fxfuse::lora_linear` returns its outputs and `xa` (dB needs it). Under gradient
checkpointing AOTAutograd's min-cut recomputes, in the backward graph, every op of the region the
backward needs something from; one op is one unit, so recomputing `xa` recomputed the base GEMM
too. For the MLP's down projection that is all it did: the op's output only feeds the residual add,
the region's output, which is saved. Skipping that GEMM saves 2·T·4096·14336 FLOP per layer on the
Llama-3.1-8B shape (~5% of a step at 4k); the skinny product that remains reads x once. `lora_xa`
runs the forward's kernels on the same inputs (dropout masks from the same seed), so `xa` is the
value the full recompute gave: bit-identical where the kernel is deterministic (the CPU tests); on
a GPU the skinny kernel's split-K atomic adds may differ in the last bits between two runs, as the
full recompute's did.

It runs at partition time on the backward graph min-cut produced (Inductor's custom partitioner,
or aot_eager's partition function), before the activation offload. Every LoRA op the backward
recomputes is a candidate; one whose outputs the backward reads is declined with that reason (it is
recomputed in full, as before).
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx

from .manager import PassStats, Site, source_uuid
from .pattern import module_path


class RecomputeLoraXA:
    name = "recompute_lora_xa"

    def __init__(self):
        self.config = {"policy": self.name}

    def uuid(self) -> str:
        # lora_xa's code (runtime/ops/lora.py) is what the rewrite calls
        return source_uuid((type(self).__module__, "fxfuse.runtime.ops.lora"), self.config)

    def run(self, bw: fx.GraphModule, stats: PassStats) -> None:
        op_target, xa_target = torch.ops.fxfuse.lora_linear.default, torch.ops.fxfuse.lora_xa.default
        changed = False
        for op in [n for n in bw.graph.nodes if n.op == "call_function" and n.target is op_target]:
            why = self._why_not(op)
            if why is not None:
                stats.sites.append(self._site(op, False, why))
                continue
            x, _weights, _biases, lora_as, _bs, _scalings, dropout_ps, seed, _dtype = op.args
            xa_items = [u for u in op.users if u.args[1] == len(op.args[1])]
            with bw.graph.inserting_before(op):
                xa = bw.graph.call_function(xa_target, (x, lora_as, dropout_ps, seed))
            xa.meta.update(next(u for u in xa_items if u.users).meta)
            for item in xa_items:
                item.replace_all_uses_with(xa)
            for item in list(op.users):
                bw.graph.erase_node(item)
            bw.graph.erase_node(op)
            stats.sites.append(self._site(op, True, group=xa.name))
            changed = True
        if changed:
            bw.graph.lint()
            bw.recompile()

    def _why_not(self, op: fx.Node) -> Optional[str]:
        if len(op.args) != 9 or op.kwargs:
            return "unexpected call form of fxfuse::lora_linear"
        n = len(op.args[1])  # one output per member, then xa
        if any(u.target is not operator.getitem for u in op.users):
            return "its output list is read whole"
        read = {u.args[1] for u in op.users if u.users}
        if read != {n}:
            if any(i < n for i in read):
                return "the backward reads its outputs: recomputed in full"
            return "the backward does not read its xa"
        return None

    def _site(self, node: fx.Node, rewritten: bool, reason: str = "", group: Optional[str] = None) -> Site:
        return Site(self.name, module_path(node), node.name, "aot", rewritten, reason, group, "policy")
