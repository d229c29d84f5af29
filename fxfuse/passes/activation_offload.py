"""Activation offload: the activations a training graph saves for its backward live in pinned host
memory between the forward and the backward, not on the GPU.

Checkpoint policy `offload_saved` (the one policy so far, named in reports and the cache key):
gradient checkpointing already decides what is recomputed (everything inside a checkpointed
decoder layer) and what is saved (each layer's input hidden states, plus a few tensors around the
lm_head); this pass moves every saved activation of at least `min_bytes` to the host, except the
one the backward needs first (it would be reloaded at once, a stall with no memory saved). At 16k
tokens on the Llama-3.1-8B shape that is 32 x 128 MiB of layer inputs.

Unlike the other passes this one does not rewrite dynamo's graph: what is saved is only known
after AOTAutograd partitions the joint graph, so it runs as Inductor's custom partitioner (or the
partition function of `aot_eager`), on the forward and backward graphs min-cut produced:
- forward: `off = fxfuse::offload(x, done, prev_host, sync)` right after x is computed; `off` (a
  host tensor) replaces x among the saved outputs. The copies form a chain; each waits for the copy
  `lag` offloads back (see runtime/ops/offload.py why).
- backward: x's placeholder becomes the host tensor; `fxfuse::reload(off, device, wait)` is placed
  before the first use of the activations the backward reads `lead` reads earlier (with the layer
  inputs alone, `lead` decoder layers ahead), and replaces x in every use. With `wait_at_use` (the
  default) the reload does not wait (wait=False) and `fxfuse::reload_wait` right before x's first
  use makes the compute stream wait for the copy there, not at the issue.

Declined with a reason: views and items of ops that return views (they share storage, nothing
would be freed), tensors with gaps or overlaps (contiguous and permuted-dense ones are copied as
one block with their strides), tensors that are also model outputs, tensors below `min_bytes`,
host tensors, graphs without checkpointed regions (there every op's intermediate is saved, and
moving all of them over PCIe would cost more than the compute it hides behind), and what would not
fit in `host_fraction` (default half) of the host's available memory (checked at compile time, for
the traced size; at run time the pinned-memory pool refuses, with an error, a block that would leave
the host under 2 GiB). Graph
inputs (parameters, model inputs) are counted in the `inputs saved` column, not as candidates.
"""
from __future__ import annotations

import contextlib
import itertools
import operator
from typing import Any, Optional

import torch
import torch.fx as fx

from ..runtime import host_memory
from ..runtime.ops import offload as offload_ops
from .manager import PassStats, Site, source_uuid
from .pattern import module_path

POLICY = "offload_saved"
SAVED_BY = "fxfuse_saved_by"  # node meta set by save_attention: saved by a policy, not by checkpointing
MIN_LEAD = 2  # the reach measured from 16k to 320k tokens (8B shape); lead_bytes never cuts below it


def _hint(n: Any) -> Optional[int]:
    if isinstance(n, torch.SymInt):
        return n.node.hint  # the size this graph was traced at (None if unbacked)
    return int(n)


def _nbytes(val: torch.Tensor) -> Optional[int]:
    numel = _hint(val.numel())
    return None if numel is None else numel * val.element_size()


def _host_bytes_available() -> Optional[int]:
    """The host's available memory (Linux /proc/meminfo); None where it cannot be read."""
    return host_memory.available_bytes()


def _fake_like(val: torch.Tensor, device) -> torch.Tensor:
    mode = getattr(val, "fake_mode", None)
    with mode if mode is not None else contextlib.nullcontext():
        return torch.empty_strided(val.size(), val.stride(), dtype=val.dtype, device=device)


def _is_view(node: fx.Node) -> bool:
    """An op (not an item) whose schema returns an alias of an input: view, transpose, expand..."""
    t = node.target
    return isinstance(t, torch._ops.OpOverload) and any(r.alias_info is not None for r in t._schema.returns)


def _views_item(node: fx.Node) -> bool:
    """An item of an op that returns views of its input (split, unbind)."""
    parent = node.args[0]
    pt = getattr(parent, "target", None)
    if node.target is not operator.getitem or not isinstance(pt, torch._ops.OpOverload):
        return False
    if not isinstance(node.args[1], int):
        return True
    returns = pt._schema.returns
    if len(returns) == 1:  # a list of tensors (Tensor[]): one alias annotation for all
        return returns[0].alias_info is not None or not isinstance(parent.meta.get("val"), (list, tuple))
    return node.args[1] >= len(returns) or returns[node.args[1]].alias_info is not None


