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
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
from crq.server import sanity
from crq.server.commands import Outcome, action_of, lose_tasker
from crq.server.files import LockError, take_lock
from crq.server.models import Register
from crq.server.replay import Replayed
from crq.server.service import Service, StartError
from crq.server.state import TASKER_READY

from crq.durable import write_atomic
from crq.wire import MODE_NORMAL, RUNNING

log = logging.getLogger("crq.recovery")


class Recovery:
    def __init__(self, srv: Service, loaded: Replayed) -> None:
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
            for job_id in jobs:
                job = st.jobs[job_id]
                action = action_of(job)
                self.lost.append({"id": job_id, "tasker": name, "action": action})
        before = {j.id for j in st.jobs.values() if j.state == RUNNING}
        result = sanity.check(st, set(engine.links), fix=True, emit=engine.emit)
        for job_id in sorted(before):
            job = st.jobs[job_id]
            if job.state != RUNNING:
                action = action_of(job)
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
        engine.observed.recoveries += 1
        srv.settings.paths.recovery_lock.unlink(missing_ok=True)
        srv.recovery = None
        engine.open()
        srv.write_server_json(MODE_NORMAL)
        log.info(
            "crash recovery done in %.2f s: %d reattached, %d finished meanwhile, %d lost",
            self.ended_at - self.started_at,
            self.reattached,
            self.finished_during_outage,
            len(self.lost),
        )
        await srv.checkpoint()

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
            "leaders": {
                "old": self.srv.previous or None,
                "new": {
                    "epoch": self.srv.epoch,
                    "url": self.srv.url,
                    "instance": self.srv.instance,
                    "host": os.uname().nodename,
                    "election": self.srv.settings.election.split("://")[0],
                },
            },
        }

    def write_report(self, result: sanity.Result) -> Path:
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
    leaders = r.get("leaders") or {}
    old, new = leaders.get("old") or {}, leaders.get("new") or {}
    if new:
        before = (
            f"epoch {old.get('epoch')} at {old.get('url')} on {old.get('host')}" if old else "none"
        )
        lines.append(
            f"leaders   old: {before}; new: epoch {new.get('epoch')} at {new.get('url')} "
            f"on {new.get('host')} ({new.get('election')} election)"
        )
    lines.append(
        f"sanity    {'ok' if s['ok'] else 'PROBLEMS REMAIN'}, {len(s['findings'])} findings, "
        f"{len(s['fixed'])} fixed"
    )
    lines += [f"          - {f}" for f in s["findings"]]
    return "\n".join(lines) + "\n"


async def begin(srv: Service, loaded: Replayed) -> None:
    """Enter the mode; serving starts at once, the recovery ends in the background."""
    try:
        taken = take_lock(srv.settings.paths.recovery_lock, take_over=True, epoch=srv.epoch)
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
    srv.engine.enter_recovery()
    srv.recovery = rec
    log.warning(
        "unclean stop detected: crash recovery mode, expecting taskers %s (grace %.0f s)",
        rec.expected,
        srv.settings.recovery_grace,
    )
    srv.recovery_task = asyncio.get_running_loop().create_task(rec.run())
