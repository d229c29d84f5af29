"""The host's memory as Linux reports it, for the offload's budgets: the partitioner sizes its plan at
compile time, and the pinned-memory pool checks again before each new block (a cached plan may run
on a host with less memory than the one it was made on).

Inside a container, /proc/meminfo shows the whole machine; the container's cgroup limit is what the
kernel enforces. Available memory is therefore the smaller of MemAvailable and the cgroup's headroom:
its limit less its working set (usage less inactive page cache, which the kernel can reclaim, as
container runtimes count it).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

_NO_LIMIT = 1 << 60  # cgroup v1 reports "no limit" as a huge number


def meminfo_bytes(field: str, path: str = "/proc/meminfo") -> Optional[int]:
    """A /proc/meminfo field ("MemAvailable", "MemTotal") in bytes; None where it cannot be read."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _read_int(path: Path) -> Optional[int]:
    try:
        text = path.read_text().strip()
        return None if text == "max" else int(text)
    except (OSError, ValueError):
        return None


def _stat(path: Path, field: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == field:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def cgroup_headroom(root: str = "/sys/fs/cgroup") -> Optional[int]:
    """Bytes the process's memory cgroup may still use (limit - working set); None without a limit."""
    base = Path(root)
    limit = _read_int(base / "memory.max")  # cgroup v2
    if limit is not None:
        usage = _read_int(base / "memory.current") or 0
        return limit - (usage - _stat(base / "memory.stat", "inactive_file"))
    v1 = base / "memory"
    limit = _read_int(v1 / "memory.limit_in_bytes")
    if limit is not None and limit < _NO_LIMIT:
        usage = _read_int(v1 / "memory.usage_in_bytes") or 0
        return limit - (usage - _stat(v1 / "memory.stat", "total_inactive_file"))
    return None


def available_bytes() -> Optional[int]:
    """The memory the process can still take: min(MemAvailable, cgroup headroom); None if unknown."""
    known = [v for v in (meminfo_bytes("MemAvailable"), cgroup_headroom()) if v is not None]
    return max(min(known), 0) if known else None
