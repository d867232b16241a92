"""Crash recovery time: kill -9 the server with N queued jobs, restart it, time the way back.

Three kinds of runs:

* ``journal``: N jobs submitted (batches of 10,000), no checkpoint yet, kill -9: the
  restart replays the whole journal.
* ``snapshot``: N/2 jobs, clean stop (snapshot), restart, N/2 more, kill -9: the restart
  loads a snapshot and replays a journal as long again.
* ``tasker``: one tasker whose slots all run ``sleep`` jobs, plus N queued; kill -9 of the
  server only. The tasker keeps its jobs, reconnects, and recovery ends when it is back.
  Figure: from the tasker's return (it first shows in the server's recovery progress) to
  mode ``normal``.

Times are measured from the restart's spawn: to the queue's first answer (``/healthz``
answering 200, or 503 while it recovers), to ``/healthz`` answering 200, and to
``GET /api/v1/server`` saying ``mode: normal``. The server log splits the first part into
start-up (imports) and loading (snapshot + replay). The floor is the start of the same
interpreter doing nothing (``python -c pass``, ``floors.py``), measured in the same run.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from benchlib import (
    API,
    Figure,
    Server,
    Target,
    Tasker,
    below,
    fill,
    info,
    log,
    parser,
    report,
    running,
    vs_floor,
    wait_taskers,
    workdir,
)
from floors import python_floor

BENCH = "recovery"
ANSWERS_S = 0.15  # kill -9 -> the queue answers (issue 12), any queue size
NORMAL_WITH_TASKER_S = 0.5  # kill -9 -> normal, 100,000 queued, the tasker back at once


@dataclass
class Restart:
    """Seconds after the spawn of the restarted server."""

    answers: float  # the first reply of /healthz: 200, or 503 while recovering
    healthz: float
    normal: float
    loaded_at: float | None  # when the log says loading ended
    load_s: float | None  # how long the log says loading took
    tasker_back: float | None = None  # when the tasker's registration was accepted
    recovery_end: float | None = None  # the report's ``ended_at``: mode normal from then on
    report: dict[str, Any] | None = None

    @property
    def back_to_normal(self) -> float | None:
        if self.tasker_back is None or self.recovery_end is None:
            return None
        return self.recovery_end - self.tasker_back

    def line(self) -> str:
        parts = [
            f"answers {self.answers:.3f} s",
            f"healthz {self.healthz:.2f} s",
            f"normal {self.normal:.2f} s",
        ]
        if self.load_s is not None and self.loaded_at is not None:
            parts.append(
                f"(start-up {self.loaded_at - self.load_s:.2f} s + load {self.load_s:.2f} s"
                f" + open {self.healthz - self.loaded_at:.2f} s)"
            )
        if self.tasker_back is not None and self.back_to_normal is not None:
            parts.append(
                f"tasker back {self.tasker_back:.3f} s, "
                f"back -> recovery ended {self.back_to_normal:.3f} s"
            )
        return ", ".join(parts)


LOADED = re.compile(  # "loaded …", or since the failover server "epoch N: loaded …"
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) .*crq.server: "
    r"(?:epoch \d+: )?loaded \d+ jobs .* in ([\d.]+) s"
)


def _last_load(srv: Server, since: float) -> tuple[float | None, float | None]:
    """(seconds after ``since`` when loading ended, loading seconds) from the server log."""
    found: tuple[float | None, float | None] = (None, None)
    for line in srv.log_text().splitlines():
        m = LOADED.match(line)
        if m:
            t = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1e3
            if t >= since - 1.0:
                found = (t - since, float(m.group(3)))
    return found


def trace_sizes(srv: Server) -> str:
    """What the restart has to read: the newest snapshot and the journal segments."""
    trace = srv.swd / "trace.db"
    snaps = sorted(trace.glob("snapshot.*"))
    snap = snaps[-1].stat().st_size if snaps else 0
    journal = sum(p.stat().st_size for p in trace.glob("CR.*"))
    return f"snapshot {snap / 1e6:.1f} MB, journal {journal / 1e6:.1f} MB"


def restart_and_watch(srv: Server, tasker: str | None = None, timeout: float = 600) -> Restart:
    """Spawn the server again and poll (every 2 ms) until it is back to normal.

    The tasker's return and the end of recovery are read from the server's own records
    (the tasker's ``registered`` time, the report's ``ended_at``): a tasker that is quick
    enough is back, and recovery over, before the first poll could see it.
    """
    log(f"  to read: {trace_sizes(srv)}")
    srv.start()
    t0 = srv.started_at
    deadline = t0 + timeout
    answers = healthz = None
    with httpx.Client(base_url=srv.url, timeout=60.0, trust_env=False) as c:
        while healthz is None:
            srv.check_alive()
            try:
                code = c.get("/healthz").status_code
                now = time.time() - t0
                if answers is None and code in (200, 503):
                    answers = now
                if code == 200:
                    healthz = now
                else:
                    time.sleep(0.002)
            except httpx.HTTPError:
                time.sleep(0.002)
            if time.time() > deadline:
                raise TimeoutError("no /healthz")
        assert answers is not None
        c.headers["Authorization"] = f"Bearer {srv.token}"
        while True:
            srv.check_alive()
            r = c.get(API + "/server")
            now = time.time() - t0
            r.raise_for_status()
            data = r.json()
            if data["mode"] == "normal":
                normal = now
                break
            if time.time() > deadline:
                raise TimeoutError(f"not normal after {timeout} s: {data}")
            time.sleep(0.002)
        back = None
        if tasker is not None:
            for t in c.get(API + "/taskers").json()["taskers"]:
                if t["name"] == tasker and t["registered"] >= t0:
                    back = t["registered"] - t0
    loaded_at, load_s = _last_load(srv, t0)
    reports = sorted(srv.swd.glob("crash_recovery_report_*.json"), key=lambda p: p.stat().st_mtime)
    rep = json.loads(reports[-1].read_text()) if reports else None
    end = datetime.fromisoformat(rep["ended_at"]).timestamp() - t0 if rep else None
    return Restart(answers, healthz, normal, loaded_at, load_s, back, end, rep)


def journal_run(tmp: Path, size: int) -> Restart:
    srv = Server(tmp / f"swd-j{size}")
    with running(srv):
        srv.start()
        srv.wait_normal()
        took, _ = fill(srv, size)
        log(f"journal, {size:,} jobs: filled in {took:.1f} s; kill -9, restart")
        srv.kill9()
        r = restart_and_watch(srv)
        log(f"  {r.line()}")
        srv.kill9()
    return r


def newest_segment_bytes(srv: Server) -> int:
    segs = sorted((srv.swd / "trace.db").glob("CR.*"))
    return segs[-1].stat().st_size if segs else 0


def snapshot_run(tmp: Path, size: int, journal_mib: float = 0) -> tuple[int, Restart]:
    """Snapshot of size/2 jobs, then a journal of size/2 more (or of ``journal_mib``)."""
    srv = Server(tmp / f"swd-s{size}")
    half = size // 2
    with running(srv):
        srv.start()
        srv.wait_normal()
        fill(srv, half)
        stop_s = srv.stop()
        srv.start()
        srv.wait_normal()
        added = 0
        if journal_mib > 0:  # as much journal as a checkpoint lets grow, less one batch
            goal = int(journal_mib * (1 << 20))
            while newest_segment_bytes(srv) + 2 * 10_000 * 200 < goal:
                fill(srv, 10_000, start=half + added)
                added += 10_000
        else:
            fill(srv, size - half, start=half)
            added = size - half
        log(
            f"snapshot of {half:,} (clean stop took {stop_s:.1f} s) + journal of "
            f"{added:,} ({newest_segment_bytes(srv) / (1 << 20):.0f} MiB): kill -9, restart"
        )
        srv.kill9()
        r = restart_and_watch(srv)
        log(f"  {r.line()}")
        srv.kill9()
    return half + added, r


def tasker_run(tmp: Path, size: int, slots: int) -> Restart:
    srv = Server(tmp / f"swd-t{size}", extra=["--recovery-grace", "60"])
    tasker = Tasker(srv.swd, "t0", slots, tmp / "tasker-t0")
    with running(srv):
        srv.start()
        srv.wait_normal()
        tasker.start()
        wait_taskers(srv, ["t0"])
        with srv.client() as c:
            sleeper = {"command": ["sleep", "300"], "cwd": str(tmp)}
            c.post(API + "/jobs", json={"jobs": [sleeper] * slots}).raise_for_status()
            deadline = time.time() + 30
            while True:  # running, and the start reported (so the journal has it)
                jobs = c.get(API + "/jobs", params={"state": "running"}).json()["jobs"]
                if sum(j["started"] is not None for j in jobs) >= slots:
                    break
                if time.time() > deadline:
                    raise TimeoutError("sleep jobs did not start")
                time.sleep(0.05)
        if size:
            fill(srv, size)
        log(f"tasker: {slots} running jobs on 1 tasker, {size:,} queued: kill -9, restart")
        srv.kill9()
        time.sleep(0.5)  # the tasker notices the server is gone
        r = restart_and_watch(srv, tasker="t0")
        log(f"  {r.line()}")
        if r.report:
            log(
                f"  report: {r.report['jobs']['reattached']} reattached, "
                f"{len(r.report['jobs']['lost'])} lost, duration {r.report['duration_s']} s"
            )
        srv.stop()  # not frozen: the tasker kills its jobs and leaves
        tasker.stop()
    return r


def main() -> None:
    p = parser("Recovery time after kill -9 vs queue size.")
    p.add_argument(
        "--sizes",
        default="10000,100000,1000000",
        help="comma-separated queue sizes for the journal-only runs",
    )
    p.add_argument(
        "--snapshot-size",
        type=int,
        default=1_000_000,
        help="queue size of the snapshot + journal run (0: skip)",
    )
    p.add_argument(
        "--tasker-size", type=int, default=100_000, help="queued jobs in the tasker run (-1: skip)"
    )
    p.add_argument("--tasker-slots", type=int, default=4)
    p.add_argument(
        "--journal-mib",
        type=float,
        default=0,
        help="snapshot run: after the snapshot of half the jobs, journal this many MiB "
        "(256 = the default checkpoint_bytes, the longest journal a crash can leave) "
        "instead of the other half",
    )
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]

    tmp = workdir(args.keep)
    figures: list[Figure] = []
    start = python_floor()
    answering = Target("<=", ANSWERS_S, on="value", unit="s")

    def limit_for(n: int) -> float | None:
        return 1.0 if n <= 100_000 else 10.0 if n <= 1_000_000 else None

    def add(kind: str, n: int, r: Restart) -> None:
        lim = limit_for(n)
        note = f"{n:,} queued, {kind}"
        figures.append(
            vs_floor(BENCH, "kill -9 -> queue answering", r.answers, "s", start, answering, note)
        )
        figures.append(info(BENCH, "kill -9 -> /healthz 200", r.healthz, "s", note))
        if lim is not None:
            figures.append(below(BENCH, "kill -9 -> mode normal", r.normal, "s", lim, note))
        else:
            figures.append(info(BENCH, "kill -9 -> mode normal", r.normal, "s", note))
        if r.load_s is not None:
            figures.append(info(BENCH, "  of which loading (log)", r.load_s, "s", note))

    for n in sizes:
        add("journal", n, journal_run(tmp, n))
    if args.snapshot_size > 0:
        total, r = snapshot_run(tmp, args.snapshot_size, args.journal_mib)
        kind = "snapshot+journal" if not args.journal_mib else f"snapshot+{args.journal_mib:g} MiB"
        add(kind, total, r)
    if args.tasker_size >= 0:
        r = tasker_run(tmp, args.tasker_size, args.tasker_slots)
        note = f"{args.tasker_size:,} queued, {args.tasker_slots} running on 1 tasker"
        if r.tasker_back is None or r.back_to_normal is None:
            figures.append(
                Figure(
                    BENCH,
                    "tasker back -> mode normal",
                    float("nan"),
                    "s",
                    "< 1",
                    False,
                    note + "; tasker not back",
                )
            )
        else:
            figures.append(
                below(BENCH, "tasker back -> mode normal", r.back_to_normal, "s", 1.0, note)
            )
            figures.append(info(BENCH, "restart -> tasker back", r.tasker_back, "s", note))
        figures.append(
            vs_floor(
                BENCH,
                "kill -9 -> mode normal, tasker back",
                r.normal,
                "s",
                start,
                Target("<=", NORMAL_WITH_TASKER_S, on="value", unit="s"),
                note,
            )
        )
        reattached = r.report["jobs"]["reattached"] if r.report else -1
        figures.append(
            Figure(
                BENCH,
                "running jobs reattached",
                reattached,
                "jobs",
                f"= {args.tasker_slots}",
                reattached == args.tasker_slots,
                note,
            )
        )
    report(figures, args.json)


if __name__ == "__main__":
    main()
