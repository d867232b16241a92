"""The tasker follows the leader: standby pointers, candidate lists, the epoch fence.

In process: the failure kinds, ServerSource's order of candidates, the epoch file and the
agent's refusal of a deposed leader's orders. With real processes: a vovtasker sent to a
standby (a stand-in here, until the server's standby mode exists) registers with the leader
it names, and one that meets a deposed leader moves on to the next server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from crq.tasker import link
from crq.tasker.agent import Agent, PollResult, TaskerInfo
from crq.tasker.link import ServerSource
from crq.tasker.runner import Runner
from crq.tasker.statedir import StateDir

from tests.rigs import (
    ROOT,
    CrqServer,
    Tasker,
    dispatch,
    e2e_server,
    env_with_root,
    free_port,
    kill_jobs,
    server_available,
    wait_for_start,
    wait_until,
)

HOST = os.uname().nodename

# -- failure kinds --------------------------------------------------------------------------


def test_a_standby_answer_names_the_leader() -> None:
    body = {"error": "standby", "message": "standby of q", "leader": "http://h:7/"}
    f = link._refusal(503, body, "1")
    assert type(f) is link.Standby and isinstance(f, link.RetryLater)
    assert f.leader == "http://h:7" and f.after == 1.0
    assert str(f) == "HTTP 503 standby: standby of q"


@pytest.mark.parametrize("leader", [None, "", "h:7", 12])
def test_a_standby_without_a_usable_leader_names_none(leader: object) -> None:
    f = link._refusal(503, {"error": "standby", "leader": leader}, None)
    assert isinstance(f, link.Standby) and f.leader is None and f.after == 1.0


# -- where the leader is --------------------------------------------------------------------


def test_a_followed_leader_goes_first_and_the_list_stays() -> None:
    src = ServerSource(servers=["http://a:1", "http://b:2/"], token="t")
    assert src.resolve() == ("http://a:1", "t")
    src.follow("http://c:3/")
    assert src.resolve()[0] == "http://c:3" and src.following == "http://c:3"
    src.failed()  # the leader it named does not answer: back to the list, the next one
    assert src.resolve()[0] == "http://b:2" and src.following is None
    src.failed()
    assert src.resolve()[0] == "http://a:1"
    assert src.servers == ["http://a:1", "http://b:2"]


def _server_file(path: Path, url: str, mode: str, pid: int, epoch: int | None = None) -> None:
    info = {"pid": pid, "host": HOST, "url": url, "mode": mode, "instance": path.stem}
    if epoch is not None:
        info["epoch"] = epoch
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info))


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_swd_candidates_leader_file_first_then_servers(tmp_path: Path) -> None:
    swd = tmp_path / "q.swd"
    (swd / "security").mkdir(parents=True)
    (swd / "security" / "tasker.token").write_text("tok\n")
    src = ServerSource(swd=swd)
    with pytest.raises(link.SourceError, match="server not started"):
        src.resolve()
    me = os.getpid()
    servers = swd / "servers"
    _server_file(servers / "b.json", "http://b:2", "standby", me)
    _server_file(servers / "c.json", "http://c:3", "normal", me, epoch=4)
    _server_file(servers / "d.json", "http://d:4", "standby", _dead_pid())  # gone
    (servers / "e.json").write_text("{half a fi")  # being written: skipped
    assert src.candidates() == ["http://c:3", "http://b:2"]
    _server_file(swd / "server.json", "http://a:1", "normal", me, epoch=4)
    assert src.candidates() == ["http://a:1", "http://c:3", "http://b:2"]
    assert src.resolve() == ("http://a:1", "tok")
    src.failed()
    assert src.resolve()[0] == "http://c:3"
    src.follow("http://z:9")
    # a new leader rewrites server.json: it is tried first again, the pointer dropped
    _server_file(swd / "server.json", "http://b:2", "normal", me, epoch=5)
    assert src.changed()
    assert src.resolve()[0] == "http://b:2" and src.following is None
    # the leader's file of a dead (or stopped) server: straight to the candidates
    _server_file(swd / "server.json", "http://b:2", "normal", _dead_pid(), epoch=5)
    assert src.candidates() == ["http://c:3", "http://b:2"]
    _server_file(swd / "server.json", "http://b:2", "stopped", me, epoch=5)
    assert src.candidates()[0] == "http://c:3"


def test_a_leader_file_of_another_host_is_tried(tmp_path: Path) -> None:
    swd = tmp_path / "q.swd"
    info = {"pid": 1, "host": "elsewhere.example", "url": "http://far:1", "mode": "normal"}
    swd.mkdir()
    (swd / "server.json").write_text(json.dumps(info))
    assert ServerSource(swd=swd, token="t").candidates() == ["http://far:1"]


# -- the epoch fence ------------------------------------------------------------------------


def test_the_epoch_file(tmp_path: Path) -> None:
    s = StateDir(tmp_path / "st", fsync=False)
    assert s.stored_epoch() == 0
    s.store_epoch(7)
    assert s.stored_epoch() == 7
    assert (s.root / "epoch").stat().st_mode & 0o777 == 0o600
    (s.root / "epoch").write_text("garbage\n")
    assert s.stored_epoch() == 0


class InProcess:
    """An Agent in this process with a real Runner and state dir, fed answers by hand."""

    def __init__(self, state: StateDir) -> None:
        self.state = state
        self.runner = Runner(state, slots=4)
        info = TaskerInfo("tk", 4, "", 1.0, "", False)
        self.source = ServerSource(servers=["http://a:1", "http://b:2"], token="t")
        self.agent = Agent(info, self.source, self.runner, state)
        self.agent._url = "http://a:1"

    def poll_answer(self, answer: dict[str, Any]) -> None:
        """A long poll's answer arriving for the current registration."""
        agent = self.agent
        agent._registered = True
        agent._polling = True
        agent._poll_result = PollResult(agent._gen, answer, None)
        agent._take_poll_result()


@pytest.fixture
def inproc(state: StateDir) -> Iterator[InProcess]:
    ip = InProcess(state)
    yield ip
    ip.runner.close()


def test_a_higher_epoch_is_recorded_before_its_orders_run(
    inproc: InProcess, work: Path, state: StateDir
) -> None:
    inproc.poll_answer({"epoch": 3, "dispatch": [dispatch(1, work, ["sleep", "30"])]})
    assert state.stored_epoch() == 3
    wait_until(lambda: inproc.runner.counts()[0] == 1)
    assert inproc.agent._registered


def test_a_deposed_leaders_orders_are_ignored(
    inproc: InProcess, work: Path, state: StateDir, caplog: pytest.LogCaptureFixture
) -> None:
    inproc.poll_answer({"epoch": 5, "dispatch": [dispatch(1, work, ["sleep", "30"])]})
    wait_until(lambda: inproc.runner.counts()[0] == 1)
    records = sorted(state.load_records())
    with caplog.at_level("WARNING", logger="crq.tasker"):
        inproc.poll_answer(
            {
                "epoch": 4,
                "dispatch": [dispatch(2, work, ["sleep", "30"])],
                "kill": [{"job": 1, "attempt": 1}],
                "ack": [{"job": 1, "attempt": 1}],
                "shutdown": True,
            }
        )
    assert sorted(state.load_records()) == records  # no spawn
    assert inproc.runner.counts()[0] == 1  # no kill: job 1 still runs
    assert not inproc.agent._shutdown
    assert state.stored_epoch() == 5
    lines = [r.getMessage() for r in caplog.records if "deposed" in r.getMessage()]
    assert len(lines) == 1 and "epoch 4" in lines[0] and "epoch 5 seen" in lines[0]
    # not registered any more, and the next connection goes to the next server
    assert not inproc.agent._registered
    assert inproc.source.resolve()[0] == "http://b:2"


def test_a_restarted_tasker_still_refuses_the_deposed_leader(state: StateDir, work: Path) -> None:
    state.store_epoch(9)
    ip = InProcess(state)  # a new Agent: the epoch comes from the state dir
    try:
        ip.poll_answer({"epoch": 8, "dispatch": [dispatch(1, work, ["true"])]})
        assert ip.runner.counts()[0] == 0 and not state.load_records()
        assert not ip.agent._registered
    finally:
        ip.runner.close()


def test_an_answer_without_an_epoch_is_taken(inproc: InProcess, state: StateDir) -> None:
    state.store_epoch(2)
    inproc.agent._epoch = 2
    assert inproc.agent._admit({"dispatch": []}) is None
    assert inproc.agent._admit({"epoch": 2}) is None
    assert isinstance(inproc.agent._admit({"epoch": "3"}), link.BadAnswer)
    assert isinstance(inproc.agent._admit({"epoch": True}), link.BadAnswer)
    assert state.stored_epoch() == 2


def test_a_standby_pointer_is_followed_at_once(inproc: InProcess) -> None:
    agent = inproc.agent
    agent._failed(link.Standby("HTTP 503 standby", 503, 1.0, "http://c:3"))
    assert inproc.source.resolve()[0] == "http://c:3"
    assert agent._next_try <= time.monotonic()
    agent._url = "http://c:3"
    agent._failed(link.Standby("HTTP 503 standby", 503, 1.0, None))  # knows no leader
    assert inproc.source.resolve()[0] == "http://b:2"
    assert agent._next_try > time.monotonic()


# -- real processes against stand-ins ---------------------------------------------------------


class StandIn:
    """A scripted server: a standby naming ``leader``, or a leader of a low ``epoch``."""

    def __init__(self, leader: str | None = None, epoch: int | None = None) -> None:
        self.leader = leader
        self.epoch = epoch
        self.hits: list[str] = []
        self.lock = threading.Lock()
        stand_in = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with stand_in.lock:
                    stand_in.hits.append(self.path)
                if stand_in.epoch is None:
                    code, body = 503, {"error": "standby", "leader": stand_in.leader}
                else:
                    code = 200
                    body = {"epoch": stand_in.epoch, "kill": [], "ack": [], "heartbeat": 1}
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if code == 503:
                    self.send_header("Retry-After", "1")
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


needs_server = pytest.mark.skipif(not server_available(), reason="server not written yet")
srv = pytest.fixture(e2e_server)


def _spec(work: Path, command: object) -> dict[str, object]:
    return {"command": command, "cwd": str(work), "env": {"PATH": os.environ["PATH"]}}


def _tasker(tmp_path: Path, srv: CrqServer, *servers: str, name: str = "tk1") -> Tasker:
    env = env_with_root()
    env["CRQ_TASKER_TOKEN"] = srv.tasker_token
    t = Tasker(tmp_path / f"{name}.state", "--server", ",".join(servers), name=name)
    t.start(env=env)
    return t


@needs_server
def test_a_tasker_sent_to_a_standby_registers_with_its_leader(
    srv: CrqServer, tmp_path: Path, work: Path
) -> None:
    standby = StandIn(leader=srv.url)
    t = _tasker(tmp_path, srv, standby.url)
    try:
        (job,) = srv.submit(_spec(work, ["true"]))
        assert srv.wait(job)["state"] == "done"
        assert f"server {standby.url} is a standby: following the leader at {srv.url}" in t.log()
        assert standby.hits == ["/api/v1/taskers/tk1/register"]  # asked once, then the leader
    finally:
        t.kill9()
        kill_jobs(t.state)
        standby.close()


@needs_server
def test_a_deposed_leader_is_left_for_the_next_server(
    srv: CrqServer, tmp_path: Path, work: Path
) -> None:
    epoch = srv.request("GET", "/server").get("epoch") or 1  # None: a server before epochs
    StateDir(tmp_path / "tk1.state").store_epoch(epoch)
    deposed = StandIn(epoch=epoch - 1)
    dead = f"http://127.0.0.1:{free_port()}"
    t = _tasker(tmp_path, srv, deposed.url, dead, srv.url)
    try:
        (job,) = srv.submit(_spec(work, ["true"]))
        assert srv.wait(job)["state"] == "done"
        log = t.log()
        assert log.count("is a deposed leader's") == 1, log
        assert deposed.hits == ["/api/v1/taskers/tk1/register"]
        words = (tmp_path / "tk1.state" / "epoch").read_text().split()
        assert words[0] == str(epoch) and words[1] == _queue_id(srv)
    finally:
        t.kill9()
        kill_jobs(t.state)
        deposed.close()


def _queue_id(srv: CrqServer) -> str:
    return str(json.loads((srv.swd / "trace.db" / "queue.json").read_text())["uuid"])


@needs_server
def test_epochs_count_per_queue_a_tasker_moved_to_a_new_queue_takes_its_orders(
    srv: CrqServer, tmp_path: Path, work: Path
) -> None:
    """A state dir that saw epoch 90 of another queue (or of this swd before it was made
    anew) must not refuse a new queue's epoch 1 or 2."""
    StateDir(tmp_path / "tk1.state").store_epoch(90, "another-queue")
    t = _tasker(tmp_path, srv, srv.url)
    try:
        (job,) = srv.submit(_spec(work, ["true"]))
        assert srv.wait(job)["state"] == "done"
        words = (tmp_path / "tk1.state" / "epoch").read_text().split()
        assert words == [str(srv.request("GET", "/server")["epoch"]), _queue_id(srv)]
    finally:
        t.kill9()
        kill_jobs(t.state)


def test_usage_errors_of_the_new_flags(tmp_path: Path) -> None:
    env = env_with_root()
    env["CRQ_TASKER_TOKEN"] = "t"
    base = [sys.executable, "-m", "crq.tasker", "--state-dir", str(tmp_path / "s")]
    for args, words in [
        (["--server", " , "], "--server names no URL"),
        (["--server", "http://a:1,b:2"], "bad server URL (want http://host:port): b:2"),
        (["--etcd", "http://h:1"], "bad --etcd: want etcd://HOST[:PORT]"),
        (["--etcd", "etcd://h:1,"], "bad --etcd: bad etcd member ''"),
        (["--etcd", "etcd://h:99999"], "bad --etcd: bad etcd member 'h:99999'"),
        (["--swd", str(tmp_path), "--queue", "q"], "--queue goes with --etcd"),
    ]:
        r = subprocess.run(base + args, env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], (args, r.stderr)


# -- etcd ------------------------------------------------------------------------------------


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[str]:
    """A real etcd on loopback (skipped where there is none): its client endpoint."""
    import shutil

    if shutil.which("etcd") is None:
        pytest.skip("no etcd binary")
    import httpx

    client, peer = free_port(), free_port()
    url = f"http://127.0.0.1:{client}"
    proc = subprocess.Popen(
        ["etcd", "--data-dir", str(tmp_path / "etcd"), "--listen-client-urls", url,
         "--advertise-client-urls", url, "--listen-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-cluster", f"default=http://127.0.0.1:{peer}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip

    def up() -> bool:
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for_start(proc, up, "etcd")
        yield url
    finally:
        proc.kill()
        proc.wait()


def test_the_leader_is_read_from_etcd(etcd: str) -> None:
    import base64

    import httpx
    from crq.tasker.etcdleader import EtcdLeader, parse_endpoints

    dead = f"127.0.0.1:{free_port()}"
    endpoints = parse_endpoints(f"etcd://{dead},{etcd.removeprefix('http://')}")
    assert endpoints == [f"http://{dead}", etcd]
    assert parse_endpoints("etcd://h,[::1]:7,h:2379") == ["http://h:2379", "http://[::1]:7"]
    find = EtcdLeader(endpoints, "q1")
    with pytest.raises(link.SourceError, match="no leader in etcd yet"):
        find()
    value = json.dumps({"url": "http://h:6201/", "instance": "i", "host": "h", "pid": 1})
    put = {
        "key": base64.b64encode(b"/crq/q1/leader").decode(),
        "value": base64.b64encode(value.encode()).decode(),
    }
    httpx.post(f"{etcd}/v3/kv/put", json=put, timeout=10).raise_for_status()
    assert find() == "http://h:6201"
    src = ServerSource(etcd=find, token="t")
    assert src.resolve() == ("http://h:6201", "t")
    with pytest.raises(link.SourceError, match="no etcd endpoint answers"):
        EtcdLeader([f"http://{dead}"], "q1")()


# -- real failover (waits for the server's standby mode) ---------------------------------------

needs_standby = pytest.mark.skipif(
    not (ROOT / "server" / "election.py").exists(), reason="waits for the server's standby mode"
)
SETTINGS = ("--recovery-grace", "60", "--heartbeat", "2")


@pytest.fixture
def pair(crq_server: Any, tmp_path: Path) -> tuple[CrqServer, CrqServer]:
    """A leader and a standby of queue t1 on one swd (the crq_server fixture kills both)."""
    swd = tmp_path / "q.swd"
    leader = crq_server(*SETTINGS, swd=swd)
    standby = crq_server(*SETTINGS, "--standby", swd=swd)
    wait_until(lambda: standby.request("GET", "/server")["mode"] == "standby")
    return leader, standby


def _mode(srv: CrqServer) -> str | None:
    import httpx

    try:
        return str(srv.request("GET", "/server")["mode"])
    except (httpx.HTTPError, AssertionError):
        return None


@needs_standby
def test_a_takeover_after_kill9_keeps_the_running_job(
    pair: tuple[CrqServer, CrqServer], crq_tasker: Any, tmp_path: Path, work: Path
) -> None:
    leader, standby = pair
    t = crq_tasker("tk1", "--swd", str(leader.swd))
    gate = work / "gate"
    (job,) = leader.submit(_spec(work, f"while [ ! -e {gate} ]; do sleep 0.02; done"))
    wait_until(lambda: leader.request("GET", f"/jobs/{job}")["state"] == "running")
    first = leader.request("GET", "/server")["epoch"]
    leader.kill9()
    wait_until(lambda: _mode(standby) == "normal")  # recovery ends when tk1 is back
    gate.touch()
    done = standby.wait(job)
    assert done["state"] == "done" and done["attempt"] == 1, done  # it ran once, throughout
    epoch = standby.request("GET", "/server")["epoch"]
    assert epoch > first
    assert (t.state / "epoch").read_text().split()[0] == str(epoch)


@needs_standby
def test_a_tasker_sent_to_a_real_standby_follows_the_handover(
    pair: tuple[CrqServer, CrqServer], crq_tasker: Any, work: Path
) -> None:
    leader, standby = pair
    env = env_with_root()
    env["CRQ_TASKER_TOKEN"] = leader.tasker_token
    t = crq_tasker("tk1", "--server", f"{standby.url},{leader.url}", start=False)
    t.start(env=env)
    (job,) = leader.submit(_spec(work, ["true"]))
    assert leader.wait(job)["state"] == "done"
    assert f"server {standby.url} is a standby: following the leader at {leader.url}" in t.log()
    r = leader.api("POST", "/server/failover", json={"to": None})
    assert r.status_code == 202, r.text
    wait_until(lambda: _mode(standby) == "normal")
    (job,) = standby.submit(_spec(work, ["true"]))
    assert standby.wait(job)["state"] == "done"


@needs_standby
def test_a_tasker_finds_the_leader_in_etcd_across_a_kill9(
    etcd_cluster: Any, crq_server: Any, crq_tasker: Any, tmp_path: Path, work: Path
) -> None:
    swd = tmp_path / "q.swd"
    election = ("--election", etcd_cluster.url, "--election-ttl", "2")
    leader = crq_server(*SETTINGS, *election, swd=swd)
    standby = crq_server(*SETTINGS, *election, "--standby", swd=swd)
    wait_until(lambda: _mode(standby) == "standby")
    env = env_with_root()
    env["CRQ_TASKER_TOKEN"] = leader.tasker_token
    t = crq_tasker("tk1", "--etcd", etcd_cluster.url, "--queue", "t1", start=False)
    t.start(env=env)
    gate = work / "gate"
    (job,) = leader.submit(_spec(work, f"while [ ! -e {gate} ]; do sleep 0.02; done"))
    wait_until(lambda: leader.request("GET", f"/jobs/{job}")["state"] == "running")
    leader.kill9()  # its lease runs out; the standby wins and publishes itself
    wait_until(lambda: _mode(standby) == "normal")
    gate.touch()
    done = standby.wait(job)
    assert done["state"] == "done" and done["attempt"] == 1, done
    assert f"registered with {standby.url}" in t.log()
