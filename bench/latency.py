"""Dispatch latency on an idle queue: one tasker connected, one job at a time.

Latency = the job's ``started`` (the tasker's clock when it spawned the job) minus its
``submitted`` (the server's clock when it accepted the submit); both are unix times on
this host. Each job is waited for (long poll) before the next one is submitted, so the
queue is idle and the tasker is in its long poll every time.
"""

from __future__ import annotations

import time

from benchlib import (
    API,
    Server,
    Tasker,
    below,
    info,
    log,
    ms,
    parser,
    pct,
    report,
    running,
    wait_taskers,
    workdir,
)

BENCH = "latency"


def main() -> None:
    p = parser("Dispatch latency (submitted -> started) on an idle queue, one tasker.")
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
    srv = Server(tmp / "swd")
    tasker = Tasker(srv.swd, "t0", args.slots, tmp / "tasker-t0")
    lat: list[float] = []
    round_trip: list[float] = []
    with running(srv):
        srv.start()
        srv.wait_normal()
        tasker.start()
        wait_taskers(srv, ["t0"])
        log(f"{args.samples} jobs, one at a time, 1 tasker ({args.slots} slots)")
        with srv.client() as c:
            for i in range(args.samples + 3):
                t0 = time.time()
                r = c.post(API + "/jobs", json={"command": ["true"], "cwd": "/tmp"})
                r.raise_for_status()
                job_id = r.json()["ids"][0]
                job = c.get(f"{API}/jobs/{job_id}/wait", params={"timeout": 30}).json()
                t1 = time.time()
                if job["state"] != "done":
                    raise RuntimeError(f"job {job_id} ended {job['state']}: {job.get('reason')}")
                if i >= 3:  # the first few warm the paths up
                    lat.append(job["started"] - job["submitted"])
                    round_trip.append(t1 - t0)
                time.sleep(args.pause)
        tasker.stop()
        srv.stop()
    p50, p99 = pct(lat, 50), pct(lat, 99)
    log(
        f"dispatch latency p50 {ms(p50):.2f} ms, p90 {ms(pct(lat, 90)):.2f} ms, "
        f"p99 {ms(p99):.2f} ms, max {ms(max(lat)):.2f} ms; "
        f"submit -> end seen by the client p50 {ms(pct(round_trip, 50)):.2f} ms"
    )
    note = f"{len(lat)} samples, 1 tasker"
    figures = [
        below(BENCH, "dispatch latency p50", ms(p50), "ms", 5, note),
        info(BENCH, "dispatch latency p99", ms(p99), "ms", note),
        info(BENCH, "submit -> wait returns p50", ms(pct(round_trip, 50)), "ms", note),
    ]
    report(figures, args.json)


if __name__ == "__main__":
    main()
