"""A tasker name belongs to the session that registered it (issue 9, tasker sessions).

A second tasker under a live tasker's name is refused and changes nothing; a sync or a
report under another session is refused; a name whose holder went silent past the tasker
timeout (or was declared lost) is taken over, and then nothing of the old session counts.
Three levels: the commands on a Core, the real app in process (httpx's ASGI transport),
and real ``python -m crq.tasker`` processes against a real server.
"""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from crq.server import commands
from crq.server.app import create_app
from crq.server.commands import lose_tasker
from crq.server.engine import Engine
from crq.server.journal import Journal
from crq.server.models import Register, ResultReport, RunningReport
from crq.server.service import Service
from crq.server.settings import load
from crq.server.state import State
from crq.tasker.statedir import StateDir

from crq.wire import SESSION_HEADER
from tests.core import Core, fingerprint
from tests.rigs import (
    PATIENCE,
    CrqServer,
    Tasker,
    alive,
    env_with_root,
    kill_jobs,
    server_available,
    wait_until,
)

A, B = "session-a", "session-b"  # the hashes the commands see

# -- the commands -------------------------------------------------------------------------


def running_core() -> tuple[Core, int]:
    """Tasker w (session A) runs one started job."""
    core = Core()
    core.register("w", slots=2, session=A)
    (job,) = core.submit(1)
    core.dispatch()
    core.start("w", job, 1)
    assert core.state.jobs[job].state == "running"
    return core, job


def claim(core: Core, session: str, silent_for: float, **kw: Any) -> commands.Outcome:
    body = Register(host="intruder", pid=666, slots=9, **kw)
    out = commands.register(core.state, "w", body, core.tick(), session, silent_for, 90.0)
    core.emit(out.events)
    return out


def test_a_live_name_is_refused_to_another_session_and_nothing_changes() -> None:
    core, job = running_core()
    before = fingerprint(core.state)
    with pytest.raises(commands.NameInUse) as e:
        claim(core, B, silent_for=5.0)
    assert e.value.status == 409 and e.value.code == "tasker_name_in_use"
    assert "host host-w" in e.value.message and "--dead-host w" in e.value.message
    assert e.value.retry_after == 85.0
    assert fingerprint(core.state) == before


def test_reports_under_another_session_are_refused() -> None:
    core, job = running_core()
    before = fingerprint(core.state)
    done = ResultReport(job=job, attempt=1, exit_code=0)
    begun = [RunningReport(job=job, attempt=1)]
    out = commands.reports(core.state, "w", begun, [done], core.tick(), session=B)
    assert out.events == [] and out.kill == {(job, 1)}  # acked, not applied, killed
    assert fingerprint(core.state) == before
    out = commands.reports(core.state, "w", [], [done], core.tick(), session=A)
    core.emit(out.events)
    assert core.state.jobs[job].state == "done"


def test_the_same_session_is_recognised_while_live() -> None:
    core, job = running_core()
    body = Register(host="host-w", slots=2, running=[RunningReport(job=job, attempt=1)])
    out = commands.register(core.state, "w", body, core.tick(), A, 0.0, 90.0)
    core.emit(out.events)
    assert not out.kill and [e["e"] for e in out.events] == ["tasker"]
    assert core.state.jobs[job].state == "running"


def test_a_silent_name_is_taken_over_and_nothing_of_the_old_session_counts() -> None:
    core, job = running_core()
    # the newcomer claims the old session's attempt, as running and as finished
    begun = [RunningReport(job=job, attempt=1)]
    done = [ResultReport(job=job, attempt=1, exit_code=0)]
    out = claim(core, B, silent_for=91.0, running=begun, finished=done)
    assert out.kill == {(job, 1)}
    assert [e["e"] for e in out.events] == ["tasker", "recover"]
    j = core.state.jobs[job]
    assert j.state == "queued" and "taken over by another session" in (j.reason or "")
    t = core.state.taskers["w"]
    assert (t.session, t.slots, t.host, t.running) == (B, 9, "intruder", set())
    core.dispatch()  # attempt 2 goes to the new session; the old one's reports do nothing
    assert (j.state, j.attempt) == ("running", 2)
    late = [ResultReport(job=job, attempt=2, exit_code=0)]
    out = commands.reports(core.state, "w", [], late, core.tick(), session=A)
    assert out.events == [] and j.state == "running"


