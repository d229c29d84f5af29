"""Pass manager: runs graph passes in order, gives each a stable uuid, collects what they did.

A pass's uuid hashes its module source and its config, and the manager's uuid hashes all of
them in order: that uuid feeds the compile-cache key, so a changed pass never reuses an artifact
compiled by its older self.
"""
from __future__ import annotations

import abc
import hashlib
import importlib
import inspect
import json
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch.fx as fx

from .pattern import graphs_of


@dataclass
class Site:
    """One candidate a pass looked at: rewritten, or declined with the reason."""
    pass_name: str
    module: str
    node: str
    graph: str
    rewritten: bool
    reason: str = ""
    group: Optional[str] = None  # name of the fused node that absorbed this site
    check: str = ""  # which check declined it (e.g. "pattern", "check()"), for `fxfuse explain`

    def detail(self) -> str:
        """What a report line says about the site: "node -> group (note)" when rewritten, the reason
        when declined."""
        if not self.rewritten:
            return self.reason
        return f"{self.node} -> {self.group}" + (f" ({self.reason})" if self.reason else "")


@dataclass
class PassStats:
    name: str
    uuid: str
    sites: list[Site] = field(default_factory=list)
    # The pass's own report columns (name -> number), summed over graphs by the report and shown
    # by `fxfuse inspect` after the common ones; e.g. the LoRA pass counts the fused ops it emitted.
    columns: dict[str, float] = field(default_factory=dict)

    def add(self, column: str, n: float = 1) -> None:
        self.columns[column] = self.columns.get(column, 0) + n

    @property
    def candidates(self) -> int:
        return len(self.sites)

    @property
    def rewritten(self) -> int:
        return sum(s.rewritten for s in self.sites)

    @property
    def declined(self) -> list[Site]:
        return [s for s in self.sites if not s.rewritten]


def _source(module_name: str) -> str:
    module = importlib.import_module(module_name)
    try:
        return inspect.getsource(module)
    except OSError:  # no .py shipped: hash the compiled file instead
        return hashlib.sha256(open(module.__file__, "rb").read()).hexdigest()


def source_uuid(modules, config: dict) -> str:
    """A pass's or policy's uuid: the source of the modules whose code it runs, and its config."""
    blob = json.dumps({"src": [_source(m) for m in modules], "config": config}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class GraphPass(abc.ABC):
    """Base class: a pass rewrites one fx graph (and its subgraphs) in place and records sites."""

    name: str = ""
    config: dict
    # Modules whose code ends up in the compiled artifact through this pass (the matcher, the
    # custom op and its kernels): their source feeds the uuid too.
    depends_on: tuple[str, ...] = ()

    def uuid(self) -> str:
        return source_uuid((type(self).__module__, *self.depends_on), self.config)

    @abc.abstractmethod
    def run(self, gm: fx.GraphModule, stats: PassStats) -> None:
        """Rewrite `gm` and its subgraphs in place; append one Site per candidate to `stats`."""


class PassManager:
    """Runs passes in the given order; their order is part of the uuid."""

    def __init__(self, passes: list[GraphPass]):
        names = [p.name for p in passes]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate passes: {names}")
        self.passes = passes

    def uuid(self) -> str:
        blob = "|".join(f"{p.name}:{p.uuid()}" for p in self.passes)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def run(self, gm: fx.GraphModule,
            after_pass: Optional[Callable[[str, fx.GraphModule], None]] = None) -> list[PassStats]:
        """after_pass(name, gm) is called after each pass (the CLI snapshots every stage with it)."""
        results = []
        for p in self.passes:
            stats = PassStats(p.name, p.uuid())
            p.run(gm, stats)
            for _, g in graphs_of(gm):
                g.graph.lint()
                g.recompile()
            results.append(stats)
            if after_pass is not None:
                after_pass(p.name, gm)
        return results
