"""SIGTERM (systemd's stop, a container's stop) is a clean stop, the same as `ncmgr stop`.

uvicorn's own signal handling would only close the sockets: taskers were never told,
running jobs never released, and the signal was raised again once it had served.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.rigs import PATIENCE, CrqServer, Tasker, kill_jobs, server_available, wait_until

pytestmark = pytest.mark.skipif(not server_available(), reason="server not built")


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[CrqServer, Tasker]]:
    srv = CrqServer(tmp_path / "q.swd", "sig", "--heartbeat", "1")
    tk = Tasker(tmp_path / "tk.state", "--swd", str(srv.swd), "--slots", "1")
    try:
        srv.start()
        tk.start()
        yield srv, tk
    finally:
        tk.kill9()
        srv.kill9()
        kill_jobs(tk.state)


def test_sigterm_stops_cleanly_and_releases_running_jobs(
    rig: tuple[CrqServer, Tasker], tmp_path: Path
) -> None:
    srv, tk = rig
    (job,) = srv.submit({"command": ["sleep", "600"], "cwd": str(tmp_path)})
    wait_until(lambda: srv.request("GET", f"/jobs/{job}")["started"] is not None)
    assert srv.proc is not None
    os.kill(srv.proc.pid, signal.SIGTERM)
    assert srv.proc.wait(timeout=PATIENCE) == 0
    assert (srv.swd / "trace.db" / "clean").exists()
    assert "stop requested (freeze=False)" in (srv.swd / "logs" / "server.log").read_text()
    assert tk.proc is not None
    tk.proc.wait(timeout=PATIENCE)  # told to shut down: it kills its job and exits
    srv.start()
    assert srv.request("GET", "/server")["mode"] == "normal"  # no crash recovery
    after = srv.request("GET", f"/jobs/{job}")
    assert after["state"] == "queued" and after["tasker"] is None, after
