"""A tasker that cannot start an attempt says so: no dispatch is ever dropped silently.

Whatever stops a dispatch from running (a spec execve refuses, a cwd or log the tasker
cannot use, a malformed item), the attempt is reported finished with the reason and its
slot frees; otherwise the server would keep it running and send it again forever. Real
processes throughout: the runner with real jobs, then a real server and vovtasker.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from crq.tasker.runner import MAX_REASON, Runner
from crq.tasker.statedir import StateDir

from tests.rigs import (
    PATIENCE,
    CrqServer,
    Tasker,
    alive,
    dispatch,
    e2e_server,
    kill_jobs,
    server_available,
    wait_until,
)


def finished(runner: Runner, key: tuple[int, int], timeout: float = PATIENCE) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        _, done = runner.outbox.reports(everything=True)
        return next((r for r in done if (r["job"], r["attempt"]) == key), None)

    return wait_until(find, timeout)


def _long_missing_dir(root: Path) -> str:
    """An absolute path of about 4,090 characters that does not exist (valid at submit)."""
    parts = [str(root / "gone")]
    while len("/".join(parts)) < 4090 - 201:
        parts.append("d" * 200)
    path = "/".join(parts)
    return path + "/" + "e" * (4090 - len(path) - 1)


UNSTARTABLE: dict[str, tuple[dict[str, Any], str]] = {
    "nul in a command word": ({"command": ["echo", "a\0b"]}, "bad command: it holds a NUL"),
    "nul in a shell command": ({"command": "echo a\0b"}, "bad command: it holds a NUL"),
    "nul in an env name": ({"env": {"A\0B": "1"}}, "bad env: variable 'A\\x00B' holds a NUL"),
    "nul in an env value": ({"env": {"A": "1\0"}}, "bad env: variable 'A' holds a NUL"),
    "= in an env name": ({"env": {"A=B": "1"}}, "bad env: variable name 'A=B' is empty or"),
    "env not a mapping": ({"env": ["A=1"]}, "bad env: not a mapping: list"),
    "nul in the log": ({"log": "/tmp/x\0.log"}, "bad log path: it holds a NUL"),
    "nul in the cwd": ({"cwd": "/tmp\0x"}, "bad cwd: it holds a NUL"),
    "no command": ({"command": None}, "bad command: None"),
    "no cwd": ({"cwd": None}, "cwd does not exist: None"),
}


@pytest.mark.parametrize("case", list(UNSTARTABLE))
def test_an_unstartable_dispatch_is_reported_failed_and_frees_its_slot(
    state: StateDir, work: Path, case: str
) -> None:
    change, reason = UNSTARTABLE[case]
    r = Runner(state, slots=1)
    r.start_many([{**dispatch(1, work, ["true"]), **change}, dispatch(2, work, ["true"])])
    bad = finished(r, (1, 1))
    assert (bad["exit_code"], bad["signal"]) == (None, None)
    assert bad["reason"].startswith(reason), bad["reason"]
    assert not bad.get("lost")
    assert finished(r, (2, 1))["exit_code"] == 0, "the one slot must be free again"
    assert set(state.load_results()) == {(1, 1), (2, 1)}  # durable like any result
    wait_until(lambda: state.load_records() == {} and state.status_keys() == [])


def test_a_cwd_or_log_the_tasker_cannot_use_is_reported(state: StateDir, work: Path) -> None:
    (work / "afile").write_text("")
    r = Runner(state, slots=1)
    r.start_many(
        [
            dispatch(1, work, ["true"], log=str(work / "afile" / "sub" / "x.log")),
            dispatch(2, Path(_long_missing_dir(work)), ["true"]),
            dispatch(3, work, ["true"]),
        ]
    )
    assert finished(r, (1, 1))["reason"].startswith(f"cannot open log {work}/afile/sub/x.log")
    long = finished(r, (2, 1))["reason"]
    # the server refuses a report whose reason is over 4096 characters, with the whole sync
    assert long.startswith("cwd does not exist: ") and len(long) == MAX_REASON
    assert finished(r, (3, 1))["exit_code"] == 0


def test_an_error_nobody_foresaw_is_reported_too(
    state: StateDir, work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_a: object, **_k: object) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(os, "posix_spawn", broken)
    r = Runner(state, slots=1)
    r.start(dispatch(1, work, ["true"]))
    res = finished(r, (1, 1), timeout=0.5)
    assert res["reason"] == "cannot start: RuntimeError: can't start new thread"


def test_items_without_a_job_and_attempt_are_logged_once(
    state: StateDir, work: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing to report them against; the server would send them again and again."""
    caplog.set_level(logging.INFO, logger="crq.tasker")
    r = Runner(state, slots=1)
    junk: list[Any] = [1, "x", None, {"job": 1}, {"attempt": 1}, {"job": "a", "attempt": 1}]
    for _ in range(5):
        r.start_many([*junk, dispatch(7, work, ["true"])])
    assert finished(r, (7, 1))["exit_code"] == 0
    errors = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert len(errors) == len(junk), [e.getMessage() for e in errors]
    assert all(e.getMessage().startswith("malformed dispatch") for e in errors)


