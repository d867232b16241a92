"""The one test rig: real server and tasker processes (nothing mocked), waits that follow them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the repo may not be pip-installed when tests run
    sys.path.insert(0, str(ROOT))


PATIENCE = 120.0
"""The cap of every wait in the tests. A wait returns as soon as its condition holds, so a
generous cap costs nothing on a quiet machine and rides out a busy one; it only bounds how
long a broken test hangs."""


def wait_until(pred: Callable[[], Any], timeout: float = PATIENCE, step: float = 0.02) -> Any:
    """Poll until pred() is truthy; fail the test with a clear message on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(step)


def wait_for_start(
    proc: subprocess.Popen[bytes], ready: Callable[[], bool], what: str, cap: float = PATIENCE
) -> None:
    """Wait for ready() while ``proc`` lives: a start follows the process, not a clock.

    Fails at once, with the process's stderr, when it exits; after ``cap`` seconds (a hang,
    not a slow machine) it is killed, so that a failed start leaves nothing running.
    """
    deadline = time.monotonic() + cap
    while not ready():
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise AssertionError(f"{what} exited {proc.returncode}: {err}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise AssertionError(f"{what} (pid {proc.pid}) alive but not up after {cap:.0f} s")
        time.sleep(0.05)


def dispatch(job: int, cwd: Path, command: Any, attempt: int = 1, **extra: Any) -> dict[str, Any]:
    d = {
        "job": job,
        "attempt": attempt,
        "command": command,
        "cwd": str(cwd),
        "env": {"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        "log": str(cwd / f"job{job}.log"),
        "name": f"job{job}",
    }
    d.update(extra)
    return d


def env_with_root() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_and_vanish(state: Path, cwd: Path, jobs: list[dict[str, Any]]) -> None:
    """Start jobs from a separate Python process that then dies like kill -9 (os._exit)."""
    script = (
        "import json, os, sys\n"
        "from crq.tasker.statedir import StateDir\n"
        "from crq.tasker.runner import Runner\n"
        "r = Runner(StateDir(sys.argv[1]))\n"
        "for d in json.loads(sys.argv[2]):\n"
        "    r.start(d)\n"
        "os._exit(0)\n"
    )
    subprocess.run(
        [sys.executable, "-c", script, str(state), json.dumps(jobs)],
        check=True,
        env=env_with_root(),
        cwd=cwd,
        timeout=PATIENCE,
    )


def alive(pid: int) -> bool:
    """Running, and not a zombie (a stopped tasker cannot reap its finished jobs)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_jobs(state: Path) -> None:
    """Leave no job of a tasker (or Runner) with this state dir behind: the process groups
    in its attempt records, and wrappers spawned but not recorded yet (found in /proc by
    their status file). Jobs run in their own sessions, so killing the tasker spares them."""
    from crq.tasker.runner import find_orphan_wrappers
    from crq.tasker.statedir import StateDir

    groups = set(find_orphan_wrappers(state / "status").values())
    if state.is_dir():
        for rec in StateDir(state).load_records().values():
            try:
                groups.add(int(rec["pgid"]))
            except (ValueError, KeyError, TypeError):
                pass
    for pgid in groups - {0, 1}:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_available() -> bool:
    return (ROOT / "server" / "app.py").exists() and (ROOT / "server" / "__main__.py").exists()


def server_argv(queue: str, swd: Path, port: int, *extra: str, fsync: str = "never") -> list[str]:
    """The command line of a foreground server on loopback (the rig's and the benchmarks')."""
    return [sys.executable, "-m", "crq.server", "--queue", queue, "--swd", str(swd),
            "--host", "127.0.0.1", "--port", str(port), "--fsync", fsync, *extra]  # fmt: skip


def tasker_argv(name: str, state: Path, *args: str) -> list[str]:
    """The command line of a ``vovtasker`` with its own state dir."""
    return [sys.executable, "-m", "crq.tasker", "--name", name, "--state-dir", str(state), *args]


class CrqServer:
    """A real ``python -m crq.server`` in the foreground, killable with -9 and restartable."""

    def __init__(self, swd: Path, queue: str = "t1", *extra: str) -> None:
        self.swd = swd
        self.queue = queue
        self.extra = list(extra)
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.preexec: Callable[[], Any] | None = None  # run in the child before the server

    def start(self, port: int | None = None, timeout: float = PATIENCE) -> None:
        self.port = port or free_port()
        self.proc = subprocess.Popen(
            server_argv(self.queue, self.swd, self.port, *self.extra),
            cwd=ROOT, env=env_with_root(), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=self.preexec,
        )  # fmt: skip
        wait_for_start(self.proc, self._healthy, "server", cap=timeout)

    def _healthy(self) -> bool:
        """Up and every route in: a leader answers ``/healthz`` while it still loads
        (``"loading": true``), and its other routes only after."""
        import httpx

        try:
            r = httpx.get(f"{self.url}/healthz", timeout=5.0)
        except httpx.HTTPError:
            return False
        return r.status_code == 200 and not r.json().get("loading")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        """The server's own log (``<swd>/logs/server.log``), for failure messages."""
        f = self.swd / "logs" / "server.log"
        return f.read_text(errors="replace") if f.exists() else ""

    @property
    def admin_token(self) -> str:
        return (self.swd / "security" / "admin.token").read_text().strip()

    @property
    def tasker_token(self) -> str:
        return (self.swd / "security" / "tasker.token").read_text().strip()

    def api(
        self, method: str, path: str, token: str | None = None, timeout: float = 30, **kw: Any
    ) -> httpx.Response:
        """One API call as admin (or with ``token``); the response whatever its status."""
        import httpx

        headers = {"Authorization": f"Bearer {token or self.admin_token}", **kw.pop("headers", {})}
        return httpx.request(
            method, f"{self.url}/api/v1{path}", headers=headers, timeout=timeout, **kw
        )

    def request(self, method: str, path: str, **kw: Any) -> Any:
        """An admin API call that must succeed; its JSON."""
        r = self.api(method, path, **kw)
        if r.status_code >= 400:
            raise AssertionError(f"{method} {path}: {r.status_code} {r.text}")
        return r.json()

    def submit(self, *specs: dict[str, Any]) -> list[int]:
        return list(self.request("POST", "/jobs", json={"jobs": list(specs)})["ids"])

    def wait(self, job: int, timeout: float = PATIENCE) -> dict[str, Any]:
        """Wait for a final state, riding out crash recovery (503) within the timeout."""
        deadline = time.monotonic() + timeout
        while True:
            left = max(0.1, deadline - time.monotonic())
            r = self.api("GET", f"/jobs/{job}/wait", params={"timeout": left}, timeout=left + 5)
            if r.status_code != 503 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if r.status_code >= 400:
            raise AssertionError(f"wait {job}: {r.status_code} {r.text}")
        j = r.json()
        assert j["state"] in ("done", "failed", "stopped", "lost"), j
        return j

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self, freeze: bool = False) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            self.request("POST", "/server/stop", json={"freeze": freeze})
            self.proc.wait(timeout=PATIENCE)
        except Exception:  # noqa: BLE001 - teardown must not hide the test's own failure
            self.kill9()


class Tasker:
    """A real ``vovtasker`` process with its stderr captured to a file for the asserts."""

    def __init__(self, state: Path, *args: str, name: str = "tk1") -> None:
        self.state = state
        self.argv = tasker_argv(name, state, *args)
        self.logfile = state.parent / f"{name}.stderr"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, env: dict[str, str] | None = None) -> None:
        out = open(self.logfile, "ab")  # noqa: SIM115 - kept by the child
        with out:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=ROOT, env=env or env_with_root(), stdin=subprocess.DEVNULL,
                stdout=out, stderr=out,
            )  # fmt: skip

    def log(self) -> str:
        return self.logfile.read_text() if self.logfile.exists() else ""

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def term(self, timeout: float = PATIENCE) -> int:
        assert self.proc is not None
        self.proc.terminate()
        return self.proc.wait(timeout=timeout)


def e2e_server(tmp_path: Path) -> Iterator[CrqServer]:
    """The tasker end-to-end tests' server (a fixture in those files): short beats."""
    # the recovery grace is generous: it ends as soon as the taskers are back, and a tasker
    # in backoff on a busy machine must not miss it (its jobs would run a second time)
    s = CrqServer(tmp_path / "q.swd", "t1", "--recovery-grace", "60", "--heartbeat", "2")
    s.start()
    yield s
    s.kill9()
