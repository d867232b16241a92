"""Durable submit rate: one job per request (16 clients) and batches of 1,000 jobs.

The load comes from ``wrk`` (Debian package) with a Lua script; without wrk, from an
asyncio + httpx generator that is itself the bottleneck (about 1,300 requests/s here).
After the load the server is killed with -9 and restarted, and every acknowledged submit
must still be there: the figure is a durable one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
from benchlib import (
    API,
    Figure,
    Server,
    at_least,
    cpu_seconds,
    info,
    log,
    ms,
    parser,
    pct,
    report,
    running,
    workdir,
)

BENCH = "submit"
ONE_JOB = {"command": ["true"], "cwd": "/tmp"}

LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %(token)s"
local f = assert(io.open("%(body)s", "rb"))
wrk.body = f:read("*a")
f:close()

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKJSON {\\"requests\\":%%d,\\"duration_us\\":%%d,\\"connect\\":%%d,\\"read\\":%%d," ..
    "\\"write\\":%%d,\\"status\\":%%d,\\"timeout\\":%%d,\\"p50\\":%%d,\\"p90\\":%%d," ..
    "\\"p99\\":%%d,\\"max\\":%%d,\\"mean\\":%%f}\\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    latency.mean))
end
"""


def run_wrk(
    srv: Server, body: bytes, conns: int, seconds: float, tmp: Path, threads: int
) -> dict[str, Any]:
    """One wrk run; latencies in seconds, ``ok`` = requests answered 2xx."""
    body_path = tmp / f"body-{conns}-{len(body)}.json"
    body_path.write_bytes(body)
    script = tmp / "submit.lua"
    script.write_text(LUA % {"token": srv.token, "body": body_path})
    cmd = [
        "wrk",
        f"-t{threads}",
        f"-c{conns}",
        f"-d{seconds:g}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        srv.url + API + "/jobs",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=True)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary:\n{out.stdout}\n{out.stderr}")
    r = json.loads(line[len("WRKJSON ") :])
    bad = r["status"] + r["connect"] + r["read"] + r["write"] + r["timeout"]
    return {
        "requests": r["requests"],
        "ok": r["requests"] - r["status"],
        "errors": bad,
        "seconds": r["duration_us"] / 1e6,
        "p50": r["p50"] / 1e6,
        "p90": r["p90"] / 1e6,
        "p99": r["p99"] / 1e6,
        "max": r["max"] / 1e6,
        "tool": "wrk",
    }


def run_python(srv: Server, body: bytes, conns: int, seconds: float) -> dict[str, Any]:
    """The fallback: ``conns`` closed-loop httpx clients on one asyncio loop."""

    async def main() -> dict[str, Any]:
        lat: list[float] = []
        counts = {"ok": 0, "bad": 0}
        headers = {**srv.headers(), "Content-Type": "application/json"}
        one = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        clients = [  # one client per connection: a shared pool costs more than it saves
            httpx.AsyncClient(
                base_url=srv.url, headers=headers, limits=one, timeout=10.0, trust_env=False
            )
            for _ in range(conns)
        ]
        async with contextlib.AsyncExitStack() as stack:
            for c in clients:
                await stack.enter_async_context(c)
            end = time.perf_counter() + seconds

            async def worker(c: httpx.AsyncClient) -> None:
                while time.perf_counter() < end:
                    t0 = time.perf_counter()
                    try:
                        r = await c.post(API + "/jobs", content=body)
                        ok = r.status_code == 201
                    except httpx.HTTPError:
                        ok = False
                    lat.append(time.perf_counter() - t0)
                    counts["ok" if ok else "bad"] += 1

            t0 = time.perf_counter()
            await asyncio.gather(*(worker(c) for c in clients))
            took = time.perf_counter() - t0
        return {
            "requests": len(lat),
            "ok": counts["ok"],
            "errors": counts["bad"],
            "seconds": took,
            "p50": pct(lat, 50),
            "p90": pct(lat, 90),
            "p99": pct(lat, 99),
            "max": max(lat),
            "tool": "python (asyncio + httpx)",
        }

    return asyncio.run(main())


def load(
    srv: Server, body: bytes, conns: int, seconds: float, tmp: Path, tool: str, threads: int
) -> dict[str, Any]:
    if tool == "wrk":
        return run_wrk(srv, body, conns, seconds, tmp, threads)
    return run_python(srv, body, conns, seconds)


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

    tool = "wrk" if shutil.which("wrk") and not args.python_client else "python"
    if tool == "python" and not args.python_client:
        log("wrk not found (apt-get install -y wrk): falling back to the Python load generator")
    tmp = workdir(args.keep)
    srv = Server(tmp / "swd")
    figures: list[Figure] = []
    with running(srv):
        srv.start()
        srv.wait_normal()
        single = json.dumps(ONE_JOB).encode()
        batch = json.dumps({"jobs": [ONE_JOB] * args.batch}).encode()

        load(srv, single, args.conns, 1.0, tmp, tool, args.threads)  # warm-up
        log(f"single submits: {args.conns} clients, {args.seconds:g} s, {tool}")
        c0 = cpu_seconds(srv.pid)[0]
        one = load(srv, single, args.conns, args.seconds, tmp, tool, args.threads)
        cpu_one = cpu_seconds(srv.pid)[0] - c0
        rate = one["ok"] / one["seconds"]
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
            at_least(BENCH, "durable single submits/s", rate, "req/s", 3000, note),
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
