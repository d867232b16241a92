"""Time limits, memory limits and stored scripts (SPEC section 10), with real processes.

A time limit counts from the attempt's start as recorded, so it holds for an attempt a
restarted tasker re-adopts, and the reason ``time limit`` survives a tasker that dies between
its SIGTERM and its report (it records the enforcement first). The server's crash does not
matter to the tasker, which goes on enforcing and reports once the server is back.
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
from crq.tasker import cgroups
from crq.tasker.alarms import Alarms
from crq.tasker.runner import TIME_LIMIT, Runner
from crq.tasker.statedir import StateDir

from tests.rigs import (
    PATIENCE,
    CrqServer,
    Tasker,
    alive,
    dispatch,
    e2e_server,
    env_with_root,
    kill_jobs,
    server_available,
    wait_until,
)

IGNORE_TERM = "trap '' TERM; while :; do sleep 0.05; done"


def finished(runner: Runner, key: tuple[int, int], timeout: float = PATIENCE) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        _, done = runner.outbox.reports(everything=True)
        return next((r for r in done if (r["job"], r["attempt"]) == key), None)

    return wait_until(find, timeout)


@pytest.fixture
def runner(state: StateDir) -> Iterator[Runner]:
    r = Runner(state)
    yield r
    r.close()


def test_alarms_ring_in_time_order_and_cancelled_ones_are_let_go() -> None:
    alarms = Alarms()
    try:
        rang: list[int] = []
        now = time.time()
        for i in (3, 1, 2):
            alarms.at(now + i / 10, lambda i=i: rang.append(i))
        wait_until(lambda: len(rang) == 3)
        assert rang == [1, 2, 3]
        far = [alarms.at(now + 3600, lambda: rang.append(0)) for _ in range(200)]
        for a in far[:150]:
            alarms.cancel(a)
        assert alarms.pending() == 50
        assert len(alarms._heap) <= 100  # compacted: the heap does not grow with ended jobs
        alarms.cancel(far[0])  # twice: harmless
        assert alarms.pending() == 50
    finally:
        alarms.close()


# -- time limits -----------------------------------------------------------------------------


def test_a_job_past_its_time_limit_gets_sigterm_and_fails_with_the_reason(
    runner: Runner, work: Path
) -> None:
    runner.start(dispatch(1, work, ["sleep", "60"], time_limit=0.5))
    r = finished(runner, (1, 1))
    assert (r["reason"], r["exit_code"], r["signal"]) == (TIME_LIMIT, None, signal.SIGTERM)
    assert r["ended"] - r["started"] >= 0.5


def test_a_job_ignoring_sigterm_is_killed_after_the_grace(runner: Runner, work: Path) -> None:
    runner.start(dispatch(1, work, IGNORE_TERM, time_limit=0.3, kill_grace=0.5))
    r = finished(runner, (1, 1))
    assert (r["reason"], r["signal"]) == (TIME_LIMIT, signal.SIGKILL), r
    assert r["ended"] - r["started"] >= 0.8


def test_a_job_within_its_limit_is_done_and_a_job_may_exit_on_sigterm(
    runner: Runner, work: Path
) -> None:
    runner.start(dispatch(1, work, ["true"], time_limit=60))
    runner.start(dispatch(2, work, "trap 'exit 0' TERM; sleep 60 & wait", time_limit=0.3))
    assert finished(runner, (1, 1))["reason"] is None
    r = finished(runner, (2, 1))  # exit 0 after the SIGTERM: still the limit that ended it
    assert (r["reason"], r["exit_code"]) == (TIME_LIMIT, 0), r


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"time_limit": 0}, "bad time_limit: 0"),
        ({"time_limit": "90"}, "bad time_limit: '90'"),
        ({"time_limit": True}, "bad time_limit: True"),
        ({"time_limit": 5, "kill_grace": -1}, "bad kill_grace: -1"),
        ({"ram": 0}, "bad ram: 0"),
        ({"script": 5}, "bad script: not a string but int"),
        ({"script": "true", "command": "echo"}, "bad command: 'echo'"),
    ],
)
def test_bad_limits_or_scripts_fail_the_attempt_with_the_reason(
    runner: Runner, work: Path, change: dict[str, Any], reason: str
) -> None:
    runner.start({**dispatch(1, work, ["true"]), **change})
    r = finished(runner, (1, 1))
    assert r["reason"] == reason, r


_VANISH = """
import json, os, sys, time
from crq.tasker.statedir import StateDir
from crq.tasker.runner import Runner
state = StateDir(sys.argv[1])
r = Runner(state)
r.start(json.loads(sys.argv[2]))
if sys.argv[3] == "enforced":  # die right after the SIGTERM, before any report
    while not any(rec.get("limit_at") for rec in state.load_records().values()):
        if state.load_results():  # too late (a busy machine): the test says so, no hang
            break
        time.sleep(0.01)
    time.sleep(0.2)  # the SIGTERM follows the record at once
