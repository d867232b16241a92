"""Crash recovery mode, entered when the last stop was unclean.

The state is already rebuilt from snapshot and journal. Here: hold ``recovery.lock``,
refuse clients (503) and dispatch nothing while the taskers that had running jobs come
back with what they still run and what finished meanwhile; when all are back or
``recovery_grace`` runs out, recover what nobody claimed, run the sanity check, write the
report, checkpoint, and open.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from crq.server import checkpoint, sanity
from crq.server.commands import Outcome
from crq.server.models import Register
from crq.server.monitor import lose_tasker
from crq.server.state import TASKER_READY

from crq.wire import MODE_NORMAL, MODE_RECOVERING, RUNNING, process_exists

if TYPE_CHECKING:
    from crq.server.app import Server
    from crq.server.replay import Replayed

log = logging.getLogger("crq.recovery")


class LockError(Exception):
    pass


def boot_id() -> str:
    """This boot of this host ("" where Linux's boot id is not to be had)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def read_lock(path: Path) -> dict[str, Any] | None:
    try:
        return orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (orjson.JSONDecodeError, OSError):
        return {"pid": 0, "host": "?", "time": 0}


def take_lock(path: Path, take_over: bool = False) -> dict[str, Any] | None:
    """One recovery at a time per swd; a stale lock is named, not silently taken over.

    With ``take_over`` (a server starting, under server.lock, so no rival can be starting
    too), a lock left by a process of this very boot of this host that is gone now is
    replaced, and returned so the caller can say so. Any other holder is refused: a live
    pid, another host (its process may live), or another or unknown boot (the pid may be
    some other process now).
    """
    held = read_lock(path)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "boot": boot_id(), "time": 0.0}
    if held is not None:
        when = datetime.fromtimestamp(held.get("time") or 0).strftime("%Y-%m-%d %H:%M:%S")
        who = f"pid {held.get('pid')} on {held.get('host')} since {when}"
        pid = int(held.get("pid") or 0)
        if held.get("host") == me["host"] and (pid == me["pid"] or not process_exists(pid)):
            if take_over and me["boot"] and held.get("boot") == me["boot"]:
                me["time"] = time.time()
                from crq.server.main import write_atomic

                write_atomic(path, orjson.dumps(me))
                return held
            raise LockError(
                f"stale recovery lock {path} ({who}, process gone): "
                "check the swd, then run `ncmgr cleanup --reset-lock`"
            )
        raise LockError(f"a recovery of this swd is already running ({who})")
    me["time"] = time.time()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, orjson.dumps(me))
        os.fsync(fd)
    finally:
        os.close(fd)
    return None