def test_a_lost_name_is_free_at_once() -> None:
    core, job = running_core()
    core.emit(lose_tasker(core.state, "w", "lost", core.tick()))
    claim(core, B, silent_for=0.0)
    assert core.state.taskers["w"].session == B and core.state.taskers["w"].state == "ready"


def test_a_name_without_a_session_is_claimed_with_its_jobs() -> None:
    """A journal from before sessions: the first session to register keeps the jobs."""
    core = Core()
    core.register("w", slots=2)  # session ""
    (job,) = core.submit(1)
    core.dispatch()
    out = claim(core, B, silent_for=0.0, running=[RunningReport(job=job, attempt=1, pid=7)])
    assert not out.kill and core.state.jobs[job].state == "running"
    assert core.state.jobs[job].pid == 7 and core.state.taskers["w"].session == B


# -- the app, in process ------------------------------------------------------------------

TOKEN, TASKER_TOKEN = "admin-token", "tasker-token"
SECRET_A, SECRET_B = "a" * 43, "b" * 43


async def app_scenario(tmp: Path) -> dict[str, Any]:
    flags = ["--fsync", "never", "--tasker-timeout", "60", "--heartbeat", "1"]
    settings = load(["--swd", str(tmp / "q.swd"), *flags])
    settings.paths.trace.mkdir(parents=True)
    journal = Journal(settings.paths.trace, next_seq=1, fsync=False)
    engine = Engine(State(), journal)
    srv = Service(settings, engine, TOKEN.encode(), TASKER_TOKEN.encode(), "test", "http://test")
    transport = httpx.ASGITransport(app=create_app(srv))
    out: dict[str, Any] = {}
    reg_a = {"host": "ha", "pid": 11, "slots": 2}
    reg_b = {"host": "hb", "pid": 22, "slots": 7}

    def as_tasker(secret: str | None) -> dict[str, str]:
        h = {"Authorization": f"Bearer {TASKER_TOKEN}"}
        return h | ({SESSION_HEADER: secret} if secret else {})

    admin = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:

        async def reg(secret: str | None, body: dict[str, Any], name: str = "w") -> Any:
            url = f"/api/v1/taskers/{name}/register"
            return await c.post(url, json=body, headers=as_tasker(secret))

        async def sync(secret: str | None, body: dict[str, Any], name: str = "w") -> Any:
            url = f"/api/v1/taskers/{name}/sync"
            return await c.post(url, json=body, headers=as_tasker(secret))

        r = await reg(SECRET_A, reg_a)
        assert r.status_code == 200 and "session" not in r.json(), r.text
        r = await c.post("/api/v1/jobs", json={"command": ["true"], "cwd": "/tmp"}, headers=admin)
        (job,) = r.json()["ids"]
        r = await sync(SECRET_A, {"wait": 2})
        assert [d["job"] for d in r.json()["dispatch"]] == [job], r.text
        started = {"job": job, "attempt": 1, "pid": 4242}
        r = await sync(SECRET_A, {"started": [started], "running": [started]})
        assert r.status_code == 200, r.text
        # a second tasker under the live name: refused, whatever it shows
        for secret in (SECRET_B, None):
            r = await reg(secret, {**reg_b, "running": [started]})
            out.setdefault("register_refused", []).append(
                (r.status_code, r.json(), r.headers.get("retry-after"))
            )
        finished = {"job": job, "attempt": 1, "exit_code": 0}
        for secret in (SECRET_B, None):
            r = await sync(secret, {"finished": [finished]})
            out.setdefault("sync_refused", []).append((r.status_code, r.json()))
        r = await c.get("/api/v1/taskers", headers=admin)
        out["taskers_after_refusal"] = r.json()["taskers"]
        r = await c.get(f"/api/v1/jobs/{job}", headers=admin)
        out["job_after_refusal"] = r.json()
        # the holder goes silent past the timeout while its long poll is out: taken over
        poll = asyncio.create_task(sync(SECRET_A, {"wait": 3, "running": [started]}))
        await asyncio.sleep(0.2)
        engine.links["w"].last_contact -= 100  # silence, as a frozen host would leave
        r = await reg(SECRET_B, {**reg_b, "running": [started]})
        out["takeover"] = (r.status_code, r.json())
        out["old_poll"] = (await poll).json()
        out["new_sync"] = (await sync(SECRET_B, {"wait": 2})).json()
        r = await sync(SECRET_A, {"finished": [finished]})
        out["old_sync"] = (r.status_code, r.json())
        r = await c.get(f"/api/v1/jobs/{job}", headers=admin)
        out["job_after_takeover"] = r.json()
        # a client showing no secret is given one, which then holds the name
        issued = (await reg(None, reg_a, name="x")).json()["session"]
        out["issued_sync"] = (await sync(issued, {}, name="x")).status_code
        r = await reg("short", reg_b)
        out["malformed"] = (r.status_code, r.json())
    engine.wake_all()
    journal.close()
    return out