os._exit(0)
"""


def _vanish(state: StateDir, work: Path, d: dict[str, Any], when: str) -> None:
    """A tasker (its Runner) that starts ``d`` and dies like kill -9: at once, or just
    after it enforced the time limit."""
    argv = [sys.executable, "-c", _VANISH, str(state.root), json.dumps(d), when]
    subprocess.run(argv, check=True, env=env_with_root(), cwd=work, timeout=PATIENCE)


def _record(state: StateDir) -> dict[str, Any]:
    return next(iter(state.load_records().values()))


def test_a_readopted_job_is_killed_at_its_own_start_plus_the_limit(
    state: StateDir, work: Path
) -> None:
    _vanish(state, work, dispatch(1, work, ["sleep", "60"], time_limit=6), "at once")
    started = _record(state)["started"]
    wait_until(lambda: time.time() > started + 3)
    restarted = time.time()
    r = Runner(state)
    try:
        assert r.recover() == (1, 0)
        res = finished(r, (1, 1))
    finally:
        r.close()
    assert (res["reason"], res["signal"]) == (TIME_LIMIT, signal.SIGTERM), res
    assert res["ended"] >= started + 5.9  # the status file's mtime: a coarser clock
    # the restart's own clock would have ended it at restarted + 6, three seconds later
    assert res["ended"] < restarted + 5, (res["ended"] - started, restarted - started)


def test_the_reason_survives_a_tasker_dying_between_sigterm_and_report(
    state: StateDir, work: Path
) -> None:
    job = "trap 'sleep 1; exit 3' TERM; sleep 60 & wait"  # ends after its tasker died
    _vanish(state, work, dispatch(1, work, job, time_limit=0.2), "enforced")
    assert not state.load_results(), "the runner reported before it could be killed"
    wait_until(lambda: (st := state.exit_status((1, 1))) is not None and st[0] is not None)
    r = Runner(state)
    try:
        r.recover()
        res = finished(r, (1, 1))
    finally:
        r.close()
    assert (res["reason"], res["exit_code"]) == (TIME_LIMIT, 3), res
    assert not res.get("lost")


def test_a_restarted_tasker_sees_an_enforced_limit_through_to_the_sigkill(
    state: StateDir, work: Path
) -> None:
    """Died after the SIGTERM of a job that ignores it: the next tasker sends the SIGKILL
    at the recorded enforcement + grace, and reports the time limit."""
    d = dispatch(1, work, IGNORE_TERM, time_limit=0.2, kill_grace=1.5)
    _vanish(state, work, d, "enforced")
    rec = _record(state)
    r = Runner(state)
    try:
        assert r.recover() == (1, 0)
        res = finished(r, (1, 1))
    finally:
        r.close()
    assert (res["reason"], res["signal"]) == (TIME_LIMIT, signal.SIGKILL), res
    assert res["ended"] >= rec["limit_at"] + 1.4  # a status mtime: a coarser clock


def test_a_limit_kill_while_no_tasker_watched_is_a_time_limit_not_a_lost_attempt(
    state: StateDir, work: Path
) -> None:
    """The SIGKILL takes the wrapper too (no exit status): with the enforcement recorded
    it is the job's result, not an attempt lost with its tasker."""
    _vanish(state, work, dispatch(1, work, IGNORE_TERM, time_limit=0.2), "enforced")
    pgid = _record(state)["pgid"]
    os.killpg(pgid, signal.SIGKILL)  # as the dead tasker's SIGKILL would have
    wait_until(lambda: not alive(pgid))
    r = Runner(state)
    try:
        r.recover()
        res = finished(r, (1, 1))
    finally:
        r.close()
    assert res["reason"] == TIME_LIMIT and not res.get("lost"), res


