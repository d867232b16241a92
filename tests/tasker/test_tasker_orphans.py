"""Attempts spawned but never recorded: the tasker died between the spawn and the record.

``Runner.start_many`` spawns a batch and only then writes the attempt records, so a kill -9
of the tasker in between leaves a job (running, ended or killed) with no record. The next
tasker must still report that attempt exactly once: if it listed nothing, the server (which
trusts a tasker with the same state dir to remember all it spawned) would send the same
attempt again and the job would run twice. Real processes throughout; the window is made
deterministic by failing the record write (runner level) or by blocking it on a FIFO in the
real vovtasker (end to end), never by timing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from crq.tasker.procs import find_orphan_wrappers
from crq.tasker.runner import Runner
from crq.tasker.statedir import STALL_ENV, Key, StateDir

from tests.rigs import (
    PATIENCE,
    CrqServer,
    Tasker,
    dispatch,
    e2e_server,
    env_with_root,
    kill_jobs,
    server_available,
    wait_until,
)

# A dying tasker, as run_and_vanish, except that its attempt records never reach the disk.
UNRECORDED = (
    "import json, os, sys\n"
    "from crq.tasker.statedir import StateDir\n"
    "from crq.tasker.runner import Runner\n"
    "r = Runner(StateDir(sys.argv[1]))\n"
    "def crash(records):\n"
    "    raise OSError(5, 'the tasker died before writing its attempt records')\n"
    "r.state.write_records = crash\n"
    "r.start_many(json.loads(sys.argv[2]))\n"
    "os._exit(0)\n"
)


def spawn_unrecorded(state: StateDir, cwd: Path, jobs: list[dict[str, Any]]) -> None:
    """Spawn jobs exactly as the runner does, then die (os._exit) with no record written."""
    subprocess.run(
        [sys.executable, "-c", UNRECORDED, str(state.root), json.dumps(jobs)],
        check=True,
        env=env_with_root(),
        cwd=cwd,
        timeout=PATIENCE,
    )
    assert state.load_records() == {}, "the crash window: spawned, not recorded"


def finished(runner: Runner, key: Key, timeout: float = PATIENCE) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        _, done = runner.outbox.reports(everything=True)
        return next((r for r in done if (r["job"], r["attempt"]) == key), None)

    return wait_until(find, timeout)


def ended_with(state: StateDir, key: Key, rc: int) -> bool:
    st = state.exit_status(key)
    return st is not None and st[0] == rc


def gone(state: StateDir, key: Key) -> bool:
    """The wrapper of key is no longer running (a zombie counts as gone)."""
    return key not in find_orphan_wrappers(state.status)


GATED = "echo ran >> marker; while [ ! -e go ]; do sleep 0.02; done; exit 3"


# -- runner level ---------------------------------------------------------------------------


# A tasker that dies at the spawn itself: nothing of the job ever ran.
UNSPAWNED = (
    "import json, os, subprocess, sys\n"
    "from crq.tasker.statedir import StateDir\n"
    "from crq.tasker.runner import Runner\n"
    "def crash(*a, **k):\n"
    "    os._exit(0)\n"
    "os.posix_spawn = crash\n"
    "Runner(StateDir(sys.argv[1])).start_many(json.loads(sys.argv[2]))\n"
)


def test_an_attempt_the_dying_tasker_never_spawned_is_left_to_be_sent_again(
    state: StateDir, work: Path
) -> None:
    """Nothing ran, so nothing is reported: the server sends it again and it runs once. A
    report of "killed" here would fail a job that never ran (the kill -9 storm found it)."""
    items = json.dumps([dispatch(60, work, "true")])
    subprocess.run(
        [sys.executable, "-c", UNSPAWNED, str(state.root), items],
        check=True, env=env_with_root(), cwd=work, timeout=PATIENCE,
    )  # fmt: skip
    r = Runner(state)
    assert r.recover() == (0, 0)
    assert r.outbox.reports(everything=True) == ([], []) and r.running_attempts() == []
    r.start(dispatch(60, work, "exit 4"))
    assert finished(r, (60, 1))["exit_code"] == 4


def test_unrecorded_attempt_that_ended_is_reported_once(state: StateDir, work: Path) -> None:
    spawn_unrecorded(state, work, [dispatch(50, work, "echo ran >> marker; exit 7")])
    wait_until(lambda: ended_with(state, (50, 1), 7))
    r = Runner(state)
    assert r.recover() == (0, 1)
    res = finished(r, (50, 1), timeout=0.1)
    assert (res["exit_code"], res["signal"], res["reason"]) == (7, None, None)
    assert res["started"] <= res["ended"]
    assert state.load_records() == {} and state.status_keys() == []
    assert set(state.load_results()) == {(50, 1)}
    # the server sending the attempt again (it should not) would not run it again
    r.start(dispatch(50, work, "echo ran >> marker; exit 7"))
    assert r.running() == [] and r.outbox.reports(everything=True) == ([], [res])
    # another crash before the server acked: the very same result, once
    r2 = Runner(state)
    assert r2.recover() == (0, 1)
    assert r2.outbox.reports(everything=True) == ([], [res])
    assert (work / "marker").read_text() == "ran\n"


def test_unrecorded_running_attempt_is_adopted_and_recorded(state: StateDir, work: Path) -> None:
    spawn_unrecorded(state, work, [dispatch(51, work, GATED)])
    wait_until(lambda: (work / "marker").exists())
    (pid,) = find_orphan_wrappers(state.status).values()
    r = Runner(state, poll_interval=0.05)
    assert r.recover() == (1, 0)
    (running,) = r.running()
    assert (running["job"], running["pid"]) == (51, pid)
    started, _ = r.outbox.reports()
    assert started == [running], "reported started at registration"
    # adopted attempts are recorded, so the next restart knows them without /proc
    rec = state.load_records()[(51, 1)]
    assert (rec["pid"], rec["pgid"], rec["started"]) == (pid, pid, running["started"])
    r.start(dispatch(51, work, GATED))  # a repeated dispatch is not a second run
    assert len(r.running()) == 1
    (work / "go").touch()
    res = finished(r, (51, 1))
    assert (res["exit_code"], res["reason"], res["started"]) == (3, None, running["started"])
    wait_until(lambda: state.load_records() == {} and state.status_keys() == [])  # just after
    assert (work / "marker").read_text() == "ran\n"
    r.close()


def test_unrecorded_attempt_killed_while_tasker_down_is_reported(
    state: StateDir, work: Path
) -> None:
    """No record, no status written, no process: the spawn itself must still be known."""
    spawn_unrecorded(state, work, [dispatch(52, work, GATED)])
    wait_until(lambda: (work / "marker").exists())
    (pid,) = find_orphan_wrappers(state.status).values()
    os.killpg(pid, signal.SIGKILL)  # OOM killer, an operator: no status is written
    wait_until(lambda: gone(state, (52, 1)))
    r = Runner(state)
    assert r.recover() == (0, 1)
    res = finished(r, (52, 1), timeout=0.1)
    assert (res["exit_code"], res["reason"]) == (None, "killed while the tasker was down")
    assert state.load_records() == {} and state.status_keys() == []


def test_adopted_orphan_killed_during_a_second_outage(state: StateDir, work: Path) -> None:
    spawn_unrecorded(state, work, [dispatch(53, work, GATED)])
    wait_until(lambda: (work / "marker").exists())
    r = Runner(state, poll_interval=0.05)
    assert r.recover() == (1, 0)
    (running,) = r.running()
    r.close()  # the tasker dies again
    os.killpg(running["pid"], signal.SIGKILL)
    wait_until(lambda: gone(state, (53, 1)))
    r2 = Runner(state)
    assert r2.recover() == (0, 1)
    res = finished(r2, (53, 1), timeout=0.1)
    assert res["reason"] == "killed while the tasker was down"
    assert res["started"] == running["started"]


def test_sigkilled_child_ends_when_reaped_not_when_spawned(state: StateDir, work: Path) -> None:
    """The status file has a trace from the spawn on; without a status, its mtime is no end."""
    r = Runner(state, kill_grace=0.0)
    r.start(dispatch(54, work, "trap '' TERM; echo ready; sleep 30"))
    wait_until(lambda: "ready" in (work / "job54.log").read_text())
    spawned = (state.exit_status((54, 1)) or (None, 0.0))[1]
    assert spawned > 0
    assert r.kill((54, 1))
    res = finished(r, (54, 1))
    assert res["signal"] == 9
    assert res["ended"] >= spawned and res["ended"] >= res["started"]


# -- end to end: real server, real vovtasker -------------------------------------------------

e2e = pytest.mark.skipif(not server_available(), reason="server not written yet")


srv = pytest.fixture(e2e_server)


@pytest.fixture
def tasker(tmp_path: Path, srv: CrqServer) -> Iterator[Tasker]:
    t = Tasker(tmp_path / "tk1.state", "--swd", str(srv.swd), "--slots", "2")
    t.start(env={**env_with_root(), STALL_ENV: str(tmp_path / "stall")})
    yield t
    t.kill9()
    kill_jobs(t.state)


def spec(cwd: Path, command: object, **kw: object) -> dict[str, object]:
    return {"command": command, "cwd": str(cwd), "env": {"PATH": os.environ["PATH"]}, **kw}


def stall_record_write(
    srv: CrqServer, tasker: Tasker, command: str, work: Path, **kw: object
) -> int:
    """Submit one job whose attempt record the tasker cannot write: it hangs right there.

    ``write_records`` opens ``$CRQ_TEST_STALL_RECORDS.<pid>`` for writing if it exists;
    a FIFO of that name blocks the open until a reader comes, which never happens, so the
    tasker sits between the spawn and the record until we kill it (the restarted one has
    another pid). Made after the registration, like the dot file of earlier versions.
    """
    assert tasker.proc is not None
    wait_until(lambda: "registered with" in tasker.log())
    job = 1  # a fresh queue: ids start at 1
    os.mkfifo(tasker.state.parent / f"stall.{tasker.proc.pid}")
    (submitted,) = srv.submit(spec(work, command, **kw))
    assert submitted == job, "the FIFO must be named after the job"
    return job


def stalled_gated_job(srv: CrqServer, tasker: Tasker, work: Path, **kw: object) -> tuple[int, int]:
    """A GATED job running with no record and no start report: (job id, wrapper pid)."""
    job = stall_record_write(srv, tasker, GATED, work, **kw)
    wait_until(lambda: (work / "marker").exists())
    assert never_started(srv, job)
    (pid,) = find_orphan_wrappers(tasker.state / "status").values()
    return job, pid


def never_started(srv: CrqServer, job: int) -> bool:
    j = srv.request("GET", f"/jobs/{job}")
    return j["state"] == "running" and j["attempt"] == 1 and j["pid"] is None


def no_second_run(srv: CrqServer, work: Path, job: int) -> None:
    """One more job through the same tasker: a re-sent attempt would have come before it."""
    (other,) = srv.submit(spec(work, ["true"]))
    assert srv.wait(other)["state"] == "done"
    j = srv.request("GET", f"/jobs/{job}")
    assert j["attempt"] == 1 and len(j["attempts"]) == 1, j
    assert (work / "marker").read_text() == "ran\n"


@e2e
def test_e2e_job_ended_before_record_is_reported_once(
    srv: CrqServer, tasker: Tasker, tmp_path: Path
) -> None:
    work = tmp_path / "w"
    work.mkdir()
    job = stall_record_write(srv, tasker, "echo ran >> marker; exit 7", work)
    wait_until(lambda: ended_with(StateDir(tasker.state), (job, 1), 7))
    assert never_started(srv, job), "the server never heard of the start"
    tasker.kill9()
    tasker.start()
    j = srv.wait(job)
    assert (j["state"], j["exit_code"], j["attempt"]) == ("failed", 7, 1), j
    no_second_run(srv, work, job)
    wait_until(lambda: not StateDir(tasker.state).load_results())
    assert "Traceback" not in tasker.log()


@e2e
def test_e2e_job_running_at_restart_is_adopted_once(
    srv: CrqServer, tasker: Tasker, tmp_path: Path
) -> None:
    work = tmp_path / "w"
    work.mkdir()
    job, pid = stalled_gated_job(srv, tasker, work)
    tasker.kill9()
    tasker.start()
    j = wait_until(lambda: (x := srv.request("GET", f"/jobs/{job}"))["pid"] and x)
    assert (j["state"], j["pid"], j["attempt"]) == ("running", pid, 1)
    assert "found running without a record" in tasker.log()
    (work / "go").touch()
    j = srv.wait(job)
    assert (j["state"], j["exit_code"], j["attempt"]) == ("failed", 3, 1), j
    no_second_run(srv, work, job)


@e2e
def test_e2e_job_killed_before_record_is_not_sent_again(
    srv: CrqServer, tasker: Tasker, tmp_path: Path
) -> None:
    """Killed with the tasker: lost for a job that may not run again (never re-sent)."""
    work = tmp_path / "w"
    work.mkdir()
    job, pid = stalled_gated_job(srv, tasker, work, rerunnable=False)
    tasker.kill9()
    os.killpg(pid, signal.SIGKILL)  # the job dies too, before writing any status
    wait_until(lambda: not find_orphan_wrappers(tasker.state / "status"))
    tasker.start()
    j = srv.wait(job)
    assert (j["state"], j["attempt"], j["reason"]) == (
        "lost",
        1,
        "killed while the tasker was down",
    ), j
    no_second_run(srv, work, job)
    assert time.time() >= j["ended"] >= j["submitted"]
