"""Runner and state dir: real jobs (sh, sleep, true, false), no server involved."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from crq.tasker.procs import classify, current_umask, find_orphan_wrappers
from crq.tasker.runner import Runner
from crq.tasker.statedir import StateDir, StateDirBusy, read_status

from tests.rigs import PATIENCE, alive, dispatch, run_and_vanish, wait_until


def finished(runner: Runner, key: tuple[int, int], timeout: float = PATIENCE) -> dict:
    """Wait for the finished report of one attempt and return it."""

    def find() -> dict | None:
        _, done = runner.outbox.reports(everything=True)
        return next((r for r in done if (r["job"], r["attempt"]) == key), None)

    return wait_until(find, timeout)


def test_true_and_false_report_exit_codes_durably(state: StateDir, work: Path) -> None:
    events: list[int] = []
    r = Runner(state, on_event=lambda: events.append(1))
    r.start(dispatch(1, work, ["true"]))
    r.start(dispatch(2, work, ["false"]))
    started, _ = r.outbox.reports()
    assert {s["job"] for s in started} == {1, 2}
    assert all(s["pid"] > 0 and s["started"] > 0 for s in started)
    ok, bad = finished(r, (1, 1)), finished(r, (2, 1))
    assert (ok["exit_code"], ok["signal"], ok["reason"]) == (0, None, None)
    assert (bad["exit_code"], bad["signal"]) == (1, None)
    assert ok["ended"] >= ok["started"]
    # the result is on disk, the attempt record and status file are gone (the reaper drops
    # them just after it stores the result: wait for it, as below)
    assert set(state.load_results()) == {(1, 1), (2, 1)}
    wait_until(lambda: state.load_records() == {} and state.status_keys() == [])
    assert events, "the agent must be woken for prompt reports"


def test_a_batch_is_recorded_before_it_is_reported(state: StateDir, work: Path) -> None:
    """start_many: every record on disk before any started report; duplicates ignored."""
    r = Runner(state)
    seen_records: list[set] = []
    real = state.write_records

    def spy(records: list[dict]) -> None:
        assert r.outbox.reports(everything=True)[0] == [], "reported started before the records"
        real(records)
        seen_records.append(set(state.load_records()))

    state.write_records = spy  # type: ignore[method-assign]
    items = [dispatch(i, work, ["sh", "-c", f"exit {i % 3}"]) for i in range(1, 9)]
    r.start_many([*items, items[0], {"job": "x"}, dispatch(99, work / "nope", ["true"])])
    assert seen_records == [{(i, 1) for i in range(1, 9)}]  # one write, the whole batch
    started, _ = r.outbox.reports()
    assert {s["job"] for s in started} == set(range(1, 9))
    for i in range(1, 9):
        assert finished(r, (i, 1))["exit_code"] == i % 3
    assert finished(r, (99, 1))["reason"].startswith("cwd does not exist")
    wait_until(lambda: state.load_records() == {} and state.status_keys() == [])
    assert set(state.load_results()) == {*((i, 1) for i in range(1, 9)), (99, 1)}


def test_an_ending_attempt_is_listed_until_its_result_is_stored(
    state: StateDir, work: Path
) -> None:
    """Register reads running(), then the outbox: while the result goes to the disk the
    attempt must be in one of them, or the server recovers it and runs it again."""
    r = Runner(state)
    seen: list[tuple[list, list]] = []
    real = r.outbox.store_results

    def spy(results: list[dict]) -> None:
        seen.append((r.running(), r.outbox.reports(everything=True)[1]))
        real(results)

    r.outbox.store_results = spy  # type: ignore[method-assign]
    r.start(dispatch(1, work, ["true"]))
    finished(r, (1, 1))
    running, stored = seen[0]
    assert [(x["job"], x["attempt"]) for x in running] == [(1, 1)] and stored == []
    wait_until(lambda: r.running() == [])


def test_string_command_env_and_log(state: StateDir, work: Path) -> None:
    r = Runner(state)
    logp = work / "deep" / "er" / "out.log"
    d = dispatch(7, work, "echo hello; env | sort; exit 3", log=str(logp))
    d["env"] = {"FOO": "bar"}
    r.start(d)
    res = finished(r, (7, 1))
    assert res["exit_code"] == 3
    text = logp.read_text()
    assert text.startswith("hello\n")
    env_lines = {line.split("=", 1)[0] for line in text.splitlines()[1:] if "=" in line}
    # exactly the dispatch env plus the two crq variables (sh adds PWD on its own)
    assert env_lines - {"PWD"} == {"FOO", "CRQ_JOB_ID", "CRQ_ATTEMPT"}
    assert "CRQ_JOB_ID=7" in text and "CRQ_ATTEMPT=1" in text


def test_log_is_appended_and_cwd_used(state: StateDir, work: Path) -> None:
    r = Runner(state)
    logp = work / "same.log"
    r.start(dispatch(1, work, ["sh", "-c", "pwd"], log=str(logp)))
    finished(r, (1, 1))
    r.start(dispatch(2, work, ["sh", "-c", "echo two >&2"], log=str(logp)))
    finished(r, (2, 1))
    assert logp.read_text() == f"{work}\ntwo\n"


def test_missing_cwd_is_reported_without_running(state: StateDir, work: Path) -> None:
    r = Runner(state)
    gone = work / "nope"
    r.start(dispatch(3, gone, ["touch", str(work / "ran")]))
    res = finished(r, (3, 1), timeout=0.5)
    assert res["exit_code"] is None and res["signal"] is None
    assert res["reason"] == f"cwd does not exist: {gone}"
    assert not (work / "ran").exists()
    assert (3, 1) in state.load_results()


def test_unopenable_log_is_reported(state: StateDir, work: Path) -> None:
    (work / "afile").write_text("")
    r = Runner(state)
    r.start(dispatch(4, work, ["true"], log=str(work / "afile" / "x.log")))
    res = finished(r, (4, 1), timeout=0.5)
    assert res["exit_code"] is None
    assert res["reason"].startswith("cannot open log")


def test_command_not_found_is_exit_127(state: StateDir, work: Path) -> None:
    r = Runner(state)
    r.start(dispatch(5, work, ["no-such-command-crq"]))
    assert finished(r, (5, 1))["exit_code"] == 127
    assert "not found" in (work / "job5.log").read_text()


def test_death_by_signal_is_a_signal_not_an_exit_code(state: StateDir, work: Path) -> None:
    r = Runner(state)
    r.start(dispatch(6, work, ["sh", "-c", "kill -9 $$"]))
    res = finished(r, (6, 1))
    assert (res["exit_code"], res["signal"]) == (None, 9)
    assert res["reason"] == "killed by signal 9"


def test_kill_terms_the_process_group(state: StateDir, work: Path) -> None:
    r = Runner(state)
    # a job with a grandchild: both must go
    r.start(dispatch(8, work, "sleep 30 & echo $! > child.pid; wait"))
    pidfile = work / "child.pid"
    wait_until(lambda: pidfile.exists() and pidfile.read_text().strip())
    grandchild = int(pidfile.read_text())
    t0 = time.monotonic()
    assert r.kill((8, 1))
    res = finished(r, (8, 1))
    assert time.monotonic() - t0 < 2
    assert (res["exit_code"], res["signal"]) == (None, 15)
    assert res["reason"] == "killed on server request (signal 15)"
    wait_until(lambda: not alive(grandchild))
    assert not r.kill((8, 1)), "a finished attempt is not killed twice"


def test_kill_escalates_to_sigkill(state: StateDir, work: Path) -> None:
    r = Runner(state, kill_grace=0.3)
    r.start(dispatch(9, work, "trap '' TERM; echo ready; sleep 30"))
    wait_until(lambda: "ready" in (work / "job9.log").read_text())
    r.kill((9, 1))
    res = finished(r, (9, 1))
    assert res["signal"] == 9 and res["exit_code"] is None


def test_kill_only_the_named_attempt(state: StateDir, work: Path) -> None:
    r = Runner(state)
    r.start(dispatch(10, work, ["sleep", "30"], attempt=1))
    r.start(dispatch(11, work, ["sleep", "30"], attempt=2))
    assert not r.kill((10, 2)) and not r.kill((11, 1))
    assert len(r.running()) == 2
    r.kill((10, 1))
    finished(r, (10, 1))
    assert [x["job"] for x in r.running_attempts()] == [11]
    r.kill((11, 2))
    finished(r, (11, 2))


def test_ack_drops_only_what_was_sent(state: StateDir, work: Path) -> None:
    r = Runner(state)
    r.start(dispatch(1, work, ["true"]))
    started, _ = r.outbox.reports()
    res = finished(r, (1, 1))
    # an ack for a request that carried only the started report keeps the result
    r.outbox.ack({(1, 1)}, started, [])
    assert (1, 1) in state.load_results()
    started2, fin = r.outbox.reports()
    assert started2 == [] and fin == [res]
    r.outbox.ack({(1, 1)}, [], fin)
    assert r.outbox.reports(everything=True) == ([], [])
    assert state.load_results() == {}
    # a duplicate dispatch of an acked attempt does not run again
    r.start(dispatch(1, work, ["touch", "again"]))
    time.sleep(0.1)
    assert not (work / "again").exists()
    # and a new runner on the same dir has nothing to report
    r2 = Runner(state)
    assert r2.recover() == (0, 0)


def test_unacked_reports_wait_before_resend(state: StateDir, work: Path) -> None:
    r = Runner(state)
    r.start(dispatch(1, work, ["true"]))
    res = finished(r, (1, 1))
    started, fin = r.outbox.reports()
    r.outbox.sent(started, fin, delay=0.3)
    assert r.outbox.reports() == ([], [])
    assert 0 < (r.outbox.next_due_in() or 0) <= 0.3
    wait_until(lambda: r.outbox.reports()[1] == [res])
    r.outbox.sent(started, fin, delay=30)
    r.outbox.all_due()
    assert r.outbox.reports()[1] == [res]


def test_status_written_after_tasker_died(state: StateDir, work: Path) -> None:
    run_and_vanish(state.root, work, [dispatch(20, work, "sleep 0.3; exit 4")])
    assert (20, 1) in state.load_records()
    wait_until(lambda: state.exit_status((20, 1)) is not None)  # traced by the wrapper at start
    wait_until(lambda: (state.exit_status((20, 1)) or (None,))[0] == 4)
    r = Runner(state)
    assert r.recover() == (0, 1)
    res = finished(r, (20, 1), timeout=0.1)
    assert res["exit_code"] == 4 and res["reason"] is None
    assert "lost" not in res  # a real exit status is a real result
    assert state.load_records() == {} and state.status_keys() == []


def test_readoption_of_a_running_job(state: StateDir, work: Path) -> None:
    gate = work / "gate"  # the job outlives the dead runner however slow the machine is
    job = f"until [ -e {gate} ]; do sleep 0.02; done; echo done"
    run_and_vanish(state.root, work, [dispatch(21, work, job)])
    r = Runner(state, poll_interval=0.1)
    assert r.recover() == (1, 0)
    (running,) = r.running()
    assert running["job"] == 21 and running["pid"] == state.load_records()[(21, 1)]["pid"]
    started, _ = r.outbox.reports()
    assert [s["job"] for s in started] == [21]  # re-sent at register
    gate.touch()
    res = finished(r, (21, 1))
    assert res["exit_code"] == 0
    assert (work / "job21.log").read_text() == "done\n"
    r.close()


def test_kill_of_an_adopted_job(state: StateDir, work: Path) -> None:
    run_and_vanish(state.root, work, [dispatch(22, work, ["sleep", "30"])])
    r = Runner(state, poll_interval=0.1)
    assert r.recover() == (1, 0)
    assert r.kill((22, 1))
    res = finished(r, (22, 1))
    assert res["signal"] == 15 and res["exit_code"] is None
    r.close()


def test_adopted_job_killed_behind_our_back(state: StateDir, work: Path) -> None:
    run_and_vanish(state.root, work, [dispatch(23, work, ["sleep", "30"])])
    pid = state.load_records()[(23, 1)]["pid"]
    r = Runner(state, poll_interval=0.1)
    r.recover()
    os.killpg(pid, signal.SIGKILL)
    res = finished(r, (23, 1))
    assert res["exit_code"] is None and res["reason"] == "killed"
    assert "lost" not in res  # it died while we watched: the job's own failure
    r.close()


def test_orphan_without_record_is_found_through_proc(state: StateDir, work: Path) -> None:
    run_and_vanish(state.root, work, [dispatch(24, work, ["sleep", "30"])])
    pid = state.load_records()[(24, 1)]["pid"]
    state.remove_attempt((24, 1))  # as if the tasker died before writing it
    assert find_orphan_wrappers(state.status) == {(24, 1): pid}
    r = Runner(state, poll_interval=0.1)
    assert r.recover() == (1, 0)
    r.kill((24, 1))
    assert finished(r, (24, 1))["signal"] == 15
    r.close()


def test_an_orphan_of_the_earlier_wrapper_is_found_after_an_upgrade(state: StateDir) -> None:
    import subprocess

    from crq.tasker.procs import OLD_WRAPPERS, SH, WRAPPER_NAME

    status = state.status_path((25, 1))
    argv = [SH, "-c", OLD_WRAPPERS[0], WRAPPER_NAME, str(status), "sleep", "30"]
    proc = subprocess.Popen(argv, start_new_session=True)
    try:
        wait_until(lambda: read_status(status) is not None)
        assert find_orphan_wrappers(state.status) == {(25, 1): proc.pid}
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_a_process_with_a_wrappers_argv_outside_its_own_session_is_not_taken_for_it(
    state: StateDir,
) -> None:
    """The wrapper's fork shares its argv until it execs the job; only a session leader
    (every wrapper is one) is the wrapper, so the scan never adopts that fork's pid."""
    import subprocess

    from crq.tasker.procs import OLD_WRAPPERS, SH, WRAPPER_NAME

    status = state.status_path((26, 1))
    argv = [SH, "-c", OLD_WRAPPERS[0], WRAPPER_NAME, str(status), "sleep", "30"]
    proc = subprocess.Popen(argv, process_group=0)  # its own group, but pytest's session
    try:
        wait_until(lambda: read_status(status) is not None)
        assert (26, 1) not in find_orphan_wrappers(state.status)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_dead_record_is_reported_killed(state: StateDir) -> None:
    state.write_record(
        {"job": 30, "attempt": 2, "pid": 999999999, "pgid": 999999999, "started": 1.0,
         "status": str(state.status_path((30, 2)))}
    )  # fmt: skip
    r = Runner(state)
    assert r.recover() == (0, 1)
    res = finished(r, (30, 2), timeout=0.1)
    assert res["exit_code"] is None and res["reason"] == "killed while the tasker was down"
    assert res["started"] == 1.0
    # no exit status: it died with the tasker, for the server's rerun policy (durably so)
    assert res["lost"] is True and state.load_results()[(30, 2)]["lost"] is True


