"""Checkpoint policy `save_projections`: under gradient checkpointing with the activation offload on,
the LoRA projections a checkpointed backward would recompute in full have their outputs saved, and
offloaded to host memory, instead, as far as host memory and the host link allow.

Why: a checkpointed backward recomputes a decoder layer's forward up to what it reads. After
save_attention (which saves the attention block's q/k/v, output and lse) that is still, on the
Llama-3.1-8B shape, the output projection (its output feeds the residual sum the next norm's
backward reads) and the MLP's grouped gate/up op (the activation's backward reads both outputs):
2·T·4096·(4096 + 2·14336) FLOP a layer, ~9% of a 32k step on the H200 (bench/RESULTS.md). Their
outputs cost T·4096·2 and T·28672·2 bytes: per byte the same FLOPs as q/k/v (K = 4096 for all).
On Llama the MLP's down projection is not a candidate: its output only feeds the layer's output,
which is saved at the region's boundary (recompute_lora_xa trims its recompute to xa); where a norm
follows it (Gemma 2/3's sandwich norms, OLMo 2's post-norms) the norm's backward reads it, and it
is. What save_attention already saved (its q/k/v op) is its site, not a candidate here; where
save_attention kept q/k/v recomputed, their op is a candidate like the others.

It runs at partition time after save_attention, on AOTAutograd's joint graph: a candidate is a
`fxfuse::lora_linear` op in a checkpointed region (tagged recompute) one of whose outputs reaches,
through the region's unsaved nodes, a node the backward reads. The op is marked MUST_SAVE whole,
with its items (min-cut cannot save only some outputs of an op it recomputes); min-cut saves them,
the offload moves them.

Two budgets:
- host memory: what save_attention's budget has left (the offload's share of the host's available
  memory less the layer inputs and what save_attention saved, times `margin`);
- the host link: a region's forward must not offload more than the link carries while the forward
  computes. Its time is estimated from its forward's FLOPs (its LoRA ops and attention, saved or
  not) at `flop_rate`, the link at `link_rate` (both measured on the H200: ~600 TFLOP/s for the
  32k forward's GEMMs and cuDNN attention, ~52 GB/s per direction for the offload's copies). What a
  region cannot copy in its own time spills into the next regions' (the copies form one chain); a
  candidate is taken while no region's pending copies exceed its allowance (or grow, where they
  did already).

Candidates go in tiers: each region's smallest candidate first (the output projection), then the
next, so a tight budget saves many cheap tensors before a few large ones. By default the budgets
decide how deep (`tiers=None`): on the 8B shape every layer's output projection at 4k-32k, and the
MLP's gate/up op on 11 of 32 layers at 32k (1796 MiB each; the others declined by the link or host
memory) and 7 at 16k;
measured on one H200 against `tiers=1` (output projections only): 32k 7983 -> 8109 tok/s (peak
20.97 -> 22.10 GiB), 16k 10131 -> 10146 (18.33 -> 18.87 GiB), 4k and 64k make the same decisions
(bench/RESULTS.md). `tiers=1` is the leaner option where the GPU's memory is tight.

Declined with a reason: an op whose outputs feed only saved tensors (recompute_lora_xa's case), an
output the offload could not move or would leave on the device (below its min_bytes, or of unknown
size), what is beyond `tiers`, and what does not fit either budget.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.utils.checkpoint import CheckpointPolicy

from .activation_offload import _hint, _host_bytes_available, _nbytes
from .manager import PassStats, Site, source_uuid
from .pattern import module_path
from .save_attention import (SAVED_BY, _attention_ops, _backward_nodes, _bytes_read_back, _recomputed, boundary_bytes,
                             unmovable)


def _not_forward(joint: fx.GraphModule, num_fwd_outputs: int) -> set:
    """The joint graph's nodes the forward outputs do not need: the backward's, including those that
    read no gradient (a norm's backward squares its input again: not a tangent's descendant)."""
    outputs = pytree.arg_tree_leaves(*(n.args for n in joint.graph.find_nodes(op="output")))
    forward, frontier = set(), [o for o in outputs[:num_fwd_outputs] if isinstance(o, fx.Node)]
    while frontier:
        n = frontier.pop()
        if n not in forward:
            forward.add(n)
            frontier += n.all_input_nodes
    return {n for n in joint.graph.nodes if n not in forward and n.op != "output"}


def _region(node: fx.Node):
    return node.meta.get("ac_graph_id")


def _items(op: fx.Node) -> list[fx.Node]:
    return [u for u in op.users if u.target is operator.getitem]


def _lora_flops(op: fx.Node) -> int:
    x, weights = op.args[0], op.args[1]
    val = x.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return 0
    rows = (_hint(val.numel()) or 0) // max(_hint(val.shape[-1]) or 1, 1)
    return sum(2 * rows * (_hint(w.meta["val"].numel()) or 0) for w in weights
               if isinstance(getattr(w, "meta", {}).get("val"), torch.Tensor))


def _attention_flops(node: fx.Node) -> int:
    """Forward FLOPs of a scaled-dot-product attention op: 4·B·H·Tq·Tk·D, half that when causal."""
    q, k = (a.meta.get("val") if isinstance(a, fx.Node) else None for a in node.args[:2])
    if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor) or q.dim() != 4:
        return 0
    b, h, tq, d = (_hint(s) or 0 for s in q.shape)
    flops = 4 * b * h * tq * (_hint(k.shape[-2]) or 0) * d
    names = [a.name for a in node.target._schema.arguments]
    causal = node.kwargs.get("is_causal")
    if causal is None and "is_causal" in names and names.index("is_causal") < len(node.args):
        causal = node.args[names.index("is_causal")]
    return flops // 2 if causal is True else flops


def _pending(allowances: list[float], offloads: list[float]) -> list[float]:
    """Bytes of copies still pending at the end of each region's forward: the copies form one chain,
    so what a region cannot finish in its own time spills into the next regions'."""
    out, pending = [], 0.0
    for allowance, offload in zip(allowances, offloads):
        pending = max(pending + offload - allowance, 0.0)
        out.append(pending)
    return out