def test_a_limited_job_found_running_without_a_record_keeps_its_limit(
    state: StateDir, work: Path
) -> None:
    """Spawned just before a crash, never recorded: the limit is read back from the
    wrapper's environment (CRQ_TIME_LIMIT, CRQ_KILL_GRACE, the job's to read too)."""
    d = dispatch(1, work, 'echo "$CRQ_TIME_LIMIT $CRQ_KILL_GRACE"; exec sleep 60', time_limit=2)
    _vanish(state, work, d, "at once")
    state.remove_attempts([(1, 1)])  # as if the record had never been written
    r = Runner(state)
    try:
        assert r.recover() == (1, 0)
        res = finished(r, (1, 1))
    finally:
        r.close()
    assert (res["reason"], res["signal"]) == (TIME_LIMIT, signal.SIGTERM), res
    assert (work / "job1.log").read_text().startswith("2 30\n")


# -- stored scripts --------------------------------------------------------------------------


def test_a_script_runs_with_the_command_as_its_arguments_then_goes(
    runner: Runner, state: StateDir, work: Path
) -> None:
    body = 'echo "args $# $1 $2"; stat -c "%a" "$0"; test -w "$0" && echo writable\n'
    runner.start(dispatch(1, work, ["a", "b c"], script=body))
    assert finished(runner, (1, 1))["exit_code"] == 0
    lines = (work / "job1.log").read_text().splitlines()
    assert lines[:2] == ["args 2 a b c", "700"], lines
    runner.start(dispatch(2, work, [], script="#!/bin/sh\necho shebang $0\n"))
    assert finished(runner, (2, 1))["exit_code"] == 0
    assert (work / "job2.log").read_text() == f"shebang {state.script_path((2, 1))}\n"
    wait_until(lambda: state.script_keys() == [])


def test_a_script_left_by_a_crash_goes_at_the_restart(state: StateDir, work: Path) -> None:
    _vanish(state, work, dispatch(1, work, [], script="sleep 0.2\n"), "at once")
    assert state.script_keys() == [(1, 1)]
    stray = state.scripts_dir() / "9.1"  # a script whose attempt never started
    stray.write_text("true\n")
    r = Runner(state)
    try:
        r.recover()
        assert finished(r, (1, 1))["exit_code"] == 0
    finally:
        r.close()
    wait_until(lambda: state.script_keys() == [])


# -- memory ----------------------------------------------------------------------------------


def _fake_v2(root: Path, proc: Path, enabled: str) -> None:
    (root / "jobs" / "me").mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpu memory pids\n")
    (root / "jobs" / "cgroup.subtree_control").write_text(enabled)
    proc.write_text("0::/jobs/me\n")


def test_cgroup_v2_is_used_beside_the_taskers_group(tmp_path: Path) -> None:
    root, proc = tmp_path / "cg", tmp_path / "cgroup"
    _fake_v2(root, proc, "cpu memory\n")
    memory = cgroups.detect("abc", root, proc)
    assert (memory.version, memory.base) == ("v2", root / "jobs" / "crq-abc")
    assert (memory.base / "cgroup.subtree_control").read_text() == "+memory\n"
    group = memory.prepare("7.1", 50)
    assert (group / "memory.max").read_text() == f"{50 << 20}\n"
    assert memory.join_argv(group)[-1] == str(group / "cgroup.procs")


