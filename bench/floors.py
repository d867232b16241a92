"""The floors: what this machine does at best for each benchmark's kind of work.

A benchmark measures its floor in the same run as its figure and prints the ratio, so
that a busy or a slow machine moves both. Each function returns a ``benchlib.Floor``:

* ``StarletteFloor``: a trivial Starlette POST route (``floorapp.py``) under the server's
  uvicorn settings, loaded by the submit bench's own load command: requests/s.
* ``spawn_floor``: ``posix_spawn`` of /bin/true + ``waitpid``; the CPU of both sides
  (getrusage) per spawn, and so jobs/s on ``os.cpu_count()`` cores.
* ``fsync_floor``: append a 64-512 B record + ``fsync`` in the bench's own dir: p50.
* ``dispatch_floor``: one such fsync, then one ``posix_spawn`` of ``/bin/echo`` writing a
  line to a file, until the line is seen (polled as ``latency.py`` polls a job's log): p50.
* ``python_floor``: wall time of ``python -c pass`` (this interpreter): p50.
"""

from __future__ import annotations

import os
import random
import resource
import sys
import threading
import time
from pathlib import Path

import httpx
from benchlib import Floor, end_group, free_port, log, ms, pct, spawn
from loadgen import load_url

HERE = Path(__file__).resolve().parent
TRUE = "/bin/true"
ECHO = "/bin/echo"


def _rusage_cpu() -> float:
    """CPU seconds (user + system) of this process and its waited-for children."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class StarletteFloor:
    """The trivial route as a running process, loaded by ``loadgen.load_url``: measure it
    before and after the bench's own load, and the floor is the mean of the two."""

    def __init__(self, tmp: Path, conns: int, tool: str, threads: int = 1) -> None:
        self.tmp, self.conns, self.tool, self.threads = tmp, conns, tool, threads
        self.url = f"http://127.0.0.1:{free_port()}"
        self.rates: list[float] = []
        self.seconds = 0.0
        port = self.url.rsplit(":", 1)[1]
        self.proc = spawn([sys.executable, str(HERE / "floorapp.py"), port], tmp / "floorapp.log")

    def __enter__(self) -> StarletteFloor:
        deadline = time.time() + 60
        with httpx.Client(base_url=self.url, timeout=2.0, trust_env=False) as c:
            while True:
                try:
                    if c.get("/healthz").status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                if self.proc.poll() is not None or time.time() > deadline:
                    self.__exit__()
                    raise RuntimeError(f"floor app did not start (see {self.tmp}/floorapp.log)")
                time.sleep(0.01)

    def __exit__(self, *_: object) -> None:
        end_group(self.proc)
        self.proc.wait(timeout=10)

    def measure(self, body: bytes, seconds: float) -> float:
        """Requests/s of one load run (after a 1 s warm-up the first time)."""
        if not self.rates:
            load_url(self.url, "", body, self.conns, 1.0, self.tmp, self.tool, self.threads)
        r = load_url(self.url, "", body, self.conns, seconds, self.tmp, self.tool, self.threads)
        rate = float(r["ok"] / r["seconds"])
        self.rates.append(rate)
        self.seconds = seconds
        log(f"floor: trivial Starlette route {rate:,.0f} req/s ({self.tool}, {self.conns} conns)")
        return rate

    def floor(self) -> Floor:
        rate = sum(self.rates) / len(self.rates)
        each = " / ".join(f"{r:,.0f}" for r in self.rates)
        return Floor(
            rate,
            "req/s",
            "starlette",
            f"trivial Starlette POST route (reads the body, answers 201), uvicorn uvloop + "
            f"httptools, no access log; {self.tool} {self.threads} thread, {self.conns} conns, "
            f"{self.seconds:g} s, the same body; mean of {each} (before / after) req/s",
        )


def starlette_floor(
    tmp: Path, body: bytes, conns: int, seconds: float, tool: str, threads: int = 1
) -> Floor:
    """Requests/s of the trivial route, one run after a 1 s warm-up."""
    with StarletteFloor(tmp, conns, tool, threads) as f:
        f.measure(body, seconds)
        return f.floor()


def spawn_floor(n: int = 600) -> Floor:
    """Jobs/s if every core did nothing but spawn and reap /bin/true."""
    env = dict(os.environ)
    for _ in range(20):  # warm the page cache and the allocator
        os.waitpid(os.posix_spawn(TRUE, [TRUE], env), 0)
    c0, t0 = _rusage_cpu(), time.perf_counter()
    for _ in range(n):
        os.waitpid(os.posix_spawn(TRUE, [TRUE], env), 0)
    cpu = (_rusage_cpu() - c0) / n
    wall = (time.perf_counter() - t0) / n
    cores = os.cpu_count() or 1
    rate = cores / cpu
    log(
        f"floor: posix_spawn {TRUE} + waitpid {ms(cpu):.3f} ms CPU ({ms(wall):.3f} ms wall) "
        f"each: {rate:,.0f} jobs/s on {cores} cores"
    )
    return Floor(
        rate,
        "jobs/s",
        "spawn",
        f"posix_spawn of {TRUE} + waitpid, {ms(cpu):.3f} ms CPU each (parent + child, "
        f"getrusage, {n} spawns) on {cores} cores = {rate:,.0f} jobs/s",
    )


