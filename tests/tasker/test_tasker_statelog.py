"""The state log: torn records, compaction under kill -9, the older layout, status files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from crq.tasker.procs import OLD_WRAPPERS, SH, WRAPPER_NAME
from crq.tasker.runner import Runner
from crq.tasker.statedir import StateDir, encode

from tests.rigs import PATIENCE, dispatch, env_with_root, wait_until


def result(job: int, rc: int = 0) -> dict[str, Any]:
    return {"job": job, "attempt": 1, "exit_code": rc, "signal": None, "started": 1.0,
            "ended": 2.0, "reason": None}  # fmt: skip


def record(job: int, pid: int = 999999999) -> dict[str, Any]:
    return {"job": job, "attempt": 1, "pid": pid, "pgid": pid, "started": 1.0,
            "status": "", "kill_at": None}  # fmt: skip


def finished(r: Runner, key: tuple[int, int]) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        _, done = r.outbox.reports(everything=True)
        return next((x for x in done if (x["job"], x["attempt"]) == key), None)

    return wait_until(find)


def test_a_torn_last_record_is_ignored_and_not_glued_to_the_next(state: StateDir) -> None:
    state.write_results([result(1), result(2)])
    line = encode({"k": "end", **result(3)})
    with open(state.log_path, "ab") as f:
        f.write(line[: len(line) // 2])  # a power cut in the middle of the write
    assert set(state.load_results()) == {(1, 1), (2, 1)}
    # the restarted tasker appends after the torn tail: its record must not be lost with it
    StateDir(state.root).write_result(result(4))
    assert set(state.load_results()) == {(1, 1), (2, 1), (4, 1)}
    assert state.log_path.read_bytes().endswith(encode({"k": "end", **result(4)}))


def test_a_damaged_record_is_ignored(state: StateDir) -> None:
    state.write_results([result(1), result(2)])
    data = state.log_path.read_bytes()
    at = data.index(b'"job":2') + 6
    state.log_path.write_bytes(data[:at] + b"7" + data[at + 1 :])  # job 2 -> job 7, same length
    assert set(state.load_results()) == {(1, 1)}, "the CRC does not match: not job 7"


def test_acks_drops_and_compaction_keep_the_live_records(state: StateDir) -> None:
    state.write_records([record(1), record(2), record(3)])
    state.write_results([result(1), result(5)])
    state.remove_attempts([(2, 1)])
    state.remove_results([(5, 1)])
    want = (state.load_records(), state.load_results())
    assert set(want[0]) == {(3, 1)} and set(want[1]) == {(1, 1)}
    size = state.log_path.stat().st_size
    state.compact()
    assert (state.load_records(), state.load_results()) == want
    assert state.log_path.stat().st_size < size


# A writer that compacts and is killed -9 at the rename: just before it, or just after.
KILLED_COMPACTION = (
    "import json, os, signal, sys\n"
    "from crq import durable\n"
    "from crq.tasker.statedir import StateDir\n"
    "s = StateDir(sys.argv[1])\n"
    "def die(*a):\n"
    "    os.kill(os.getpid(), signal.SIGKILL)\n"
    "real = os.replace\n"
    "def replace(*a):\n"
    "    if sys.argv[2] == 'after':\n"
    "        real(*a)\n"
    "    die()\n"
    "os.replace = replace\n"
    "s.compact()\n"
)


def test_compaction_killed_at_the_rename_loses_nothing(state: StateDir, tmp_path: Path) -> None:
    state.write_records([record(1), record(2)])
    state.write_results([result(2), result(3), result(4)])
    state.remove_results([(4, 1)])
    want = (state.load_records(), state.load_results())
    for when in ("before", "after"):
        proc = subprocess.run(
            [sys.executable, "-c", KILLED_COMPACTION, str(state.root), when],
            env=env_with_root(), timeout=PATIENCE,
        )  # fmt: skip
        assert proc.returncode == -signal.SIGKILL
        assert (state.load_records(), state.load_results()) == want, when
        assert (state.root / "log.new").exists() == (when == "before")
        again = StateDir(state.root)
        again.write_result(result(9))  # a restarted tasker writes on, and compacts
        again.compact()
        assert not (state.root / "log.new").exists()
        assert again.load_results() == {**want[1], (9, 1): result(9)}
        again.remove_results([(9, 1)])


def test_done_attempts_are_not_reported_again_and_status_files_go(
    tmp_path: Path, work: Path
) -> None:
    """Traces of finished, acked attempts stay in a status file while it is in use; the log
    speaks for them (``D``), so a restart reports nothing; unused status files are removed."""
    state = StateDir(tmp_path / "st", gen_size=2)
    r = Runner(state)
    for job in range(1, 6):
        r.start(dispatch(job, work, ["true"]))
        res = finished(r, (job, 1))
        r.outbox.ack({(job, 1)}, [], [res])
    assert state.load_results() == {} and state.status_keys() == []
    state.compact()
    assert sorted(p.name for p in state.status.iterdir()) == ["g2", "g3"], "the current ones"
    r2 = Runner(StateDir(state.root, gen_size=2))
    assert r2.recover() == (0, 0)
    assert r2.outbox.reports(everything=True) == ([], [])
    assert list(state.status.iterdir()) == [], "the restart has none of its own yet"


def test_an_older_state_dir_is_migrated_with_a_job_running_across(
    state: StateDir, work: Path
) -> None:
    """What a tasker of the earlier layout left: a job running under its wrapper, one that
    ended while nobody watched, and a result not acked yet."""
    root = state.root
    for d in ("attempts", "results"):
        (root / d).mkdir(mode=0o700, exist_ok=True)
    gate = work / "gate"
    running = root / "status" / "1.1"
    proc = subprocess.Popen(
        [SH, "-c", OLD_WRAPPERS[1], WRAPPER_NAME, str(running), "022",
         "sh", "-c", f"until [ -e {gate} ]; do sleep 0.02; done; exit 5"],
        start_new_session=True,
    )  # fmt: skip
    try:
        wait_until(running.exists)
        old = {**record(1, proc.pid), "status": str(running)}
        (root / "attempts" / "1.1.json").write_text(json.dumps(old))
        (root / "attempts" / "2.1.json").write_text(
            json.dumps({**record(2), "status": str(root / "status" / "2.1")})
        )
        (root / "status" / "2.1").write_text("3\n")  # ended while no tasker watched
        (root / "results" / "3.1.json").write_text(json.dumps(result(3, 4)))
        r = Runner(state, poll_interval=0.05)
        assert r.recover() == (1, 2)
        assert not (root / "attempts").exists() and not (root / "results").exists()
        assert set(state.load_records()) == {(1, 1)} and set(state.load_results()) == {
            (2, 1),
            (3, 1),
        }
        assert finished(r, (2, 1))["exit_code"] == 3
        assert finished(r, (3, 1))["exit_code"] == 4
        assert r.running()[0]["pid"] == proc.pid, "re-adopted by pid"
        gate.touch()
        assert finished(r, (1, 1))["exit_code"] == 5
        proc.wait(timeout=PATIENCE)
        wait_until(lambda: not running.exists())  # its own status file goes with the record
        r.close()
        r2 = Runner(StateDir(root))
        assert r2.recover() == (0, 3), "each result once, nothing run again"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