def test_the_app_refuses_other_sessions_and_hands_a_silent_name_over(tmp_path: Path) -> None:
    out = asyncio.run(app_scenario(tmp_path))
    for status, body, retry_after in out["register_refused"]:
        assert (status, body["error"]) == (409, "tasker_name_in_use"), body
        assert "host ha, pid 11" in body["message"], body
        assert retry_after is not None and 55 <= int(retry_after) <= 60
    for status, body in out["sync_refused"]:
        assert (status, body["error"]) == (409, "wrong_session"), body
        assert "register first" in body["message"]
    (t,) = out["taskers_after_refusal"]
    assert (t["host"], t["slots"], t["free_slots"]) == ("ha", 2, 1)
    j = out["job_after_refusal"]
    assert (j["state"], j["pid"], j["tasker"]) == ("running", 4242, "w")
    status, body = out["takeover"]
    assert status == 200 and body["kill"] == [{"job": j["id"], "attempt": 1}], body
    assert out["old_poll"]["dispatch"] == [], "the old session got the new one's work"
    assert [(d["job"], d["attempt"]) for d in out["new_sync"]["dispatch"]] == [(j["id"], 2)]
    status, body = out["old_sync"]
    assert (status, body["error"]) == (409, "wrong_session")
    j = out["job_after_takeover"]
    assert (j["state"], j["attempt"]) == ("running", 2)
    assert j["attempts"][0]["outcome"] == "requeued"
    assert "taken over by another session (host hb)" in j["attempts"][0]["reason"]
    assert out["issued_sync"] == 200
    status, body = out["malformed"]
    assert status == 422 and SESSION_HEADER in body["message"]


# -- real processes -----------------------------------------------------------------------

e2e = pytest.mark.skipif(not server_available(), reason="server not written yet")


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[dict[str, Any]]:
    made: dict[str, Any] = {"taskers": [], "server": None}
    yield made
    for t in made["taskers"]:
        if t.proc is not None and t.proc.poll() is None:
            t.proc.send_signal(signal.SIGCONT)
        t.kill9()
        kill_jobs(t.state)
    if made["server"] is not None:
        made["server"].kill9()


def _server(tmp: Path, procs: dict[str, Any], timeout: str) -> CrqServer:
    srv = CrqServer(tmp / "q.swd", "sess", "--tasker-timeout", timeout, "--heartbeat", "0.5")
    procs["server"] = srv
    srv.start()
    return srv


def _tasker(srv: CrqServer, procs: dict[str, Any], state: Path, slots: int) -> Tasker:
    t = Tasker(state, "--swd", str(srv.swd), "--slots", str(slots), name="dup")
    t.logfile = state.parent / f"{state.name}.stderr"  # two taskers share the name
    procs["taskers"].append(t)
    t.start()
    return t


def _spec(work: Path, command: str) -> dict[str, Any]:
    return {"command": command, "cwd": str(work), "env": {"PATH": os.environ["PATH"]}}


def _job(srv: CrqServer, job: int) -> dict[str, Any]:
    return dict(srv.request("GET", f"/jobs/{job}"))


def _taskers(srv: CrqServer) -> list[dict[str, Any]]:
    return list(srv.request("GET", "/taskers")["taskers"])