def test_cgroup_v2_without_the_memory_controller_says_what_is_missing(tmp_path: Path) -> None:
    root, proc = tmp_path / "cg", tmp_path / "cgroup"
    _fake_v2(root, proc, "cpu\n")
    with pytest.raises(cgroups.Unusable, match="memory controller is not enabled in .*jobs"):
        cgroups.detect("abc", root, proc)


def test_cgroup_v1_is_used_inside_the_taskers_memory_group(tmp_path: Path) -> None:
    root, proc = tmp_path / "cg", tmp_path / "cgroup"
    (root / "memory" / "q" / "me").mkdir(parents=True)
    (root / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    proc.write_text("5:cpu:/\n4:memory:/q/me\n0::/\n")
    memory = cgroups.detect("abc", root, proc)
    assert (memory.version, memory.base) == ("v1", root / "memory" / "q" / "me" / "crq-abc")


def test_no_cgroup_at_all_is_unusable(tmp_path: Path) -> None:
    with pytest.raises(cgroups.Unusable, match="no cgroup memory controller under"):
        cgroups.detect("abc", tmp_path, tmp_path / "cgroup")


def _real_memory(state: StateDir) -> cgroups.Memory:
    try:
        return cgroups.detect(state.identity())
    except cgroups.Unusable as e:
        pytest.skip(f"no writable cgroup memory controller here: {e}")


ALLOCATE = [sys.executable, "-c", "b = bytearray({mb} << 20); print('allocated')"]


def test_a_job_over_its_ram_is_oom_killed_and_fails_with_the_reason(
    state: StateDir, work: Path
) -> None:
    memory = _real_memory(state)
    r = Runner(state, memory=memory)
    try:
        big = [a.format(mb=200) for a in ALLOCATE]
        small = [a.format(mb=10) for a in ALLOCATE]
        r.start(dispatch(1, work, big, ram=50))
        r.start(dispatch(2, work, small, ram=100))
        res = finished(r, (1, 1))
        assert (res["reason"], res["signal"]) == ("out of memory (RAM/50)", signal.SIGKILL), res
        ok = finished(r, (2, 1))
        assert (ok["reason"], ok["exit_code"]) == (None, 0), ok
        assert (work / "job2.log").read_text() == "allocated\n"
        wait_until(lambda: not any(p.is_dir() for p in memory.base.iterdir()))
    finally:
        r.close()
        memory.sweep(set())
        memory.base.rmdir()


# -- end to end: real server, real vovtasker -------------------------------------------------

e2e = pytest.mark.skipif(not server_available(), reason="server not written yet")

srv = pytest.fixture(e2e_server)


@pytest.fixture
def tasker(tmp_path: Path, srv: CrqServer) -> Iterator[Tasker]:
    t = Tasker(tmp_path / "tk1.state", "--swd", str(srv.swd), "--slots", "2")
    t.start()
    yield t
    t.kill9()
    kill_jobs(t.state)


def spec(cwd: Path, command: object, **kw: object) -> dict[str, object]:
    return {"command": command, "cwd": str(cwd), "env": {"PATH": os.environ["PATH"]}, **kw}


def _running(srv: CrqServer, job: int) -> dict[str, Any] | None:
    j = srv.request("GET", f"/jobs/{job}")
    return j if j["state"] == "running" and j["pid"] else None


@e2e
def test_e2e_a_time_limit_holds_through_a_server_kill9(
    srv: CrqServer, tasker: Tasker, work: Path
) -> None:
    [job] = srv.submit(spec(work, ["sleep", "60"], time_limit=3, kill_grace=1))
    pid = wait_until(lambda: _running(srv, job))["pid"]
    srv.kill9()
    wait_until(lambda: not alive(pid))  # the tasker enforced it while the server was down
    srv.start(port=srv.port)
    j = srv.wait(job)
    assert (j["state"], j["reason"], j["signal"]) == ("failed", TIME_LIMIT, 15), j
    assert (j["time_limit"], j["kill_grace"]) == (3, 1)
    assert [a["outcome"] for a in j["attempts"]] == ["failed"], j["attempts"]
    assert j["ended"] - j["started"] >= 3


@e2e
def test_e2e_a_time_limit_holds_through_a_tasker_kill9_and_restart(
    srv: CrqServer, tasker: Tasker, work: Path
) -> None:
    [job] = srv.submit(spec(work, ["sleep", "60"], time_limit=8))
    started = wait_until(lambda: _running(srv, job))["started"]
    tasker.kill9()
    wait_until(lambda: time.time() > started + 4)
    restarted = time.time()
    tasker.start()
    j = srv.wait(job)
    assert (j["state"], j["reason"], j["signal"]) == ("failed", TIME_LIMIT, 15), j
    assert len(j["attempts"]) == 1, j["attempts"]
    # (an adopted job's end is its status file's mtime: the kernel's coarser clock)
    assert started + 7.9 <= j["ended"] < restarted + 7, (j["ended"] - started, restarted - started)


@e2e
def test_e2e_crq_submit_script_runs_after_the_file_is_gone(
    srv: CrqServer, tasker: Tasker, work: Path
) -> None:
    script = work / "job.sh"
    script.write_text('#!/bin/sh\necho "hello $1 from $(basename "$0")"\n')
    env = {**env_with_root(), "CRQ_SERVER": srv.url, "CRQ_TOKEN": srv.admin_token}
    crq = [sys.executable, "-m", "crq.client.cli", "submit", "--time", "1:00", "--script"]
    out = subprocess.run(
        [*crq, str(script), "world"],
        env=env, cwd=work, capture_output=True, text=True, timeout=PATIENCE, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    job = int(out.stdout.strip())
    script.unlink()
    j = srv.wait(job)
    assert (j["state"], j["name"], j["command"], j["time_limit"]) == (
        "done",
        "job.sh",
        ["world"],
        60,
    )
    assert (work / f"crq.{job}.log").read_text() == f"hello world from {job}.1\n"


@e2e
def test_e2e_a_tasker_without_cgroups_says_it_cannot_enforce_memory_and_runs(
    srv: CrqServer, tmp_path: Path, work: Path
) -> None:
    t = Tasker(tmp_path / "tk2.state", "--swd", str(srv.swd), "--enforce-memory", name="tk2")
    t.start(env={**env_with_root(), cgroups.ROOT_ENV: str(tmp_path / "no-cgroups")})
    try:
        [job] = srv.submit(spec(work, ["true"]))
        assert srv.wait(job)["state"] == "done"
        assert "cannot enforce memory (RAM/N places jobs only): no cgroup memory" in t.log()
    finally:
        t.kill9()
        kill_jobs(t.state)


@e2e
def test_e2e_a_job_over_its_ram_fails_out_of_memory(
    srv: CrqServer, tmp_path: Path, work: Path
) -> None:
    probe = StateDir(tmp_path / "tk3.state")
    memory = _real_memory(probe)  # the tasker's base group (it uses the same state id)
    args = ("--swd", str(srv.swd), "--enforce-memory", "--resources", "RAM/4000")
    t = Tasker(probe.root, *args, name="tk3")
    t.start()
    try:
        big = spec(work, [a.format(mb=200) for a in ALLOCATE], resources="RAM/50")
        [job] = srv.submit(big)
        j = srv.wait(job)
        assert (j["state"], j["reason"], j["signal"]) == ("failed", "out of memory (RAM/50)", 9)
        assert f"enforcing RAM/N with cgroup {memory.version} under {memory.base}" in t.log()
        wait_until(lambda: not any(p.is_dir() for p in memory.base.iterdir()))
    finally:
        t.kill9()
        kill_jobs(t.state)
        memory.sweep(set())
        memory.base.rmdir()
