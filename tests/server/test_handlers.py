"""The handlers in process, through the ``api`` fixture: auth, refusals, the recovery 503 and
the sync long poll's wake-ups, in milliseconds where a process test takes seconds.

The real ``serving_app`` (hot routes, then FastAPI) over a real engine and journal in tmp
(tests/core.py ``serving``); nothing of ours is mocked. A refusal must also leave the state as
it was (``seq`` unchanged).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
from crq.server import app
from crq.server.http import hot
from crq.server.recovery import Recovery
from crq.server.replay import Replayed
from crq.server.service import Service

from crq.wire import SESSION_HEADER
from tests.core import ADMIN, TASKER, TASKER_TOKEN, TOKEN, InProcess

OK = {"command": ["true"], "cwd": "/tmp"}
SECRET = "s" * 43  # a tasker's session secret
LONG = 20.0  # a long poll's wait: a wake-up answers far sooner, a missed one takes this long
BEATS = ("--heartbeat", "10")  # the server caps a sync's wait at 3 beats: above LONG


def as_tasker(secret: str = SECRET) -> dict[str, str]:
    return {**TASKER, SESSION_HEADER: secret}


async def register(c: httpx.AsyncClient, name: str = "w", slots: int = 1) -> None:
    body = {"host": f"host-{name}", "pid": 4242, "slots": slots}
    r = await c.post(f"/api/v1/taskers/{name}/register", json=body, headers=as_tasker())
    assert r.status_code == 200, r.text


async def submit(c: httpx.AsyncClient, n: int = 1) -> list[int]:
    r = await c.post("/api/v1/jobs", json={"jobs": [OK] * n})
    assert r.status_code == 201, r.text
    return list(r.json()["ids"])


def sync(c: httpx.AsyncClient, name: str = "w", wait: float = 0.0) -> Any:
    """A sync's request (a coroutine: run it as a task to hold it open)."""
    return c.post(f"/api/v1/taskers/{name}/sync", json={"wait": wait}, headers=as_tasker())


def refusal(r: httpx.Response) -> tuple[int, str]:
    return r.status_code, str(r.json()["error"])


# -- auth --------------------------------------------------------------------------------


def test_no_token_is_401_with_a_bearer_challenge(api: InProcess) -> None:
    async def body(c: httpx.AsyncClient, srv: Service) -> list[Any]:
        out = []
        for path in ("/api/v1/jobs", "/api/v1/taskers", "/api/v1/server"):
            r = await c.get(path, headers={"Authorization": ""})
            out.append((refusal(r), r.headers.get("WWW-Authenticate")))
        return out

    assert api.run(body) == [((401, "unauthorized"), "Bearer")] * 3


def test_a_bad_token_is_401_and_changes_nothing(api: InProcess) -> None:
    async def body(c: httpx.AsyncClient, srv: Service) -> list[Any]:
        seq = srv.state.seq
        bad = {"Authorization": "Bearer not-the-token"}
        out = [
            refusal(await c.post("/api/v1/jobs", json=OK, headers=bad)),
            refusal(await c.post("/api/v1/taskers/w/register", json={}, headers=bad)),
            refusal(await c.post("/api/v1/server/stop", json={}, headers=bad)),
        ]
        assert srv.state.seq == seq and not srv.state.jobs
        assert srv.stops == []  # type: ignore[attr-defined]
        return out

    assert api.run(body) == [(401, "unauthorized")] * 3


def test_the_tasker_token_on_a_client_route_is_403(api: InProcess) -> None:
    async def body(c: httpx.AsyncClient, srv: Service) -> list[Any]:
        r = await c.post("/api/v1/jobs", json=OK, headers=TASKER)
        assert "tasker token opens only tasker endpoints" in r.json()["message"]
        out = [refusal(r), refusal(await c.get("/api/v1/jobs", headers=TASKER))]
        assert not srv.state.jobs
        return out

    assert api.run(body) == [(403, "forbidden")] * 2


