"""fxfuse's environment switches: read fast (the launchers read some per call) and validated, so a
typo fails loudly instead of meaning "on"."""
from __future__ import annotations

import os
from typing import Optional

# os.environ.get encodes the name and decodes the value on every call (~2-4 us; the launchers read
# ~3800 switches a 1k training step, 14 ms of its host time profiled: bench/RESULTS.md). On POSIX
# os.environ keeps its bytes in `_data`, which every os.environ write (monkeypatch.setenv too)
# updates, so a lookup there sees the same values. Elsewhere (Windows keeps str keys) os.environ.get.
_DATA = getattr(os.environ, "_data", None)
_RAW = isinstance(_DATA, dict) and os.name == "posix" and all(type(k) is bytes for k in list(_DATA)[:8])
_KEYS: dict = {}


def get(name: str, default: Optional[str] = None) -> Optional[str]:
    """os.environ.get(name, default), without its per-call encoding."""
    if not _RAW:
        return os.environ.get(name, default)
    key = _KEYS.get(name)
    if key is None:
        key = _KEYS[name] = os.fsencode(name)
    value = _DATA.get(key)
    return default if value is None else os.fsdecode(value)


def flag(name: str, default: bool) -> bool:
    """The switch `name` as "0" or "1" (unset: `default`); anything else raises."""
    value = get(name, "1" if default else "0")
    if value not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1, not {value!r}")
    return value == "1"