class Recovery:
    def __init__(self, srv: Server, loaded: Replayed) -> None:
        self.srv = srv
        self.loaded = loaded
        self.started_at = time.time()
        self.deadline = self.started_at + srv.settings.recovery_grace
        st = srv.state
        self.expected = sorted(
            n for n, t in st.taskers.items() if t.running and t.state == TASKER_READY
        )
        self.reconnected: list[str] = []
        self.reattached = 0
        self.finished_during_outage = 0
        self.lost: list[dict[str, Any]] = []
        self.back = asyncio.Event()
        self.ended_at: float | None = None
        self.lock_taken_over: dict[str, Any] | None = None  # a dead recovery's lock

    def progress(self) -> dict[str, Any]:
        missing = [n for n in self.expected if n not in self.reconnected]
        return {
            "started_at": self.started_at,
            "expected": self.expected,
            "reconnected": self.reconnected,
            "missing": missing,
            "seconds_left": max(0.0, round(self.deadline - time.time(), 1)),
            "events_replayed": self.loaded.events_replayed,
        }

    def on_register(self, name: str, body: Register, out: Outcome) -> None:
        if name not in self.reconnected:
            self.reconnected.append(name)
        kinds = [ev["e"] for ev in out.events]
        self.finished_during_outage += kinds.count("finish")
        killed = {ref for ref in out.kill}
        self.reattached += sum(1 for r in body.running if (r.job, r.attempt) not in killed)
        self.back.set()

    def settled(self) -> bool:
        """Every expected tasker is back, or was declared lost by the operator meanwhile."""
        taskers = self.srv.state.taskers
        return all(n in self.reconnected or taskers[n].state != TASKER_READY for n in self.expected)

    async def run(self) -> None:
        while not self.settled() and time.time() < self.deadline:
            self.back.clear()
            try:
                await asyncio.wait_for(
                    self.back.wait(), min(0.2, max(0.0, self.deadline - time.time()))
                )
            except TimeoutError:
                pass
        await self.finish()

    async def finish(self) -> None:
        srv, engine, st = self.srv, self.srv.engine, self.srv.state
        now = time.time()
        for name in self.expected:
            if name in self.reconnected or st.taskers[name].state != TASKER_READY:
                continue
            events = lose_tasker(st, name, f"tasker {name} did not return after the crash", now)
            jobs = [ev["job"] for ev in events if ev["e"] == "recover"]
            engine.emit(events)
            engine.links.pop(name, None)
            for job_id in jobs:
                job = st.jobs[job_id]
                action = "requeued" if job.state == "queued" else job.state
                self.lost.append({"id": job_id, "tasker": name, "action": action})
        before = {j.id for j in st.jobs.values() if j.state == RUNNING}
        result = sanity.check(st, set(engine.links), fix=True, emit=engine.emit)
        for job_id in sorted(before):
            job = st.jobs[job_id]
            if job.state != RUNNING:
                action = "requeued" if job.state == "queued" else job.state
                self.lost.append(
                    {
                        "id": job_id,
                        "tasker": job.attempts[-1].tasker if job.attempts else None,
                        "action": action,
                    }
                )
        await engine.durable()
        self.ended_at = time.time()
        self.write_report(result)
        srv.settings.paths.recovery_lock.unlink(missing_ok=True)
        engine.mode = MODE_NORMAL
        srv.recovery = lambda: None
        srv.on_register = lambda *a: None
        engine.schedule_dispatch()
        from crq.server.main import server_json

        server_json(srv, MODE_NORMAL)
        log.info(
            "crash recovery done in %.2f s: %d reattached, %d finished meanwhile, %d lost",
            self.ended_at - self.started_at,
            self.reattached,
            self.finished_during_outage,
            len(self.lost),
        )
        await checkpoint.write_forked(srv)

    def report(self, result: sanity.Result) -> dict[str, Any]:
        ended = self.ended_at or time.time()
        ld = self.loaded
        return {
            "started_at": _iso(self.started_at),
            "ended_at": _iso(ended),
            "duration_s": round(ended - self.started_at, 3),
            "snapshot": {
                "seq": _snap_seq(ld.snapshot),
                "jobs": ld.snapshot_jobs,
                "path": str(ld.snapshot) if ld.snapshot else None,
            },
            "journal": {
                "segments": ld.segments,
                "events_replayed": ld.events_replayed,
                "bytes_discarded": ld.bytes_discarded,
                "losses": ld.losses,
                "lost_seq": ld.lost_seq,
                "lost_jobs": ld.lost_jobs,
                "lost_ids": ld.lost_ids,
                "kept": ld.kept,
            },
            "taskers": {
                "expected": self.expected,
                "reconnected": self.reconnected,
                "missing": [n for n in self.expected if n not in self.reconnected],
            },
            "jobs": {
                "reattached": self.reattached,
                "finished_during_outage": self.finished_during_outage,
                "lost": self.lost,
            },
            "sanity": result.as_dict(),
            "lock_taken_over": self.lock_taken_over,
        }

    def write_report(self, result: sanity.Result) -> Path:
        from crq.server.main import write_atomic

        data = self.report(result)
        stamp = datetime.fromtimestamp(self.started_at).strftime("%Y%m%d-%H%M%S")
        base = self.srv.settings.paths.root / f"crash_recovery_report_{stamp}"
        write_atomic(
            base.with_name(base.name + ".json"), orjson.dumps(data, option=orjson.OPT_INDENT_2)
        )
        write_atomic(base, render_text(data).encode())
        return base


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t).astimezone().isoformat(timespec="milliseconds")


