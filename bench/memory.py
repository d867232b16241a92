"""Server memory per queued job: RSS before and after N queued jobs, no taskers.

Jobs look like a regression run: ``["sim", "-seed", i]`` in /work/proj, with one
realistic environment of 30 variables that every job shares, sent once per batch as the
batch's top-level ``env``. The target is absolute (<= 400 B, issue 12); the floor shown
beside it is the job's own record: the journal bytes the fill wrote per job (its durable
form, compact JSON), measured in the same run.
"""

from __future__ import annotations

import time
from pathlib import Path

from benchlib import (
    Floor,
    Server,
    Target,
    at_most,
    fill,
    info,
    log,
    parser,
    report,
    rss_kb,
    running,
    vs_floor,
    workdir,
)

BENCH = "memory"
TARGET_B = 400  # RSS per queued job (issue 12)


def journal_bytes(swd: Path) -> int:
    return sum(p.stat().st_size for p in (swd / "trace.db").glob("CR.*"))


def main() -> None:
    p = parser("Server RSS per queued job.")
    p.add_argument("--jobs", type=int, default=1_000_000)
    p.add_argument("--batch", type=int, default=10_000)
    p.add_argument(
        "--restart",
        action="store_true",
        help="also measure RSS after a clean stop and restart (state from snapshot)",
    )
    args = p.parse_args()

    tmp = workdir(args.keep)
    srv = Server(tmp / "swd")
    figures = []
    with running(srv):
        srv.start()
        srv.wait_normal()
        time.sleep(0.5)
        before = rss_kb(srv.pid)
        journal0 = journal_bytes(srv.swd)
        log(
            f"RSS before: {before / 1024:.1f} MiB; submitting {args.jobs:,} jobs "
            f"in batches of {args.batch:,}"
        )
        took, worst = fill(srv, args.jobs, args.batch)
        time.sleep(1.0)
        after = rss_kb(srv.pid)
        queued = srv.info()["counts"]["queued"]
        if queued != args.jobs:
            raise RuntimeError(f"{queued} queued, expected {args.jobs}")
        per_job = (after - before) * 1024 / args.jobs
        record = (journal_bytes(srv.swd) - journal0) / args.jobs
        floor = Floor(
            record,
            "B",
            "record",
            f"journal bytes written per job by the fill (its own record, compact JSON) "
            f"= {record:.0f} B",
        )
        log(
            f"RSS after: {after / 1024:.1f} MiB: {per_job:,.0f} B/job; filled in {took:.1f} s "
            f"({args.jobs / took:,.0f} jobs/s, slowest batch {worst:.2f} s)"
        )
        note = f"{args.jobs:,} queued jobs, 30-var shared env"
        figures += [
            vs_floor(
                BENCH,
                "server RSS per queued job",
                per_job,
                "B",
                floor,
                Target("<=", TARGET_B, on="value", unit="B"),
                note,
            ),
            info(BENCH, "server RSS total", after / 1024, "MiB", note),
            info(BENCH, "fill rate (batches of 10k)", args.jobs / took, "jobs/s", note),
            info(BENCH, "slowest batch of the fill", worst, "s", f"{args.batch:,} jobs/batch"),
        ]
        if args.restart:
            stop_s = srv.stop()
            srv.start()
            srv.wait_normal()
            time.sleep(1.0)
            again = rss_kb(srv.pid)
            per_job2 = (again - before) * 1024 / args.jobs
            log(
                f"clean stop took {stop_s:.1f} s; after restart RSS {again / 1024:.1f} MiB: "
                f"{per_job2:,.0f} B/job"
            )
            figures.append(
                at_most(
                    BENCH, "RSS per job after restart", per_job2, "B", TARGET_B, "from snapshot"
                )
            )
        srv.stop()
    report(figures, args.json)


if __name__ == "__main__":
    main()
