"""client.api.Client against an in-process fake server (tests/client/fakehttp.py): request
shapes, paging, waiting and the error mapping."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from crq.client.api import Client
from crq.client.errors import CrashRecovery, CrqError, Standby

from crq import wire
from tests.client.fakehttp import opener


@pytest.fixture(autouse=True)
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRQ_HOME", str(tmp_path / "crqhome"))
    for var in ("CRQ_SERVER", "CRQ_QUEUE", "CRQ_TOKEN"):
        monkeypatch.delenv(var, raising=False)


Handler = Callable[[httpx.Request], httpx.Response]


def make(handler: Handler, **kw: Any) -> Client:
    return Client(url="http://fake:1", token="tok", queue="q", user="ann",
                  opener=opener(handler), **kw)  # fmt: skip


def test_headers_and_submit_body() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(201, json={"ids": [41]})

    with make(handler) as c:
        assert c.submit(command=["true"], priority=5) == 41
        assert c.submit({"command": "echo hi", "cwd": "/x"}, name="n") == 41
    first, second = (json.loads(r.content) for r in seen)
    assert first == {"command": ["true"], "priority": 5, "cwd": os.getcwd()}
    assert second == {"command": "echo hi", "cwd": "/x", "name": "n"}
    assert seen[0].headers["authorization"] == "Bearer tok"
    assert seen[0].headers[wire.USER_HEADER] == "ann"
    assert seen[0].url.path == "/api/v1/jobs"


def test_submit_many_is_one_request_with_shared_env() -> None:
    bodies: list[Any] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(201, json={"ids": [1, 2, 3]})

    with make(handler) as c:
        assert c.submit_many([{"command": "a"}, {"command": "b"}, {"command": "c"}],
                             env={"X": "1"}) == [1, 2, 3]  # fmt: skip
        assert c.submit_many([]) == []
    assert len(bodies) == 1
    assert bodies[0]["env"] == {"X": "1"} and len(bodies[0]["jobs"]) == 3


def test_list_follows_pages_and_limit() -> None:
    jobs = [{"id": i, "state": "done"} for i in range(1, 26)]

    def handler(request: httpx.Request) -> httpx.Response:
        after = int(request.url.params.get("after", 0))
        limit = int(request.url.params["limit"])
        page = [j for j in jobs if j["id"] > after][:limit]
        more = page and page[-1]["id"] < jobs[-1]["id"]
        return httpx.Response(200, json={"jobs": page, "next": page[-1]["id"] if more else None})

    with make(handler) as c:
        assert [j["id"] for j in c.list(page_size=10)] == list(range(1, 26))
        assert [j["id"] for j in c.list(limit=12, page_size=10)] == list(range(1, 13))


def test_list_goes_on_after_an_empty_page_with_a_next() -> None:
    """The server pauses a sparse scan with a short (even empty) page and a ``next``."""
    pages = {0: ([], 100), 100: ([150], 200), 200: ([], 300), 300: ([301], None)}

    def handler(request: httpx.Request) -> httpx.Response:
        ids, nxt = pages[int(request.url.params.get("after", 0))]
        return httpx.Response(200, json={"jobs": [{"id": i} for i in ids], "next": nxt})

    with make(handler) as c:
        assert [j["id"] for j in c.list(state="stopped")] == [150, 301]


def test_error_body_becomes_crq_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"error": "not_found", "message": "no job 9\nreally"})

    with make(handler) as c, pytest.raises(CrqError) as exc:
        c.get(9)
    assert exc.value.status == 404 and exc.value.code == "not_found"
    assert exc.value.message == "no job 9 really"


def test_unauthorized_hints_at_token() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"error": "unauthorized", "message": "bad token"})

    with make(handler) as c, pytest.raises(CrqError, match="CRQ_TOKEN"):
        c.queue()


def test_non_json_error_body() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(502, text="<html>bad gateway</html>")

    with make(handler) as c, pytest.raises(CrqError) as exc:
        c.taskers()
    assert exc.value.status == 502 and exc.value.code == "http_502"


def test_a_reply_that_is_not_an_object_is_one_error() -> None:
    """The typed methods promise a JSON object: a list (or nothing) is a bad reply, not an
    AttributeError further on."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=[1, 2])

    with make(handler) as c:
        for call in (c.server, lambda: c.get(1), c.taskers):
            with pytest.raises(CrqError, match="not a JSON object") as exc:
                call()
            assert exc.value.code == "bad_reply"


def test_crash_recovery_is_typed() -> None:
    body = {
        "error": "crash_recovery",
        "message": "recovering",
        "recovery": {"expected": ["a", "b", "c"], "reconnected": ["a", "b"], "seconds_left": 87},
    }

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, json=body, headers={"Retry-After": "7"})

    with make(handler) as c, pytest.raises(CrashRecovery) as exc:
        c.queue()  # not retried: only the waits and submits ride recovery out
    e = exc.value
    assert e.status == 503 and e.code == "crash_recovery" and e.retry_after == 7.0
    assert e.summary() == "queue q is in crash recovery (2/3 taskers back, ~87 s left)"


