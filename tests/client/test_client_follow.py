"""Clients follow the leader: the registry's candidates, a standby's pointer, the other
candidates when the one in use does not answer.

The registry and the Client's moves in process (tests/client/fakehttp.py plays the candidates);
then a Client against real servers: a dead leader URL with a live candidate.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from crq.client import registry
from crq.client.api import Client
from crq.client.errors import CrqError, Standby

from tests.client.fakehttp import opener
from tests.rigs import CrqServer, free_port, server_available


@pytest.fixture(autouse=True)
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "crqhome"
    monkeypatch.setenv("CRQ_HOME", str(home))
    for var in ("CRQ_SERVER", "CRQ_QUEUE", "CRQ_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    return home


# -- registry -------------------------------------------------------------------------------


def test_candidates_gather_leader_and_standbys() -> None:
    registry.register("q", "http://a:1/", "/s/q.swd", "tok")
    registry.add_candidate("q", "http://b:2", "/s/q.swd", "tok")
    registry.add_candidate("q", "http://B:2/", "/s/q.swd", None)  # the same, once
    e = registry.lookup("q")
    assert e is not None
    assert e["url"] == "http://a:1" and e["token"] == "tok"
    assert e["candidates"] == ["http://a:1", "http://b:2"]
    # a leader restarted elsewhere: the url moves, the candidates stay
    registry.register("q", "http://c:3", "/s/q.swd", "tok")
    e = registry.lookup("q")
    assert e is not None and e["url"] == "http://c:3"
    assert registry.candidates(e) == ["http://c:3", "http://a:1", "http://b:2"]
    # another swd is another queue's life: it starts afresh
    registry.register("q", "http://d:4", "/t/q.swd", "tok2")
    assert registry.candidates(registry.lookup("q")) == ["http://d:4"]


def test_a_standby_first_makes_an_entry_pointing_at_the_leader() -> None:
    registry.add_candidate("q", "http://b:2", "/s/q.swd", "tok", leader="http://a:1")
    e = registry.lookup("q")
    assert e is not None and e["url"] == "http://a:1"
    assert e["candidates"] == registry.candidates(e) == ["http://a:1", "http://b:2"]
    registry.add_candidate("r", "http://b:5", "/s/r.swd", None)  # no leader known yet
    assert registry.lookup("r") == {
        "url": "http://b:5",
        "swd": str(Path("/s/r.swd")),
        "host": "b",
        "port": 5,
        "token": None,
        "candidates": ["http://b:5"],
    }


def test_set_leader_notes_where_it_was_found() -> None:
    assert not registry.set_leader("nope", "http://a:1")  # an unregistered queue: left alone
    registry.register("q", "http://a:1", "/s/q.swd", "tok")
    registry.add_candidate("q", "http://b:2", "/s/q.swd", "tok")
    assert registry.set_leader("q", "http://b:2/")
    e = registry.lookup("q")
    assert e is not None and (e["url"], e["port"]) == ("http://b:2", 1)  # port: ncmgr start's
    assert e["candidates"] == ["http://a:1", "http://b:2"]
    assert not registry.set_leader("q", "http://b:2")  # nothing new: no write


def test_a_standbys_url_names_its_queue(clean_env: Path) -> None:
    registry.register("q", "http://a:1", "/s/q.swd", "tok")
    registry.add_candidate("q", "http://b:2", "/s/q.swd", "tok")
    target = registry.resolve_server("http://b:2")
    assert target.queue == "q" and target.url == "http://b:2"
    assert registry.resolve_token(target) == "tok"


def test_an_old_entry_without_candidates_is_read(clean_env: Path) -> None:
    clean_env.mkdir(mode=0o700)
    old = {"q": {"url": "http://a:1", "swd": "/s", "host": "a", "port": 1, "token": "t"}}
    (clean_env / "registry.json").write_text(json.dumps(old))
    assert registry.candidates(registry.lookup("q")) == ["http://a:1"]


# -- the Client's moves, in process ---------------------------------------------------------

Route = Callable[[httpx.Request], httpx.Response]


def refused(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("[Errno 111] Connection refused", request=request)


def standby(leader: str | None) -> Route:
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/v1/server":
            return httpx.Response(200, json={"mode": "standby", "leader": leader})
        body = {"error": "standby", "message": "a standby of queue q", "leader": leader}
        return httpx.Response(503, json=body, headers={"Retry-After": "1"})

    return answer


def leader(seen: list[str]) -> Route:
    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.method} {request.url.path}")
        if request.url.path == "/api/v1/server":
            return httpx.Response(200, json={"mode": "normal", "epoch": 2})
        if request.method == "POST" and request.url.path == "/api/v1/jobs":
            return httpx.Response(201, json={"ids": [7]})
        return httpx.Response(200, json={"id": 7, "state": "queued"})

    return answer


class Hosts:
    """One fake for many servers: each host:port has its own route."""

    def __init__(self, routes: dict[str, Route]) -> None:
        self.routes = routes
        self.log: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        where = f"{request.url.host}:{request.url.port}"
        self.log.append(f"{where} {request.method} {request.url.path}")
        return self.routes[where](request)


def client(hosts: Hosts, url: str, **kw: Any) -> Client:
    return Client(url=url, token="tok", user="ann", opener=opener(hosts), **kw)


def test_a_standbys_pointer_is_followed_at_once_for_any_request() -> None:
    seen: list[str] = []
    hosts = Hosts({"b:2": standby("http://a:1/"), "a:1": leader(seen)})
    with client(hosts, "http://b:2") as c:
        assert c.submit(command=["true"]) == 7
        assert c.url == "http://a:1"
        assert c.get(7)["id"] == 7
    # nothing applied on the standby; the leader got the submit once
    assert hosts.log == ["b:2 POST /api/v1/jobs", "a:1 POST /api/v1/jobs", "a:1 GET /api/v1/jobs/7"]
    assert seen == ["POST /api/v1/jobs", "GET /api/v1/jobs/7"]


def test_a_refused_connection_tries_the_registered_candidates() -> None:
    registry.register("q", "http://a:1", "/s/q.swd", "tok")
    registry.add_candidate("q", "http://b:2", "/s/q.swd", "tok")
    registry.add_candidate("q", "http://c:3", "/s/q.swd", "tok")
    seen: list[str] = []
    hosts = Hosts({"a:1": refused, "b:2": standby(None), "c:3": leader(seen)})
    with client(hosts, None, queue="q") as c:
        assert c.submit(command=["true"]) == 7
        assert c.url == "http://c:3"
    assert hosts.log == [
        "a:1 POST /api/v1/jobs",  # refused: nothing sent
        "b:2 GET /api/v1/server",  # a standby that knows no leader
        "c:3 GET /api/v1/server",  # the leader
        "c:3 POST /api/v1/jobs",
    ]
    e = registry.lookup("q")  # remembered: the next command goes straight there
    assert e is not None and e["url"] == "http://c:3"
    hosts.log.clear()
    with client(hosts, None, queue="q") as c:
        c.get(7)
    assert hosts.log == ["c:3 GET /api/v1/jobs/7"]


def test_a_standby_pointer_found_by_probing_is_followed() -> None:
    registry.register("q", "http://a:1", "/s/q.swd", "tok")
    registry.add_candidate("q", "http://b:2", "/s/q.swd", "tok")
    seen: list[str] = []
    # the leader moved to c, which the registry does not know yet: b's pointer says so
    hosts = Hosts({"a:1": refused, "b:2": standby("http://c:3"), "c:3": leader(seen)})
    with client(hosts, None, queue="q") as c:
        assert c.get(7)["id"] == 7
    assert registry.candidates(registry.lookup("q")) == ["http://c:3", "http://a:1", "http://b:2"]


def test_no_leader_anywhere_is_the_first_error() -> None:
    registry.register("q", "http://a:1", "/s/q.swd", "tok")
    registry.add_candidate("q", "http://b:2", "/s/q.swd", "tok")
    hosts = Hosts({"a:1": refused, "b:2": refused})
    with client(hosts, None, queue="q") as c, pytest.raises(CrqError) as exc:
        c.get(7)
    assert exc.value.code == "unreachable"
    assert "cannot reach queue q at http://a:1: connection refused" in exc.value.message
    assert c.url == "http://a:1"


def test_a_standby_without_leader_is_a_typed_503() -> None:
    hosts = Hosts({"b:2": standby(None)})
    with client(hosts, "http://b:2") as c, pytest.raises(Standby) as exc:
        c.get(7)
    assert exc.value.status == 503 and exc.value.leader is None
    assert exc.value.message == "a standby of queue q"


def test_standbys_pointing_at_each_other_end() -> None:
    hosts = Hosts({"a:1": standby("http://b:2"), "b:2": standby("http://a:1")})
    with client(hosts, "http://a:1") as c, pytest.raises(Standby):
        c.get(7)
    assert len(hosts.log) <= 6


def test_a_lost_submit_is_not_sent_elsewhere() -> None:
    """Only a request that never left moves on by itself: a submit cut off mid-way may have
    been applied (the idempotent-submit retries decide that, with their key)."""
    registry.register("q", "http://a:1", "/s/q.swd", "tok")
    registry.add_candidate("q", "http://b:2", "/s/q.swd", "tok")

    keys: list[str | None] = []

    def cut(request: httpx.Request) -> httpx.Response:
        keys.append(request.headers.get("Idempotency-Key"))
        raise httpx.RemoteProtocolError("Server disconnected", request=request)

    seen: list[str] = []
    hosts = Hosts({"a:1": cut, "b:2": leader(seen)})
    with client(hosts, None, queue="q") as c:
        with pytest.raises(CrqError) as exc:
            # a short retry window: the default (120 s) only makes this test wait longer
            c.submit(command=["true"], retry_for=1.0)
        assert exc.value.code == "disconnected" and seen == []
        # retried where it was cut off, always with its one key
        assert len(keys) >= 2 and len(set(keys)) == 1 and keys[0]
        assert c.get(7)["id"] == 7  # a read is safe to send again, to the other candidate
        assert c.url == "http://b:2"


# -- against real servers -------------------------------------------------------------------

needs_server = pytest.mark.skipif(not server_available(), reason="server not written yet")


@needs_server
def test_a_dead_leader_url_moves_to_the_live_candidate(
    crq_server: Callable[..., CrqServer], tmp_path: Path
) -> None:
    srv = crq_server()
    dead = f"http://127.0.0.1:{free_port()}"
    registry.register("t1", dead, srv.swd, srv.admin_token)
    registry.add_candidate("t1", srv.url, srv.swd, srv.admin_token)
    with Client(queue="t1") as c:
        (job,) = c.submit_many([{"command": ["true"], "cwd": str(tmp_path)}])
        assert c.get(job)["state"] == "queued"
        assert c.url == srv.url
    e = registry.lookup("t1")
    assert e is not None and e["url"] == srv.url


# -- ncmgr's side, without servers ----------------------------------------------------------


def test_start_standby_passes_the_election_to_the_server(tmp_path: Path) -> None:
    from crq.client import ncmgr
    from crq.client.place import Place

    args = ncmgr.build_parser().parse_args(
        ["start", "--queue", "q", "--swd", str(tmp_path / "q.swd"), "--standby",
         "--election", "etcd://h1:2379,h2:2379", "--election-ttl", "2.5"]
    )  # fmt: skip
    cmd = ncmgr.server_command(args, Place(args), "127.0.0.1", 7001)
    tail = cmd[cmd.index("--port") :][:7]
    assert tail == ["--port", "7001", "--standby", "--election", "etcd://h1:2379,h2:2379",
                    "--election-ttl", "2.5"]  # fmt: skip


@pytest.mark.parametrize("bad", ["zookeeper", "etcd://", "http://h:1"])
def test_a_bad_election_is_a_usage_error(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    from crq.client import ncmgr

    with pytest.raises(SystemExit) as exc:
        ncmgr.build_parser().parse_args(["start", "--election", bad])
    assert exc.value.code == 2
    assert "want file or etcd://host:port" in capsys.readouterr().err


def test_a_standby_takes_the_next_free_port() -> None:
    import socket

    from crq.client import ncmgr

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        base = held.getsockname()[1]
        port = ncmgr._standby_port("127.0.0.1", base - 1)  # base itself is busy
        assert port is not None and port > base


def test_status_lists_servers_that_do_not_answer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from crq.client import ncmgr

    swd = tmp_path / "q.swd"
    (swd / "servers").mkdir(parents=True)
    host = os.uname().nodename
    for name, port, mode in (("a1", free_port(), "normal"), ("b2", free_port(), "standby")):
        url = f"http://127.0.0.1:{port}"
        info = {"pid": 999999, "host": host, "port": port, "url": url, "queue": "q",
                "instance": name, "mode": mode, "epoch": 3, "started_at": 1.0}  # fmt: skip
        (swd / "servers" / f"{name}.json").write_text(json.dumps(info))
    assert ncmgr.main(["status", "--queue", "q", "--swd", str(swd)]) == 1
    out = capsys.readouterr().out
    assert "mode       stopped" in out and "servers:" in out
    table = out.split("servers:\n")[1].splitlines()
    assert table[0].split() == ["ROLE", "MODE", "URL", "PID", "HOST", "EPOCH", "INSTANCE"]
    assert [r.split()[:3] for r in table[1:]] == [["-", "normal,", "not"], ["-", "standby,", "not"]]