def test_reboot_drops_vanished_jobs_but_keeps_real_results(state: StateDir) -> None:
    for job in (31, 32):
        state.write_record(
            {"job": job, "attempt": 1, "pid": os.getpid(), "pgid": os.getpid(), "started": 1.0,
             "status": str(state.status_path((job, 1)))}
        )  # fmt: skip
    state.status_path((32, 1)).write_text("0\n")  # ended before the reboot
    r = Runner(state)
    assert r.recover(rebooted=True) == (0, 1)
    # the vanished attempt is left to the server (register says rebooted), the one that
    # ended before the reboot keeps its real result
    assert finished(r, (32, 1), 0.1)["exit_code"] == 0
    assert [x["job"] for x in r.outbox.reports(everything=True)[1]] == [32]
    assert state.load_records() == {} and state.status_keys() == []


def test_result_file_wins_over_leftovers(state: StateDir) -> None:
    # crash between writing the result and removing record + status
    res = {"job": 40, "attempt": 1, "exit_code": 0, "signal": None, "started": 1.0,
           "ended": 2.0, "reason": None}  # fmt: skip
    state.write_result(res)
    state.write_record({"job": 40, "attempt": 1, "pid": 1, "pgid": 1, "started": 1.0,
                        "status": str(state.status_path((40, 1)))})  # fmt: skip
    state.status_path((40, 1)).write_text("0\n")
    r = Runner(state)
    assert r.recover() == (0, 1)
    assert r.outbox.reports(everything=True)[1] == [res]
    assert state.load_records() == {} and state.status_keys() == []


