"""Shared plumbing of the benchmarks: servers and taskers in a temp dir, timing, reporting.

Every process a benchmark starts runs in its own session (process group) so that
``cleanup()`` can end exactly those, by id, whatever happened. Figures are printed as a
table and, with ``--json FILE``, written for ``run_all.py`` to gather.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # a benchmark runs as bench/<name>.py: the rig is at tests/
    sys.path.insert(0, str(REPO))

from tests.rigs import server_argv, tasker_argv  # noqa: E402 - after the path above

PY = sys.executable
API = "/api/v1"

_procs: list[subprocess.Popen[bytes]] = []
_dirs: list[Path] = []


# -- numbers -------------------------------------------------------------------------------


def pct(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of ``values``; nan when empty."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(p / 100.0 * len(s) + 0.5)) - 1))
    return s[k]


def ms(seconds: float) -> float:
    return seconds * 1000.0


@dataclass(frozen=True)
class Floor:
    """What the machine does at best for the same kind of work, measured in the same run."""

    value: float
    unit: str
    key: str  # a short name for the table: "starlette", "spawn", "fsync+spawn", "python"
    what: str  # one line: what was measured and how

    def cell(self) -> str:
        return f"{fmt_value(self.value)} {self.unit} {self.key}".strip()


@dataclass(frozen=True)
class Target:
    """A bound on the figure's ratio to its floor (``on="ratio"``) or on the value itself."""

    op: Literal[">=", "<=", "<", "="]
    bound: float
    on: Literal["ratio", "value"] = "ratio"
    unit: str = ""

    def met(self, value: float, ratio: float | None) -> bool:
        x = ratio if self.on == "ratio" else value
        if x is None or x != x:  # no floor, or nan
            return False
        return {
            ">=": x >= self.bound,
            "<=": x <= self.bound,
            "<": x < self.bound,
            "=": x == self.bound,
        }[self.op]

    def text(self) -> str:
        if self.on == "ratio":
            return f"{self.op} {self.bound:g}x"
        return f"{self.op} {self.bound:g} {self.unit}".rstrip()


@dataclass
class Figure:
    """One measured number, its floor and ratio (value / floor), its target and verdict.

    ``target`` is the target as text (``">= 0.7x"`` is on the ratio; ``"<= 0.15 s"`` on
    the value); ``ok`` is None where the figure is informative only. The JSON form
    (``as_json``/``from_json``) is what ``run_all.py`` gathers from every bench.
    """

    bench: str
    name: str
    value: float
    unit: str
    target: str = ""
    ok: bool | None = None
    note: str = ""
    floor: Floor | None = None
    ratio: float | None = None

    def verdict(self) -> str:
        return "-" if self.ok is None else "PASS" if self.ok else "MISS"

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Figure:
        """Tolerant of figures written without floor and ratio (older or outside benches)."""
        fl = d.get("floor")
        floor = Floor(**fl) if isinstance(fl, dict) else None
        ratio = d.get("ratio")
        return cls(
            bench=str(d.get("bench", "?")),
            name=str(d.get("name", "?")),
            value=float(d["value"]) if d.get("value") is not None else float("nan"),
            unit=str(d.get("unit", "")),
            target=str(d.get("target") or ""),
            ok=d.get("ok"),
            note=str(d.get("note", "")),
            floor=floor,
            ratio=float(ratio) if ratio is not None else None,
        )


def vs_floor(
    bench: str,
    name: str,
    value: float,
    unit: str,
    floor: Floor,
    target: Target | None = None,
    note: str = "",
) -> Figure:
    """A figure with its floor, the ratio value / floor, and (if given) the target's verdict."""
    ratio = value / floor.value if floor.value else float("nan")
    if target is None:
        return Figure(bench, name, value, unit, "", None, note, floor, ratio)
    return Figure(
        bench, name, value, unit, target.text(), target.met(value, ratio), note, floor, ratio
    )


def at_least(
    bench: str, name: str, value: float, unit: str, floor: float, note: str = ""
) -> Figure:
    return Figure(bench, name, value, unit, f">= {floor:g}", value >= floor, note)


