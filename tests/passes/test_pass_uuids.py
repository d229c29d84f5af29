"""Every pass's uuid (part of the compile cache key) covers the fxfuse modules its code imports: a
change in one of them must give a new key, not a cached graph built with the old code."""
import ast
import importlib

import pytest

from fxfuse.frontends.optimize import PASSES


def _fxfuse_imports(module_name: str) -> set:
    """The fxfuse modules `module_name` imports (`from ..runtime.ops import lora` -> runtime.ops.lora)."""
    module = importlib.import_module(module_name)
    tree = ast.parse(open(module.__file__).read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = module_name.split(".")[:-node.level] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            if not target.startswith("fxfuse"):
                continue
            for alias in node.names:
                try:  # a submodule (`from . import fp32_branch`) or a name in `target`
                    importlib.import_module(f"{target}.{alias.name}")
                    found.add(f"{target}.{alias.name}")
                except ImportError:
                    found.add(target)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("fxfuse")}
    return found


@pytest.mark.parametrize("name", sorted(PASSES))
def test_the_uuid_covers_every_fxfuse_module_the_pass_imports(name):
    cls = PASSES[name]
    # the manager (Site, PassStats) holds bookkeeping, not code that reaches a compiled graph
    imported = _fxfuse_imports(cls.__module__) - {cls.__module__, "fxfuse.passes.manager"}
    missing = sorted(imported - set(cls.depends_on))
    assert not missing, f"{name}: add {missing} to depends_on"