def test_state_dir_lock_is_exclusive(tmp_path: Path) -> None:
    a = StateDir(tmp_path / "s")
    a.lock()
    with pytest.raises(StateDirBusy, match=f"pid {os.getpid()}"):
        StateDir(tmp_path / "s").lock()
    a.unlock()
    StateDir(tmp_path / "s").lock()


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mode & 0o777 for p in [root, *root.rglob("*")]}


def test_the_state_dir_is_private(tmp_path: Path, work: Path) -> None:
    """0700 directories, 0600 files, also where an older tasker left them world-readable;
    the job itself still gets the tasker's umask."""
    root = tmp_path / "old"
    for d in (root, root / "attempts", root / "status", root / "results"):
        d.mkdir()
        d.chmod(0o755)
    (root / "lock").write_text("")
    (root / "lock").chmod(0o644)
    state = StateDir(root)
    state.lock()
    state.identity()
    state.store_boot_id("boot")
    r = Runner(state)
    r.start(dispatch(1, work, "umask; while [ ! -e go ]; do sleep 0.02; done"))
    try:
        wait_until(lambda: state.exit_status((1, 1)) is not None)
        dirs = {".", "attempts", "status", "results"}  # the older layout's, until recovery
        files = {"lock", "id", "boot_id", "log", "status/g1"}
        assert _modes(root) == {**dict.fromkeys(dirs, 0o700), **dict.fromkeys(files, 0o600)}
    finally:
        (work / "go").touch()  # the job ends also when an assertion above fails
    assert finished(r, (1, 1))["exit_code"] == 0
    assert _modes(root)["log"] == 0o600
    r.recover()  # moves the older layout into the log
    assert set(_modes(root)) == {".", "status", "lock", "id", "boot_id", "log", "status/g1"}
    assert (work / "job1.log").read_text() == f"{current_umask():04o}\n"
    state.unlock()


