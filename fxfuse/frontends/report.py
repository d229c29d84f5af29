"""What optimize() did: per pass, candidates / rewritten / declined with reasons and HF module
names; graphs compiled, graph breaks, and run-time fallbacks of the fused ops. Graph breaks and
run-time counters are process-wide (dynamo's and the ops' counters), not per model."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..passes.manager import PassStats, Site
from ..runtime import stats as runtime_stats


@dataclass
class GraphRecord:
    index: int
    nodes_before: int
    nodes_after: int
    passes: list[PassStats]
    compile_id: str = ""  # dynamo's "frame/attempt"; attempt > 0 is a recompile of that frame
    lora_layers: int = 0  # PEFT LoRA layers whose A weights are inputs of this graph
    lora_kinds: dict = field(default_factory=dict)  # their kinds ("lora.Linear", ...) -> count
    inductor_patches: dict = field(default_factory=dict)  # Inductor config fxfuse set for this graph


@dataclass
class Report:
    manager_uuid: str = ""
    pass_names: list[str] = field(default_factory=list)
    graphs: list[GraphRecord] = field(default_factory=list)
    graph_breaks: Counter = field(default_factory=Counter)
    cache_dir: str = ""
    errors: list[str] = field(default_factory=list)  # passes that failed; their graph ran unchanged
    # graphs the compiler failed on after the passes ran (not compiled: their sites are dropped)
    compile_errors: list[str] = field(default_factory=list)
    # PEFT adapter layers of the model (optimize() fills it): full module name -> kind ("lora.Linear")
    adapter_layers: dict = field(default_factory=dict)
    _model: Any = None  # weakref to the optimized model (optimize() sets it): its adapters' weights
    forward_calls: int = 0  # calls of the optimized model's forward (optimize() counts them)
    cudagraphs: bool = False  # optimize(cudagraphs=True) asked for them
    _breaks_at_start: Optional[Counter] = None  # dynamo's graph-break counter when start() ran
    _cudagraph_skips_at_start: int = 0

    def start(self) -> None:
        self._breaks_at_start = Counter(_graph_break_counter())
        self._cudagraph_skips_at_start = _cudagraph_skip_counter()

    @property
    def cudagraph_skips(self) -> int:
        """Forward/backward graphs Inductor compiled (or loaded) without CUDA graphs since optimize():
        on the CPU, or for the reason torch's own warning gives. Process-wide, like the graph breaks:
        models compiled later in the process count too."""
        if not self.cudagraphs:
            return 0
        return max(0, _cudagraph_skip_counter() - self._cudagraph_skips_at_start)  # counters.clear() resets

    def add_graph(self, before: int, after: int, passes: list[PassStats]) -> None:
        cid = torch._guards.CompileContext.current_compile_id()
        self.graphs.append(GraphRecord(len(self.graphs), before, after, passes, str(cid) if cid else ""))
        self._refresh_breaks()

    def sites(self, pass_name: str | None = None) -> list[Site]:
        return [s for g in self.graphs for p in g.passes for s in p.sites
                if pass_name is None or s.pass_name == pass_name]

    def summary(self) -> dict:
        """Per pass: candidates, rewritten, declined (reason -> count)."""
        out = {}
        for name in self.pass_names:
            sites = self.sites(name)
            out[name] = {
                "candidates": len(sites),
                "rewritten": sum(s.rewritten for s in sites),
                "declined": dict(Counter(s.reason for s in sites if not s.rewritten)),
            }
        return out

    def columns(self) -> dict[str, dict[str, float]]:
        """Per pass: its own report columns (PassStats.columns), summed over graphs."""
        out: dict[str, dict[str, float]] = {name: {} for name in self.pass_names}
        for g in self.graphs:
            for p in g.passes:
                for col, n in p.columns.items():
                    out.setdefault(p.name, {})[col] = out.get(p.name, {}).get(col, 0) + n
        return out

    @property
    def recompiles(self) -> int:
        return sum(1 for g in self.graphs if g.compile_id and not g.compile_id.endswith("/0"))

    @property
    def nothing_compiled(self) -> bool:
        """The forward ran and no graph reached fxfuse: dynamo ran it eagerly, nothing was rewritten."""
        return self.forward_calls > 0 and not self.graphs

    def lora_weight_layers(self) -> dict:
        """data_ptr() of each A weight of the model's PEFT LoRA layers -> the layer's name."""
        model = self._model() if self._model is not None else None
        out: dict = {}
        for name, kind in self.adapter_layers.items() if model is not None else ():
            if kind.startswith("lora."):
                try:
                    weights = list(model.get_submodule(name).lora_A.parameters())
                except AttributeError:  # removed since (merge_and_unload), or no lora_A
                    continue
                out.update((runtime_stats.weight_key(w), name) for w in weights)
        return out

    def unseen_adapters(self) -> dict[str, list[str]]:
        """Adapter layers that ran unfused, by kind: LoRA layers whose A weights no graph fxfuse
        compiled ran with (they ran outside them: a graph break, a compile error), and every layer
        of the adapter kinds no pass handles (LoHa, IA3, ...). Checked on the graphs' run-time
        inputs, not by module path: a path in a graph is relative to the frame dynamo compiled, and
        one compiled frame may run several layers. Empty before the first forward call."""
        if not self.forward_calls or self._model is None or self._model() is None:
            return {}
        weights = self.lora_weight_layers()
        ran = {name for key, name in weights.items() if key in runtime_stats.lora_weights_run}
        known = set(weights.values())
        out: dict[str, list[str]] = {}
        for name, kind in self.adapter_layers.items():
            if kind.startswith("lora.") and (name in ran or name not in known or "lora" not in self.pass_names):
                continue
            out.setdefault(kind, []).append(name)
        return out

    def unmatched_lora(self) -> list[tuple[int, int, int]]:
        """(graph index, LoRA layers among its inputs, lora-pass sites in it) where the pass has
        fewer sites than layers: some ran inside the graph in a form the pass does not match."""
        out = []
        for g in self.graphs if "lora" in self.pass_names else ():
            sites = sum(len(p.sites) for p in g.passes if p.name == "lora")
            if g.lora_layers > sites:
                out.append((g.index, g.lora_layers, sites))
        return out

    @property
    def runtime_fallbacks(self) -> int:
        return sum(runtime_stats.fallbacks.values())

    def to_dict(self) -> dict:
        self._refresh_breaks()
        return {
            "manager_uuid": self.manager_uuid,
            "graphs_compiled": len(self.graphs),
            "forward_calls": self.forward_calls,
            "nothing_compiled": self.nothing_compiled,
            "graph_breaks": sum(self.graph_breaks.values()),
            "graph_break_reasons": dict(self.graph_breaks),
            "recompiles": self.recompiles,
            "cudagraphs": self.cudagraphs,
            "cudagraph_skips": self.cudagraph_skips,
            "passes": self.summary(),
            "pass_columns": self.columns(),
            "sites": [s.__dict__ for s in self.sites()],
            "runtime": runtime_stats.snapshot(),
            "cache_dir": self.cache_dir,
            "pass_errors": self.errors,
            "compile_errors": self.compile_errors,
            "inductor_patches": {g.index: g.inductor_patches for g in self.graphs if g.inductor_patches},
            "adapter_layer_count": len(self.adapter_layers),
            "unseen_adapters": self.unseen_adapters(),
            "unmatched_lora": self.unmatched_lora(),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def _refresh_breaks(self) -> None:
        """Graph breaks since start(): read again, a fallback after the last graph adds one."""
        if self._breaks_at_start is not None:
            self.graph_breaks = Counter(_graph_break_counter()) - self._breaks_at_start

    def table(self, sites: bool = False) -> str:
        self._refresh_breaks()
        lines = [f"fxfuse report (passes uuid {self.manager_uuid}): {len(self.graphs)} graph(s) compiled, "
                 f"{sum(self.graph_breaks.values())} graph break(s), {self.recompiles} recompile(s)"]
        for reason, n in self.graph_breaks.items():
            lines.append(f"  graph break x{n}: {reason}")
        for g in self.graphs:
            if g.inductor_patches.get("allow_buffer_reuse") is False:
                lines.append(f"  graph {g.index}: Inductor's buffer reuse off (its LoRA sites run as graph ops; "
                             "reuse kept dead buffers across layers and raised the peak); the partition "
                             "policies that act on fxfuse::lora_linear (save_projections, recompute_lora_xa) "
                             "have no sites among them")
        for err in self.errors:
            lines.append(f"  PASS ERROR (graph compiled without fxfuse rewrites): {err}")
        for err in self.compile_errors:
            lines.append(f"  COMPILE ERROR: {err}")
        for kind, names in self.unseen_adapters().items():
            example = ", ".join(_short(n) for n in names[:3]) + (", ..." if len(names) > 3 else "")
            if kind.startswith("lora."):
                lines.append(f"  WARNING: {len(names)} of {sum(k == kind for k in self.adapter_layers.values())} "
                             f"{kind} adapter layer(s) ran outside the graphs fxfuse compiled (graph breaks, "
                             f"compile errors above), unfused ({example})")
            else:
                lines.append(f"  note: {len(names)} {kind} adapter layer(s): no fxfuse pass handles this adapter "
                             f"kind, they run as traced, unfused ({example})")
        kinds = {g.index: g.lora_kinds for g in self.graphs}
        for index, layers, sites in self.unmatched_lora():
            lines.append(f"  WARNING: graph {index} runs {layers} LoRA layer(s) and the lora pass found {sites} "
                         f"site(s) there: {layers - sites} in a form it does not match, unfused"
                         + _unmatched_why(kinds.get(index, {})))
        if self.nothing_compiled:
            lines.append(f"  WARNING: {self.forward_calls} forward call(s) and no graph compiled: dynamo ran the "
                         "model eagerly, nothing was rewritten (its recompile limit, "
                         "torch._dynamo.config.recompile_limit, reached by models compiled earlier in this "
                         "process? TORCH_LOGS=recompiles shows why)")
        if self.cudagraph_skips:
            lines.append(f"  WARNING: cudagraphs=True, but Inductor compiled {self.cudagraph_skips} forward/backward "
                         "graph(s) without CUDA graphs (process-wide count; a graph on the CPU, or the reason in "
                         "torch's 'skipping cudagraphs due to' warning)")
        columns = self.columns()
        extra = list(dict.fromkeys(c for cols in columns.values() for c in cols))
        pw = max([len(n) for n in self.pass_names] + [8])  # pass-name column
        lines.append(f"{'pass':<{pw}} {'candidates':>10} {'rewritten':>10} {'declined':>9}"
                     + "".join(f" {c:>{max(len(c), 6)}}" for c in extra))
        for name, s in self.summary().items():
            lines.append(f"{name:<{pw}} {s['candidates']:>10} {s['rewritten']:>10} {sum(s['declined'].values()):>9}"
                         + "".join(f" {_num(columns[name].get(c, '-')):>{max(len(c), 6)}}" for c in extra))
            for reason, n in s["declined"].items():
                lines.append(f"  declined x{n}: {reason}")
            # rewritten with a caveat (save_attention: output saved, q/k/v recomputed, and why)
            for note, n in Counter(x.reason for x in self.sites(name) if x.rewritten and x.reason).items():
                lines.append(f"  note x{n}: {note}")
        snap = runtime_stats.snapshot()
        lines.append(f"run-time: kernel calls {sum(snap['kernel_calls'].values())}, "
                     f"fallbacks to reference {self.runtime_fallbacks}")
        for what, n in snap["fallbacks"].items():
            lines.append(f"  fallback x{n}: {what}")
        if sites:
            width = max([len(s.module) for s in self.sites()] + [6])
            lines.append(f"{'pass':<{pw}} {'status':<10} {'module':<{width}} {'node / reason'}")
            for s in self.sites():
                status = "rewritten" if s.rewritten else "declined"
                lines.append(f"{s.pass_name:<{pw}} {status:<10} {s.module:<{width}} {s.detail()}")
        return "\n".join(lines)

    __str__ = table


def _short(name: str) -> str:
    """A module name without PEFT's wrapper prefix."""
    return name[len("base_model.model."):] if name.startswith("base_model.model.") else name


