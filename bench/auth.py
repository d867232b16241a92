"""What authentication costs the hot path: durable single submits/s by how the caller is known.

One server, one run, four loads of single durable submits (16 connections, wrk): the admin
token, a personal token (``POST /api/v1/tokens``), a MUNGE credential per request (a real
``munged`` with a generated key, started here; every request carries a fresh credential, as a
one-shot ``crq`` process would send, read by wrk's Lua from a file made beforehand), and the
admin token again. The reference is the mean of the two admin-token runs; the target
(issue 13) is each other way within 15% of it. munged's own CPU counts: it runs on the same
2 cores as the server, as it would on a server host.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from benchlib import (
    API,
    Figure,
    Floor,
    Server,
    Target,
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
from loadgen import LUA, run_wrk

from crq import munge
from tests.munged import launch_munged

BENCH = "auth"
ONE_JOB = {"command": ["true"], "cwd": "/tmp"}

MUNGE_LUA = """
local f = assert(io.open("%(body)s", "rb"))
local body = f:read("*a")
f:close()
local creds = {}
for line in io.lines("%(creds)s") do creds[#creds + 1] = line end
local i = 0
request = function()
  i = i + 1
  local c = creds[i] or "exhausted"
  return wrk.format("POST", "/api/v1/jobs",
    {["Content-Type"] = "application/json", ["Authorization"] = "Munge " .. c}, body)
end
%(done)s
"""


def done_function() -> str:
    """The ``done`` of loadgen's Lua (its WRKJSON summary line), shared, not copied."""
    return LUA[LUA.index("function done") :] % {}


def run_munge_wrk(
    url: str, body: bytes, creds: list[str], conns: int, seconds: float, tmp: Path
) -> dict[str, Any]:
    """wrk with one fresh credential per request (a credential decodes once: replays fail)."""
    body_path = tmp / "munge-body.json"
    body_path.write_bytes(body)
    cred_path = tmp / f"creds-{time.monotonic_ns()}.txt"
    cred_path.write_text("\n".join(creds) + "\n")
    script = tmp / "munge.lua"
    script.write_text(MUNGE_LUA % {"body": body_path, "creds": cred_path, "done": done_function()})
    cmd = ["wrk", "-t1", f"-c{conns}", f"-d{seconds:g}s", "--timeout", "10s", "-s", str(script)]
    out = subprocess.run(
        [*cmd, url + API + "/jobs"], capture_output=True, text=True, timeout=seconds + 60
    )
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary:\n{out.stdout}\n{out.stderr}")
    r = json.loads(line[len("WRKJSON ") :])
    return {
        "requests": r["requests"],
        "ok": r["requests"] - r["status"],
        "errors": r["status"] + r["connect"] + r["read"] + r["write"] + r["timeout"],
        "seconds": r["duration_us"] / 1e6,
        "p50": r["p50"] / 1e6,
        "p99": r["p99"] / 1e6,
        "unused": max(0, len(creds) - r["requests"]),
    }


def main() -> None:
    p = parser("Durable single submits/s with the admin token, a personal token and MUNGE.")
    p.add_argument("--seconds", type=float, default=5.0, help="length of each load run")
    p.add_argument("--conns", type=int, default=16, help="concurrent clients")
    args = p.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("bench/auth.py needs wrk (apt-get install -y wrk)")

    tmp = workdir(args.keep)
    daemon = launch_munged(tmp / "munge")
    munged, sock = daemon.proc, daemon.socket
    figures: list[Figure] = []
    try:
        swd = tmp / "swd"
        swd.mkdir(parents=True, exist_ok=True)
        # the bench runs as root: MUNGE says uid 0, whose jobs are refused by default
        (swd / "config.toml").write_text(
            f"munge_socket = {json.dumps(sock)}\nallow_root_jobs = true\n"
        )
        srv = Server(swd)
        single = json.dumps(ONE_JOB).encode()
        with running(srv):
            srv.start()
            srv.wait_normal()
            with srv.client() as c:
                r = c.post(API + "/tokens", json={"user": "benchuser", "note": "bench/auth.py"})
                r.raise_for_status()
                personal = str(r.json()["token"])

            def timed(what: str, load: Any) -> dict[str, Any]:
                c0 = cpu_seconds(srv.pid)[0]
                m0 = cpu_seconds(munged.pid)[0]
                res: dict[str, Any] = load()
                res["cpu_us"] = 1e6 * (cpu_seconds(srv.pid)[0] - c0) / max(1, res["requests"])
                res["munged_us"] = 1e6 * (cpu_seconds(munged.pid)[0] - m0) / max(1, res["requests"])
                rate = res["ok"] / res["seconds"]
                log(
                    f"  {what}: {res['ok']} acknowledged in {res['seconds']:.2f} s = {rate:,.0f}/s,"
                    f" p50 {ms(res['p50']):.2f} ms, server CPU {res['cpu_us']:.0f} us/req,"
                    f" munged {res['munged_us']:.0f} us/req, errors {res['errors']}"
                )
                res["rate"] = rate
                return res

            def token_load(tok: str) -> Any:
                return lambda: run_wrk(srv.url, tok, single, args.conns, args.seconds, tmp, 1)

            run_wrk(srv.url, srv.token, single, args.conns, 1.0, tmp, 1)  # warm-up
            log(f"single submits, {args.conns} connections, {args.seconds:g} s each")
            admin1 = timed("admin token", token_load(srv.token))
            tok = timed("personal token", token_load(personal))
            t0 = time.perf_counter()
            n = int(max(admin1["rate"], 1000) * args.seconds * 1.5) + 1000
            creds = [munge.encode(socket=sock) for _ in range(n)]
            log(f"  {n} MUNGE credentials made in {time.perf_counter() - t0:.1f} s")
            mun = timed(
                "MUNGE",
                lambda: run_munge_wrk(srv.url, single, creds, args.conns, args.seconds, tmp),
            )
            if mun["unused"] == 0:
                log("  (the credentials ran out: the MUNGE figure is a lower bound)")
            admin2 = timed("admin token again", token_load(srv.token))
        ref = (admin1["rate"] + admin2["rate"]) / 2
        floor = Floor(ref, "req/s", "admin token", "mean of the two admin-token runs, same server")
        note = f"{args.conns} conns, wrk"
        figures += [
            vs_floor(BENCH, "single submits/s, admin token", ref, "req/s", floor, None, note),
            vs_floor(
                BENCH,
                "single submits/s, personal token",
                tok["rate"],
                "req/s",
                floor,
                Target(">=", 0.85),
                note,
            ),
            vs_floor(
                BENCH,
                "single submits/s, MUNGE per request",
                mun["rate"],
                "req/s",
                floor,
                Target(">=", 0.85),
                note + f"; munged CPU {mun['munged_us']:.0f} us/req",
            ),
            info(BENCH, "server CPU per submit, admin token", admin1["cpu_us"], "us"),
            info(BENCH, "server CPU per submit, personal token", tok["cpu_us"], "us"),
            info(BENCH, "server CPU per submit, MUNGE", mun["cpu_us"], "us"),
        ]
    finally:
        daemon.stop()
    report(figures, args.json)


if __name__ == "__main__":
    main()