def test_an_older_tmp_file_is_ignored_and_removed(state: StateDir) -> None:
    state.results.mkdir()
    (state.results / ".1.1.json.tmp123").write_text("{garbage")
    (state.results / "1.3.json").write_text(json.dumps({"job": 1, "attempt": 3}))
    state.write_result({"job": 1, "attempt": 2})
    assert set(state.load_results()) == {(1, 2), (1, 3)}
    state.compact()
    assert not state.results.exists()
    assert state.load_results() == {
        (1, 2): {"job": 1, "attempt": 2},
        (1, 3): {"job": 1, "attempt": 3},
    }


def test_read_status_and_classify(tmp_path: Path) -> None:
    p = tmp_path / "st"
    assert read_status(p) is None
    p.write_text("")
    assert read_status(p)[0] is None  # type: ignore[index]
    p.write_text("13")
    assert read_status(p)[0] is None  # type: ignore[index]
    p.write_text("13\n")
    assert read_status(p)[0] == 13  # type: ignore[index]
    assert classify(0) == (0, None)
    assert classify(-9) == (None, 9)
    assert classify(143) == (None, 15)
    assert classify(255) == (255, None)


def _attempts(r: Runner) -> set[tuple[int, int]]:
    return {(a["job"], a["attempt"]) for a in r.running_attempts()}


