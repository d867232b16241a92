"""Snakemake through crq vs locally: the same fan-out/fan-in DAG of 1-second jobs
(tests/ecosystem/dag.py) with ``snakemake --executor crq --jobs N`` on a real server and tasker
(N slots), and with ``snakemake --cores N`` here, both in this run. The issue's target: crq's wall
time within 2x of local."""

from __future__ import annotations

import os
import time
from pathlib import Path

from benchlib import (
    Floor,
    Server,
    Target,
    Tasker,
    cleanup,
    log,
    parser,
    report,
    vs_floor,
    wait_taskers,
    workdir,
)

from tests.ecosystem import dag

BENCH = "snakemake"


def run(work: Path, *args: str, env: dict[str, str] | None = None) -> float:
    """Wall seconds of one snakemake run in ``work``; fails loudly if it did not succeed."""
    t0 = time.monotonic()
    p = dag.snakemake(work, *args, env=env)
    rc = p.wait()
    took = time.monotonic() - t0
    if rc != 0:
        tail = (work / "snakemake.log").read_text(errors="replace")[-3000:]
        raise SystemExit(f"snakemake {' '.join(args)} failed ({rc}):\n{tail}")
    return took


def main() -> None:
    ap = parser(__doc__ or "")
    ap.add_argument("--width", type=int, default=49, help="fan-out width (jobs: 2*width+2)")
    ap.add_argument("--jobs", type=int, default=20, help="N of --jobs / --cores / tasker slots")
    ap.add_argument("--sleep", type=float, default=1.0, help="seconds each job sleeps")
    args = ap.parse_args()
    root = workdir(args.keep)
    try:
        local = root / "local"
        jobs = dag.write(local, args.width, args.sleep)
        log(f"local: {jobs} jobs, --cores {args.jobs}")
        local_s = run(local, "--cores", str(args.jobs))

        srv = Server(root / "q.swd").start()
        srv.wait_normal()
        Tasker(srv.swd, "tk1", args.jobs, root / "tk1.state").start()
        wait_taskers(srv, ["tk1"])
        remote = root / "crq"
        dag.write(remote, args.width, args.sleep)
        env = dict(os.environ, CRQ_SERVER=srv.url, CRQ_TOKEN=srv.token)
        log(f"crq: {jobs} jobs, --executor crq --jobs {args.jobs}")
        crq_s = run(remote, "--executor", "crq", "--jobs", str(args.jobs), env=env)
        load = Path("/proc/loadavg").read_text().split()[:3]
        floor = Floor(local_s, "s", "local", f"snakemake --cores {args.jobs}, same DAG")
        fig = vs_floor(
            BENCH, f"wall time, {jobs} jobs of {args.sleep:g} s", crq_s, "s", floor,
            Target("<=", 2.0), note=f"loadavg {' '.join(load)}",
        )  # fmt: skip
        report([fig], args.json)
    finally:
        cleanup()


if __name__ == "__main__":
    main()