def test_the_tasker_token_on_an_admin_route_is_refused(api: InProcess) -> None:
    """Today an admin-only route answers the tasker token 401 "needs the admin token" (not
    the 403 of a client route); the clean stop it guards is not asked."""

    async def body(c: httpx.AsyncClient, srv: Service) -> list[Any]:
        out = []
        for method, path in (("POST", "/server/stop"), ("POST", "/server/sanity")):
            r = await c.request(method, "/api/v1" + path, json={}, headers=TASKER)
            assert "needs the admin token" in r.json()["message"], r.text
            out.append(refusal(r))
        assert srv.stops == []  # type: ignore[attr-defined]
        r = await c.get("/api/v1/server", headers=TASKER)  # the status: either token
        out.append(r.status_code)
        return out

    assert api.run(body) == [(401, "unauthorized"), (401, "unauthorized"), 200]


def test_both_tokens_open_the_tasker_routes(api: InProcess) -> None:
    async def body(c: httpx.AsyncClient, srv: Service) -> list[int]:
        reg = {"host": "h", "pid": 1, "slots": 1}
        out = []
        for tok in (TASKER_TOKEN, TOKEN):
            h = {"Authorization": f"Bearer {tok}", SESSION_HEADER: SECRET}
            out.append(
                (await c.post("/api/v1/taskers/w/register", json=reg, headers=h)).status_code
            )
        return out

    assert api.run(body) == [200, 200]


# -- refusals ----------------------------------------------------------------------------


def test_refusals_name_their_reason_and_change_nothing(api: InProcess) -> None:
    async def body(c: httpx.AsyncClient, srv: Service) -> dict[str, Any]:
        ended, running = await submit(c, 2)
        assert (await c.post(f"/api/v1/jobs/{ended}/stop")).status_code == 200
        await register(c)
        r = await sync(c)  # job `running` is dispatched to w ...
        assert [d["job"] for d in r.json()["dispatch"]] == [running], r.text
        started = {"job": running, "attempt": 1, "pid": 99, "started": time.time()}
        r = await c.post("/api/v1/taskers/w/sync", json={"started": [started]}, headers=as_tasker())
        assert r.status_code == 200, r.text  # ... and runs
        seq = srv.state.seq
        out = {
            "unknown job": refusal(await c.get("/api/v1/jobs/999")),
            "stop unknown": refusal(await c.post("/api/v1/jobs/999/stop")),
            "forget unknown": refusal(await c.delete("/api/v1/jobs/999")),
            "stop ended": refusal(await c.post(f"/api/v1/jobs/{ended}/stop")),
            "forget running": refusal(await c.delete(f"/api/v1/jobs/{running}")),
            "rerun running": refusal(await c.post(f"/api/v1/jobs/{running}/rerun")),
            "bad spec": refusal(await c.post("/api/v1/jobs", json={"command": [], "cwd": "/"})),
            "bad field": refusal(await c.post("/api/v1/jobs", json={**OK, "priority": "hi"})),
            "bad json": refusal(await c.post("/api/v1/jobs", content=b"{")),
            "sync unregistered": refusal(await sync(c, "nobody")),
            "sync other session": refusal(
                await c.post("/api/v1/taskers/w/sync", json={}, headers=as_tasker("o" * 43))
            ),
        }
        assert srv.state.seq == seq, "a refusal changed the state"
        assert srv.state.jobs[running].state == "running"
        assert srv.state.jobs[ended].state == "stopped"
        return out

    assert api.run(body) == {
        "unknown job": (404, "not_found"),
        "stop unknown": (404, "not_found"),
        "forget unknown": (404, "not_found"),
        "stop ended": (409, "conflict"),
        "forget running": (409, "conflict"),
        "rerun running": (409, "conflict"),
        "bad spec": (422, "invalid"),
        "bad field": (422, "invalid"),
        "bad json": (400, "bad_json"),
        "sync unregistered": (409, "unknown_tasker"),
        "sync other session": (409, "wrong_session"),
    }


# -- crash recovery ----------------------------------------------------------------------


def enter_recovery(srv: Service) -> None:
    """Crash recovery mode as ``recovery.begin`` enters it, without its background task."""
    srv.engine.enter_recovery()
    srv.recovery = Recovery(srv, Replayed(state=srv.state))


