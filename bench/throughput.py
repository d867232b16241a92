"""End-to-end throughput: N ``true`` jobs through taskers, first submit to last job ended.

The clock starts before the first submit request and stops when ``GET /api/v1/server``
counts every job as ended (polled every 10 ms). Taskers start and register before the
clock starts. The floor is ``posix_spawn`` of ``true`` on every core (``floors.py``),
measured before each run; the figure is the median run against the median floor.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

from benchlib import (
    API,
    Floor,
    Server,
    Target,
    Tasker,
    cpu_seconds,
    info,
    log,
    parser,
    report,
    running,
    vs_floor,
    wait_taskers,
    workdir,
)
from floors import spawn_floor, spawn_wall_rate

BENCH = "throughput"
FINAL = ("done", "failed", "stopped", "lost")


def one_run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """A fresh server and taskers, N jobs through them; rate, time and CPU used."""
    tmp.mkdir(parents=True, exist_ok=True)
    srv = Server(tmp / "swd")
    taskers = [
        Tasker(srv.swd, f"t{i}", args.slots, tmp / f"tasker-t{i}") for i in range(args.taskers)
    ]
    with running(srv):
        srv.start()
        srv.wait_normal()
        for t in taskers:
            t.start()
        wait_taskers(srv, [t.name for t in taskers])
        batch = args.batch or args.jobs
        job = {"command": ["true"], "cwd": "/tmp"}
        pids = {"server": srv.pid, **{t.name: t.proc.pid for t in taskers if t.proc}}
        cpu0 = {k: cpu_seconds(pid) for k, pid in pids.items()}
        with srv.client() as c:
            t0 = time.time()
            sent = 0
            while sent < args.jobs:
                n = min(batch, args.jobs - sent)
                body = json.dumps({"jobs": [job] * n}).encode()
                r = c.post(
                    API + "/jobs", content=body, headers={"Content-Type": "application/json"}
                )
                r.raise_for_status()
                sent += n
            t_sub = time.time()
            counts: dict[str, int] = {}
            while True:
                counts = srv.info(c)["counts"]
                if sum(counts[s] for s in FINAL) >= args.jobs:
                    break
                if time.time() - t0 > args.timeout:
                    raise TimeoutError(f"not all jobs ended in {args.timeout} s: {counts}")
                time.sleep(0.01)
            t_end = time.time()
        took = t_end - t0
        cpu = {
            k: [a - b for a, b in zip(cpu_seconds(pid), cpu0[k], strict=True)]
            for k, pid in pids.items()
        }
        log(
            f"  submitted in {t_sub - t0:.3f} s, all ended after {took:.2f} s: "
            f"{args.jobs / took:,.0f} jobs/s; {counts['done']} done"
        )
        for k, (own, kids) in cpu.items():
            log(
                f"    CPU {k}: {own:.2f} s own ({100 * own / took:.0f}% of a core), "
                f"{kids:.2f} s in its waited-for children"
            )
        for t in taskers:
            t.stop()
        srv.stop()
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "rate": args.jobs / took,
        "took": took,
        "not_done": args.jobs - counts["done"],
        "server_cpu": cpu["server"][0],
        "tasker_cpu": sum(sum(v) for k, v in cpu.items() if k != "server"),
    }


def main() -> None:
    p = parser("End-to-end jobs/s: N `true` jobs through taskers.")
    p.add_argument("--jobs", type=int, default=2000)
    p.add_argument("--taskers", type=int, default=2)
    p.add_argument("--slots", type=int, default=16, help="slots per tasker")
    p.add_argument(
        "--batch", type=int, default=0, help="jobs per submit request (0: all in one request)"
    )
    p.add_argument("--repeat", type=int, default=3, help="runs; the median is the figure")
    p.add_argument("--timeout", type=float, default=300.0)
    args = p.parse_args()

    tmp = workdir(args.keep)
    log(
        f"{args.jobs} jobs, {args.taskers} taskers x {args.slots} slots, submitted "
        f"{args.batch or args.jobs} per request; {args.repeat} runs"
    )
    runs = []
    spawns: list[Floor] = []
    walls: list[float] = []
    for i in range(args.repeat):  # a floor next to each run: the load moves both
        spawns.append(spawn_floor())
        walls.append(spawn_wall_rate())
        runs.append(one_run(args, tmp / f"run{i}"))
    walls.sort()
    spawns.sort(key=lambda f: f.value)
    floor = spawns[len(spawns) // 2]
    runs.sort(key=lambda r: r["rate"])
    mid = runs[len(runs) // 2]
    spread = "runs " + ", ".join(f"{r['rate']:.0f}" for r in runs)
    note = f"{args.jobs} jobs, {args.taskers}x{args.slots} slots, median of {len(runs)}"
    figures = [
        vs_floor(BENCH, "end-to-end jobs/s", mid["rate"], "jobs/s", floor, Target(">=", 0.6), note),
        info(BENCH, "  slowest run", runs[0]["rate"], "jobs/s", spread),
        info(
            BENCH,
            "spawn /bin/true, wall rate",
            walls[len(walls) // 2],
            "jobs/s",
            "1 thread per core; moves with the load, unlike the CPU floor",
        ),
        info(BENCH, "time first submit -> all ended", mid["took"], "s", note),
        info(BENCH, "jobs not done, worst run", max(r["not_done"] for r in runs), "jobs"),
        info(BENCH, "server CPU per job", 1e6 * mid["server_cpu"] / args.jobs, "us"),
        info(BENCH, "tasker CPU per job (own + jobs)", 1e6 * mid["tasker_cpu"] / args.jobs, "us"),
    ]
    report(figures, args.json)


if __name__ == "__main__":
    main()