def below(bench: str, name: str, value: float, unit: str, ceiling: float, note: str = "") -> Figure:
    return Figure(bench, name, value, unit, f"< {ceiling:g}", value < ceiling, note)


def at_most(
    bench: str, name: str, value: float, unit: str, ceiling: float, note: str = ""
) -> Figure:
    return Figure(bench, name, value, unit, f"<= {ceiling:g}", value <= ceiling, note)


def info(bench: str, name: str, value: float, unit: str, note: str = "") -> Figure:
    return Figure(bench, name, value, unit, "", None, note)


def fmt_value(v: float) -> str:
    if v != v:  # nan
        return "n/a"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.3g}"


def table(figures: Sequence[Figure], with_bench: bool = False) -> str:
    """figure | value | floor | ratio | target | ok | note, then what each floor is."""
    head = (["bench"] if with_bench else []) + [
        "figure",
        "value",
        "floor",
        "ratio",
        "target",
        "ok",
        "note",
    ]
    rows = [
        ([f.bench] if with_bench else [])
        + [
            f.name,
            f"{fmt_value(f.value)} {f.unit}".rstrip(),
            f.floor.cell() if f.floor else "-",
            f"{f.ratio:.2f}x" if f.ratio is not None and f.ratio == f.ratio else "-",
            f.target or "-",
            f.verdict(),
            f.note,
        ]
        for f in figures
    ]
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    first = 2 if with_bench else 1
    numeric = {first, first + 1, first + 2}  # value, floor, ratio align right

    def line(r: Sequence[str]) -> str:
        cells = [
            str(c).rjust(w) if i in numeric else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    out = [line(head), line(["-" * w for w in widths]), *map(line, rows)]
    floors = {f.floor.key: f.floor for f in figures if f.floor}
    if floors:
        out += ["", "floors (measured in the same run; ratio = value / floor):"]
        out += [f"  {k}: {fl.what}" for k, fl in floors.items()]
    return "\n".join(out)


def report(figures: Sequence[Figure], json_path: str | None) -> None:
    print()
    print(table(figures))
    if json_path:
        Path(json_path).write_text(json.dumps([f.as_json() for f in figures], indent=1))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- arguments -----------------------------------------------------------------------------


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON to FILE")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, swd) at the end")
    return p


# -- processes -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def workdir(keep: bool = False) -> Path:
    """A fresh temp dir, removed at exit unless ``keep``."""
    d = Path(tempfile.mkdtemp(prefix="crq-bench-"))
    if not keep:
        _dirs.append(d)
    else:
        print(f"(keeping {d})")
    return d


def spawn(cmd: list[str], logfile: Path) -> subprocess.Popen[bytes]:
    with open(logfile, "ab") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    _procs.append(proc)
    return proc


