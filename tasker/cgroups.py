"""Memory limits of jobs with cgroups (``vovtasker --enforce-memory``).

Each attempt of a job that asks for ``RAM/N`` gets a group of its own, ``<base>/<job>.<n>``,
with a hard limit of N MB and no swap; the job joins it before it runs (the ``JOIN`` shim
of its argv, so nothing it allocates is outside), while its wrapper stays outside, so an
OOM kill never takes the wrapper that writes the exit status. After the attempt the group
tells whether the kernel killed something in it for memory, and goes.

cgroup v2 where ``/sys/fs/cgroup`` is the unified hierarchy: ``base`` is ``crq-<id>``
beside the tasker's own group (the memory controller must be enabled in the parent's
``cgroup.subtree_control``; a group with processes cannot hand controllers down, so
``base`` holds none itself). Else the v1 memory controller: ``base`` inside the tasker's
own memory group. Paths go into the attempt records: a restarted tasker reads the OOM
verdict of a job that ended while it was down from the group it left behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

ROOT_ENV = "CRQ_CGROUP_ROOT"  # tests point it elsewhere; default /sys/fs/cgroup
SH = "/bin/sh"
# Runs as the tasker's user (root before setpriv, for a job run as its owner): only
# built-ins, the job's env may have no PATH. Exit 125 if the group cannot be joined.
JOIN = 'echo $$ > "$1" || exit 125; shift; exec "$@"'
MB = 1 << 20


class Unusable(Exception):
    """No cgroup this tasker can hold jobs to: the message says what is missing."""


@dataclass(frozen=True)
class Memory:
    """Where this tasker makes its attempt groups, and how (``v1`` or ``v2``)."""

    version: str
    base: Path

    def group(self, name: str) -> Path:
        return self.base / name

    def prepare(self, name: str, mb: int) -> Path:
        """A fresh group limited to ``mb`` MB without swap, for one attempt."""
        group = self.group(name)
        if group.is_dir():  # left by a crash before the attempt was recorded: start clean
            remove(group)
        group.mkdir()
        try:
            if self.version == "v2":
                _write(group / "memory.max", mb * MB)
                _write_if_there(group / "memory.swap.max", 0)
                _write_if_there(group / "memory.oom.group", 1)  # the whole job goes at once
            else:
                _write(group / "memory.limit_in_bytes", mb * MB)
                _write_if_there(group / "memory.memsw.limit_in_bytes", mb * MB)
        except OSError:
            remove(group)
            raise
        return group

    def join_argv(self, group: Path) -> list[str]:
        """The argv prefix that moves the job into ``group`` before it execs."""
        return [SH, "-c", JOIN, "crq-join", str(group / "cgroup.procs")]

    def sweep(self, keep: set[str]) -> None:
        """Remove attempt groups nobody needs (left by a crash), those in ``keep`` aside."""
        try:
            names = [p for p in self.base.iterdir() if p.is_dir()]
        except OSError:
            return
        for group in names:
            if str(group) not in keep:
                remove(group)


def _write(path: Path, value: int | str) -> None:
    with open(path, "w") as f:
        f.write(f"{value}\n")


def _write_if_there(path: Path, value: int | str) -> None:
    if path.exists():
        _write(path, value)


def _own_path(controller: str, proc: Path) -> str:
    """This process's group in the hierarchy of ``controller`` ("" for the v2 one)."""
    try:
        lines = proc.read_text().splitlines()
    except OSError as e:
        raise Unusable(f"cannot read {proc}: {e.strerror or e}") from None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3 and controller in parts[1].split(","):
            return parts[2]
    raise Unusable(f"{proc} names no {'cgroup v2' if not controller else controller} group")


def detect(name: str, root: Path | None = None, proc: Path | None = None) -> Memory:
    """The memory controller this tasker can use, with its base made; else Unusable."""
    root = Path(os.environ.get(ROOT_ENV) or "/sys/fs/cgroup") if root is None else root
    proc = Path("/proc/self/cgroup") if proc is None else proc
    base_name = f"crq-{name}"
    if (root / "cgroup.controllers").is_file():
        return _detect_v2(root, proc, base_name)
    v1 = root / "memory"
    if (v1 / "memory.limit_in_bytes").is_file():
        own = _own_path("memory", proc).lstrip("/")
        return _make_base(Memory("v1", (v1 / own / base_name) if own else v1 / base_name))
    raise Unusable(
        f"no cgroup memory controller under {root} (neither cgroup v2 there nor v1 at {v1})"
    )


def _detect_v2(root: Path, proc: Path, base_name: str) -> Memory:
    own = _own_path("", proc).lstrip("/")
    parent = (root / own).parent if own else root
    try:
        enabled = (parent / "cgroup.subtree_control").read_text().split()
    except OSError as e:
        raise Unusable(f"cannot read {parent}/cgroup.subtree_control: {e.strerror or e}") from None
    if "memory" not in enabled:
        raise Unusable(
            f"cgroup v2: the memory controller is not enabled in "
            f"{parent}/cgroup.subtree_control (the parent of this tasker's group)"
        )
    memory = _make_base(Memory("v2", parent / base_name))
    try:
        _write(memory.base / "cgroup.subtree_control", "+memory")
    except OSError as e:
        raise Unusable(
            f"cgroup v2: cannot enable memory in {memory.base}: {e.strerror or e}"
        ) from None
    return memory


def _make_base(memory: Memory) -> Memory:
    try:
        memory.base.mkdir(exist_ok=True)
    except OSError as e:
        raise Unusable(
            f"cgroup {memory.version}: cannot create {memory.base}: {e.strerror or e}"
        ) from None
    return memory


def limit_mb(group: Path) -> int:
    """The limit set on an attempt's group, in MB (the N of its RAM/N)."""
    for name in ("memory.max", "memory.limit_in_bytes"):
        path = group / name
        if path.exists():
            return int(path.read_text().strip()) // MB
    raise ValueError(f"no memory limit in {group}")


def _counts(path: Path) -> dict[str, int]:
    """``name value`` lines (memory.events, memory.oom_control) as a dict."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            words = line.split()
            if len(words) == 2 and words[1].isdigit():
                out[words[0]] = int(words[1])
    return out


def oom_killed(group: Path, sig: int | None) -> bool:
    """Whether the kernel killed something in ``group`` for want of memory.

    v2 counts in memory.events, v1 (since Linux 4.13) in memory.oom_control; an older v1
    counts only hits of the limit (memory.failcnt), which with a SIGKILL are taken for one.
    """
    events = group / "memory.events"
    if events.exists():
        return _counts(events).get("oom_kill", 0) > 0
    control = _counts(group / "memory.oom_control")
    if "oom_kill" in control:
        return control["oom_kill"] > 0
    try:
        failed = int((group / "memory.failcnt").read_text().strip() or 0)
    except (OSError, ValueError):
        return False
    return failed > 0 and sig == signal.SIGKILL


def remove(group: Path, tries: int = 20) -> bool:
    """Kill what is left in ``group`` (the job's strays) and remove it; False if it stays."""
    for _ in range(tries):
        try:
            group.rmdir()
            return True
        except FileNotFoundError:
            return True
        except OSError:
            pass
        try:
            pids = (group / "cgroup.procs").read_text().split()
        except OSError:
            pids = []
        for pid in pids:
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        time.sleep(0.01)
    return False
