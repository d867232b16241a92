"""Resource limits on the HTTP side: body size while it streams, idle and half-sent
connections, the number of connections under a low open-file limit, and big batches
that must not hold the event loop.

Real servers (``python -m crq.server``) for the socket-level behaviour; the in-process app
(httpx's ASGI transport, as tests/server/test_paging.py) for the ordering of a big batch
against other requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import resource
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from crq.server import commands, replay
from crq.server.app import create_app
from crq.server.engine import Engine
from crq.server.http import hot as app_module
from crq.server.journal import Journal
from crq.server.models import MAX_BODY
from crq.server.service import Service
from crq.server.settings import SettingsError, load
from crq.server.state import State

from tests.rigs import CrqServer

MIB = 1 << 20


class LimitedServer(CrqServer):
    """A real server started with an open-file limit, as systemd's LimitNOFILE sets one."""

    def __init__(self, swd: Path, nofile: tuple[int, int], *extra: str) -> None:
        super().__init__(swd, "t1", *extra)
        self.preexec = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, nofile)


def status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def read_reply(sock: socket.socket, timeout: float = 30.0) -> bytes:
    """What the server sent before it closed (or until the reply's headers and body)."""
    sock.settimeout(timeout)
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return data


@pytest.fixture
def server(tmp_path: Path) -> Iterator[CrqServer]:
    s = CrqServer(tmp_path / "q.swd")
    s.start()
    yield s
    s.kill9()


# -- body size ---------------------------------------------------------------------------


def test_a_chunked_body_over_the_limit_is_refused_while_it_streams(server: CrqServer) -> None:
    assert server.proc is not None
    pid = server.proc.pid
    before = status_kib(pid, "VmHWM")
    size = 4 * MAX_BODY  # 256 MiB
    chunk = b"x" * MIB
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(
            b"POST /api/v1/jobs HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
            b"Authorization: Bearer " + server.admin_token.encode() + b"\r\n\r\n"
        )
        sent = 0
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while sent < size:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
        reply = read_reply(sock)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b'"too_large"' in reply
    assert sent < size, "the server read the whole body before refusing it"
    grew = (status_kib(pid, "VmHWM") - before) * 1024
    assert grew < size // 2, f"peak RSS grew by {grew / MIB:.0f} MiB for a refused body"
    assert server.submit({"command": ["true"], "cwd": "/tmp"})  # and it keeps serving


@pytest.mark.parametrize("path", ["/api/v1/jobs", "/api/v1/taskers/tk1/sync"])
def test_a_declared_length_over_the_limit_is_refused_before_the_body(
    server: CrqServer, path: str
) -> None:
    token = server.admin_token if path.endswith("jobs") else server.tasker_token
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {MAX_BODY + 1}\r\n"
            f"Content-Type: application/json\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
        )  # and not one byte of the body: the answer must not wait for it
        reply = read_reply(sock)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b"connection: close" in reply.lower()
    assert server.submit({"command": ["true"], "cwd": "/tmp"})


def test_a_body_under_the_limit_is_read_whole(server: CrqServer) -> None:
    jobs = [{"command": ["true", "x" * 1000], "cwd": "/tmp"} for _ in range(3000)]  # 3 MB
    r = server.api("POST", "/jobs", json={"jobs": jobs})
    assert r.status_code == 201, r.text
    assert len(r.json()["ids"]) == 3000


# -- connections -------------------------------------------------------------------------


def closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True
    except BlockingIOError:
        return False


def wait_all_closed(socks: list[socket.socket], timeout: float) -> list[socket.socket]:
    """Until the server has closed every socket (or the timeout); those still open."""
    left = {s.fileno(): s for s in socks}
    for s in socks:
        s.setblocking(False)
    poller = select.poll()
    for fd in left:
        poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + timeout
    while left and time.monotonic() < deadline:
        for fd, _ in poller.poll(500):
            sock = left.get(fd)
            if sock is not None and closed_by_peer(sock):
                poller.unregister(fd)
                del left[fd]
    return list(left.values())