def test_clients_get_503_with_retry_after_during_crash_recovery(api: InProcess) -> None:
    async def body(c: httpx.AsyncClient, srv: Service) -> dict[str, Any]:
        (job,) = await submit(c)
        enter_recovery(srv)
        seq = srv.state.seq
        answers = [
            await c.post("/api/v1/jobs", json=OK),
            await c.get(f"/api/v1/jobs/{job}"),
            await c.get("/api/v1/taskers"),
        ]
        assert srv.state.seq == seq
        status = await c.get("/api/v1/server")  # says why, itself not refused
        reg = {"host": "h", "pid": 1, "slots": 1}  # taskers come back meanwhile
        back = await c.post("/api/v1/taskers/w/register", json=reg, headers=as_tasker())
        return {
            "answers": [(r.status_code, r.headers.get("Retry-After"), r.json()) for r in answers],
            "status": (status.status_code, status.json().get("mode")),
            "back": (back.status_code, srv.progress()),
        }

    out = api.run(body, "--recovery-grace", "20")
    for code, retry_after, js in out["answers"]:
        assert code == 503
        assert retry_after is not None and 1 <= int(retry_after) <= 20, retry_after
        assert js["error"] == "crash_recovery" and "retry later" in js["message"], js
        assert {"expected", "reconnected", "missing", "seconds_left"} <= set(js["recovery"])
    assert out["status"] == (200, "recovering")
    code, progress = out["back"]
    assert code == 200 and progress["reconnected"] == ["w"], progress


# -- the sync long poll ------------------------------------------------------------------


def test_a_waiting_sync_returns_as_soon_as_a_dispatch_is_emitted(api: InProcess) -> None:
    async def body(c: httpx.AsyncClient, srv: Service) -> tuple[bool, list[int], list[int], float]:
        await register(c)
        poll = asyncio.create_task(sync(c, wait=LONG))
        await asyncio.sleep(0.2)  # the poll has nothing to send: it waits
        waited = not poll.done()
        t0 = time.monotonic()
        ids = await submit(c)
        r = await poll
        took = time.monotonic() - t0
        assert r.status_code == 200, r.text
        return waited, ids, [d["job"] for d in r.json()["dispatch"]], took

    waited, ids, sent, took = api.run(body, *BEATS)
    assert waited, "a sync with nothing to send answered before its wait"
    assert sent == ids
    assert took < LONG / 2, f"the dispatch did not wake the poll ({took:.1f} s)"


def test_a_second_sync_of_the_same_tasker_supersedes_the_first(api: InProcess) -> None:
    async def body(c: httpx.AsyncClient, srv: Service) -> tuple[bool, Any, int, float]:
        await register(c)
        first = asyncio.create_task(sync(c, wait=LONG))
        await asyncio.sleep(0.2)
        waited = not first.done()
        t0 = time.monotonic()
        second = await sync(c, wait=0)
        old = await first
        took = time.monotonic() - t0
        return waited, old.json(), second.status_code, took

    waited, old, second, took = api.run(body, *BEATS)
    assert waited and second == 200
    assert old["dispatch"] == [] and old["kill"] == [], old
    assert took < LONG / 2, f"the newer sync did not end the older one ({took:.1f} s)"


def test_a_waiting_sync_returns_at_the_clean_stop(api: InProcess) -> None:
    async def body(c: httpx.AsyncClient, srv: Service) -> tuple[Any, float]:
        await register(c)
        poll = asyncio.create_task(sync(c, wait=LONG))
        await asyncio.sleep(0.2)
        t0 = time.monotonic()
        srv.engine.stop(freeze=False, release=[])
        r = await poll
        return r.json(), time.monotonic() - t0

    answer, took = api.run(body, *BEATS)
    assert answer["shutdown"] is True and took < LONG / 2, (answer, took)


# -- the hot routes answer as the full app does ------------------------------------------

SHOWN = ("www-authenticate", "retry-after", "connection", "content-type")


async def _both(
    hot: httpx.AsyncClient, full: httpx.AsyncClient, method: str, path: str, **kw: Any
) -> tuple[Any, Any]:
    """One request to the served app (hot router first) and to FastAPI's routes alone."""
    out = []
    for c in (hot, full):
        r = await c.request(method, path, **kw)
        out.append((r.status_code, r.json(), {h: r.headers.get(h) for h in SHOWN}))
    return out[0], out[1]