def end_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    """Signal the process group this benchmark created for ``proc`` (its pid is the pgid)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def kill_job_processes(root: Path) -> int:
    """Kill leftover job processes whose argv names a path under ``root`` (our temp dir).

    Tasker jobs run in their own sessions (they survive the tasker), so they are found
    here by what their wrapper's argv names, and ended by pid.
    """
    mark = os.fsencode(str(root))
    killed = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read()
        except OSError:
            continue
        if mark in argv:
            pid = int(entry)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if os.getpgid(pid) == pid:  # a job wrapper leads its own session: take the job too
                    os.killpg(pid, signal.SIGKILL)
                else:
                    os.kill(pid, signal.SIGKILL)
                killed += 1
    return killed


def cleanup() -> None:
    for proc in _procs:
        if proc.poll() is None:
            end_group(proc, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        else:
            end_group(proc, signal.SIGKILL)  # a forked checkpoint child may still run
    _procs.clear()
    for d in _dirs:
        kill_job_processes(d)
        shutil.rmtree(d, ignore_errors=True)
    _dirs.clear()


atexit.register(cleanup)


def _on_signal(signum: int, _frame: Any) -> None:
    cleanup()
    sys.exit(128 + signum)


signal.signal(signal.SIGTERM, _on_signal)


def rss_kb(pid: int) -> int:
    """VmRSS of ``pid`` in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(own, waited-for children's) CPU seconds, user + system, of ``pid``."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    own = (int(fields[11]) + int(fields[12])) / tick
    kids = (int(fields[13]) + int(fields[14])) / tick
    return own, kids


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


# -- the server ----------------------------------------------------------------------------


class ServerDied(RuntimeError):
    pass


@dataclass
class Server:
    """One ``python -m crq.server`` in the foreground, on a free loopback port."""

    swd: Path
    port: int = field(default_factory=free_port)
    extra: list[str] = field(default_factory=list)
    queue: str = "bench"
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0  # time.time() just before the process was spawned
    token: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def log_path(self) -> Path:
        return self.swd / "logs" / "server.log"

    @property
    def out_path(self) -> Path:
        return self.swd.parent / f"{self.swd.name}.stdout"

    def start(self) -> Server:
        """Spawn the server (does not wait: see ``wait_healthz``)."""
        cmd = server_argv(self.queue, self.swd, self.port, *self.extra, fsync="always")
        self.started_at = time.time()
        self.proc = spawn(cmd, self.out_path)
        return self

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            tail = (
                self.out_path.read_text(errors="replace")[-2000:] if self.out_path.exists() else ""
            )
            raise ServerDied(f"server exited with {self.proc.returncode}: {tail.strip()}")

    def _read_token(self, deadline: float) -> None:
        path = self.swd / "security" / "admin.token"
        while not self.token:
            with contextlib.suppress(OSError):
                self.token = path.read_text().strip()
            if self.token:
                return
            self.check_alive()
            if time.time() > deadline:
                raise TimeoutError(f"no {path}")
            time.sleep(0.005)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def _poll(self, ready: Callable[[], bool], deadline: float, poll: float, what: str) -> float:
        """Until ``ready()`` (an HTTP error counts as not yet); the time.time() it first was."""
        while True:
            self.check_alive()
            try:
                if ready():
                    return time.time()
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise TimeoutError(f"server never {what}")
            time.sleep(poll)

    def wait_healthz(self, timeout: float = 120.0, poll: float = 0.002) -> float:
        """Wait until /healthz answers; returns the time.time() it first did."""
        deadline = time.time() + timeout
        self._read_token(deadline)
        with httpx.Client(base_url=self.url, timeout=2.0, trust_env=False) as c:
            ok = lambda: c.get("/healthz").status_code == 200  # noqa: E731
            return self._poll(ok, deadline, poll, "answered /healthz")

    def info(self, client: httpx.Client | None = None) -> dict[str, Any]:
        if client is None:
            with self.client() as c:
                return self.info(c)
        r = client.get(API + "/server")
        r.raise_for_status()
        data: dict[str, Any] = r.json()
        return data

    def wait_normal(self, timeout: float = 300.0, poll: float = 0.002) -> float:
        """Wait until GET /api/v1/server says mode normal; the time.time() it first did."""
        deadline = time.time() + timeout
        self._read_token(deadline)
        with self.client(timeout=5.0) as c:
            normal = lambda: self.info(c).get("mode") == "normal"  # noqa: E731
            return self._poll(normal, deadline, poll, "reached mode normal")

    def client(self, timeout: float = 60.0) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers=self.headers(), timeout=timeout, trust_env=False
        )

    def stop(self, timeout: float = 300.0) -> float:
        """Clean stop (snapshot written); returns seconds from the request to the exit."""
        assert self.proc is not None
        t0 = time.time()
        with self.client(timeout=30.0) as c:
            c.post(API + "/server/stop", json={"freeze": False}).raise_for_status()
        self.proc.wait(timeout=timeout)
        if self.proc.returncode != 0:
            raise ServerDied(f"server stopped with exit code {self.proc.returncode}")
        end_group(self.proc)
        return time.time() - t0

    def kill9(self) -> None:
        """kill -9 of the server process only (as an OOM kill or a crash would do)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        end_group(self.proc)  # a checkpoint child, if one was writing, goes too

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def checkpoints_in_log(text: str) -> list[tuple[float, float]]:
    """(end unix time, duration s) of each ``checkpoint … written in X s`` log line."""
    out = []
    pat = re.compile(
        r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) .*checkpoint \S+ written in ([\d.]+) s"
    )
    for line in text.splitlines():
        m = pat.match(line)
        if m:
            t = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1e3
            out.append((t, float(m.group(3))))
    return out


# -- taskers -------------------------------------------------------------------------------


@dataclass
class Tasker:
    swd: Path
    name: str
    slots: int
    state_dir: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Tasker:
        cmd = tasker_argv(
            self.name, self.state_dir, "--swd", str(self.swd), "--slots", str(self.slots)
        )
        self.proc = spawn(cmd, self.state_dir.parent / f"tasker-{self.name}.log")
        return self

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            end_group(self.proc)
            self.proc.wait(timeout=10)


def wait_taskers(srv: Server, names: Sequence[str], timeout: float = 30.0) -> None:
    """Until every named tasker is registered and has a live connection."""
    deadline = time.time() + timeout
    with srv.client() as c:
        while True:
            r = c.get(API + "/taskers")
            if r.status_code == 200:
                live = {t["name"] for t in r.json()["taskers"] if t["state"] in ("ready", "full")}
                if set(names) <= live:
                    return
            if time.time() > deadline:
                raise TimeoutError(f"taskers {list(names)} did not register")
            time.sleep(0.02)


# -- workloads -----------------------------------------------------------------------------

ENV_30 = {
    "HOME": "/home/alice",
    "USER": "alice",
    "LOGNAME": "alice",
    "SHELL": "/bin/bash",
    "PATH": "/tools/sim/2024.1/bin:/usr/local/bin:/usr/bin:/bin",
    "LANG": "en_US.UTF-8",
    "LC_ALL": "en_US.UTF-8",
    "TERM": "xterm-256color",
    "TZ": "Europe/Berlin",
    "TMPDIR": "/tmp",
    "PROJECT": "proj",
    "PROJ_ROOT": "/work/proj",
    "SIM_HOME": "/tools/sim/2024.1",
    "SIM_LICENSE_FILE": "27000@licsrv1:27000@licsrv2",
    "LM_LICENSE_FILE": "27000@licsrv1",
    "CC": "gcc",
    "CXX": "g++",
    "PYTHONPATH": "/work/proj/lib/python",
    "EDITOR": "vim",
    "LD_LIBRARY_PATH": "/tools/sim/2024.1/lib:/usr/local/lib",
    "OMP_NUM_THREADS": "1",
    "MAKEFLAGS": "-j1",
    "SIM_MODE": "regression",
    "SIM_SEED_BASE": "1000",
    "SIM_WORKDIR": "/work/proj/sim",
    "SIM_OUT": "/work/proj/out",
    "DISPLAY": ":0",
    "HOSTTYPE": "x86_64",
    "GIT_DIR": "/work/proj/.git",
    "SIM_OPTS": "-q -nolog -timescale 1ns",
}


def sim_batch(first: int, n: int) -> bytes:
    """A batch of ``n`` jobs like a regression run: distinct seeds, one shared env."""
    jobs = [
        {"command": ["sim", "-seed", str(i)], "cwd": "/work/proj"} for i in range(first, first + n)
    ]
    return json.dumps({"jobs": jobs, "env": ENV_30}, separators=(",", ":")).encode()


def fill(srv: Server, total: int, batch: int = 10_000, start: int = 0) -> tuple[float, float]:
    """Submit ``total`` sim jobs in batches; returns (seconds, worst batch latency s)."""
    t0 = time.time()
    worst = 0.0
    with srv.client(timeout=600.0) as c:
        done = 0
        while done < total:
            n = min(batch, total - done)
            body = sim_batch(start + done, n)
            t1 = time.time()
            r = c.post(API + "/jobs", content=body, headers={"Content-Type": "application/json"})
            if r.status_code != 201:
                raise RuntimeError(f"submit failed: {r.status_code} {r.text[:300]}")
            worst = max(worst, time.time() - t1)
            done += n
    return time.time() - t0, worst


@contextlib.contextmanager
def running(*servers: Server) -> Iterator[None]:
    """Kill the given servers (if still running) when the block ends, even on error."""
    try:
        yield
    finally:
        for s in servers:
            if s.proc is not None and s.proc.poll() is None:
                end_group(s.proc)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    s.proc.wait(timeout=10)
