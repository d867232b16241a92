"""The recovery monitor and manual recovery (SPEC sections 1 and 5), end to end.

Real server, real ``vovtasker`` processes, real shell jobs; nothing mocked. Taskers die
(kill -9 with their jobs), freeze (SIGSTOP past ``tasker_timeout``) and come back (SIGCONT),
a poison job takes its host down on every attempt, and the operator steps in with
``ncmgr cleanup`` with the server up, down (``--standalone``) and crashing right after.
Jobs append ``<job>:<attempt>`` lines to a file, so every run of every attempt is counted.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from crq.tasker.statedir import StateDir

from tests.rigs import (
    PATIENCE,
    ROOT,
    CrqServer,
    Tasker,
    alive,
    env_with_root,
    kill_jobs,
    server_available,
    wait_until,
)

pytestmark = pytest.mark.skipif(not server_available(), reason="server not written yet")

TIMEOUT = 2.0  # --tasker-timeout: small, so the monitor acts within the test's patience
FAST = ("--tasker-timeout", str(TIMEOUT), "--heartbeat", "0.5", "--recovery-grace", "3")
# For ncmgr cleanup the monitor must stay out of the way while the operator works.
SLOW = ("--tasker-timeout", "60", "--heartbeat", "0.5", "--recovery-grace", "3")


class Rig:
    """A server on a fresh swd, taskers started on demand, a work dir and a runs file."""

    def __init__(self, tmp: Path, srv: CrqServer, new_tasker: Callable[..., Tasker]) -> None:
        self.tmp = tmp
        self.srv = srv  # started (the crq_server fixture)
        self.swd = srv.swd
        self.work = tmp / "work"
        self.work.mkdir()
        self.runs = tmp / "runs.txt"
        self.runs.touch()
        self.home = tmp / "crqhome"
        self.home.mkdir()
        self.new_tasker = new_tasker  # the crq_tasker fixture
        self.taskers: list[Tasker] = []

    def tasker(self, name: str, *args: str, state: Path | None = None) -> Tasker:
        t = self.new_tasker(name, "--swd", str(self.swd), *args, state=state)
        self.taskers.append(t)
        return t

    def spec(self, command: str, **kw: Any) -> dict[str, Any]:
        line = f'echo "$CRQ_JOB_ID:$CRQ_ATTEMPT" >> {self.runs}; '
        return {
            "command": line + command,
            "cwd": str(self.work),
            "env": {"PATH": os.environ["PATH"]},
            **kw,
        }

    def job(self, job_id: int) -> dict[str, Any]:
        return dict(self.srv.request("GET", f"/jobs/{job_id}"))

    def running_on(self, job_id: int, tasker: str, attempt: int = 1) -> dict[str, Any] | None:
        j = self.job(job_id)
        ok = j["state"] == "running" and j["pid"] and j["tasker"] == tasker
        return j if ok and j["attempt"] == attempt else None

    def tasker_state(self, name: str) -> str | None:
        for t in self.srv.request("GET", "/taskers")["taskers"]:
            if t["name"] == name:
                return str(t["state"])
        return None

    def runs_of(self) -> Counter[str]:
        return Counter(self.runs.read_text().split())

    def ncmgr(self, *args: str, timeout: float = PATIENCE) -> subprocess.CompletedProcess[str]:
        env = {**env_with_root(), "CRQ_HOME": str(self.home)}
        for k in ("CRQ_TOKEN", "CRQ_SERVER", "CRQ_QUEUE"):
            env.pop(k, None)
        return subprocess.run(
            [sys.executable, "-m", "crq.client.ncmgr", "cleanup", "--swd", str(self.swd), *args],
            cwd=self.tmp, env=env, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip

    def sanity(self) -> dict[str, Any]:
        return dict(self.srv.request("POST", "/server/sanity"))

    def close(self) -> None:
        for t in self.taskers:
            if t.proc is not None and t.proc.poll() is None:
                t.proc.send_signal(signal.SIGCONT)  # a stopped process dies only once resumed
            t.kill9()
        self.srv.kill9()
        for d in self.tmp.glob("*.state"):
            kill_jobs(d)


@pytest.fixture
def rig_factory(
    tmp_path: Path, crq_server: Callable[..., CrqServer], crq_tasker: Callable[..., Tasker]
) -> Iterator[Any]:
    made: list[Rig] = []

    def make(*settings: str) -> Rig:
        r = Rig(tmp_path, crq_server(*settings, queue="mon"), crq_tasker)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def _cleanup_works() -> bool:
    text = (ROOT / "client" / "ncmgr.py").read_text()
    return "def cmd_cleanup" in text and "not implemented" not in text.split("def cmd_cleanup")[1]


needs_cleanup = pytest.mark.skipif(not _cleanup_works(), reason="ncmgr cleanup not implemented")


# -- the monitor ----------------------------------------------------------------------------


def test_dead_tasker_jobs_requeued_after_timeout(rig_factory: Any) -> None:
    """kill -9 of a tasker and its jobs: after tasker_timeout the jobs are requeued and end
    done on the other tasker with attempt 2; the dead tasker shows as lost."""
    rig: Rig = rig_factory(*FAST)
    dead = rig.tasker("dead1", "--slots", "3")
    # attempt 1 would never end by itself; attempt 2 ends at once
    ids = rig.srv.submit(*[rig.spec('[ "$CRQ_ATTEMPT" = 1 ] && sleep 30; exit 0')] * 3)
    for i in ids:
        wait_until(lambda i=i: rig.running_on(i, "dead1"))
    rig.tasker("alive1", "--slots", "3")
    wait_until(lambda: rig.tasker_state("alive1") == "ready")
    killed_at = time.time()
    dead.kill9()
    kill_jobs(dead.state)
    time.sleep(TIMEOUT / 4)
    assert all(rig.job(i)["state"] == "running" for i in ids), "recovered before the timeout"
    assert rig.tasker_state("dead1") != "lost"
    for i in ids:
        j = rig.srv.wait(i)
        assert (j["state"], j["exit_code"], j["attempt"], j["tasker"]) == (
            "done",
            0,
            2,
            "alive1",
        ), j
        assert [a["attempt"] for a in j["attempts"]] == [1, 2]
        assert [a["tasker"] for a in j["attempts"]] == ["dead1", "alive1"]
        assert [a["outcome"] for a in j["attempts"]] == ["requeued", "done"]
        assert j["attempts"][0]["ended"] >= killed_at + TIMEOUT / 2
    assert rig.tasker_state("dead1") == "lost"
    assert rig.tasker_state("alive1") == "ready"
    assert rig.runs_of() == Counter({f"{i}:{a}": 1 for i in ids for a in (1, 2)})
    sanity = rig.sanity()
    assert sanity["ok"] and not sanity["findings"], sanity


def test_frozen_tasker_results_are_fenced(rig_factory: Any) -> None:
    """SIGSTOP past the timeout: the jobs finish unseen, are rerun on the other tasker; back,
    the frozen tasker's late results (exit 7) are refused, and it takes new work."""
    rig: Rig = rig_factory(*FAST)
    frozen = rig.tasker("frozen", "--slots", "2", "--resources", "sideA")
    # attempt 1 exits 7 once the tasker is frozen (the gate opens); attempt 2 exits 0 at once
    gate = rig.tmp / "gate"
    wait_gate = f"until [ -e {gate} ]; do sleep 0.02; done"
    cmd = f'[ "$CRQ_ATTEMPT" = 1 ] && {{ {wait_gate}; exit 7; }}; exit 0'
    ids = rig.srv.submit(*[rig.spec(cmd)] * 2)
    pids = [wait_until(lambda i=i: rig.running_on(i, "frozen"))["pid"] for i in ids]
    other = rig.tasker("other", "--slots", "2")
    wait_until(lambda: rig.tasker_state("other") == "ready")
    assert frozen.proc is not None
    os.kill(frozen.proc.pid, signal.SIGSTOP)
    gate.touch()
    jobs = [rig.srv.wait(i) for i in ids]
    for j in jobs:
        assert (j["state"], j["exit_code"], j["attempt"], j["tasker"]) == (
            "done",
            0,
            2,
            "other",
        ), j
    assert rig.tasker_state("frozen") == "lost"
    # attempt 1 went on in its own session while the tasker was frozen, and ended (exit 7)
    wait_until(lambda: not any(alive(p) for p in pids))
    assert all((StateDir(frozen.state).exit_status((i, 1)) or (None,))[0] == 7 for i in ids)
    os.kill(frozen.proc.pid, signal.SIGCONT)
    wait_until(lambda: rig.tasker_state("frozen") == "ready")
    # its late results are delivered (and acked) but refused: nothing changes
    wait_until(lambda: not StateDir(frozen.state).load_results())
    for before in jobs:
        after = rig.job(before["id"])
        assert (after["state"], after["exit_code"], after["attempt"], after["tasker"]) == (
            "done",
            0,
            2,
            "other",
        ), after
        assert after["ended"] == before["ended"]
        assert [a["outcome"] for a in after["attempts"]] == ["requeued", "done"]
        assert [a["exit_code"] for a in after["attempts"]] == [None, 0]
    assert rig.runs_of() == Counter({f"{i}:{a}": 1 for i in ids for a in (1, 2)})
    assert "Traceback" not in frozen.log()
    # it carries on with new work: this job needs what only it offers
    (new,) = rig.srv.submit(rig.spec("exit 0", resources="sideA"))
    j = rig.srv.wait(new)
    assert (j["state"], j["attempt"], j["tasker"]) == ("done", 1, "frozen"), j
    sanity = rig.sanity()
    assert sanity["ok"] and not sanity["findings"], sanity
    assert other.proc is not None and other.proc.poll() is None


