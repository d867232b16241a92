"""vovtasker against the real server: real processes, kill -9 of either side."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from crq.tasker.statedir import StateDir

from tests.rigs import (
    PATIENCE,
    CrqServer,
    Tasker,
    alive,
    e2e_server,
    env_with_root,
    free_port,
    kill_jobs,
    server_available,
    wait_until,
)

pytestmark = pytest.mark.skipif(not server_available(), reason="server not written yet")


srv = pytest.fixture(e2e_server)


@pytest.fixture
def tasker(tmp_path: Path, srv: CrqServer) -> Iterator[Tasker]:
    t = Tasker(tmp_path / "tk1.state", "--swd", str(srv.swd), "--slots", "4")
    t.start()
    yield t
    t.kill9()
    kill_jobs(t.state)


def spec(cwd: Path, command: object, **kw: object) -> dict[str, object]:
    return {"command": command, "cwd": str(cwd), "env": {"PATH": os.environ["PATH"]}, **kw}


def gated(work: Path, then: str) -> str:
    """A job that runs until the test touches ``work/gate``, then ``then``: it outlives a
    restart of either side however slow the machine is."""
    return f"while [ ! -e {work / 'gate'} ]; do sleep 0.02; done; {then}"


def running(srv: CrqServer, job: int) -> dict | None:
    j = srv.request("GET", f"/jobs/{job}")
    return j if j["state"] == "running" and j["pid"] else None


def test_jobs_run_and_report(srv: CrqServer, tasker: Tasker, work: Path) -> None:
    a, b, c = srv.submit(
        spec(work, ["sh", "-c", "echo hi; exit 3"]),
        spec(work, "echo $CRQ_JOB_ID.$CRQ_ATTEMPT", log=str(work / "logs" / "b.log")),
        spec(work / "missing", ["true"]),
    )
    ja, jb, jc = srv.wait(a), srv.wait(b), srv.wait(c)
    assert (ja["state"], ja["exit_code"], ja["tasker"]) == ("failed", 3, "tk1")
    assert (work / f"crq.{a}.log").read_text() == "hi\n"
    assert (jb["state"], jb["exit_code"]) == ("done", 0)
    assert (work / "logs" / "b.log").read_text() == f"{b}.1\n"
    assert jc["state"] == "failed" and jc["reason"] == f"cwd does not exist: {work / 'missing'}"
    # every result acked: nothing left on the tasker's disk
    wait_until(lambda: not StateDir(tasker.state).load_results())


def test_dispatch_is_prompt(srv: CrqServer, tasker: Tasker, work: Path) -> None:
    wait_until(lambda: srv.request("GET", "/taskers")["taskers"])
    time.sleep(0.3)  # the tasker is now in its long poll
    t0 = time.time()
    (job,) = srv.submit(spec(work, ["true"]))
    j = srv.wait(job)
    assert j["state"] == "done"
    assert j["ended"] - t0 < 1.0, "dispatch and report must not wait for a heartbeat"


def test_tasker_kill9_readopts_running_job(srv: CrqServer, tasker: Tasker, work: Path) -> None:
    (job,) = srv.submit(spec(work, gated(work, "echo done")))
    pid = wait_until(lambda: running(srv, job))["pid"]
    tasker.kill9()
    tasker.start()
    wait_until(lambda: "re-adopted" in tasker.log())
    (work / "gate").touch()
    j = srv.wait(job)
    assert (j["state"], j["exit_code"], j["attempt"], j["pid"]) == ("done", 0, 1, pid)
    assert (work / f"crq.{job}.log").read_text() == "done\n"
    assert "re-adopted" in tasker.log()


def test_result_buffered_while_tasker_down(srv: CrqServer, tasker: Tasker, work: Path) -> None:
    (job,) = srv.submit(spec(work, "sleep 0.3; exit 5"))
    wait_until(lambda: running(srv, job))
    tasker.kill9()
    time.sleep(0.6)
    assert srv.request("GET", f"/jobs/{job}")["state"] == "running"
    tasker.start()
    j = srv.wait(job)
    assert (j["state"], j["exit_code"], j["attempt"]) == ("failed", 5, 1)


def test_server_kill9_restart_on_new_port(srv: CrqServer, tasker: Tasker, work: Path) -> None:
    first, second = srv.submit(spec(work, "sleep 0.8; exit 0"), spec(work, "sleep 2; exit 0"))
    wait_until(lambda: running(srv, first) and running(srv, second))
    srv.kill9()
    time.sleep(1.0)  # the first ends while there is no server; the second still runs
    srv.start(port=free_port())  # server.json now names another port
    j1, j2 = srv.wait(first), srv.wait(second)
    assert (j1["state"], j1["attempt"]) == ("done", 1)
    assert (j2["state"], j2["attempt"]) == ("done", 1)
    (third,) = srv.submit(spec(work, ["true"]))
    assert srv.wait(third)["state"] == "done"
    assert "reconnected" in tasker.log()


def test_stop_kills_the_running_job(srv: CrqServer, tasker: Tasker, work: Path) -> None:
    (job,) = srv.submit(spec(work, ["sleep", "30"]))
    wait_until(lambda: running(srv, job))
    srv.request("POST", f"/jobs/{job}/stop")
    j = srv.wait(job)
    assert j["state"] == "stopped"
    assert j["signal"] in (15, None), j  # the server may settle it before the report


def test_sigterm_leaves_jobs_running(srv: CrqServer, tasker: Tasker, work: Path) -> None:
    (job,) = srv.submit(spec(work, gated(work, "echo ok")))
    pid = wait_until(lambda: running(srv, job))["pid"]
    t0 = time.monotonic()
    assert tasker.term() == 0
    assert time.monotonic() - t0 < 2
    os.kill(pid, 0)  # still there
    assert "Traceback" not in tasker.log()
    (work / "gate").touch()
    tasker.start()
    assert srv.wait(job)["state"] == "done"
    assert (work / f"crq.{job}.log").read_text() == "ok\n"


def test_failover_to_the_next_server(srv: CrqServer, tmp_path: Path, work: Path) -> None:
    env = env_with_root()
    env["CRQ_TASKER_TOKEN"] = (srv.swd / "security" / "tasker.token").read_text().strip()
    dead = f"http://127.0.0.1:{free_port()}"
    t = Tasker(tmp_path / "tk2.state", "--server", dead, "--server", srv.url, name="tk2")
    t.start(env=env)
    try:
        (job,) = srv.submit(spec(work, ["true"]))
        assert srv.wait(job)["state"] == "done"
    finally:
        t.kill9()
        kill_jobs(t.state)


def test_clean_stop_without_freeze_stops_the_tasker(
    srv: CrqServer, tasker: Tasker, work: Path
) -> None:
    (job,) = srv.submit(spec(work, ["sleep", "30"]))
    pid = wait_until(lambda: running(srv, job))["pid"]
    srv.stop(freeze=False)
    assert tasker.proc is not None
    assert tasker.proc.wait(timeout=PATIENCE) == 0
    wait_until(lambda: not alive(pid))


def test_usage_errors_are_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    for args in ([], ["--server", "http://x"], ["--swd", "x", "--slots", "0"],
                 ["--swd", "x", "--name", "a/b"]):  # fmt: skip
        p = subprocess.run(
            [sys.executable, "-m", "crq.tasker", *args],
            capture_output=True,
            env={**env_with_root(), "CRQ_TASKER_TOKEN": "", "CRQ_HOME": str(tmp_path)},
            timeout=PATIENCE,
        )
        assert p.returncode == 2, (args, p.stderr)
        assert len(p.stderr.decode().strip().splitlines()) == 1, p.stderr


def test_busy_state_dir_is_refused(tmp_path: Path, srv: CrqServer) -> None:
    import subprocess
    import sys

    a = Tasker(tmp_path / "s", "--swd", str(srv.swd))
    a.start()
    try:
        wait_until(lambda: "registered" in a.log())
        p = subprocess.run(
            [sys.executable, "-m", "crq.tasker", "--swd", str(srv.swd), "--state-dir",
             str(tmp_path / "s")],
            capture_output=True, env=env_with_root(), timeout=PATIENCE,
        )  # fmt: skip
        assert p.returncode == 1
        assert b"in use by another vovtasker" in p.stderr
        assert len(p.stderr.splitlines()) == 1
    finally:
        a.kill9()


def test_lost_tasker_comes_back_and_is_fenced(tmp_path: Path, work: Path) -> None:
    """A tasker frozen past the timeout: its job is requeued; back, it kills the old attempt."""
    srv = CrqServer(tmp_path / "q.swd", "t1", "--tasker-timeout", "1", "--heartbeat", "0.5")
    t = Tasker(tmp_path / "st", "--swd", str(srv.swd), "--slots", "1")
    try:
        srv.start()
        t.start()
        (job,) = srv.submit(spec(work, "sleep 30", max_attempts=3))
        pid = wait_until(lambda: running(srv, job))["pid"]
        assert t.proc is not None
        os.kill(t.proc.pid, signal.SIGSTOP)
        wait_until(lambda: srv.request("GET", f"/jobs/{job}")["state"] == "queued")
        os.kill(t.proc.pid, signal.SIGCONT)
        # attempt 1 is killed, attempt 2 then runs on the same (only) tasker
        wait_until(lambda: not alive(pid))
        j2 = wait_until(lambda: running(srv, job))
        assert j2["attempt"] == 2 and j2["pid"] != pid
        srv.request("POST", f"/jobs/{job}/stop")
        assert srv.wait(job)["attempt"] == 2
    finally:
        t.kill9()
        kill_jobs(t.state)
        srv.kill9()


def test_reboot_reports_lost_jobs_at_once(srv: CrqServer, tasker: Tasker, work: Path) -> None:
    (job,) = srv.submit(spec(work, "sleep 30", max_attempts=3))
    pid = wait_until(lambda: running(srv, job))["pid"]
    tasker.kill9()
    os.killpg(pid, signal.SIGKILL)  # the "reboot" took the job with it
    (tasker.state / "boot_id").write_text("an-older-boot\n")
    tasker.start()
    # at once: well before the 90 s tasker timeout would have the monitor requeue it
    j = wait_until(lambda: (x := running(srv, job)) and x["attempt"] == 2 and x, timeout=30)
    assert j["attempts"][0]["outcome"] == "requeued"  # recovered, not failed
    assert "gone with the host reboot" in tasker.log()
    srv.request("POST", f"/jobs/{job}/stop")
    srv.wait(job)


def test_freeze_stop_keeps_jobs_for_the_next_server(
    srv: CrqServer, tasker: Tasker, work: Path
) -> None:
    (job,) = srv.submit(spec(work, gated(work, "echo kept")))
    pid = wait_until(lambda: running(srv, job))["pid"]
    srv.stop(freeze=True)
    time.sleep(0.3)
    assert tasker.proc is not None and tasker.proc.poll() is None
    assert alive(pid)
    srv.start(port=free_port())
    (work / "gate").touch()
    j = srv.wait(job)
    why = f"{j.get('attempts')}\ntasker:\n{tasker.log()[-3000:]}\nserver:\n{srv.log()[-3000:]}"
    assert (j["state"], j["attempt"], j["pid"]) == ("done", 1, pid), why
    assert (work / f"crq.{job}.log").read_text() == "kept\n"


def test_kill9_storm_keeps_every_result(srv: CrqServer, tasker: Tasker, work: Path) -> None:
    """kill -9 of tasker and server at random moments: every job ends once, exit code kept."""
    import random

    rnd = random.Random(7)
    n = 30
    srv.submit(*[spec(work, f"sleep 0.{rnd.randint(0, 2)}; exit {i % 3}") for i in range(n)])
    for victim in ("tasker", "server", "tasker", "server", "tasker"):
        time.sleep(rnd.uniform(0.05, 0.3))
        if victim == "tasker":
            tasker.kill9()
            tasker.start()
        else:
            srv.kill9()
            srv.start(port=free_port())

    def all_final() -> bool:
        try:
            counts = srv.request("GET", "/server")["counts"]
        except AssertionError:  # still recovering
            return False
        return counts.get("done", 0) + counts.get("failed", 0) == n

    wait_until(all_final, step=0.1)
    for j in srv.request("GET", "/jobs")["jobs"]:
        assert j["attempt"] == 1, j
        assert j["exit_code"] == int(j["command"].rsplit(" ", 1)[1]), j
    wait_until(lambda: not StateDir(tasker.state).load_results())
    assert "Traceback" not in tasker.log()