def adapter_layers(model: torch.nn.Module) -> dict:
    """PEFT tuner layers of `model` (outermost only: a wrapped base layer is part of its wrapper),
    full module name -> "<tuner>.<class>" (e.g. "lora.Linear", "loha.Linear"); {} without peft."""
    try:
        from peft.tuners.lora import LoraLayer
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return {}
    out: dict = {}
    for name, mod in model.named_modules():  # parents come before their children
        ancestors = {name[:i] for i, c in enumerate(name) if c == "."}
        if isinstance(mod, BaseTunerLayer) and not ancestors & out.keys():
            parts = type(mod).__module__.split(".")  # peft.tuners.<tuner>.layer
            tuner = "lora" if isinstance(mod, LoraLayer) else \
                (parts[parts.index("tuners") + 1] if "tuners" in parts[:-1] else parts[-1])
            out[name] = f"{tuner}.{type(mod).__name__}"
    return out


# why a LoRA layer kind has no site the lora pass could match, where that is known
_NO_LINEAR = {"lora.ParamWrapper": "LoRA on a weight parameter (PEFT target_parameters, e.g. MoE experts): "
                                   "PEFT adds scale·B·A to the weight before the op that reads it, so the graph "
                                   "has no LoRA linear to fuse"}


def _unmatched_why(kinds: dict) -> str:
    """The graph's LoRA layer kinds, with the known reason a kind has no matchable site."""
    if not kinds:
        return ""
    parts = [f"{kind} x{n}" + (f" ({_NO_LINEAR[kind]})" if kind in _NO_LINEAR else "") for kind, n in kinds.items()]
    return "; the graph's LoRA layers: " + ", ".join(parts)


def _num(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _cudagraph_skip_counter() -> int:
    from torch._dynamo.utils import counters
    return counters["inductor"]["cudagraph_skips"]


def _graph_break_counter() -> Counter:
    """Dynamo's graph-break counter, keyed by the first line of each reason."""
    out: Counter = Counter()
    for reason, n in torch._dynamo.utils.counters.get("graph_break", {}).items():
        first = next((line.strip() for line in str(reason).splitlines() if line.strip()), str(reason))
        out[first] += n
    return out