@contextlib.contextmanager
def own_fd_limit(need: int) -> Iterator[None]:
    """The test opens about a thousand sockets itself: raise its own soft limit for that."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"needs {need} open files, the hard limit is {hard}")
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("nofile", [(1024, 1024), (1024, 8192)], ids=["hard-1024", "soft-1024"])
def test_idle_and_half_sent_connections_cannot_starve_submits(
    tmp_path: Path, nofile: tuple[int, int]
) -> None:
    srv = LimitedServer(tmp_path / "q.swd", nofile, "--idle-timeout", "2")
    socks: list[socket.socket] = []
    with own_fd_limit(4096):
        try:
            srv.start()
            assert srv.proc is not None
            job = srv.submit({"command": ["true"], "cwd": "/tmp"})[0]  # stays queued: no tasker
            addr = ("127.0.0.1", srv.port)
            for _ in range(1000):  # never send a byte
                socks.append(socket.create_connection(addr))
            for _ in range(25):  # half a request line and header
                socks.append(socket.create_connection(addr))
                socks[-1].sendall(b"POST /api/v1/jobs HTTP/1.1\r\nHost: t\r\nContent-Le")
            for _ in range(25):  # the headers and part of the body
                socks.append(socket.create_connection(addr))
                socks[-1].sendall(
                    b"POST /api/v1/jobs HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n"
                    b"Authorization: Bearer " + srv.admin_token.encode() + b'\r\n\r\n{"jo'
                )
            # a long poll well past the idle timeout is not idle: it gets its answer
            waited: dict[str, Any] = {}
            poll = threading.Thread(
                target=lambda: waited.update(
                    r=srv.api("GET", f"/jobs/{job}/wait", params={"timeout": 5}, timeout=60)
                )
            )
            poll.start()
            for i in range(20):
                r = srv.api("POST", "/jobs", json={"command": ["true", str(i)], "cwd": "/tmp"})
                assert r.status_code == 201, f"submit {i} with 1,000 idle sockets: {r.text}"
            still_open = wait_all_closed(socks, timeout=60)
            assert not still_open, f"{len(still_open)} idle or half-sent sockets never closed"
            poll.join(timeout=60)
            assert waited["r"].status_code == 200 and waited["r"].json()["state"] == "queued"
            assert open_fds(srv.proc.pid) < 100
            assert srv.submit({"command": ["true"], "cwd": "/tmp"})
            said = (srv.swd / "logs" / "server.log").read_text()
            assert ("open-file limit 1024: serving at most" in said) == (nofile[1] == 1024)
        finally:
            for s in socks:
                s.close()
            srv.kill9()


def test_past_the_cap_with_every_connection_busy_requests_get_503(tmp_path: Path) -> None:
    srv = CrqServer(tmp_path / "q.swd", "t1", "--max-connections", "4")
    polls: list[socket.socket] = []
    try:
        srv.start()
        job = srv.submit({"command": ["true"], "cwd": "/tmp"})[0]  # stays queued: no tasker
        for _ in range(4):  # long polls: busy, so none is closed to make room
            polls.append(socket.create_connection(("127.0.0.1", srv.port)))
            polls[-1].sendall(
                f"GET /api/v1/jobs/{job}/wait?timeout=12 HTTP/1.1\r\nHost: t\r\n"
                f"Authorization: Bearer {srv.admin_token}\r\n\r\n".encode()
            )
        deadline = time.monotonic() + 10
        while (r := srv.api("GET", "/queue")).status_code != 503:
            assert r.status_code == 200, r.text
            assert time.monotonic() < deadline, "never refused past the cap"
            time.sleep(0.1)
        for sock in polls:  # the busy ones get their answers
            assert read_reply(sock).startswith(b"HTTP/1.1 200")
            sock.close()
        assert srv.submit({"command": ["true"], "cwd": "/tmp"})
    finally:
        for sock in polls:
            sock.close()
        srv.kill9()


def test_the_soft_open_file_limit_is_raised_to_what_the_connections_need(
    tmp_path: Path,
) -> None:
    srv = LimitedServer(tmp_path / "q.swd", (1024, 8192), "--max-connections", "2000")
    try:
        srv.start()
        assert srv.proc is not None
        limits = Path(f"/proc/{srv.proc.pid}/limits").read_text()
        line = next(ln for ln in limits.splitlines() if ln.startswith("Max open files"))
        soft = int(line.split()[3])
        assert 2000 < soft <= 8192, line
    finally:
        srv.kill9()


def test_connection_bounds_are_settings(tmp_path: Path) -> None:
    swd = tmp_path / "q.swd"
    swd.mkdir()
    (swd / "config.toml").write_text("max_connections = 100\nidle_timeout = 5\n")
    s = load(["--swd", str(swd)])
    assert (s.max_connections, s.idle_timeout) == (100, 5.0)
    assert load(["--swd", str(swd), "--idle-timeout", "0.5"]).idle_timeout == 0.5
    with pytest.raises(SettingsError):
        load(["--swd", str(swd), "--max-connections", "0"])


# -- big batches ---------------------------------------------------------------------------


class App:
    """The real app and engine in process, with a real journal in a temp dir."""

    def __init__(self, tmp: Path) -> None:
        self.settings = load(["--swd", str(tmp / "q.swd"), "--fsync", "never"])
        self.settings.paths.trace.mkdir(parents=True)
        self.journal = Journal(self.settings.paths.trace, next_seq=1, fsync=False)
        self.engine = Engine(State(), self.journal)
        srv = Service(self.settings, self.engine, b"admin", b"tasker", "test", "http://t")
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_app(srv)),
            base_url="http://t",
            headers={"Authorization": "Bearer admin"},
            timeout=60,
        )

    @property
    def state(self) -> State:
        return self.engine.state

    async def close(self) -> None:
        await self.client.aclose()
        self.engine.wake_all()
        self.journal.close()


def sim(i: int, **extra: Any) -> dict[str, Any]:
    return {"command": ["sim", str(i)], "cwd": "/tmp", **extra}


@pytest.fixture
def small_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    """Slices of 50 jobs and the big-body path from 1 KiB: a few thousand jobs show it."""
    monkeypatch.setattr(commands, "SLICE", 50)
    monkeypatch.setattr(app_module, "BIG_BODY", 1024)


@pytest.mark.usefixtures("small_slices")
def test_a_big_batch_lets_other_requests_through_and_keeps_its_ids_together(
    tmp_path: Path,
) -> None:
    async def scenario() -> dict[str, Any]:
        app = App(tmp_path)
        done: list[str] = []

        async def call(name: str, method: str, url: str, **kw: Any) -> httpx.Response:
            r = await app.client.request(method, url, **kw)
            done.append(name)
            return r

        c = app.client
        batch = {"jobs": [sim(i) for i in range(5000)], "env": {"A": "1"}}
        big = asyncio.create_task(call("big", "POST", "/api/v1/jobs", json=batch))
        await asyncio.sleep(0.01)  # the big batch is being checked, slice by slice
        small = [
            asyncio.create_task(call(f"small{i}", "POST", "/api/v1/jobs", json=sim(-i)))
            for i in range(3)
        ]
        health = asyncio.create_task(call("healthz", "GET", "/healthz"))
        big_r, *small_r = await asyncio.gather(big, *small)
        await health
        out = {
            "done": done,
            "big": big_r.json()["ids"],
            "small": [r.json()["ids"][0] for r in small_r],
            "env": {app.state.env_of(app.state.jobs[i])["A"] for i in big_r.json()["ids"]},
            "gc": gc.isenabled(),
            "listed": (await c.get("/api/v1/jobs", params={"limit": 10000})).json()["jobs"],
        }
        await app.close()
        return out

    out = asyncio.run(scenario())
    assert out["done"].index("big") > out["done"].index("healthz"), out["done"]
    assert out["done"].index("big") > min(out["done"].index(f"small{i}") for i in range(3))
    big = out["big"]
    assert big == list(range(big[0], big[0] + 5000))  # contiguous, whatever ran meanwhile
    assert all(not big[0] <= i <= big[-1] for i in out["small"])
    assert out["env"] == {"1"}
    assert len(out["listed"]) == 5003
    assert out["gc"], "the collector stays off after a big batch"


@pytest.mark.usefixtures("small_slices")
@pytest.mark.parametrize(
    "bad, message",
    [
        ({"cwd": "relative"}, "jobs[4321].cwd: must be an absolute path"),
        ({"resources": "License:nosuch"}, "jobs[4321].resources: unknown resource License:nosuch"),
        ({"bogus": 1}, "jobs[4321].bogus: unknown field"),
    ],
)
def test_a_big_batch_refused_late_changes_nothing(
    tmp_path: Path, bad: dict[str, Any], message: str
) -> None:
    async def scenario() -> tuple[httpx.Response, int, int, bool]:
        app = App(tmp_path)
        jobs = [sim(i, env={"I": str(i)}) for i in range(5000)]
        jobs[4321].update(bad)
        r = await app.client.post("/api/v1/jobs", json={"jobs": jobs})
        seq, n_envs = app.state.seq, len(app.state.envs)
        await app.close()
        return r, seq, n_envs, gc.isenabled()

    r, seq, n_envs, gc_on = asyncio.run(scenario())
    assert r.status_code == 422, r.text
    assert r.json()["message"].startswith(message), r.json()
    assert (seq, n_envs) == (0, 0)  # not a job, not an env, not an event
    assert gc_on


@pytest.mark.usefixtures("small_slices")
def test_a_batch_over_the_maximum_is_refused_before_it_is_validated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(commands, "MAX_BATCH", 1000)

    async def scenario() -> httpx.Response:
        app = App(tmp_path)
        jobs: list[Any] = [sim(i) for i in range(1001)]
        jobs[0] = "not a job"  # validation would say so first: the size is checked before
        r = await app.client.post("/api/v1/jobs", json={"jobs": jobs})
        await app.close()
        return r

    r = asyncio.run(scenario())
    assert r.status_code == 422
    assert "at most 1000 jobs in one submit, not 1001" in r.json()["message"]


@pytest.mark.usefixtures("small_slices")
def test_envs_of_a_big_batch_exist_whatever_ran_between_its_slices(tmp_path: Path) -> None:
    """Envs are numbered when defined: one forgotten (dropped) meanwhile is defined again,
    and the journal replays to the same jobs and envs."""

    async def scenario() -> dict[int, dict[str, str] | None]:
        app = App(tmp_path)
        c = app.client
        shared = {"SHARED": "1"}
        first = (await c.post("/api/v1/jobs", json=sim(0, env=shared))).json()["ids"][0]
        await c.post(f"/api/v1/jobs/{first}/stop")
        jobs = [sim(i, env=shared if i % 2 else {"OWN": str(i)}) for i in range(3000)]
        big = asyncio.create_task(c.post("/api/v1/jobs", json={"jobs": jobs}))
        await asyncio.sleep(0.01)
        r = await c.delete(f"/api/v1/jobs/{first}")  # drops the shared env, if alone with it
        assert r.status_code == 200, r.text
        r = await big
        assert r.status_code == 201, r.text
        envs = {i: app.state.env_of(app.state.jobs[i]) for i in r.json()["ids"]}
        await app.close()
        return envs

    envs = asyncio.run(scenario())
    for n, (job_id, env) in enumerate(sorted(envs.items())):
        assert env == ({"SHARED": "1"} if n % 2 else {"OWN": str(n)}), (job_id, env)
    again = replay.load(tmp_path / "q.swd" / "trace.db", None, False).state
    assert {i: again.env_of(again.jobs[i]) for i in envs} == envs