def schedule(regions: list[tuple[float, float, list[int]]], left: Optional[int],
             tiers: Optional[int] = None) -> list[list]:
    """Which candidates to save. regions: in forward order, (bytes its forward may offload, bytes it
    offloads already, its candidates' sizes in ascending order); left: host bytes (None: unknown);
    tiers: how many of each region's candidates may be saved (None: all). Returns per region, per
    candidate, None (save it) or why not: ("host", bytes left), ("link", bytes a region would leave
    pending) or ("tier", its tier). Tier by tier (each region's smallest candidate, then the next),
    a candidate is taken while no region's pending copies exceed its allowance, or, where they did
    already, grow."""
    allowances = [a for a, _, _ in regions]
    offloads = [float(u) for _, u, _ in regions]
    out = [[None if tiers is None or t < tiers else ("tier", t) for t in range(len(sizes))] for _, _, sizes in regions]
    deepest = max((len(sizes) for _, _, sizes in regions), default=0)
    for tier in range(deepest if tiers is None else min(tiers, deepest)):
        for i, (_, _, sizes) in enumerate(regions):
            if tier >= len(sizes):
                continue
            size = sizes[tier]
            if left is not None and size > left:
                out[i][tier] = ("host", left)
                continue
            before = _pending(allowances, offloads)
            offloads[i] += size
            after = _pending(allowances, offloads)
            over = next((p for p, q, a in zip(after, before, allowances) if p > max(a, q)), None)
            if over is not None:
                offloads[i] -= size
                out[i][tier] = ("link", over)
                continue
            left = None if left is None else left - size
    return out