def test_wait_loops_the_long_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    states = iter(["running", "running", "done"])
    polls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        polls.append(request.url.params["timeout"])
        return httpx.Response(200, json={"id": 5, "state": next(states)})

    with make(handler) as c:
        assert c.wait(5)["state"] == "done"
    assert len(polls) == 3 and all(float(p) > 0 for p in polls)


def test_wait_rides_out_crash_recovery(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("time.sleep", lambda s: None)
    answers = [
        httpx.Response(
            503, json={"error": "crash_recovery", "message": "m"}, headers={"Retry-After": "1"}
        ),  # fmt: skip
        httpx.Response(200, json={"id": 5, "state": "failed", "exit_code": 1}),
    ]

    def handler(request: httpx.Request) -> httpx.Response:
        return answers.pop(0)

    with make(handler) as c:
        assert c.wait(5)["state"] == "failed"


def test_wait_all_pages_the_range_and_reports_progress() -> None:
    jobs = {i: {"id": i, "state": "running"} for i in range(1, 51)}
    calls = {"list": 0, "wait": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path.endswith("/wait"):
            calls["wait"] += 1
            for j in jobs.values():  # time passes: everything finishes
                j["state"] = "failed" if j["id"] == 7 else "done"
            jid = int(path.split("/")[-2])
            return httpx.Response(200, json=jobs[jid])
        assert path == "/api/v1/jobs"
        calls["list"] += 1
        after = int(request.url.params["after"])
        limit = int(request.url.params["limit"])
        page = [j for i, j in sorted(jobs.items()) if i > after][:limit]
        return httpx.Response(200, json={"jobs": page, "next": None})

    seen: list[tuple[int, int, int]] = []
    with make(handler) as c:
        result = c.wait_all(range(1, 51), progress=lambda d, f, t: seen.append((d, f, t)))
    assert sorted(result) == list(range(1, 51))
    assert result[7]["state"] == "failed"
    assert seen[-1] == (49, 1, 50)
    assert calls["list"] == 2 and calls["wait"] == 1


def test_wait_all_unknown_ids() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/api/v1/jobs":
            return httpx.Response(200, json={"jobs": [{"id": 1, "state": "done"}], "next": None})
        return httpx.Response(404, json={"error": "not_found", "message": "no such job"})

    with make(handler) as c:
        result = c.wait_all([1, 2])
    assert result[1]["state"] == "done" and result[2]["state"] == "unknown"


def test_wait_all_timeout_returns_unfinished() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/v1/jobs":
            page = [{"id": 1, "state": "done"}, {"id": 2, "state": "running"}]
            return httpx.Response(200, json={"jobs": page, "next": None})
        return httpx.Response(200, json={"id": 2, "state": "running"})

    with make(handler) as c:
        result = c.wait_all([1, 2], timeout=0.2)
    assert result[2]["state"] == "running"


def test_connection_refused_names_queue_and_hint() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    with make(handler) as c, pytest.raises(CrqError) as exc:
        c.server()
    assert exc.value.code == "unreachable" and exc.value.status is None
    assert exc.value.message == (
        "cannot reach queue q at http://fake:1: connection refused — is it started? "
        "try: ncmgr start --queue q"
    )


def test_control_endpoints() -> None:
    seen: list[tuple[str, str, bytes]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, request.url.path + "?" + request.url.query.decode(),
                     request.content))  # fmt: skip
        return httpx.Response(200, json={"ok": True, "ids": [], "taskers": []})

    with make(handler) as c:
        c.stop(1)
        c.rerun(2)
        c.forget(3)
        c.taskers()
        c.stop_server(freeze=True)
        c.sanity(fix=True)
    assert [(m, p) for m, p, _ in seen] == [
        ("POST", "/api/v1/jobs/1/stop?"),
        ("POST", "/api/v1/jobs/2/rerun?"),
        ("DELETE", "/api/v1/jobs/3?"),
        ("GET", "/api/v1/taskers?"),
        ("POST", "/api/v1/server/stop?"),
        ("POST", "/api/v1/server/sanity?fix=1"),
    ]
    assert json.loads(seen[4][2]) == {"freeze": True}


# -- submits: an Idempotency-Key, and retries of the very same request ----------------------


def test_a_submit_carries_a_new_key_and_its_own_on_request() -> None:
    keys: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        keys.append(request.headers[wire.IDEMPOTENCY_HEADER])
        assert request.headers["content-type"] == "application/json"
        return httpx.Response(201, json={"ids": [7]})

    with make(handler) as c:
        c.submit(command="true")
        c.submit(command="true")
        c.submit_many([{"command": "true"}], idempotency_key="mine-1")
        with pytest.raises(CrqError) as exc:
            c.submit(command="true", idempotency_key="has blank")
        assert exc.value.code == "usage" and len(keys) == 3
    assert all(len(k) == 32 and int(k, 16) >= 0 for k in keys[:2]) and keys[0] != keys[1]
    assert keys[2] == "mine-1"


def test_a_lost_connection_is_retried_with_the_same_key_and_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("time.sleep", lambda s: None)
    seen: list[tuple[str, bytes]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.headers[wire.IDEMPOTENCY_HEADER], request.content))
        if len(seen) == 1:
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        if len(seen) == 2:  # the server got it, then went away before answering
            raise httpx.RemoteProtocolError("Server disconnected", request=request)
        if len(seen) == 3:
            return httpx.Response(503, json={"error": "stopping", "message": "stopping"})
        return httpx.Response(201, json={"ids": [4, 5]})

    notes: list[str] = []
    with make(handler) as c:
        c.notify = notes.append
        assert c.submit_many([{"command": "a"}, {"command": "b"}], env={"A": "1"}) == [4, 5]
    assert len(seen) == 4 and len(set(seen)) == 1
    assert len(notes) == 1 and "connection refused" in notes[0] and "120 s" in notes[0]


