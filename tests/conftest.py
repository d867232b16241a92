"""The suite's fixtures (``core``, ``api``, ``crq_server``, ``crq_tasker``) and its safety net:
no test module may leave a process behind.

Every fixture kills what it started, also when its test fails. This checks that they did:
after each test module (and once more at the end of the session) it looks in /proc for
processes of this run that are still there, kills them and fails loudly, naming them, so a
leak is fixed in its fixture instead of piling up on the machine.

A process belongs to this run when any of these holds (each one exact, none a guess):
- its environment carries this session's ``CRQ_TEST_RUN`` mark (set here, inherited by every
  server, tasker and CLI the tests start, and by servers that ``ncmgr start`` daemonizes);
- its command line or working directory is inside this session's pytest temporary directory
  (jobs get a clean environment from their spec, but run in, or name, a test's tmp_path);
- it is in the session of such a process (a job's children, in the wrapper's session).
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.core import Core, InProcess
from tests.etcd import etcd_cluster  # noqa: F401 (a fixture, for every test module)
from tests.munged import foreign_munged, munged  # noqa: F401 (fixtures, for every module)
from tests.rigs import CrqServer, Tasker, kill_jobs
from tests.users import unix_users  # noqa: F401 (a fixture, for every test module)

MARK = "CRQ_TEST_RUN"
RUN = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
os.environ[MARK] = RUN  # before any test starts a process: every child inherits it
GRACE = 10.0  # a process killed just now (kill -9 of a job's group) takes a moment to go


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, session id), or None when the process is gone."""
    text = _read(f"/proc/{pid}/stat").decode(errors="replace")
    if not text:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return fields[0], int(fields[1]), int(fields[3])


def _ancestors() -> set[int]:
    """This process and its parents: pytest itself is of the run but no leak."""
    seen, pid = set(), os.getpid()
    while pid > 1 and pid not in seen:
        seen.add(pid)
        st = _stat(pid)
        pid = st[1] if st else 0
    return seen


def leftovers(tmp_root: Path) -> dict[int, str]:
    """Live (not zombie) processes of this run other than pytest: pid -> command line."""
    mark = f"{MARK}={RUN}".encode()
    root = str(tmp_root).rstrip("/") + "/"
    mine = _ancestors()
    found: dict[int, str] = {}
    sessions: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in mine:
            continue
        pid = int(name)
        st = _stat(pid)
        if st is None or st[0] in ("Z", "X"):
            continue
        sessions[pid] = st[2]
        cmdline = _read(f"/proc/{pid}/cmdline")
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd") + "/"
        except OSError:
            cwd = ""
        env = _read(f"/proc/{pid}/environ").split(b"\0")
        if mark in env or root.encode() in cmdline or cwd.startswith(root):
            found[pid] = cmdline.replace(b"\0", b" ").decode(errors="replace").strip()
    for pid, sid in sessions.items():
        if pid not in found and sid in found:
            found[pid] = _read(f"/proc/{pid}/cmdline").replace(b"\0", b" ").decode().strip()
    return found


def _kill(pids: dict[int, str]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def reap_leftovers(tmp_root: Path, where: str) -> None:
    """Wait a little for processes just killed; kill what stays and fail, naming each one."""
    deadline = time.monotonic() + GRACE
    left = leftovers(tmp_root)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = leftovers(tmp_root)
    if not left:
        return
    _kill(left)
    lines = "\n".join(f"  pid {pid}: {cmd[:300]}" for pid, cmd in sorted(left.items()))
    pytest.fail(f"{where} left {len(left)} process(es) running (now killed):\n{lines}")


@pytest.fixture(scope="session")
def _tmp_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp()


@pytest.fixture(scope="module", autouse=True)
def no_process_left(request: pytest.FixtureRequest, _tmp_root: Path) -> Iterator[None]:
    """Set up before, torn down after, every module-scoped fixture of the module."""
    yield
    reap_leftovers(_tmp_root, request.module.__name__)


@pytest.fixture(scope="session", autouse=True)
def no_process_left_at_all(_tmp_root: Path) -> Iterator[None]:
    yield
    reap_leftovers(_tmp_root, "the test session")


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def core() -> Core:
    """The core in process (commands + ``State.apply``), no HTTP, no journal."""
    return Core()


@pytest.fixture
def api(tmp_path: Path) -> InProcess:
    """The real app over a real journal in tmp, in process: ``api.run(body, *settings)``."""
    return InProcess(tmp_path)


@pytest.fixture
def crq_server(tmp_path: Path) -> Iterator[Callable[..., CrqServer]]:
    """Real ``python -m crq.server`` processes: ``crq_server(*settings, queue=, swd=,
    start=)`` gives one (started unless ``start=False``); each is killed at teardown."""
    made: list[CrqServer] = []

    def make(
        *settings: str, queue: str = "t1", swd: Path | None = None, start: bool = True
    ) -> CrqServer:
        where = swd or tmp_path / ("q.swd" if not made else f"q{len(made)}.swd")
        srv = CrqServer(where, queue, *settings)
        made.append(srv)
        if start:
            srv.start()
        return srv

    yield make
    for srv in made:
        srv.kill9()


@pytest.fixture
def crq_tasker(tmp_path: Path) -> Iterator[Callable[..., Tasker]]:
    """Real ``vovtasker`` processes: ``crq_tasker(name, *args, state=, start=)``; at teardown
    each is resumed (a stopped process dies only once resumed) and killed, and its jobs too."""
    made: list[Tasker] = []

    def make(name: str, *args: str, state: Path | None = None, start: bool = True) -> Tasker:
        t = Tasker(state or tmp_path / f"{name}.state", *args, name=name)
        made.append(t)
        if start:
            t.start()
        return t

    yield make
    for t in made:
        if t.proc is not None and t.proc.poll() is None:
            t.proc.send_signal(signal.SIGCONT)
        t.kill9()
        kill_jobs(t.state)
