"""The tasker's side of the protocol against a scripted stand-in server.

The real server is exercised in test_tasker_e2e.py; this stand-in makes the awkward
answers (500s, missing acks) happen on cue, which the real one rarely does.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from crq.tasker.statedir import StateDir

from crq.procfs import boot_id
from tests.rigs import Tasker, dispatch, env_with_root, kill_jobs, wait_until


class Stage:
    """What the stand-in answers; tests poke its fields while the tasker runs."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.registers: list[dict[str, Any]] = []
        self.syncs: list[tuple[float, dict[str, Any]]] = []
        self.to_dispatch: list[dict[str, Any]] = []
        self.fail = 0  # answer this many next requests with 500
        self.ack = True


def _handler(stage: Stage) -> type[BaseHTTPRequestHandler]:
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _send(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            assert self.headers["Authorization"] == "Bearer sekrit"
            with stage.lock:
                if stage.fail > 0:
                    stage.fail -= 1
                    self._send(500, {"error": "internal", "message": "scripted failure"})
                    return
            reports = body.get("started", []) + body.get("running", []) + body.get("finished", [])
            ack = [{"job": r["job"], "attempt": r["attempt"]} for r in reports] if stage.ack else []
            if self.path.endswith("/register"):
                with stage.lock:
                    stage.registers.append(body)
                self._send(200, {"kill": [], "ack": ack, "heartbeat": 0.5, "instance": "fake"})
                return
            with stage.lock:
                stage.syncs.append((time.monotonic(), body))
            deadline = time.monotonic() + min(float(body.get("wait", 0)), 0.5)
            while True:
                with stage.lock:
                    send, stage.to_dispatch = stage.to_dispatch, []
                if send or time.monotonic() >= deadline:
                    break
                time.sleep(0.01)
            self._send(200, {"dispatch": send, "kill": [], "ack": ack})

    return H


class _Quiet(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a killed tasker leaves broken pipes behind: expected here


@pytest.fixture
def stage() -> Iterator[tuple[Stage, str]]:
    st = Stage()
    httpd = _Quiet(("127.0.0.1", 0), _handler(st))
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield st, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _tasker(tmp_path: Path, url: str) -> Tasker:
    t = Tasker(tmp_path / "state", "--server", url)
    env = env_with_root()
    env["CRQ_TASKER_TOKEN"] = "sekrit"
    t.start(env=env)
    return t


def _finished_reports(stage: Stage, key: tuple[int, int]) -> list[dict[str, Any]]:
    """Every report of key's end: in a sync, or in a register (a tasker back from an outage
    sends there what ended meanwhile, as it does when its job ends before it reconnects)."""
    with stage.lock:
        bodies = [*stage.registers, *(b for _, b in stage.syncs)]
        return [r for b in bodies for r in b["finished"] if (r["job"], r["attempt"]) == key]


def test_results_survive_errors_and_are_reported_once(
    stage: tuple[Stage, str], tmp_path: Path
) -> None:
    st, url = stage
    work = tmp_path / "w"
    work.mkdir()
    t = _tasker(tmp_path, url)
    try:
        wait_until(lambda: st.registers)
        reg = st.registers[0]
        assert reg["boot_id"] == boot_id() and reg["rebooted"] is False
        assert reg["running"] == [] and reg["finished"] == []
        with st.lock:
            st.fail = 3  # the next three requests fail: the result must wait on disk
            st.to_dispatch.append(dispatch(5, work, ["sh", "-c", "exit 2"]))
        results = tmp_path / "state" / "results"
        wait_until(lambda: _finished_reports(st, (5, 1)))
        wait_until(lambda: not StateDir(results.parent).load_results())
        time.sleep(1.2)  # a few more polls: the acked result never comes back
        assert len(_finished_reports(st, (5, 1))) == 1
        (rep,) = _finished_reports(st, (5, 1))
        assert (rep["exit_code"], rep["signal"]) == (2, None)
        assert len(st.registers) >= 2, "a 500 makes the tasker register again"
    finally:
        t.kill9()
        kill_jobs(tmp_path / "state")


def test_unacked_report_is_resent_without_spinning(
    stage: tuple[Stage, str], tmp_path: Path
) -> None:
    st, url = stage
    st.ack = False
    work = tmp_path / "w"
    work.mkdir()
    t = _tasker(tmp_path, url)
    try:
        wait_until(lambda: st.registers)
        with st.lock:
            st.to_dispatch.append(dispatch(6, work, ["true"]))
        wait_until(lambda: _finished_reports(st, (6, 1)))
        time.sleep(2.0)
        sent = _finished_reports(st, (6, 1))
        assert 2 <= len(sent) <= 5, sent  # about once a second, never in a tight loop
        assert StateDir(tmp_path / "state").load_results(), "kept until acked"
        with st.lock:
            st.ack = True
        wait_until(lambda: not StateDir(tmp_path / "state").load_results())
    finally:
        t.kill9()
        kill_jobs(tmp_path / "state")


def test_restart_registers_with_the_running_job(stage: tuple[Stage, str], tmp_path: Path) -> None:
    st, url = stage
    work = tmp_path / "w"
    work.mkdir()
    t = _tasker(tmp_path, url)
    try:
        wait_until(lambda: st.registers)
        gate = work / "gate"  # the job outlives the restart however slow the machine is
        with st.lock:
            st.to_dispatch.append(
                dispatch(7, work, ["sh", "-c", f"until [ -e {gate} ]; do sleep 0.02; done"])
            )
        started = wait_until(lambda: [r for _, b in st.syncs for r in b["started"]])
        t.kill9()
        t = _tasker(tmp_path, url)
        wait_until(lambda: len(st.registers) >= 2)
        (running,) = st.registers[-1]["running"]
        assert running["pid"] == started[0]["pid"] and running["job"] == 7
        gate.touch()
        wait_until(lambda: _finished_reports(st, (7, 1)))
    finally:
        t.kill9()
        kill_jobs(tmp_path / "state")
