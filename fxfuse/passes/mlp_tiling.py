"""MLP tiling pass: a gated MLP whose three projections are LoRA ops -> `fxfuse::tiled_mlp`, which
runs it over token chunks and recomputes each chunk in its backward, so the [T, intermediate]
tensors never exist for more than one chunk. For long context only: once one [T, intermediate]
tensor reaches `min_mib` (default 4 GiB: ~146k tokens on the Llama-8B shape; at 320k gate, up and
their product are ~9 GiB each); below it the extra MLP forward of the recompute would cost speed
for memory nobody needs.

Runs after the LoRA pass, on the structure it leaves (inside checkpointed layers too):
    G = lora_linear(x, [W_gate, W_up], ...);  gate, up = G[i], G[j]
    h = act(gate) * up                        act = silu, or gelu(approximate='tanh')
    D = lora_linear(h, [W_down], ...);        out = D[0]
The anchor is the product `act(gate) * up` of two members of one grouped LoRA op: every such
product is a candidate, rewritten or declined with the reason (biases, LoRA dropout, an
intermediate used elsewhere, exact-erf gelu, an intermediate below `min_mib`). With symbolic
sizes (dynamic shapes) the size test becomes a guard, so a length that crosses the threshold
recompiles and is decided again.
"""
from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.fx as fx

from ..runtime.ops import tiled_mlp as tiled_op  # noqa: F401  (registers torch.ops.fxfuse.tiled_mlp)
from ..runtime.ops.lora_graph import lora_linear_graph
from .manager import GraphPass, PassStats, Site
from .pattern import Decline, canon, example_value, graphs_of, module_path

LORA = torch.ops.fxfuse.lora_linear.default
ARGS = ("x", "weights", "biases", "lora_as", "lora_bs", "scalings", "dropout_ps", "seed", "out_dtype")


def _lora_args(node: fx.Node) -> dict:
    return {name: (node.args[i] if i < len(node.args) else node.kwargs.get(name)) for i, name in enumerate(ARGS)}


def _member(node: Any) -> Optional[tuple[fx.Node, int]]:
    """(grouped LoRA op, member index) when `node` is `op[i]`."""
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem:
        src, i = node.args
        if isinstance(src, fx.Node) and src.target in (LORA, lora_linear_graph) and isinstance(i, int):
            return src, i
    return None


def _candidate(node: fx.Node) -> Optional[tuple[fx.Node, fx.Node, fx.Node]]:
    """(act, gate getitem, up getitem) when `node` is act(G[i]) * G[j] for one grouped LoRA op G."""
    c = canon(node)
    if c is None or c.kind != "mul":
        return None
    for act, up in (c.operands, c.operands[::-1]):
        ca = canon(act)
        if ca is None or ca.kind not in ("silu", "gelu"):
            continue
        gate_m, up_m = _member(ca.operands[0]), _member(up)
        if gate_m and up_m and gate_m[0] is up_m[0]:
            return act, ca.operands[0], up
    return None


def _only_users(node: fx.Node, allowed: set, what: str) -> None:
    extra = [u.name for u in node.users if u not in allowed]
    if extra:
        raise Decline(f"{what} is also used by {extra} (the tiled op would not produce it)")


def _at_least(n: Any, bound: int) -> bool:
    """n >= bound; for a symbolic size this installs a guard (a later length on the other side of
    `bound` recompiles)."""
    return bool(n >= bound)


def _show(n: Any) -> str:
    if isinstance(n, torch.SymInt) and n.node.hint is not None:
        return f"{n} = {n.node.hint}"
    return str(n)


class _BySize(Decline):
    """A decline by design at this token count: below min_mib, or below LoraPass's
    graph_ops_below (short inputs, where tiling would not pay either)."""


