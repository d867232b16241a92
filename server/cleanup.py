"""Manual recovery (``ncmgr cleanup``): what the monitor cannot settle alone.

The same functions serve a live server (through admin endpoints) and ``--standalone``
work on the swd's files with no server running, under ``recovery.lock``. Either way each
action is a journaled ``recover`` or ``tasker_lost`` event, so it shows in the job's
history and survives a crash half-way.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from crq.server import replay
from crq.server.commands import action_of, dead_host, recover_job
from crq.server.engine import apply_and_append
from crq.server.events import Event
from crq.server.files import LockError, read_lock, take_lock
from crq.server.journal import Journal
from crq.server.state import TASKER_READY, State

from crq.durable import LockBusy, lock_pidfile
from crq.procfs import boot_id, process_exists
from crq.wire import RUNNING, Swd


def incomplete(
    state: State, last_contact: dict[str, float], now: float, heartbeat: float
) -> list[dict[str, Any]]:
    """Running attempts no live tasker has confirmed within a few heartbeats."""
    out = []
    for job in state.jobs.values():
        if job.state != RUNNING:
            continue
        t = state.taskers.get(job.tasker or "")
        seen = last_contact.get(job.tasker or "")
        if (
            t is not None
            and t.state == TASKER_READY
            and seen is not None
            and now - seen <= 3 * heartbeat
        ):
            continue
        cur = job.current()
        out.append(
            {
                "id": job.id,
                "attempt": job.attempt,
                "tasker": job.tasker,
                "host": t.host if t else None,
                "name": job.name,
                "user": job.user,
                "since": cur.dispatched if cur else None,
                "last_contact": seen,
                "age_s": round(now - seen, 1) if seen else None,
                "tasker_state": t.state if t else "unknown",
            }
        )
    return out


def summary(state: State, events: list[Event]) -> list[dict[str, Any]]:
    """What the recover events did, after they were applied."""
    out = []
    for ev in events:
        if ev["e"] == "recover":
            job = state.jobs[ev["job"]]
            out.append(
                {
                    "id": job.id,
                    "attempt": ev["attempt"],
                    "action": action_of(job),
                }
            )
        elif ev["e"] == "tasker_lost":
            out.append({"tasker": ev["name"], "action": "marked lost"})
    return out


def reset_lock(swd: Swd) -> str:
    held = read_lock(swd.recovery_lock)
    if held is None:
        return "no recovery lock"
    pid, host = int(held.get("pid") or 0), held.get("host")
    earlier_boot = bool(held.get("boot")) and held.get("boot") != boot_id()  # pid reused
    if host == os.uname().nodename and pid and process_exists(pid) and not earlier_boot:
        raise LockError(f"recovery lock held by live pid {pid}: not removed")
    if host != os.uname().nodename:
        raise LockError(
            f"recovery lock held by pid {pid} on {host}: check that host, then remove "
            f"{swd.recovery_lock} by hand"
        )
    swd.recovery_lock.unlink()
    return f"removed stale recovery lock of pid {pid}"


class Standalone:
    """Work on the swd's files directly: refused while a server holds server.lock."""

    def __init__(self, root: str | os.PathLike[str], accept_loss: bool = False) -> None:
        self.swd = Swd(root)
        if not self.swd.trace.is_dir():
            raise LockError(f"{self.swd.root} has no trace.db: not a crq server directory")
        try:
            self._lock_fd = lock_pidfile(self.swd.server_lock)
        except LockBusy:
            raise LockError(
                f"a server is running on {self.swd.root}: use ncmgr cleanup without --standalone"
            ) from None
        try:
            take_lock(self.swd.recovery_lock)
        except LockError:
            os.close(self._lock_fd)
            raise
        try:
            self.loaded = replay.load(self.swd.trace, None, accept_loss)
        except BaseException:
            self.close()
            raise
        self.state = self.loaded.state
        self.journal: Journal | None = None

    def emit(self, events: list[Event]) -> None:
        if self.journal is None:
            # written as the last leader's (under its lock): a lower epoch would be fenced off
            epoch = self.loaded.highest_epoch
            self.journal = Journal(self.swd.trace, next_seq=self.state.seq + 1, epoch=epoch)
        apply_and_append(self.state, self.journal, events)
        self.journal.flush_now()

    def close(self) -> None:
        if self.journal is not None:
            self.journal.close()
        self.swd.recovery_lock.unlink(missing_ok=True)
        os.close(self._lock_fd)


def run_standalone(root: Path, action: str, arg: str | None) -> dict[str, Any]:
    work = Standalone(root)
    try:
        now = time.time()
        if action == "list":
            return {"incomplete": incomplete(work.state, {}, now, 1.0)}
        if action == "job":
            events = recover_job(work.state, int(arg or 0), now)
        elif action == "dead_host":
            events = dead_host(work.state, arg or "", now)
        elif action == "all":
            events = [
                ev
                for j in list(work.state.jobs.values())
                if j.state == RUNNING
                for ev in recover_job(work.state, j.id, now)
            ]
        else:
            raise ValueError(action)
        work.emit(events)
        return {"recovered": summary(work.state, events)}
    finally:
        work.close()