def test_back_from_a_freeze_the_tasker_never_runs_beyond_its_slots(rig_factory: Any) -> None:
    """Its attempt was superseded while it was frozen and is deaf to SIGTERM: the new attempt
    the server sends at once waits on the tasker until the old one is dead (a job holding
    a flock on one file per slot proves no overlap)."""
    rig: Rig = rig_factory(*FAST)
    t = rig.tasker("solo", "--slots", "1")
    lock = rig.tmp / "slot.lock"
    cmd = (
        f"exec 9>{lock}; flock -n 9 || echo OVERLAP >> {rig.runs}; "
        "[ \"$CRQ_ATTEMPT\" = 1 ] && { trap '' TERM; sleep 60; }; exit 0"
    )
    (job,) = rig.srv.submit(rig.spec(cmd))
    old = wait_until(lambda: rig.running_on(job, "solo"))["pid"]
    assert t.proc is not None
    os.kill(t.proc.pid, signal.SIGSTOP)
    wait_until(lambda: rig.tasker_state("solo") == "lost")
    assert rig.job(job)["state"] == "queued" and alive(old)
    os.kill(t.proc.pid, signal.SIGCONT)
    j = rig.srv.wait(job)
    assert (j["state"], j["attempt"], j["tasker"]) == ("done", 2, "solo"), j
    assert "OVERLAP" not in rig.runs.read_text(), "two jobs ran at once on one slot"
    assert "wait for a free slot" in t.log()
    assert not alive(old)