class MlpTilingPass(GraphPass):
    name = "mlp_tiling"
    depends_on = ("fxfuse.passes.pattern", "fxfuse.runtime.ops.tiled_mlp", "fxfuse.runtime.ops.lora",
                  "fxfuse.runtime.kernels.lora", "fxfuse.runtime.ops.lora_graph")

    def __init__(self, min_mib: float = 4096, chunk_mib: float = 256, rows_per_chunk: Optional[int] = None):
        """min_mib: tile once one [tokens, intermediate] tensor is this big. chunk_mib: each chunk's
        [rows, intermediate] tensor is at most this big; rows_per_chunk overrides it (tests)."""
        if min_mib < 0 or chunk_mib <= 0 or (rows_per_chunk is not None and rows_per_chunk < 1):
            raise ValueError("min_mib >= 0, chunk_mib > 0 and rows_per_chunk >= 1 expected")
        self.config = {"min_mib": min_mib, "chunk_mib": chunk_mib, "rows_per_chunk": rows_per_chunk}

    def run(self, gm: fx.GraphModule, stats: PassStats) -> None:
        for gname, sub in graphs_of(gm):
            for node in list(sub.graph.nodes):
                if node.graph is sub.graph and (found := _candidate(node)) is not None:
                    stats.sites.append(self._site(gname, sub, node, *found))

    def _site(self, gname, gm, prod, act, gate, up) -> Site:
        try:
            plan = self._check(prod, act, gate, up)
        except Decline as e:
            check = "size" if isinstance(e, _BySize) else "check()"
            return Site(self.name, module_path(prod), prod.name, gname, False, str(e), check=check)
        g = gm.graph
        group, down, out, activation, rows, gate_index = plan
        ga, da = _lora_args(group), _lora_args(down)
        if gate_index == 1:  # the op activates its first member: put gate first
            ga = {k: (list(v)[::-1] if k in ("weights", "lora_as", "lora_bs", "scalings") else v) for k, v in ga.items()}
        with g.inserting_before(out):
            fused = g.call_function(torch.ops.fxfuse.tiled_mlp.default, (
                ga["x"], [*ga["weights"], *da["weights"]], [*ga["lora_as"], *da["lora_as"]],
                [*ga["lora_bs"], *da["lora_bs"]], [*ga["scalings"], *da["scalings"]], activation, rows,
                ga["out_dtype"], da["out_dtype"]))
        fused.meta.update({k: v for k, v in out.meta.items() if k in ("nn_module_stack", "example_value", "val")})
        out.replace_all_uses_with(fused)
        for n in (*list(down.users), down, prod, act, *list(group.users), group):
            g.erase_node(n)
        return Site(self.name, module_path(fused), prod.name, gname, True, group=fused.name)

    def _check(self, prod, act, gate, up):
        group, i = _member(gate)
        j = _member(up)[1]
        if group.target is not LORA:
            raise _BySize("gate and up run as graph ops (LoraPass graph_ops_below): the tiled MLP is built "
                          "from fxfuse::lora_linear groups")
        ga = _lora_args(group)
        if len(ga["weights"]) != 2 or {i, j} != {0, 1}:
            raise Decline(f"gate and up are members {i}, {j} of a LoRA group of {len(ga['weights'])}: "
                          "a group of exactly gate and up is supported")
        ca = canon(act)
        if ca.kind == "silu":
            if ca.attrs.get("inplace"):
                raise Decline("in-place activation")
            activation = "silu"
        elif ca.attrs.get("approximate") == "tanh":
            activation = "gelu_tanh"
        else:
            raise Decline(f"gelu approximate={ca.attrs.get('approximate')!r} (only 'tanh' is supported)")
        downs = [u for u in prod.users if u.target is LORA and _lora_args(u)["x"] is prod]
        if len(prod.users) != 1 or len(downs) != 1:
            raise Decline("act(gate) * up does not feed exactly one LoRA down projection")
        down = downs[0]
        da = _lora_args(down)
        if len(da["weights"]) != 1:
            raise Decline("the down projection is grouped with other LoRA linears")
        outs = [u for u in down.users if _member(u) == (down, 0)]
        if len(outs) != 1 or any(_member(u) is None or (_member(u)[1] != 0 and u.users) for u in down.users):
            raise Decline("the down projection's outputs are used other than as the MLP output")
        _only_users(gate, {act}, "gate")
        _only_users(act, {prod}, "act(gate)")
        _only_users(up, {prod}, "up")
        for u in group.users:
            if u not in (gate, up) and (_member(u) is None or u.users):
                raise Decline(f"the gate/up LoRA op's output {u.name} is used outside the MLP")
        if any(b is not None for b in (*ga["biases"], *da["biases"])):
            raise Decline("a base bias on gate, up or down (not supported by fxfuse::tiled_mlp)")
        if any(p for p in (*ga["dropout_ps"], *da["dropout_ps"])) or ga["seed"] is not None or da["seed"] is not None:
            raise Decline("LoRA dropout on an MLP projection (masks drawn per chunk would differ from the untiled op's)")
        ws = [example_value(w) for w in (*ga["weights"], *da["weights"])]
        x = example_value(ga["x"])
        if not all(isinstance(t, torch.Tensor) for t in (*ws, x)):
            raise Decline("weights or input have no recorded tensor value")
        hidden, inter = x.shape[-1], ws[0].shape[0]
        if ws[0].shape != ws[1].shape or ws[2].shape != (hidden, inter):
            raise Decline(f"projections do not form a gated MLP: gate {tuple(ws[0].shape)}, up {tuple(ws[1].shape)}, "
                          f"down {tuple(ws[2].shape)}")
        tokens = x.numel() // hidden
        row_bytes = int(inter) * torch.empty((), dtype=ga["out_dtype"]).element_size()
        if not _at_least(tokens * row_bytes, int(self.config["min_mib"] * 2**20)):
            raise _BySize(f"[{_show(tokens)} tokens, {inter}] intermediate below min_mib={self.config['min_mib']} "
                          "(tiling adds an MLP forward per step; it pays only at long context)")
        rows = self.config["rows_per_chunk"] or max(1, int(self.config["chunk_mib"] * 2**20) // row_bytes)
        return group, down, outs[0], activation, rows, i
