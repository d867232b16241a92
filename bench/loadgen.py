"""The HTTP load generators: ``wrk`` with a Lua script, or a slower asyncio + httpx loop.

Shared by the benchmarks and the Starlette floor, so that the floor is loaded by exactly
the command that loads the server. Latencies are in seconds; ``ok`` counts 2xx answers.
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
from benchlib import API, pct

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


def pick_tool(python_client: bool = False) -> str:
    """``wrk`` when installed (and not overridden), else ``python``."""
    return "wrk" if shutil.which("wrk") and not python_client else "python"


def run_wrk(
    url: str, token: str, body: bytes, conns: int, seconds: float, tmp: Path, threads: int
) -> dict[str, Any]:
    """One wrk run of POST ``url``/api/v1/jobs with ``body``."""
    body_path = tmp / f"body-{conns}-{len(body)}.json"
    body_path.write_bytes(body)
    script = tmp / f"submit-{abs(hash((url, token)))}.lua"
    script.write_text(LUA % {"token": token, "body": body_path})
    cmd = [
        "wrk",
        f"-t{threads}",
        f"-c{conns}",
        f"-d{seconds:g}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        url + API + "/jobs",
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


def run_python(url: str, token: str, body: bytes, conns: int, seconds: float) -> dict[str, Any]:
    """The fallback: ``conns`` closed-loop httpx clients on one asyncio loop."""

    async def main() -> dict[str, Any]:
        lat: list[float] = []
        counts = {"ok": 0, "bad": 0}
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        one = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        clients = [  # one client per connection: a shared pool costs more than it saves
            httpx.AsyncClient(
                base_url=url, headers=headers, limits=one, timeout=10.0, trust_env=False
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
                        ok = 200 <= r.status_code < 300
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


def load_url(
    url: str,
    token: str,
    body: bytes,
    conns: int,
    seconds: float,
    tmp: Path,
    tool: str,
    threads: int = 1,
) -> dict[str, Any]:
    """POST ``body`` to ``url``/api/v1/jobs over ``conns`` connections for ``seconds``."""
    if tool == "wrk":
        return run_wrk(url, token, body, conns, seconds, tmp, threads)
    return run_python(url, token, body, conns, seconds)
