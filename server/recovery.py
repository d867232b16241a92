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

from client.wire import MODE_NORMAL, MODE_RECOVERING, RUNNING, process_exists
from server import checkpoint, sanity
from server.commands import Outcome
from server.models import Register
from server.monitor import lose_tasker
from server.state import TASKER_READY

if TYPE_CHECKING:
    from server.app import Server
    from server.replay import Replayed

log = logging.getLogger("crq.recovery")


class LockError(Exception):
    pass


def read_lock(path: Path) -> dict[str, Any] | None:
    try:
        return orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (orjson.JSONDecodeError, OSError):
        return {"pid": 0, "host": "?", "time": 0}


def take_lock(path: Path) -> None:
    """One recovery at a time per swd; a stale lock is named, not silently taken over."""
    held = read_lock(path)
    if held is not None:
        when = datetime.fromtimestamp(held.get("time") or 0).strftime("%Y-%m-%d %H:%M:%S")
        who = f"pid {held.get('pid')} on {held.get('host')} since {when}"
        if held.get("host") == socket.gethostname() and not process_exists(
            int(held.get("pid") or 0)
        ):
            raise LockError(
                f"stale recovery lock {path} ({who}, process gone): "
                "check the swd, then run `ncmgr cleanup --reset-lock`"
            )
        raise LockError(f"a recovery of this swd is already running ({who})")
    info = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, orjson.dumps(info))
        os.fsync(fd)
    finally:
        os.close(fd)


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
        from server.main import server_json

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
        }

    def write_report(self, result: sanity.Result) -> Path:
        from server.main import write_atomic

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
    lines += [
        f"taskers   expected {len(t['expected'])}, reconnected {len(t['reconnected'])}, "
        f"missing {len(t['missing'])}" + (f": {', '.join(t['missing'])}" if t["missing"] else ""),
        f"jobs      {j['reattached']} reattached, {j['finished_during_outage']} finished during "
        f"the outage, {len(j['lost'])} recovered",
    ]
    lines += [f"          job {x['id']} (tasker {x['tasker']}): {x['action']}" for x in j["lost"]]
    lines.append(
        f"sanity    {'ok' if s['ok'] else 'PROBLEMS REMAIN'}, {len(s['findings'])} findings, "
        f"{len(s['fixed'])} fixed"
    )
    lines += [f"          - {f}" for f in s["findings"]]
    return "\n".join(lines) + "\n"


async def begin(srv: Server, loaded: Replayed) -> None:
    """Enter the mode; serving starts at once, the recovery ends in the background."""
    from server.main import StartError

    try:
        take_lock(srv.settings.paths.recovery_lock)
    except LockError as e:
        raise StartError(str(e)) from None
    except OSError as e:
        raise StartError(f"cannot take the recovery lock: {e}") from None
    rec = Recovery(srv, loaded)
    srv.engine.mode = MODE_RECOVERING
    srv.recovery = rec.progress
    srv.on_register = rec.on_register
    log.warning(
        "unclean stop detected: crash recovery mode, expecting taskers %s (grace %.0f s)",
        rec.expected,
        srv.settings.recovery_grace,
    )
    srv.recovery_task = asyncio.get_running_loop().create_task(rec.run())