class SaveProjections:
    name = "save_projections"

    def __init__(self, host_fraction: float = 0.5, margin: float = 0.9, link_rate: float = 52e9,
                 flop_rate: float = 600e12, tiers: Optional[int] = None, min_bytes: int = 1 << 20,
                 devices: tuple[str, ...] = ("cuda",)):
        """host_fraction, margin: as save_attention's (the same budget, what it left).
        link_rate: host link bytes/s per direction; flop_rate: the forward's FLOP/s; only their
        ratio matters (bytes a region may offload per FLOP it computes).
        tiers: how many of each layer's candidates, smallest first, may be saved; None (default): as
        many as the budgets allow. 1 saves only the smallest (the output projection on Llama), for
        a lower peak: gate/up outputs are reloaded 1.75 GiB at a time at 32k (+1.13 GiB peak there).
        min_bytes, devices: the offload's (what it leaves on the device, which device types it moves)."""
        if not 0 < margin <= 1:
            raise ValueError("margin must be in (0, 1]")
        if link_rate <= 0 or flop_rate <= 0:
            raise ValueError("link_rate and flop_rate must be > 0")
        if tiers is not None and tiers < 1:
            raise ValueError("tiers must be >= 1 or None")
        self.config = {"policy": self.name, "host_fraction": host_fraction, "margin": margin,
                       "link_rate": link_rate, "flop_rate": flop_rate, "tiers": tiers, "min_bytes": min_bytes, "devices": list(devices)}

    def uuid(self) -> str:
        # it plans with save_attention's helpers: their code is in the key too
        return source_uuid((type(self).__module__, "fxfuse.passes.save_attention"), self.config)

    def run(self, joint: fx.GraphModule, stats: PassStats, num_fwd_outputs: Optional[int] = None) -> None:
        """num_fwd_outputs: how many of the joint graph's outputs are the forward's (AOTAutograd's
        partition argument); without it the backward is what depends on a tangent."""
        lora = getattr(getattr(torch.ops, "fxfuse", None), "lora_linear", None)
        if lora is None:
            return
        nodes = list(joint.graph.nodes)
        ops = [n for n in nodes if n.op == "call_function" and n.target is lora.default and _recomputed(n)
               and _region(n) is not None]
        if not ops:  # no LoRA op in a checkpointed region: nothing is recomputed
            return
        backward = _backward_nodes(joint) if num_fwd_outputs is None else _not_forward(joint, num_fwd_outputs)
        ops = [n for n in ops if n not in backward]  # the forward's (a dead op's outputs are not saved)
        per_byte = self.config["link_rate"] / self.config["flop_rate"]
        attention = _attention_ops()

        # per region: the bytes its forward may offload, and what it offloads already
        regions: dict = {}
        for n in nodes:
            gid = _region(n)
            if n in backward or gid is None:  # every op of the forward counts, saved ones too
                continue
            r = regions.setdefault(gid, {"allowance": 0.0, "used": 0, "candidates": []})
            if n.target is lora.default:
                r["allowance"] += _lora_flops(n) * per_byte
            elif n.op == "call_function" and n.target in attention:
                r["allowance"] += _attention_flops(n) * per_byte
            val = n.meta.get("val")
            if not isinstance(val, torch.Tensor) or n.op != "call_function":
                continue
            if n.meta.get(SAVED_BY) is not None:  # a policy's: what the backward reads of it is saved
                r["used"] += _bytes_read_back([n], backward)
            elif any(_region(u) != gid and u not in backward for u in n.users):
                r["used"] += _nbytes(val) or 0  # a region output (the next layer's input): saved at the boundary

        left = self._host_budget(joint, backward)
        for op in ops:
            why = self._why_not(op, backward)
            if why is not None:
                stats.sites.append(self._site(op, False, why))
                continue
            size = sum(_nbytes(u.meta["val"]) for u in _items(op) if isinstance(u.meta.get("val"), torch.Tensor))
            regions[_region(op)]["candidates"].append((size, op))
        for r in regions.values():
            r["candidates"].sort(key=lambda c: c[0])

        decisions = schedule([(r["allowance"], r["used"], [size for size, _ in r["candidates"]]) for r in regions.values()],
                             left, self.config["tiers"])
        for r, taken in zip(regions.values(), decisions):
            for (size, op), why in zip(r["candidates"], taken):
                if why is None:
                    self._mark(op)
                    stats.sites.append(self._site(op, True, group=op.name))
                    stats.add("MiB saved", size / 2**20)
                    continue
                kind, room = why
                if kind == "tier":
                    reason = (f"not among this layer's {self.config['tiers']} smallest candidates ({size / 2**20:.1f} MiB): "
                              "the policy's tiers option (tiers=None lets the budgets decide)")
                elif kind == "host":
                    reason = (f"host memory: its outputs ({size / 2**20:.1f} MiB) would not fit in the "
                              f"{room / 2**20:.1f} MiB the offload has left after the layer inputs and attention")
                else:
                    reason = (f"host link: its outputs ({size / 2**20:.1f} MiB) would leave {room / 2**20:.1f} MiB "
                              f"of copies pending at a layer's end, more than its forward carries (this layer's: "
                              f"{r['allowance'] / 2**20:.1f} MiB at {self.config['link_rate'] / 1e9:g} GB/s)")
                stats.sites.append(self._site(op, False, reason))

    def _why_not(self, op: fx.Node, backward: set) -> Optional[str]:
        if not self._read_by_backward(op, backward):
            return "its outputs feed only saved tensors: the backward recomputes its xa alone"
        sizes = [_nbytes(u.meta["val"]) for u in _items(op) if isinstance(u.meta.get("val"), torch.Tensor)]
        if any(size is None for size in sizes):
            return "an output's size is unknown at compile time (unbacked symbolic size)"
        if max(sizes, default=0) < self.config["min_bytes"]:
            return f"its outputs are below the offload's min_bytes={self.config['min_bytes']}: they would stay on the device"
        return unmovable(_items(op), self.config["devices"])

    @staticmethod
    def _read_by_backward(op: fx.Node, backward: set) -> bool:
        """Whether the backward reads one of the op's outputs (xa aside, which recompute_lora_xa can
        recompute alone), directly or through nodes of its region that are recomputed, not saved."""
        gid, members = _region(op), len(op.args[1])
        frontier = [u for u in _items(op) if isinstance(u.args[1], int) and u.args[1] < members]
        seen = set(frontier)
        while frontier:
            n = frontier.pop()
            if any(u in backward for u in n.users):
                return True
            for u in n.users:
                if u in seen or _region(u) != gid or not _recomputed(u):
                    continue  # saved (MUST_SAVE), or outside the region: what crosses its boundary is saved
                if any(_region(v) != gid and v not in backward for v in u.users):
                    continue  # a region output read by a later region: saved at the boundary
                seen.add(u)
                frontier.append(u)
        return False

    def _mark(self, op: fx.Node) -> None:
        for n in [op] + _items(op):
            n.meta["recompute"] = CheckpointPolicy.MUST_SAVE
            n.meta[SAVED_BY] = self.name

    def _host_budget(self, joint: fx.GraphModule, backward: set) -> Optional[int]:
        """save_attention's budget less what it planned: None where the host's memory cannot be read."""
        available = _host_bytes_available()
        if available is None:
            return None
        planned = _bytes_read_back([n for n in joint.graph.nodes if n.meta.get(SAVED_BY) is not None], backward)
        budget = (available * self.config["host_fraction"] - boundary_bytes(joint)) * self.config["margin"]
        return max(int(budget - planned), 0)

    def _site(self, node: fx.Node, rewritten: bool, reason: str = "", group: Optional[str] = None) -> Site:
        return Site(self.name, module_path(node), node.name, "aot", rewritten, reason, group, "policy")