@e2e
def test_a_second_tasker_is_refused_and_a_restarted_one_recognised(
    tmp_path: Path, procs: dict[str, Any]
) -> None:
    srv = _server(tmp_path, procs, "60")
    work = tmp_path / "work"
    work.mkdir()
    first = _tasker(srv, procs, tmp_path / "a.state", 2)
    wait_until(lambda: "registered with" in first.log())
    gate = work / "gate"  # the job runs through the checks below however slow the machine is
    (job,) = srv.submit(_spec(work, f"until [ -e {gate} ]; do sleep 0.02; done"))
    wait_until(lambda: _job(srv, job)["pid"])
    second = _tasker(srv, procs, tmp_path / "b.state", 7)
    wait_until(lambda: "not registered" in second.log())
    assert "tasker_name_in_use" in second.log() and "held by a live tasker" in second.log()
    assert second.proc is not None and second.proc.poll() is None, "refused, not crashed"
    (t,) = _taskers(srv)
    assert (t["slots"], t["running"]) == (2, [job]), t
    # the first one, restarted with its state dir, is the same session: back at once
    first.kill9()
    first.start()
    wait_until(lambda: first.log().count("registered with") == 2)
    assert "not registered" not in first.log()
    gate.touch()
    j = srv.wait(job)
    assert (j["state"], j["attempt"]) == ("done", 1), j
    (other,) = srv.submit(_spec(work, "true"))
    assert srv.wait(other)["state"] == "done"
    assert second.log().count("not registered") == 1, "said once, not a line a retry"
    assert not StateDir(tmp_path / "b.state").load_records(), "the second ran a job"
    mode = stat.S_IMODE((tmp_path / "a.state" / "session").stat().st_mode)
    assert mode == 0o600, oct(mode)
    # its host dies for good; the operator frees the name (no waiting for the timeout),
    # and the waiting tasker takes it at its next try
    first.kill9()
    env = {**env_with_root(), "CRQ_HOME": str(tmp_path / "home")}
    for k in ("CRQ_TOKEN", "CRQ_SERVER", "CRQ_QUEUE"):
        env.pop(k, None)
    p = subprocess.run(
        [sys.executable, "-m", "crq.client.ncmgr", "cleanup", "--swd", str(srv.swd), "--dead-host",
         "dup"], env=env, capture_output=True, text=True, timeout=PATIENCE,
    )  # fmt: skip
    assert p.returncode == 0 and "tasker dup: marked lost" in p.stdout, p.stderr
    wait_until(lambda: "tasker name dup is ours now" in second.log())
    (t,) = _taskers(srv)
    assert (t["slots"], t["state"]) == (7, "ready"), t
    (last,) = srv.submit(_spec(work, "true"))
    assert srv.wait(last)["state"] == "done"


@e2e
def test_a_replaced_tasker_kills_what_the_new_session_took_over(
    tmp_path: Path, procs: dict[str, Any]
) -> None:
    """Frozen past the timeout, the name taken by another session: back, the old tasker is
    refused and kills its superseded attempt; the job runs once more, on the new session."""
    srv = _server(tmp_path, procs, "2")
    work = tmp_path / "work"
    work.mkdir()
    old = _tasker(srv, procs, tmp_path / "a.state", 1)
    (job,) = srv.submit(_spec(work, '[ "$CRQ_ATTEMPT" = 1 ] && sleep 60; exit 0'))
    pid = wait_until(lambda: _job(srv, job)["pid"])
    assert old.proc is not None
    os.kill(old.proc.pid, signal.SIGSTOP)
    wait_until(lambda: _taskers(srv)[0]["state"] == "lost")
    new = _tasker(srv, procs, tmp_path / "b.state", 3)
    j = srv.wait(job)
    assert (j["state"], j["attempt"]) == ("done", 2), j
    assert alive(pid)
    os.kill(old.proc.pid, signal.SIGCONT)
    wait_until(lambda: not alive(pid))
    wait_until(lambda: "killed 1 jobs superseded" in old.log())
    assert "registered with" in new.log() and "held by a live tasker" in old.log()
    (t,) = _taskers(srv)
    assert t["slots"] == 3 and t["state"] == "ready", "the old tasker took the name back"