def _snap_seq(path: Path | None) -> int:
    return int(path.name.split(".", 1)[1]) if path else 0


def _runs(ids: list[int]) -> list[list[int]]:
    """Sorted ids as [first, last] runs."""
    out: list[list[int]] = []
    for i in ids:
        if out and i == out[-1][1] + 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return out


def _ranges(ranges: list[list[int]]) -> str:
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


def render_text(r: dict[str, Any]) -> str:
    t, j, jn, s = r["taskers"], r["jobs"], r["journal"], r["sanity"]
    lines = [
        "crq crash recovery report",
        f"started   {r['started_at']}",
        f"ended     {r['ended_at']}  ({r['duration_s']} s)",
        f"snapshot  seq {r['snapshot']['seq']}, {r['snapshot']['jobs']} jobs",
        f"journal   {jn['segments']} segments, {jn['events_replayed']} events replayed, "
        f"{jn['bytes_discarded']} bytes of torn tail discarded",
    ]
    lines += [f"          LOSS ACCEPTED: {loss}" for loss in jn.get("losses", [])]
    if jn.get("lost_seq"):
        lines.append(f"          events lost: {_ranges(jn['lost_seq'])}")
    if jn.get("lost_ids"):
        lines.append(f"          jobs lost (ids known durable): {_ranges([jn['lost_ids']])}")
    if jn.get("lost_jobs"):
        lines.append(f"          jobs lost (read back): {_ranges(_runs(jn['lost_jobs']))}")
    lines += [
        f"taskers   expected {len(t['expected'])}, reconnected {len(t['reconnected'])}, "
        f"missing {len(t['missing'])}" + (f": {', '.join(t['missing'])}" if t["missing"] else ""),
        f"jobs      {j['reattached']} reattached, {j['finished_during_outage']} finished during "
        f"the outage, {len(j['lost'])} recovered",
    ]
    lines += [f"          job {x['id']} (tasker {x['tasker']}): {x['action']}" for x in j["lost"]]
    held = r.get("lock_taken_over")
    if held:
        lines.append(
            f"lock      took over the recovery lock of pid {held.get('pid')} on "
            f"{held.get('host')} (gone: it crashed during a recovery)"
        )
    lines.append(
        f"sanity    {'ok' if s['ok'] else 'PROBLEMS REMAIN'}, {len(s['findings'])} findings, "
        f"{len(s['fixed'])} fixed"
    )
    lines += [f"          - {f}" for f in s["findings"]]
    return "\n".join(lines) + "\n"


async def begin(srv: Server, loaded: Replayed) -> None:
    """Enter the mode; serving starts at once, the recovery ends in the background."""
    from crq.server.main import StartError

    try:
        taken = take_lock(srv.settings.paths.recovery_lock, take_over=True)
    except LockError as e:
        raise StartError(str(e)) from None
    except OSError as e:
        raise StartError(f"cannot take the recovery lock: {e}") from None
    rec = Recovery(srv, loaded)
    if taken is not None:
        rec.lock_taken_over = taken
        log.warning(
            "took over the recovery lock of pid %s (gone; a crash during a recovery)",
            taken.get("pid"),
        )
    srv.engine.mode = MODE_RECOVERING
    srv.recovery = rec.progress
    srv.on_register = rec.on_register
    log.warning(
        "unclean stop detected: crash recovery mode, expecting taskers %s (grace %.0f s)",
        rec.expected,
        srv.settings.recovery_grace,
    )
    srv.recovery_task = asyncio.get_running_loop().create_task(rec.run())