def _started(r: Runner) -> set[int]:
    return {s["job"] for s in r.outbox.reports(everything=True)[0]}


def test_dispatches_beyond_the_slots_wait_for_a_free_one(state: StateDir, work: Path) -> None:
    gate = work / "gate"
    r = Runner(state, slots=2)
    r.start_many([dispatch(i, work, ["sh", "-c", f"until [ -e {gate} ]; do sleep 0.02; done"])
                  for i in (1, 2)] + [dispatch(3, work, ["true"])])  # fmt: skip
    assert _started(r) == {1, 2}, "two slots: the third waits"
    assert _attempts(r) == {(1, 1), (2, 1), (3, 1)}, "held, but listed: not sent again"
    r.start(dispatch(3, work, ["true"]))  # the server repeats it: still one
    assert _started(r) == {1, 2}
    gate.touch()
    assert finished(r, (3, 1))["exit_code"] == 0
    assert finished(r, (1, 1))["exit_code"] == 0


def test_a_superseded_attempt_holds_its_slot_until_it_is_dead(state: StateDir, work: Path) -> None:
    """The server requeued our job while we were cut off and sends new work at once: the
    old attempt, deaf to SIGTERM, keeps its slot until the SIGKILL after the grace."""
    r = Runner(state, slots=1, kill_grace=0.5)
    ready = work / "ready"
    r.start(dispatch(1, work, ["sh", "-c", f"trap '' TERM; touch {ready}; sleep 30"]))
    wait_until(ready.exists)
    assert r.kill((1, 1))
    r.start(dispatch(2, work, ["true"]))
    assert _started(r) == {1}, "the slot is still taken by the dying attempt"
    old = finished(r, (1, 1))
    assert old["signal"] == signal.SIGKILL and "server request" in old["reason"]
    new = finished(r, (2, 1))
    assert new["exit_code"] == 0 and new["started"] >= old["ended"]


def test_killing_a_held_attempt_reports_it_without_running_it(state: StateDir, work: Path) -> None:
    gate = work / "gate"
    mark = work / "ran"
    r = Runner(state, slots=1)
    r.start(dispatch(1, work, ["sh", "-c", f"until [ -e {gate} ]; do sleep 0.02; done"]))
    r.start(dispatch(2, work, ["touch", str(mark)]))
    assert r.kill((2, 1)), "a held attempt is ours to kill"
    res = finished(r, (2, 1), timeout=0.5)
    assert res["exit_code"] is None and "before it started" in res["reason"]
    assert (2, 1) not in _attempts(r)
    gate.touch()
    finished(r, (1, 1))
    time.sleep(0.2)
    assert not mark.exists(), "a killed held attempt never runs"
    assert not r.kill((2, 1))
