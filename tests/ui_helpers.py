"""A real crq server process for end-to-end tests: start, kill -9, restart, stop cleanly."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class CrqServer:
    """One queue's server in a subprocess; the swd and port survive restarts."""

    def __init__(self, swd: Path, queue: str = "uitest", *extra: str) -> None:
        self.swd = swd
        self.queue = queue
        self.extra = list(extra)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def token(self) -> str:
        return (self.swd / "security" / "admin.token").read_text().strip()

    @property
    def tasker_token(self) -> str:
        return (self.swd / "security" / "tasker.token").read_text().strip()

    def start(self, timeout: float = 15.0) -> None:
        self.starts += 1
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        cmd = [
            sys.executable,
            "-m",
            "server",
            "--queue",
            self.queue,
            "--swd",
            str(self.swd),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--fsync",
            "never",
            *self.extra,
        ]
        log = self.swd.parent / f"{self.queue}.server.{self.starts}.out"
        with open(log, "wb") as out:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=out)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}: {log.read_text()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"server not healthy within {timeout} s")

    def api(self, method: str, path: str, token: str | None = None, **kw: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token or self.token}", **kw.pop("headers", {})}
        return httpx.request(method, self.url + "/api/v1" + path, headers=headers, timeout=10, **kw)

    def kill(self) -> None:
        """kill -9: what a crash looks like to the next start."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        """Clean stop through the API; kill if that fails, so no test leaves a server behind."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            self.api("POST", "/server/stop", json={"freeze": False})
            self.proc.wait(timeout=15)
        except (httpx.HTTPError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise
