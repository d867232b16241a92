"""The real CLIs of a failover queue: ``ncmgr start --standby``, ``status``, ``failover``,
``stop --all``, and ``crq`` following the leader across a handover and a kill -9.

Waits for the server's standby mode (server/election.py): skipped until it is there. Each
test has its own queue (private CRQ_HOME, free ports); every server on its swd is killed at
the end whatever state a failed test left it in.
"""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.client.test_client_integration import Queue, kill_servers_of
from tests.rigs import ROOT, alive, free_port, wait_until

pytestmark = pytest.mark.skipif(
    not (ROOT / "server" / "election.py").exists(), reason="waits for the server's standby mode"
)


@pytest.fixture
def fq(tmp_path: Path) -> Iterator[Queue]:
    """A queue whose leader ``ncmgr start`` started (and a tasker on its swd)."""
    env = dict(os.environ)
    for var in ("CRQ_SERVER", "CRQ_TOKEN", "CRQ_TASKER_TOKEN"):
        env.pop(var, None)
    name = f"fo{os.getpid()}"
    env.update(
        CRQ_HOME=str(tmp_path / "home"),
        CRQ_QUEUE=name,
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    queue = Queue(name=name, port=free_port(), root=tmp_path, env=env)
    try:
        out = queue.ncmgr(*queue.start_args())
        assert out.returncode == 0, out.stderr + out.stdout
        queue.start_tasker()
        yield queue
    finally:
        queue.stop_tasker()
        try:
            queue.ncmgr("stop", "--all", "--queue", name)
        finally:
            kill_servers_of(queue.swd)


def start_standby(q: Queue) -> str:
    out = q.ncmgr("start", "--standby", "--queue", q.name, "--swd", str(q.swd),
                  "--fsync", "never", "--recovery-grace", "30")  # fmt: skip
    assert out.returncode == 0, out.stderr + out.stdout
    m = re.search(r"standby started at (http://\S+) \(pid (\d+)", out.stdout)
    assert m, out.stdout
    assert f"leader: {q.url}" in out.stdout
    return m.group(1)


def entry(q: Queue) -> dict[str, object]:
    data = json.loads((Path(q.env["CRQ_HOME"]) / "registry.json").read_text())
    return dict(data[q.name])


def test_standby_status_failover_and_stop_all(fq: Queue) -> None:
    q = fq
    url = start_standby(q)
    port = int(url.rsplit(":", 1)[1])
    assert port > q.port  # the next free port after the queue's (the leader's)
    e = entry(q)
    assert e["url"] == q.url and e["candidates"] == [q.url, url]

    out = q.ncmgr("status", "--queue", q.name)
    assert out.returncode == 0, out.stderr
    assert "servers:" in out.stdout
    rows = [line.split() for line in out.stdout.split("servers:")[1].splitlines()[2:]]
    assert sorted((r[0], r[1], r[2]) for r in rows) == [
        ("leader", "normal", q.url),
        ("standby", "standby", url),
    ], out.stdout

    # a client sent to the standby is sent on to the leader
    out = q.crq("--server", url, "submit", "--", "true")
    assert out.returncode == 0, out.stderr
    first = int(out.stdout.split()[0])

    out = q.ncmgr("failover", "--queue", q.name, "--to", "elsewhere.example")
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
    assert "has no standby on elsewhere.example" in out.stderr
    assert "nothing was handed over" in out.stderr

    out = q.ncmgr("failover", "--queue", q.name, "--to", os.uname().nodename)
    assert out.returncode == 0, out.stderr + out.stdout
    m = re.fullmatch(rf"queue {q.name}: leader now {re.escape(url)} \(epoch (\d+)\)\n", out.stdout)
    assert m, out.stdout
    assert entry(q)["url"] == url

    # the registry's leader moved: plain commands go there; the job is still known
    out = q.crq("wait", str(first))
    assert out.returncode == 0, out.stderr
    second = q.submit("--", "true")
    assert q.crq("wait", str(second)).returncode == 0

    out = q.ncmgr("status", "--queue", q.name)
    assert out.returncode == 0 and re.search(rf"^epoch +{m.group(1)}$", out.stdout, re.M)
    rows = [line.split() for line in out.stdout.split("servers:")[1].splitlines()[2:]]
    assert sorted((r[0], r[2]) for r in rows) == [("leader", url), ("standby", q.url)]

    pids = [int(json.loads(p.read_text())["pid"]) for p in (q.swd / "servers").glob("*.json")]
    out = q.ncmgr("stop", "--all", "--queue", q.name)
    assert out.returncode == 0, out.stderr + out.stdout
    assert "standby at" in out.stdout and "stopped" in out.stdout
    assert not any(alive(pid) for pid in pids)


def test_failover_without_a_standby_is_one_clear_line(fq: Queue) -> None:
    out = fq.ncmgr("failover", "--queue", fq.name)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        f"crq: queue {fq.name} has no standby to take over; start one with "
        f"ncmgr start --standby --queue {fq.name}"
    ]
    assert fq.ncmgr("status", "--queue", fq.name).returncode == 0  # the leader still serves


@pytest.mark.parametrize("waiter_from", ["before", "after"])
def test_clients_and_taskers_follow_a_kill9_takeover(fq: Queue, waiter_from: str) -> None:
    """``crq wait`` rides the takeover out, also when its first request meets the dead
    leader (a standby's answer says the queue lives: an election, not "not started")."""
    q = fq
    url = start_standby(q)
    gate = q.root / "gate"
    job = q.submit("--", "sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.02; done")
    wait_until(lambda: q.job(job)["state"] == "running")
    pid = q.server_pid()
    if waiter_from == "before":
        waiter = q.spawn("cli", "wait", str(job))
        os.kill(pid, signal.SIGKILL)
    else:
        os.kill(pid, signal.SIGKILL)
        waiter = q.spawn("cli", "wait", str(job))
    wait_until(lambda: json.loads((q.swd / "server.json").read_text())["url"] == url)
    gate.touch()
    assert waiter.wait(timeout=240) == 0, waiter.stderr.read() if waiter.stderr else ""
    done = q.job(job)
    assert done["state"] == "done" and done["attempt"] == 1, done


def test_stop_hands_over_to_a_standby_and_a_lone_standby_leads(fq: Queue) -> None:
    q = fq
    url = start_standby(q)
    # --freeze: the tasker waits for the next server (a plain stop sends taskers away)
    out = q.ncmgr("stop", "--freeze", "--queue", q.name)
    assert out.returncode == 0, out.stderr + out.stdout
    assert f"leader at {q.url} frozen and stopped" in out.stdout, out.stdout
    assert f"{url} (epoch" in out.stdout
    assert "leads now" in out.stdout, out.stdout
    job = q.submit("--", "true")  # the registry's leader is gone: the candidate answers
    assert q.crq("wait", str(job)).returncode == 0
    assert entry(q)["url"] == url

    out = q.ncmgr("stop", "--all", "--queue", q.name)
    assert out.returncode == 0 and "clean stop" in out.stdout, out.stderr + out.stdout
    assert q.ncmgr("status", "--queue", q.name).returncode == 1

    # a standby with no leader to wait for takes over at once (its start may say either)
    out = q.ncmgr("start", "--standby", "--queue", q.name, "--swd", str(q.swd), "--fsync", "never")
    assert out.returncode == 0, out.stderr + out.stdout
    lone = rf"queue {q.name} (started at http://\S+|standby started at \S+ .*; leader: none yet)"
    assert re.search(lone, out.stdout), out.stdout
    wait_until(lambda: q.ncmgr("status", "--queue", q.name).returncode == 0)


def test_status_rides_out_a_kill9_takeover(fq: Queue) -> None:
    """``crq status`` (a workflow engine's poll) started while the leader is dead answers
    once the standby has taken over: no error for a failover."""
    q = fq
    url = start_standby(q)
    gate = q.root / "status-gate"
    job = q.submit("--", "sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.02; done")
    wait_until(lambda: q.job(job)["state"] == "running")
    os.kill(q.server_pid(), signal.SIGKILL)
    plain = q.spawn("cli", "status", str(job))
    snake = q.spawn("cli", "status", "--format", "snakemake", str(job))
    try:
        out, err = plain.communicate(timeout=240)
        assert (plain.returncode, out) == (0, f"{job} running\n".encode()), err
        out, err = snake.communicate(timeout=240)
        assert (snake.returncode, out) == (0, b"running\n"), err
    finally:
        for proc in (plain, snake):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert json.loads((q.swd / "server.json").read_text())["url"] == url
    gate.touch()
    wait_until(lambda: q.job(job)["state"] == "done")
    out = q.crq("status", "--format", "snakemake", str(job))
    assert (out.returncode, out.stdout) == (0, "success\n"), out.stderr