def test_the_hot_routes_refuse_as_the_full_app_does(
    api: InProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every refusal of submit, get, register and sync: the same status, body and headers
    from the bare router as from FastAPI's stack (server/app.py)."""
    monkeypatch.setattr(hot, "MAX_BODY", 1000)
    monkeypatch.setattr(app, "MAX_BODY", 1000)
    tasker_bad_session = {**TASKER, SESSION_HEADER: "t" * 43}
    cases: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", "/api/v1/jobs", {"json": OK, "headers": {"Authorization": ""}}),
        ("POST", "/api/v1/jobs", {"json": OK, "headers": {"Authorization": "Bearer nope"}}),
        ("POST", "/api/v1/jobs", {"json": OK, "headers": TASKER}),
        ("POST", "/api/v1/jobs", {"content": b"{"}),
        ("POST", "/api/v1/jobs", {"json": {"command": [], "cwd": "/tmp"}}),
        ("POST", "/api/v1/jobs", {"json": {"jobs": [OK, {"cwd": "rel"}]}}),
        ("POST", "/api/v1/jobs", {"json": OK, "headers": {"Idempotency-Key": "\t"}}),
        ("POST", "/api/v1/jobs", {"content": b" " * 1001}),
        ("GET", "/api/v1/jobs/999", {}),
        ("GET", "/api/v1/jobs/1", {"headers": TASKER}),
        ("POST", "/api/v1/taskers/w/register", {"json": {}, "headers": {"Authorization": ""}}),
        ("POST", "/api/v1/taskers/w/register", {"json": {"slots": "x"}, "headers": TASKER}),
        ("POST", "/api/v1/taskers/%C3%A9/register", {"json": {}, "headers": TASKER}),
        ("POST", "/api/v1/taskers/w/register", {"content": b"[", "headers": TASKER}),
        ("POST", "/api/v1/taskers/new/sync", {"json": {"wait": 0}, "headers": as_tasker()}),
        ("POST", "/api/v1/taskers/w/sync", {"json": {"wait": 0}, "headers": TASKER}),
        ("POST", "/api/v1/taskers/w/sync", {"json": {"wait": 0}, "headers": tasker_bad_session}),
        ("POST", "/api/v1/taskers/w/sync", {"json": {"wait": "x"}, "headers": as_tasker()}),
        ("POST", "/api/v1/taskers/w/sync", {"content": b" " * 1001, "headers": as_tasker()}),
    ]

    async def body(c: httpx.AsyncClient, srv: Service) -> list[Any]:
        await register(c)
        await submit(c)
        seq = srv.state.seq
        transport = httpx.ASGITransport(app=app.create_app(srv))
        async with httpx.AsyncClient(transport=transport, base_url="http://t", headers=ADMIN) as f:
            pairs = [await _both(c, f, m, p, **kw) for m, p, kw in cases]
            srv.engine.enter_recovery()
            pairs += [
                await _both(c, f, "POST", "/api/v1/jobs", json=OK),
                await _both(c, f, "GET", "/api/v1/jobs/1"),
                await _both(c, f, "GET", "/readyz"),
                await _both(c, f, "GET", "/healthz"),
            ]
        assert srv.state.seq == seq  # refused: nothing applied
        return pairs

    pairs = api.run(body)
    statuses = [hot_answer[0] for hot_answer, _ in pairs]
    assert statuses == [401, 401, 403, 400, 422, 422, 400, 413, 404, 403, 401, 422, 422, 400,
                        409, 409, 409, 422, 413, 503, 503, 503, 200]  # fmt: skip
    for (hot_answer, full_answer), case in zip(pairs, [*cases, *[("", "", {})] * 4], strict=True):
        assert hot_answer == full_answer, case
    assert pairs[0][0][2]["www-authenticate"] == "Bearer"
    assert pairs[7][0][2]["connection"] == "close"
    assert pairs[19][0][2]["retry-after"] is not None
