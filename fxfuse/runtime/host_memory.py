"""The host's memory as Linux reports it (/proc/meminfo), for the offload's budgets: the partitioner
sizes its plan at compile time, and the pinned-memory pool checks again before each new block (a
cached plan may run on a host with less memory than the one it was made on)."""
from __future__ import annotations

from typing import Optional


def meminfo_bytes(field: str) -> Optional[int]:
    """A /proc/meminfo field ("MemAvailable", "MemTotal") in bytes; None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_bytes() -> Optional[int]:
    return meminfo_bytes("MemAvailable")