def test_crash_recovery_is_ridden_out_and_said_once(monkeypatch: pytest.MonkeyPatch) -> None:
    pauses: list[float] = []
    monkeypatch.setattr("time.sleep", pauses.append)
    answers = [
        httpx.Response(503, json={"error": "crash_recovery", "message": "m",
                                  "recovery": {"seconds_left": 9}},
                       headers={"Retry-After": "2"}),
        httpx.Response(503, json={"error": "crash_recovery", "message": "m"},
                       headers={"Retry-After": "3"}),
        httpx.Response(201, json={"ids": [9]}),
    ]  # fmt: skip
    keys: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        keys.append(request.headers[wire.IDEMPOTENCY_HEADER])
        return answers.pop(0)

    notes: list[str] = []
    with make(handler) as c:
        c.notify = notes.append
        assert c.submit(command="true") == 9
    assert pauses == [2.0, 3.0] and len(set(keys)) == 1
    assert notes == ["queue q is in crash recovery (~9 s left); waiting to submit"]


def test_a_standby_answer_sends_the_submit_to_the_leader_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("time.sleep", lambda s: pytest.fail("a standby's leader is asked at once"))
    seen: list[tuple[str, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((str(request.url), request.headers.get(wire.IDEMPOTENCY_HEADER, "")))
        if request.url.host == "fake":
            body = {"error": "standby", "message": "a standby", "leader": "http://lead:2/"}
            return httpx.Response(503, json=body, headers={"Retry-After": "1"})
        return httpx.Response(201, json={"ids": [3]})

    notes: list[str] = []  # (GET /queue answers {"ids": [3]} too)
    with make(handler) as c:
        c.notify = notes.append
        assert c.submit(command="true") == 3
        assert c.url == "http://lead:2"
        c.queue()  # later calls go to the leader too
    assert [u for u, _ in seen[:2]] == ["http://fake:1/api/v1/jobs", "http://lead:2/api/v1/jobs"]
    assert seen[0][1] == seen[1][1] and seen[2][0].startswith("http://lead:2/")
    assert notes == ["queue q at http://fake:1 is a standby; following the leader at http://lead:2"]


def test_a_standby_that_knows_no_leader_is_waited_on(monkeypatch: pytest.MonkeyPatch) -> None:
    pauses: list[float] = []
    monkeypatch.setattr("time.sleep", pauses.append)
    answers = [
        httpx.Response(503, json={"error": "standby", "message": "no leader", "leader": None},
                       headers={"Retry-After": "1"}),
        httpx.Response(201, json={"ids": [1]}),
    ]  # fmt: skip

    with make(lambda request: answers.pop(0)) as c:
        assert c.submit(command="true") == 1
    assert pauses == [1.0]


def test_standby_is_typed() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        body = {"error": "standby", "message": "standby of q", "leader": "http://l:1"}
        return httpx.Response(503, json=body, headers={"Retry-After": "4"})

    with make(handler) as c, pytest.raises(Standby) as exc:
        c.queue()
    assert exc.value.leader == "http://l:1" and exc.value.retry_after == 4.0


def test_a_refusal_is_raised_at_once_and_an_outage_after_retry_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("time.sleep", lambda s: None)
    calls: list[str] = []

    def refuse(request: httpx.Request) -> httpx.Response:
        calls.append("refused")
        return httpx.Response(422, json={"error": "idempotency_mismatch", "message": "m"})

    with make(refuse) as c, pytest.raises(CrqError) as exc:
        c.submit(command="true")
    assert exc.value.code == "idempotency_mismatch" and calls == ["refused"]

    def down(request: httpx.Request) -> httpx.Response:
        calls.append("down")
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    with make(down) as c, pytest.raises(CrqError) as exc:
        c.submit(command="true", retry_for=0)
    assert exc.value.code == "unreachable" and calls.count("down") == 1