def spawn_wall_rate(seconds: float = 1.0) -> float:
    """Spawns + reaps of /bin/true per second of wall time, one thread per core: unlike
    ``spawn_floor`` (CPU time) this moves with a co-tenant's load, as the figure does."""
    env = dict(os.environ)
    counts: list[int] = []
    end = time.perf_counter() + seconds

    def spawner() -> None:
        n = 0
        while time.perf_counter() < end:
            os.waitpid(os.posix_spawn(TRUE, [TRUE], env), 0)
            n += 1
        counts.append(n)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=spawner) for _ in range(os.cpu_count() or 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rate = sum(counts) / (time.perf_counter() - t0)
    log(f"spawn wall rate, {len(threads)} threads: {rate:,.0f} jobs/s")
    return rate


def _append_fsync(fd: int, rnd: random.Random) -> None:
    os.write(fd, os.urandom(rnd.randint(63, 511)) + b"\n")
    os.fsync(fd)


def fsync_floor(where: Path, n: int = 200) -> Floor:
    """p50 of one append + fsync on the disk the bench's swd is on."""
    where.mkdir(parents=True, exist_ok=True)
    rnd = random.Random(12)
    fd = os.open(where / "floor.fsync", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    took = []
    try:
        for _ in range(n + 5):
            t0 = time.perf_counter()
            _append_fsync(fd, rnd)
            took.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
    p50 = ms(pct(took[5:], 50))
    log(f"floor: append 64-512 B + fsync p50 {p50:.3f} ms")
    return Floor(
        p50, "ms", "fsync", f"append 64-512 B + fsync in {where}, p50 of {n} = {p50:.3f} ms"
    )


def first_line_at(path: Path, timeout: float = 30.0, poll: float = 0.00025) -> float:
    """The ``time.perf_counter()`` at which ``path`` first held a whole line."""
    deadline = time.perf_counter() + timeout
    while True:
        try:
            with open(path, "rb") as f:
                if b"\n" in f.read(4096):
                    return time.perf_counter()
        except FileNotFoundError:
            pass
        if time.perf_counter() > deadline:
            raise TimeoutError(f"no line in {path} after {timeout} s")
        time.sleep(poll)


class DispatchFloor:
    """The fsync+spawn floor, one sample at a time: a bench takes one next to each of its
    own samples, so that a co-tenant's disk or CPU load weighs on both alike."""

    def __init__(self, where: Path) -> None:
        where.mkdir(parents=True, exist_ok=True)
        self.where = where
        self.rnd = random.Random(13)
        self.env = dict(os.environ)
        self.journal = where / "floor.journal"
        self.fsyncs: list[float] = []
        self.whole: list[float] = []

    def sample(self) -> None:
        out = self.where / f"floor-{len(self.whole)}.log"
        fd = os.open(self.journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            t0 = time.perf_counter()
            _append_fsync(fd, self.rnd)
            t1 = time.perf_counter()
            log_fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                pid = os.posix_spawn(
                    ECHO, [ECHO, "line"], self.env, file_actions=[(os.POSIX_SPAWN_DUP2, log_fd, 1)]
                )
            finally:
                os.close(log_fd)
            seen = first_line_at(out)
        finally:
            os.close(fd)
        os.waitpid(pid, 0)
        self.fsyncs.append(t1 - t0)
        self.whole.append(seen - t0)
        out.unlink()

    def floor(self, skip: int = 0) -> Floor:
        took = self.whole[skip:]
        p50 = ms(pct(took, 50))
        log(f"floor: fsync + spawn {ECHO} -> line seen p50 {p50:.3f} ms")
        return Floor(
            p50,
            "ms",
            "fsync+spawn",
            f"append + fsync, then posix_spawn of {ECHO} into a log file until its line is "
            f"seen (polled every 0.25 ms), p50 of {len(took)} = {p50:.3f} ms",
        )

    def fsync_floor(self, skip: int = 0) -> Floor:
        took = self.fsyncs[skip:]
        p50 = ms(pct(took, 50))
        return Floor(
            p50,
            "ms",
            "fsync",
            f"append 64-512 B + fsync in {self.where}, p50 of {len(took)} = {p50:.3f} ms",
        )


def dispatch_floor(where: Path, n: int = 100) -> Floor:
    """p50 of one fsync + one spawn of a process whose line is then seen in its log."""
    d = DispatchFloor(where)
    for _ in range(n + 5):
        d.sample()
    return d.floor(skip=5)


def python_floor(n: int = 10) -> Floor:
    """p50 wall of ``python -c pass``: the least any Python process takes to start."""
    env = dict(os.environ)
    argv = [sys.executable, "-c", "pass"]
    took = []
    for _ in range(n + 2):
        t0 = time.perf_counter()
        os.waitpid(os.posix_spawn(sys.executable, argv, env), 0)
        took.append(time.perf_counter() - t0)
    p50 = pct(took[2:], 50)
    log(f"floor: python -c pass p50 {ms(p50):.1f} ms")
    return Floor(
        p50, "s", "python", f"{sys.executable} -c pass wall, p50 of {n} = {ms(p50):.1f} ms"
    )