@pytest.mark.parametrize("delay", [0.5, 0])
def test_poison_job_gives_up_after_max_attempts(rig_factory: Any, delay: float) -> None:
    """A job that kills its tasker and itself, with a supervisor rebuilding the host each
    time (fresh state dir): lost after exactly max_attempts attempts, never run again.
    ``delay``: how long the job lives first (0: it may die before its start is reported)."""
    rig: Rig = rig_factory(*FAST)
    name = f"poison{os.getpid()}"
    state = {"n": 0}

    def fresh() -> Tasker:
        state["n"] += 1
        return rig.tasker(name, "--slots", "1", state=rig.tmp / f"{name}-{state['n']}.state")

    current = [fresh()]
    done = threading.Event()

    def supervise() -> None:
        while not done.is_set():
            proc = current[0].proc
            if proc is not None and proc.poll() is not None:
                current[0] = fresh()
            time.sleep(0.05)

    sup = threading.Thread(target=supervise, daemon=True)
    sup.start()
    try:
        wait_until(lambda: rig.tasker_state(name) == "ready")
        kill = f"sleep {delay}; pkill -9 -f -- '--name {name} '; kill -9 0"
        (job,) = rig.srv.submit(rig.spec(kill, max_attempts=2, name="poison"))
        j = rig.srv.wait(job)
        assert j["state"] == "lost", j
        assert j["attempt"] == 2 and len(j["attempts"]) == 2, j
        assert "2 attempts" in (j["reason"] or ""), j
        assert [a["outcome"] for a in j["attempts"]] == ["requeued", "lost"]
        time.sleep(1.5)  # give a wrong third dispatch the time to happen
        assert rig.job(job)["attempt"] == 2
        assert rig.runs_of() == Counter({f"{job}:1": 1, f"{job}:2": 1})
        # the rebuilt tasker is fine with healthy work
        wait_until(lambda: rig.tasker_state(name) == "ready")
        (ok,) = rig.srv.submit(rig.spec("exit 0"))
        assert rig.srv.wait(ok)["state"] == "done"
        assert state["n"] == 3, "the tasker should have been rebuilt twice"
    finally:
        done.set()
        sup.join(5)
    sanity = rig.sanity()
    assert sanity["ok"] and not sanity["findings"], sanity


