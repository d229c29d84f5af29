"""fxfuse's environment switches: read fast (the launchers read some per call) and validated, so a
typo fails loudly instead of meaning "on"."""
from __future__ import annotations

import os
from typing import Optional

# os.environ.get encodes the name and decodes the value on every call (~1.3-1.5 us for an unset name on
# the CI machine, against ~0.2 us here; the launchers read ~3800 switches a 1k training step:
# bench/RESULTS.md). On POSIX os.environ keeps its bytes in `_data`, which every os.environ write
# (monkeypatch.setenv too) updates, so a lookup there sees the same values. `_data` is looked up per
# call, so a replaced os.environ (mock.patch("os.environ", {...})) is still what is read; anything
# that is not the POSIX mapping of bytes, or a name that is not a str, goes to os.environ.get.
_POSIX = os.name == "posix"
_KEYS: dict = {}


def get(name: str, default: Optional[str] = None) -> Optional[str]:
    """os.environ.get(name, default), without its per-call encoding."""
    data = getattr(os.environ, "_data", None)
    if not _POSIX or type(data) is not dict or type(name) is not str:
        return os.environ.get(name, default)
    key = _KEYS.get(name)
    if key is None:
        key = _KEYS[name] = os.fsencode(name)
    value = data.get(key)
    return default if value is None else os.fsdecode(value)


def flag(name: str, default: bool) -> bool:
    """The switch `name` as "0" or "1" (unset: `default`); anything else raises."""
    value = get(name, "1" if default else "0")
    if value not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1, not {value!r}")
    return value == "1"
