"""Dispatch latency on an idle queue: one tasker connected, one job at a time.

The figure: from just before the submit request to the job's first line in its log file
(``echo line``, the log polled every 0.25 ms), on the bench's clock. Its floor
(``floors.py``) is the same path with nothing in between: one append + fsync (the
submit's journal record), then one ``posix_spawn`` of ``/bin/echo`` into a log file until
its line is seen by the same poll; one floor sample is taken after each job. Also shown:
``started`` (the tasker's clock at the spawn) minus ``submitted`` (the server's clock at
the submit). Each job is waited for (long poll) before the next one is submitted, so the
queue is idle and the tasker is in its long poll every time.
"""

from __future__ import annotations

import time

from benchlib import (
    API,
    Server,
    Target,
    Tasker,
    info,
    log,
    ms,
    parser,
    pct,
    report,
    running,
    vs_floor,
    wait_taskers,
    workdir,
)
from floors import DispatchFloor, first_line_at

BENCH = "latency"
WARM = 3  # the first few jobs warm the paths up


def main() -> None:
    p = parser("Dispatch latency (submit -> the job's first line) on an idle queue, one tasker.")
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--slots", type=int, default=4)
    p.add_argument(
        "--pause",
        type=float,
        default=0.01,
        help="idle seconds between one job's end and the next submit",
    )
    args = p.parse_args()

    tmp = workdir(args.keep)
    jobs_dir = tmp / "jobs"
    jobs_dir.mkdir()
    floors = DispatchFloor(tmp / "floor")
    srv = Server(tmp / "swd")
    tasker = Tasker(srv.swd, "t0", args.slots, tmp / "tasker-t0")
    to_line: list[float] = []
    to_start: list[float] = []
    round_trip: list[float] = []
    with running(srv):
        srv.start()
        srv.wait_normal()
        tasker.start()
        wait_taskers(srv, ["t0"])
        log(f"{args.samples} jobs, one at a time, 1 tasker ({args.slots} slots)")
        with srv.client() as c:
            for i in range(args.samples + WARM):
                name = f"lat-{i}.log"
                spec = {
                    "command": ["echo", "line"],
                    "cwd": str(jobs_dir),
                    "log": str(jobs_dir / name),
                }
                t0 = time.perf_counter()
                r = c.post(API + "/jobs", json=spec)
                r.raise_for_status()
                seen = first_line_at(jobs_dir / name)
                job_id = r.json()["ids"][0]
                job = c.get(f"{API}/jobs/{job_id}/wait", params={"timeout": 30}).json()
                t1 = time.perf_counter()
                if job["state"] != "done":
                    raise RuntimeError(f"job {job_id} ended {job['state']}: {job.get('reason')}")
                if i >= WARM:
                    to_line.append(seen - t0)
                    to_start.append(job["started"] - job["submitted"])
                    round_trip.append(t1 - t0)
                (jobs_dir / name).unlink()
                floors.sample()  # the floor next to each sample: a co-tenant slows both
                time.sleep(args.pause)
        tasker.stop()
        srv.stop()
    p50, p99 = pct(to_line, 50), pct(to_line, 99)
    log(
        f"submit -> first line p50 {ms(p50):.2f} ms, p90 {ms(pct(to_line, 90)):.2f} ms, "
        f"p99 {ms(p99):.2f} ms, max {ms(max(to_line)):.2f} ms; submitted -> started p50 "
        f"{ms(pct(to_start, 50)):.2f} ms; submit -> wait returns p50 "
        f"{ms(pct(round_trip, 50)):.2f} ms"
    )
    note = f"{len(to_line)} samples, 1 tasker"
    floor, fsync = floors.floor(skip=WARM), floors.fsync_floor(skip=WARM)
    figures = [
        vs_floor(
            BENCH,
            "dispatch latency p50 (submit -> line)",
            ms(p50),
            "ms",
            floor,
            Target("<=", 1.5),
            note,
        ),
        vs_floor(BENCH, "dispatch latency p99 (submit -> line)", ms(p99), "ms", floor, None, note),
        info(
            BENCH, "submitted -> started p50", ms(pct(to_start, 50)), "ms", "server/tasker clocks"
        ),
        info(
            BENCH, "submitted -> started p99", ms(pct(to_start, 99)), "ms", "server/tasker clocks"
        ),
        info(BENCH, "submit -> wait returns p50", ms(pct(round_trip, 50)), "ms", note),
        vs_floor(BENCH, "floor: append + fsync p50", fsync.value, "ms", fsync, None, "the disk"),
    ]
    report(figures, args.json)


if __name__ == "__main__":
    main()