# -- ncmgr cleanup ------------------------------------------------------------------------


def _frozen_with_jobs(rig: Rig, name: str, n: int) -> tuple[Tasker, list[int]]:
    t = rig.tasker(name, "--slots", str(n))
    ids = rig.srv.submit(*[rig.spec('[ "$CRQ_ATTEMPT" = 1 ] && sleep 30; exit 0')] * n)
    for i in ids:
        wait_until(lambda i=i: rig.running_on(i, name))
    assert t.proc is not None
    os.kill(t.proc.pid, signal.SIGSTOP)
    return t, ids


def _listed(out: str) -> dict[int, list[str]]:
    rows: dict[int, list[str]] = {}
    for line in out.splitlines():
        cells = line.split()
        if cells and cells[0].isdigit():
            rows[int(cells[0])] = cells
    return rows


@needs_cleanup
def test_cleanup_list_job_dead_host_with_server(rig_factory: Any) -> None:
    rig: Rig = rig_factory(*SLOW)
    frozen, ids = _frozen_with_jobs(rig, "icy", 3)

    def listed() -> dict[int, list[str]] | None:
        p = rig.ncmgr("--list")
        assert p.returncode == 0, p.stderr
        rows = _listed(p.stdout)
        return rows if set(rows) == set(ids) else None

    rows = wait_until(listed, step=0.2)
    for i in ids:
        assert rows[i][1:4] == ["1", "icy", socket.gethostname()], rows[i]
    head = rig.ncmgr("--list").stdout.splitlines()[0].split()
    assert head[:4] == ["ID", "ATTEMPT", "TASKER", "HOST"], head
    # The frozen tasker is silent: no new work goes to it, though its timeout has not run
    # out. Past 3 heartbeats + 1 s of silence (the server's freshness window) a
    # top-priority job submitted now, and the job recovered below, both wait.
    time.sleep(3 * 0.5 + 1.2)
    (filler,) = rig.srv.submit(rig.spec("exit 0", priority=15))
    # one job by hand
    p = rig.ncmgr("--job", str(ids[0]))
    assert p.returncode == 0, p.stderr
    assert f"job {ids[0]} attempt 1: requeued" in p.stdout
    j = rig.job(ids[0])
    assert j["state"] == "queued" and j["attempt"] == 1
    assert j["attempts"][0]["outcome"] == "requeued"
    assert "manual cleanup" in j["reason"]
    p = rig.ncmgr("--job", str(ids[0]))  # not running any more: a clear refusal
    assert p.returncode == 1 and "not running" in p.stderr and "Traceback" not in p.stderr
    assert set(_listed(rig.ncmgr("--list").stdout)) == set(ids[1:])
    assert rig.job(filler)["state"] == "queued" and rig.job(ids[0])["state"] == "queued"
    # the rest with the host (named by the tasker name)
    p = rig.ncmgr("--dead-host", "icy")
    assert p.returncode == 0, p.stderr
    for i in ids[1:]:
        assert f"job {i} attempt 1: requeued" in p.stdout
    assert "tasker icy: marked lost" in p.stdout
    assert rig.tasker_state("icy") == "lost"
    for i in ids[1:]:
        j = rig.job(i)
        assert j["state"] == "queued" and j["attempts"][0]["outcome"] == "requeued"
        assert "manual cleanup" in j["reason"] and "icy" in j["reason"]
    assert "every running attempt" in rig.ncmgr("--list").stdout
    p = rig.ncmgr("--dead-host", "no-such-host")
    assert p.returncode == 1 and "no tasker on host" in p.stderr
    # --standalone is refused while the server holds the swd
    p = rig.ncmgr("--standalone", "--list")
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "server is running" in p.stderr
    # the thawed tasker is fenced and re-registers; attempt 2 runs (there or elsewhere)
    rig.tasker("warm", "--slots", "3")
    os.kill(frozen.proc.pid, signal.SIGCONT)  # type: ignore[union-attr]
    for i in ids:
        j = rig.srv.wait(i)
        assert (j["state"], j["attempt"]) == ("done", 2), j
        assert [a["outcome"] for a in j["attempts"]] == ["requeued", "done"]
    j = rig.srv.wait(filler)
    assert (j["state"], j["attempt"]) == ("done", 1), j
    assert rig.runs_of() == Counter(
        {f"{i}:{a}": 1 for i in ids for a in (1, 2)} | {f"{filler}:1": 1}
    )
    sanity = rig.sanity()
    assert sanity["ok"] and not sanity["findings"], sanity