# -- end to end: real server, real vovtasker ------------------------------------------------

e2e = pytest.mark.skipif(not server_available(), reason="server not written yet")

srv = pytest.fixture(e2e_server)


@pytest.fixture
def tasker(tmp_path: Path, srv: CrqServer) -> Iterator[Tasker]:
    t = Tasker(tmp_path / "tk1.state", "--swd", str(srv.swd), "--slots", "1")
    t.start()
    yield t
    t.kill9()
    kill_jobs(t.state)


def spec(cwd: Path | str, command: object, **kw: object) -> dict[str, object]:
    return {"command": command, "cwd": str(cwd), "env": {"PATH": os.environ["PATH"]}, **kw}


@e2e
def test_e2e_jobs_the_tasker_cannot_start_fail_with_the_reason(
    srv: CrqServer, tasker: Tasker, work: Path
) -> None:
    """Specs the server accepts but this host cannot run: each fails, the one slot frees."""
    (work / "afile").write_text("")
    long_cwd = _long_missing_dir(work)
    ids = srv.submit(
        spec(work / "not-on-this-host", ["true"]),
        spec(work, ["true"], log=str(work / "afile" / "x.log")),
        spec(long_cwd, ["true"]),
        spec(work, ["true"]),
    )
    jobs = [srv.wait(i) for i in ids]
    assert [j["state"] for j in jobs] == ["failed", "failed", "failed", "done"], jobs
    assert jobs[0]["reason"] == f"cwd does not exist: {work / 'not-on-this-host'}"
    assert jobs[1]["reason"].startswith(f"cannot open log {work / 'afile' / 'x.log'}: ")
    assert jobs[2]["reason"].startswith("cwd does not exist: ")
    assert all(j["attempt"] == 1 for j in jobs)
    assert "malformed dispatch" not in tasker.log() and "refused" not in tasker.log()
    wait_until(lambda: not StateDir(tasker.state).load_results())


@e2e
def test_e2e_jobs_killed_with_their_tasker_follow_the_rerun_policy(
    tmp_path: Path, work: Path
) -> None:
    """kill -9 of a tasker and its jobs, back well within tasker_timeout: the jobs end as
    the monitor ends them after the timeout (requeued if they may rerun, else lost), not
    failed; the same fault has the same outcome whenever the tasker returns."""
    srv = CrqServer(tmp_path / "q.swd", "t1", "--tasker-timeout", "60", "--heartbeat", "0.5")
    t = Tasker(tmp_path / "st", "--swd", str(srv.swd), "--slots", "2")
    try:
        srv.start()
        t.start()
        again, once = srv.submit(
            spec(work, '[ "$CRQ_ATTEMPT" = 1 ] && sleep 30; exit 0'),
            spec(work, "sleep 30", rerunnable=False),
        )
        pids = [wait_until(lambda j=j: _running(srv, j))["pid"] for j in (again, once)]
        killed_at = time.time()
        t.kill9()
        kill_jobs(t.state)
        wait_until(lambda: not any(alive(p) for p in pids))
        t.start()
        ja, jo = srv.wait(again), srv.wait(once)
        assert (ja["state"], ja["attempt"], ja["exit_code"]) == ("done", 2, 0), ja
        first = ja["attempts"][0]
        assert (first["outcome"], first["reason"]) == (
            "requeued",
            "killed while the tasker was down",
        )
        assert (jo["state"], jo["attempt"]) == ("lost", 1), jo
        assert jo["reason"] == "killed while the tasker was down"
        assert time.time() - killed_at < 60, "the monitor must not have had a say"
        assert [x["state"] for x in srv.request("GET", "/taskers")["taskers"]] == ["ready"]
        check = srv.request("POST", "/server/sanity")
        assert check["ok"] and not check["findings"], check
    finally:
        t.kill9()
        kill_jobs(t.state)
        srv.kill9()


def _running(srv: CrqServer, job: int) -> dict[str, Any] | None:
    j = srv.request("GET", f"/jobs/{job}")
    return j if j["state"] == "running" and j["pid"] else None
