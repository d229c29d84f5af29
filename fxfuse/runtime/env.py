"""fxfuse's on/off environment switches, validated: a typo fails loudly instead of meaning "on"."""
from __future__ import annotations

import os


def flag(name: str, default: bool) -> bool:
    """The switch `name` as "0" or "1" (unset: `default`); anything else raises."""
    value = os.environ.get(name, "1" if default else "0")
    if value not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1, not {value!r}")
    return value == "1"
