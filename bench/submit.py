"""Durable submit rate: one job per request (16 clients) and batches of 1,000 jobs.

The load comes from ``wrk`` (Debian package) with a Lua script; without wrk, from an
asyncio + httpx generator that is itself the bottleneck (about 1,300 requests/s here).
After the load the server is killed with -9 and restarted, and every acknowledged submit
must still be there: the figure is a durable one. Its floor is a trivial Starlette route
under the same uvicorn settings, loaded by the same command just before and just after
(``floors.py``); the floor is the mean of the two.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchlib import (
    Figure,
    Server,
    Target,
    at_least,
    cpu_seconds,
    info,
    log,
    ms,
    parser,
    report,
    running,
    vs_floor,
    workdir,
)
from floors import StarletteFloor
from loadgen import load_url, pick_tool

BENCH = "submit"
ONE_JOB = {"command": ["true"], "cwd": "/tmp"}


def load(
    srv: Server, body: bytes, conns: int, seconds: float, tmp: Path, tool: str, threads: int
) -> dict[str, Any]:
    """Load ``srv`` (its admin token) with ``loadgen.load_url``; see there."""
    return load_url(srv.url, srv.token, body, conns, seconds, tmp, tool, threads)


def main() -> None:
    p = parser("Durable submits/s: single jobs (16 clients) and batches of 1,000 jobs.")
    p.add_argument("--seconds", type=float, default=10.0, help="length of each load run")
    p.add_argument("--conns", type=int, default=16, help="concurrent clients, single submits")
    p.add_argument("--batch", type=int, default=1000, help="jobs per request in the batch run")
    p.add_argument("--batch-conns", type=int, default=4, help="concurrent clients, batch run")
    p.add_argument("--threads", type=int, default=1, help="wrk threads (the server has 2 cores)")
    p.add_argument("--python-client", action="store_true", help="use the Python load generator")
    p.add_argument("--no-verify", action="store_true", help="skip the kill -9 + restart check")
    args = p.parse_args()

    tool = pick_tool(args.python_client)
    if tool == "python" and not args.python_client:
        log("wrk not found (apt-get install -y wrk): falling back to the Python load generator")
    tmp = workdir(args.keep)
    srv = Server(tmp / "swd")
    figures: list[Figure] = []
    single = json.dumps(ONE_JOB).encode()
    trivial = StarletteFloor(tmp, args.conns, tool, args.threads)
    with trivial, running(srv):
        trivial.measure(single, args.seconds)
        srv.start()
        srv.wait_normal()
        batch = json.dumps({"jobs": [ONE_JOB] * args.batch}).encode()

        load(srv, single, args.conns, 1.0, tmp, tool, args.threads)  # warm-up
        log(f"single submits: {args.conns} clients, {args.seconds:g} s, {tool}")
        c0 = cpu_seconds(srv.pid)[0]
        one = load(srv, single, args.conns, args.seconds, tmp, tool, args.threads)
        cpu_one = cpu_seconds(srv.pid)[0] - c0
        rate = one["ok"] / one["seconds"]
        trivial.measure(single, args.seconds)  # again after: the floor is the mean of both
        floor = trivial.floor()
        log(
            f"  {one['ok']} acknowledged in {one['seconds']:.2f} s = {rate:,.0f}/s, "
            f"p50 {ms(one['p50']):.2f} ms, p99 {ms(one['p99']):.2f} ms, "
            f"max {ms(one['max']):.1f} ms, errors {one['errors']}"
        )
        log(
            f"  server CPU {1e6 * cpu_one / max(1, one['requests']):.0f} us/request, "
            f"{100 * cpu_one / one['seconds']:.0f}% of a core"
        )

        log(f"batch submits: {args.batch} jobs/request, {args.batch_conns} clients")
        many = load(srv, batch, args.batch_conns, args.seconds, tmp, tool, args.threads)
        jobs_rate = many["ok"] * args.batch / many["seconds"]
        log(
            f"  {many['ok']} batches in {many['seconds']:.2f} s = {jobs_rate:,.0f} jobs/s, "
            f"p50 {ms(many['p50']):.1f} ms, p99 {ms(many['p99']):.1f} ms per batch, "
            f"errors {many['errors']}"
        )

        note = f"{args.conns} conns, {tool}" + (" (client-bound)" if tool == "python" else "")
        figures += [
            vs_floor(
                BENCH,
                "durable single submits/s",
                rate,
                "req/s",
                floor,
                Target(">=", 0.7),
                note,
            ),
            info(BENCH, "single submit latency p50", ms(one["p50"]), "ms", note),
            info(BENCH, "single submit latency p99", ms(one["p99"]), "ms", note),
            info(
                BENCH,
                "server CPU per single submit",
                1e6 * cpu_one / max(1, one["requests"]),
                "us",
                f"{100 * cpu_one / one['seconds']:.0f}% of a core",
            ),
            at_least(
                BENCH,
                f"durable batch submits ({args.batch}/req)",
                jobs_rate,
                "jobs/s",
                20000,
                f"{args.batch_conns} conns, {tool}",
            ),
            info(BENCH, "batch latency p99", ms(many["p99"]), "ms", f"{args.batch} jobs/req"),
        ]

        if not args.no_verify:
            # every 201 was durable: it survives a kill -9 (warm-up requests count too)
            before = srv.info()["counts"]["queued"]
            acked = one["ok"] + many["ok"] * args.batch
            srv.kill9()
            srv.start()
            srv.wait_normal()
            after = srv.info()["counts"]["queued"]
            ok = after >= acked and after == before
            log(
                f"kill -9 + restart: {after} queued after, {before} before, "
                f"{acked} acknowledged in the timed runs: {'OK' if ok else 'LOST JOBS'}"
            )
            figures.append(
                Figure(
                    BENCH,
                    "acked submits kept after kill -9",
                    after,
                    "jobs",
                    f">= {before}",
                    ok,
                    "durability check",
                )
            )
    report(figures, args.json)


if __name__ == "__main__":
    main()