@needs_cleanup
def test_cleanup_standalone_then_restart(rig_factory: Any) -> None:
    rig: Rig = rig_factory(*SLOW)
    gone = rig.tasker("gone", "--slots", "2")
    a, b = rig.srv.submit(*[rig.spec('[ "$CRQ_ATTEMPT" = 1 ] && sleep 30; exit 0')] * 2)
    for i in (a, b):
        wait_until(lambda i=i: rig.running_on(i, "gone"))
    gone.kill9()
    kill_jobs(gone.state)  # the host is gone
    rig.srv.kill9()
    p = rig.ncmgr("--standalone", "--list")
    assert p.returncode == 0, p.stderr
    rows = _listed(p.stdout)
    assert set(rows) == {a, b} and rows[a][2] == "gone", p.stdout
    p = rig.ncmgr("--standalone", "--job", str(a))
    assert p.returncode == 0, p.stderr
    assert f"job {a} attempt 1: requeued" in p.stdout
    assert not (rig.swd / "trace.db" / "recovery.lock").exists()
    assert set(_listed(rig.ncmgr("--standalone", "--list").stdout)) == {b}
    # restart: b's tasker never comes back, so the grace period recovers it
    rig.srv.start(port=rig.srv.port)
    wait_until(lambda: rig.srv.request("GET", "/server")["mode"] == "normal")
    ja = rig.job(a)
    assert ja["state"] == "queued" and ja["attempts"][0]["outcome"] == "requeued"
    assert "manual cleanup" in ja["reason"]
    rig.tasker("fresh", "--slots", "2")
    for i in (a, b):
        j = rig.srv.wait(i)
        assert (j["state"], j["attempt"], j["tasker"]) == ("done", 2, "fresh"), j
    assert rig.runs_of() == Counter({f"{i}:{n}": 1 for i in (a, b) for n in (1, 2)})
    sanity = rig.sanity()
    assert sanity["ok"] and not sanity["findings"], sanity


@needs_cleanup
def test_server_crash_right_after_dead_host(rig_factory: Any) -> None:
    rig: Rig = rig_factory(*SLOW)
    frozen, ids = _frozen_with_jobs(rig, "numb", 2)
    p = rig.ncmgr("--dead-host", "numb")
    assert p.returncode == 0, p.stderr
    rig.srv.kill9()  # right after the answer: what was answered must stand
    rig.srv.start(port=rig.srv.port)
    wait_until(lambda: rig.srv.request("GET", "/server")["mode"] == "normal")
    for i in ids:
        j = rig.job(i)
        assert (j["state"], j["attempt"]) == ("queued", 1), j
        assert j["attempts"][0]["outcome"] == "requeued" and "manual cleanup" in j["reason"]
    assert rig.tasker_state("numb") == "lost"
    sanity = rig.sanity()
    assert sanity["ok"] and not sanity["findings"], sanity
    # the frozen tasker thaws: its old attempts are killed, attempt 2 runs and ends
    os.kill(frozen.proc.pid, signal.SIGCONT)  # type: ignore[union-attr]
    for i in ids:
        j = rig.srv.wait(i)
        assert (j["state"], j["attempt"], j["tasker"]) == ("done", 2, "numb"), j
    assert rig.runs_of() == Counter({f"{i}:{n}": 1 for i in ids for n in (1, 2)})


@needs_cleanup
def test_reset_lock_refuses_a_live_holder(rig_factory: Any) -> None:
    rig: Rig = rig_factory(*SLOW)
    rig.srv.kill9()
    lock = rig.swd / "trace.db" / "recovery.lock"
    holder = subprocess.Popen(["sleep", "30"])
    try:
        lock.write_text(f'{{"pid": {holder.pid}, "host": "{os.uname().nodename}", "time": 1}}')
        p = rig.ncmgr("--reset-lock")
        assert p.returncode == 1 and "live pid" in p.stderr and lock.exists(), p.stderr
        p = rig.ncmgr("--standalone", "--list")  # a recovery runs: standalone keeps off
        assert p.returncode == 1 and lock.exists(), p.stderr
        assert len(p.stderr.strip().splitlines()) == 1
    finally:
        holder.kill()
        holder.wait()
    p = rig.ncmgr("--standalone", "--list")  # now stale: named, with the way out
    assert p.returncode == 1 and "--reset-lock" in p.stderr, p.stderr
    p = rig.ncmgr("--reset-lock")
    assert p.returncode == 0 and not lock.exists(), p.stderr
    p = rig.ncmgr("--standalone", "--list")
    assert p.returncode == 0, p.stderr
