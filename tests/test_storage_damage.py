"""Damaged storage is refused or reported, never silently lost (issue 9).

Real servers, killed with -9 after acknowledging jobs; then the journal is cut, emptied or
deleted as a failing disk or a careless operator would. The start must refuse and name
the file, the offset and ``--accept-loss``; with that flag the report lists what was lost,
and no acknowledged id is ever handed out again. Also: empty and unreadable old segments
do not stop pruning, a recovery killed half-way does not need an operator, and the swd is
private to its owner.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server.recovery import boot_id
from tests._tasker_util import ROOT, CrqServer, env_with_root, server_available, wait_until

pytestmark = pytest.mark.skipif(not server_available(), reason="needs the server package")

SETTINGS = ("--heartbeat", "1", "--recovery-grace", "5")


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[CrqServer]:
    s = CrqServer(tmp_path / "q.swd", "dmg", *SETTINGS)
    yield s
    s.kill9()


def trace(srv: CrqServer) -> Path:
    return srv.swd / "trace.db"


def submit_many(srv: CrqServer, n: int, batch: int = 10) -> list[int]:
    spec = {"command": "true", "cwd": "/tmp"}
    ids: list[int] = []
    while len(ids) < n:
        ids += srv.submit(*[spec] * min(batch, n - len(ids)))
    return ids


def open_normal(srv: CrqServer) -> None:
    wait_until(lambda: srv.request("GET", "/server")["mode"] == "normal", timeout=30, step=0.1)


def refused(srv: CrqServer) -> str:
    with pytest.raises(AssertionError, match="server exited 3") as e:
        srv.start(port=srv.port)
    return str(e.value)


def last_report(srv: CrqServer) -> dict[str, Any]:
    reports = sorted(srv.swd.glob("crash_recovery_report_*.json"))
    assert reports, "no crash_recovery_report written"
    return json.loads(reports[-1].read_text())


def _fake_lock(srv: CrqServer, **held: Any) -> Path:
    lock = trace(srv) / "recovery.lock"
    lock.write_text(json.dumps({"time": 1.0, **held}))
    return lock


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_dead_recovery_of_this_boot_is_taken_over(srv: CrqServer) -> None:
    srv.start()
    submit_many(srv, 3)
    srv.kill9()
    pid = _dead_pid()
    _fake_lock(srv, pid=pid, host=socket.gethostname(), boot=boot_id())
    srv.start(port=srv.port)
    open_normal(srv)
    rep = last_report(srv)
    assert rep["lock_taken_over"]["pid"] == pid
    assert not (trace(srv) / "recovery.lock").exists()
    assert "took over the recovery lock" in (srv.swd / "logs" / "server.log").read_text()


@pytest.mark.parametrize("who", ["another boot", "another host", "no boot recorded"])
def test_other_recovery_locks_still_refuse(srv: CrqServer, who: str) -> None:
    srv.start()
    submit_many(srv, 3)
    srv.kill9()
    host, boot = socket.gethostname(), boot_id()
    held = {
        "another boot": {"host": host, "boot": "0" * 32},
        "another host": {"host": "elsewhere.example", "boot": boot},
        "no boot recorded": {"host": host},
    }[who]
    lock = _fake_lock(srv, pid=_dead_pid(), **held)
    msg = refused(srv)
    assert "recovery" in msg and lock.exists(), msg
    if who == "another host":
        assert "already running" in msg
        return
    assert "--reset-lock" in msg
    out = subprocess.run(
        [sys.executable, "-m", "client.ncmgr", "cleanup", "--swd", str(srv.swd), "--reset-lock"],
        cwd=ROOT, env=env_with_root(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0 and not lock.exists(), out.stderr
    srv.start(port=srv.port)
    open_normal(srv)
    assert last_report(srv)["lock_taken_over"] is None
