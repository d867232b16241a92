"""What this host's kernel says about processes (stdlib only; Linux /proc where it exists).

Server, tasker and ncmgr all ask "is that pid still the process we started?": a pid is
reused after a long outage, and a zombie has exited, so ``kill(pid, 0)`` alone is not it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

HAVE_PROC = os.path.isdir("/proc/self")


def process_exists(pid: int) -> bool:
    """``kill(pid, 0)``: some process has this pid on this host (maybe another user's)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (which may hold spaces)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def is_zombie(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[:1] == ["Z"]


def alive(pid: int) -> bool:
    """Exists and is not a zombie (a zombie has exited; only its parent's wait is missing)."""
    return process_exists(pid) and not is_zombie(pid)


def cpu_ticks(pid: int) -> int | None:
    """User + system CPU time of ``pid`` in clock ticks: grows while it works (None when
    it is gone or there is no procfs)."""
    fields = _stat_fields(pid)
    try:
        return int(fields[11]) + int(fields[12]) if fields else None
    except (IndexError, ValueError):
        return None


def cmdline(pid: int) -> list[bytes] | None:
    """argv of ``pid``; None if it is gone or unreadable (empty for a zombie)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return None


def start_time(pid: int) -> float:
    """Wall-clock start of a process; now if unknown."""
    fields = _stat_fields(pid)
    try:
        ticks = int(fields[19]) if fields else None
        if ticks is None:
            return time.time()
        btime = next(
            int(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


def boot_id() -> str:
    """The kernel's id of this boot ("" where there is none): a change means every
    process we knew of is gone."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""
