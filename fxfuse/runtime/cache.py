"""On-disk cache of compiled graphs and kernels, keyed so that a second process reuses them.

The key hashes the pass manager's uuid (every pass's source + config), the device capability and
the torch / triton / transformers / peft versions: a change to any of them starts a fresh cache.
Inductor's FX-graph and AOTAutograd caches live under that directory (TORCHINDUCTOR_CACHE_DIR), so
a training run and a later process with the same model and passes load instead of recompiling.
"""
from __future__ import annotations

import hashlib
import os
from importlib import metadata
from pathlib import Path

import torch


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "absent"


def environment_key() -> dict:
    cap = torch.cuda.get_device_capability() if torch.cuda.is_available() else "cpu"
    return {
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "device": str(cap),
        "interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }


def cache_key(manager_uuid: str) -> str:
    env = environment_key()
    blob = manager_uuid + "|" + "|".join(f"{k}={v}" for k, v in sorted(env.items()))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_root() -> Path:
    return Path(os.environ.get("FXFUSE_CACHE_DIR", Path.home() / ".cache" / "fxfuse"))


def use_cache_dir(manager_uuid: str, root: str | os.PathLike | None = None) -> str:
    """Point Inductor's caches at the directory for this key (unless the user chose one) and
    return the directory in use."""
    global _ours
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is not None and current != _ours:
        return current  # the user's choice
    path = Path(root) if root is not None else default_root()
    path = path / cache_key(manager_uuid)
    path.mkdir(parents=True, exist_ok=True)
    _ours = os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return str(path)


_ours = None  # the directory fxfuse itself set, which a later optimize() may re-point