def _is_alias(node: fx.Node) -> bool:
    """Shares storage with another tensor of the graph: a view, or an item of an op that returns
    views (split, unbind) or of something that is not an op. An item of an op with fresh outputs
    (the attention op's output, a LoRA op's output) owns its storage."""
    if node.target is operator.getitem:
        return not isinstance(getattr(node.args[0], "target", None), torch._ops.OpOverload) or _views_item(node)
    return _is_view(node)


def _dense(val: torch.Tensor) -> bool:
    """Its elements fill its storage span exactly (contiguous, or permuted like a transpose's output):
    the host copy keeps the strides, so the copy is one block. Checked on the traced sizes."""
    dims = [(_hint(st), _hint(sz)) for sz, st in zip(val.size(), val.stride())]
    if any(st is None or sz is None for st, sz in dims):
        return False
    expected = 1
    for st, sz in sorted(d for d in dims if d[1] != 1):
        if st != expected:
            return False
        expected *= sz
    return True


class ActivationOffload:
    name = "activation_offload"

    def __init__(self, min_bytes: int = 1 << 20, keep_first: int = 1, devices: tuple[str, ...] = ("cuda",),
                 host_fraction: float = 0.5, save_attention: bool = True, save_projections: "bool | dict" = True,
                 lag: int = 8, lead: int = 4, lag_bytes: int = 2 << 30, lead_bytes: int = 256 << 20, wait_at_use: bool = True):
        """min_bytes: smaller saved tensors stay on the device (a transfer's fixed cost would dominate).
        keep_first: how many of the activations the backward uses first stay on the device.
        devices: device types whose activations are offloaded; tests add "cpu" to exercise the
        graph plumbing without a GPU.
        host_fraction: the share of the host's available memory (at compile time) offloads may pin.
        At 320k tokens on the 8B shape all 31 layer inputs need 77.5 GiB: 0.5 of a 124 GiB host
        left 7 of them on the GPU (measured on an H200).
        save_attention: checkpoint policy `save_attention` (passes/save_attention.py) also saves,
        and so offloads, each checkpointed attention op's q/k/v, output and log-sum-exp, instead of
        the backward recomputing them, within the host memory left after the layer inputs.
        save_projections: checkpoint policy `save_projections` (passes/save_projections.py) also
        saves, and so offloads, the outputs of LoRA projections the backward would recompute in full
        (on Llama the output projection and the MLP's gate/up, smallest first), within the host
        memory save_attention left and what the host link carries while the forward computes; a dict
        of SaveProjections options (margin, link_rate, flop_rate, tiers) turns it on with those, e.g.
        `{"link_rate": 26e9}` on a slower link or `{"tiers": 1}` for only each layer's smallest.
        lag: the compute stream waits for the copy `lag` offloads back (not the previous one), so
        that close activations (q, k, v) copy back to back without stalling the forward; fewer
        while the newer copies' sources exceed `lag_bytes` (they stay alive until waited for). At
        32k tokens on the 8B shape a layer offloads ~1.2 GiB in 7-9 copies: a shorter lag made the
        forward wait for them (bench/RESULTS.md). What is in flight adds to the forward's peak, not
        to the backward's, where the step's peak is from 4k to 128k.
        lead: a reload is issued before the first use of the activations `lead` backward reads
        earlier (activations first read by the same op count as one read); fewer, down to
        `MIN_LEAD`, while the activations reloaded in between exceed `lead_bytes` (each reload
        issued early holds its device copy that much longer). On the 8B shape that is 4 at 4k tokens
        (lead 2 left the backward waiting for its reloads: bench/RESULTS.md) and 2 from 32k up.
        The backward's first reads, with fewer than `lead` reads before them, go `MIN_LEAD` ahead
        where there is room, else at their use.
        wait_at_use: the compute stream waits for a reload's copy right before the reloaded tensor's
        first use (`fxfuse::reload_wait`); False waits where the reload is issued, `lead` reads
        earlier, which stalls the compute stream there when the host is not far enough ahead."""
        if min_bytes < 0 or keep_first < 0:
            raise ValueError("min_bytes and keep_first must be >= 0")
        if lag < 1 or lead < 1:
            raise ValueError("lag and lead must be >= 1")
        if lag_bytes < 0 or lead_bytes < 0:
            raise ValueError("lag_bytes and lead_bytes must be >= 0")
        if not 0 < host_fraction <= 0.9:
            raise ValueError("host_fraction must be in (0, 0.9]: pinned memory cannot be paged out")
        self.config = {"policy": POLICY, "min_bytes": min_bytes, "keep_first": keep_first, "devices": list(devices),
                       "host_fraction": host_fraction, "save_attention": bool(save_attention),
                       "save_projections": self._projections(save_projections), "lag": lag,
                       "lead": lead, "lag_bytes": lag_bytes, "lead_bytes": lead_bytes,
                       "wait_at_use": bool(wait_at_use)}

    @staticmethod
    def _projections(option) -> "bool | dict":
        if not isinstance(option, dict):
            return bool(option)
        allowed = {"margin", "link_rate", "flop_rate", "tiers"}  # the rest follow the offload's own options
        if set(option) - allowed:
            raise ValueError(f"save_projections options: {sorted(set(option) - allowed)} not among {sorted(allowed)}")
        return dict(option)

    def uuid(self) -> str:
        return source_uuid((type(self).__module__, offload_ops.__name__), self.config)

    def _why_not(self, node: fx.Node, model_outputs: set) -> Optional[str]:
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            return "not a tensor"
        if node in model_outputs:
            return "also a model output"
        if _is_alias(node):
            return "a view or multi-output item: shares storage, offloading it frees nothing"
        if val.device.type not in self.config["devices"]:
            return f"on {val.device.type}, not on an offloaded device type {self.config['devices']}"
        if not _dense(val):
            return "not dense (has gaps or overlaps in its storage)"
        size = _nbytes(val)
        if size is None:
            return "size unknown at compile time (unbacked symbolic size)"
        if size < self.config["min_bytes"]:
            return f"{size} bytes, below min_bytes={self.config['min_bytes']}"
        return None

    def run(self, fw: fx.GraphModule, bw: fx.GraphModule, num_fwd_outputs: int, stats: PassStats) -> None:
        fw_out = fw.graph.find_nodes(op="output")[0]
        outputs = list(fw_out.args[0])
        model_outputs = set(outputs[:num_fwd_outputs])
        bw_inputs = {n.name: n for n in bw.graph.find_nodes(op="placeholder")}
        bw_order = {n: i for i, n in enumerate(bw.graph.nodes)}

        # Without checkpointed regions the saved tensors are every op's intermediates: moving them
        # all over PCIe would cost more than the compute it overlaps with.
        checkpointed = any("ac_graph_id" in n.meta or "recompute" in n.meta for n in fw.graph.nodes)
        chosen: list[tuple[fx.Node, fx.Node]] = []  # (forward node, backward placeholder)
        for node in dict.fromkeys(outputs[num_fwd_outputs:]):
            if not isinstance(node, fx.Node):
                continue
            if node.op == "placeholder":  # parameters and model inputs: not activations
                stats.add("inputs saved")
                continue
            why = self._why_not(node, model_outputs)
            if why is None and not checkpointed:
                why = ("the graph has no checkpointed regions (policy offload_saved moves what gradient "
                       "checkpointing saves; without it every intermediate is saved)")
            placeholder = bw_inputs.get(node.name)
            if why is None and (placeholder is None or not placeholder.users):
                why = "not read by the backward graph"
            if why is not None:
                if isinstance(node.meta.get("val"), torch.Tensor):
                    stats.sites.append(self._site(node, False, why))
                continue
            chosen.append((node, placeholder))

        # The backward reads the activations in about the reverse order; keep the first ones read.
        first_use = {ph: min(bw_order[u] for u in ph.users) for _, ph in chosen}
        chosen.sort(key=lambda c: first_use[c[1]])
        # each reload goes before the first use of the activations read `lead` reads earlier (kept
        # ones too); activations first read by the same node are one read (q, k, v by attention)
        reads = sorted(set(first_use.values()))
        read_index = {at: i for i, at in enumerate(reads)}
        read_bytes = [0] * len(reads)
        for node, ph in chosen:
            read_bytes[read_index[first_use[ph]]] += _nbytes(node.meta["val"]) or 0
        upto = list(itertools.accumulate(read_bytes, initial=0))  # upto[k]: bytes of reads before k
        nodes_by_order = {i: n for n, i in bw_order.items()}
        lead = {}
        for _, ph in chosen:
            r = read_index[first_use[ph]]
            i = r - self.config["lead"]
            # nearer while what is reloaded for the reads in between (this one's included) is too big
            while i < r - MIN_LEAD and upto[r + 1] - upto[max(i + 1, 0)] > self.config["lead_bytes"]:
                i += 1
            if i < 0:  # the backward's first reads: `MIN_LEAD` ahead where there is room, else at their use
                near = min(MIN_LEAD, self.config["lead"])
                i = r - near if r >= near else r
            lead[ph] = nodes_by_order[reads[i]]
        for node, _ in chosen[: self.config["keep_first"]]:
            stats.sites.append(self._site(node, False, "read first by the backward: it would be reloaded at once"))
        chosen = chosen[self.config["keep_first"]:]
        chosen = self._within_host_budget(chosen, stats)
        if not chosen:
            return

        # forward: one chain of copies in the order the forward computes them
        fw_order = {n: i for i, n in enumerate(fw.graph.nodes)}
        by_fw = sorted(chosen, key=lambda c: fw_order[c[0]])
        sources = [node for node, _ in by_fw]
        sizes = [_nbytes(n.meta["val"]) for n in sources]
        host_of: dict[fx.Node, fx.Node] = {}
        prev_host = None
        waited = 0  # sources[:waited] are waited for by earlier offloads
        for i, node in enumerate(sources):
            last = i == len(sources) - 1
            # the copies this offload waits for: all but the newest `lag`, and fewer while those
            # exceed `lag_bytes` (at 320k tokens one layer input is 2.5 GiB: then the previous copy
            # only, so no more sources stay alive than before); each source is an input of the
            # offload that waits for it, which keeps it alive up to there. The last waits for all.
            upto = i
            if not last:
                upto = max(i - self.config["lag"] + 1, 0)  # the newest lag - 1 copies stay in flight
                while upto < i and sum(sizes[upto:i]) > self.config["lag_bytes"]:
                    upto += 1
                upto = max(upto, waited)
            done, waited = sources[waited:upto], upto
            # right after x, which the forward computes after the previous copy's source: prev_host is
            # already there, and as an input it makes the chain a data dependency, not a list order
            with fw.graph.inserting_after(node):
                host = fw.graph.call_function(torch.ops.fxfuse.offload.default, (node, done, prev_host, last))
            host.meta.update({k: v for k, v in node.meta.items() if k.startswith("saved_tensor")})
            host.meta["val"] = _fake_like(node.meta["val"], "cpu")
            host_of[node] = host
            prev_host = host
        fw_out.args = (tuple(host_of.get(n, n) if isinstance(n, fx.Node) else n for n in outputs),)

        # backward: host placeholders, each reload where `lead` placed it, its wait before its first use
        wait_at_use = self.config["wait_at_use"]
        for node, ph in chosen:
            val = ph.meta["val"]
            first = nodes_by_order[first_use[ph]]
            with bw.graph.inserting_after(ph):
                host_ph = bw.graph.placeholder(ph.name + "_host")
            host_ph.meta["val"] = host_of[node].meta["val"]
            with bw.graph.inserting_before(lead[ph]):
                back = bw.graph.call_function(torch.ops.fxfuse.reload.default, (host_ph, val.device, not wait_at_use))
            back.meta["val"] = val
            ph.replace_all_uses_with(back)
            bw.graph.erase_node(ph)
            if wait_at_use:
                with bw.graph.inserting_before(first):
                    bw.graph.call_function(torch.ops.fxfuse.reload_wait.default, (back,)).meta["val"] = None
            stats.sites.append(self._site(node, True, group=back.name))
            stats.add("MiB offloaded", _nbytes(val) / 2**20)

        for gm in (fw, bw):
            gm.graph.lint()
            gm.recompile()

    def _within_host_budget(self, chosen, stats: PassStats):
        available = _host_bytes_available()
        if available is None:
            return chosen
        host_left = int(available * self.config["host_fraction"])
        kept = set()
        # what checkpointing saves (the layer inputs) first, then what a policy chose to save
        # (save_attention): whatever does not fit stays on the device, so let that be the policy's
        for node, ph in sorted(chosen, key=lambda c: SAVED_BY in c[0].meta):
            size = _nbytes(node.meta["val"])
            if size > host_left:
                stats.sites.append(self._site(node, False, f"host memory: {size >> 20} MiB would not fit in the "
                                                           f"{host_left >> 20} MiB left to offloads"))
            else:
                host_left -= size
                kept.add(node)
        return [c for c in chosen if c[0] in kept]

    def _site(self, node: fx.Node, rewritten: bool, reason: str = "", group: Optional[str] = None) -> Site:
        return Site(self.name, module_path(node), node.name, "aot", rewritten, reason, group, "policy")
