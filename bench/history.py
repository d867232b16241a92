"""The accounting history's cost (server/history.py), in process: what the forget hook costs
the event loop per job, and how many forgotten jobs a second the writer commits, against
the floor of raw SQLite inserts of the very same rows (same schema and indexes, same
transactions of 5,000, synchronous=FULL, in the same temp dir).

``--jobs`` jobs run (dispatched, started, finished: one attempt each) and are forgotten in
forget events of 20,000 ids, as autoforget sends them.
"""

from __future__ import annotations

import sqlite3
import sys
import time
from pathlib import Path

from benchlib import Floor, info, log, parser, report, vs_floor, workdir

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from crq.server import commands  # noqa: E402 (the repository on the path first)
from crq.server.events import Event  # noqa: E402
from crq.server.history import BATCH, INSERT, SCHEMA, History, Item, row_of  # noqa: E402
from crq.server.models import Batch, JobSpec, Register, ResultReport, RunningReport  # noqa: E402
from crq.server.scheduler import dispatch_pass  # noqa: E402
from crq.server.state import State  # noqa: E402

BENCH = "history"


def ended_jobs(n: int) -> State:
    """n jobs that ran once on one of 8 taskers and ended done."""
    st = State()
    now = 1_000_000.0

    def emit(events: list[Event]) -> None:
        for ev in events:
            st.apply(ev, st.seq + 1)

    for t in range(8):
        body = Register(host=f"host{t}", slots=10_000, resources="")
        emit(commands.register(st, f"tk{t}", body, now, "").events)
    for start in range(0, n, 10_000):
        spec = JobSpec(command=["sim", "job"], cwd="/tmp", name="sim")
        batch = Batch(jobs=[spec] * min(10_000, n - start))
        events, ids = commands.submit(st, batch, "u", now, None)
        emit(events)
        dispatch_pass(st, lambda ev: emit([ev]), now, lambda _t: True)
        for jid in ids:
            job = st.jobs[jid]
            tasker, attempt = job.tasker or "", job.attempt
            run = RunningReport(job=jid, attempt=attempt, pid=1, started=now)
            emit(commands.reports(st, tasker, [run], [], now).events)
            res = ResultReport(job=jid, attempt=attempt, exit_code=0, started=now, ended=now + 1)
            emit(commands.reports(st, tasker, [], [res], now + 1).events)
    return st


def main() -> int:
    p = parser(__doc__ or "")
    p.add_argument("--jobs", type=int, default=100_000)
    args = p.parse_args()
    tmp = workdir(args.keep)
    log(f"{args.jobs:,} jobs: running them in process")
    st = ended_jobs(args.jobs)
    hist = History(tmp / "accounting.db", sync_full=True)
    hist.attach(st)
    ids = list(st.jobs)
    began = time.perf_counter()
    for start in range(0, len(ids), 20_000):
        st.apply({"e": "forget", "t": 2e6, "jobs": ids[start : start + 20_000]}, st.seq + 1)
    hook = time.perf_counter() - began
    plain = ended_jobs(args.jobs)  # the same forgets without the hook: its own cost
    began = time.perf_counter()
    for start in range(0, len(ids), 20_000):
        plain.apply({"e": "forget", "t": 2e6, "jobs": ids[start : start + 20_000]}, st.seq + 1)
    bare = time.perf_counter() - began
    items: list[Item] = list(hist._pending)
    began = time.perf_counter()
    written = hist.flush(st.seq)
    writer = time.perf_counter() - began
    hist.close()
    assert written == args.jobs, written
    log(f"hook + forget: {hook:.2f} s; writer: {writer:.2f} s for {written:,} rows")

    rows = [row_of(i) for i in items]
    con = sqlite3.connect(tmp / "floor.db", isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=FULL")
    con.executescript(SCHEMA)
    began = time.perf_counter()
    for start in range(0, len(rows), BATCH):
        con.execute("BEGIN IMMEDIATE")
        con.executemany(INSERT, rows[start : start + BATCH])
        con.execute("COMMIT")
    raw = time.perf_counter() - began
    con.close()
    floor = Floor(
        args.jobs / raw, "rows/s", "sqlite", "executemany of the same prebuilt rows, same schema"
    )
    note = f"{args.jobs:,} jobs, forgets of 20,000"
    per_job = 1e6 / args.jobs
    figures = [
        vs_floor(BENCH, "forgotten jobs written", written / writer, "rows/s", floor, None, note),
        info(BENCH, "forget on the loop, with the hook", hook * per_job, "us/job", note),
        info(BENCH, "forget on the loop, no hook", bare * per_job, "us/job", note),
    ]
    report(figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
