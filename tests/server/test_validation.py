"""Request validation: a spec a tasker cannot run is refused at submit, every refusal is one
readable line naming the field, types are strict, and nothing refused changes the state.

The real app, engine and journal in process (httpx's ASGI transport), as in test_paging.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from crq.server.service import Service

from tests.core import TASKER_TOKEN, TOKEN, run_app

OK = {"command": ["true"], "cwd": "/tmp"}


def run(tmp: Path, body: Callable[[httpx.AsyncClient, Service], Awaitable[Any]]) -> Any:
    return run_app(tmp / "q.swd", body, "--heartbeat", "0.05")


# -- specs a tasker cannot run -------------------------------------------------------------

UNRUNNABLE = [
    ({"command": ["echo", "a\0b"]}, "command[1]: must not contain NUL bytes"),
    ({"command": "echo a\0b"}, "command: must not contain NUL bytes"),
    ({"env": {"A\0": "1"}}, "env: names must not contain NUL bytes"),
    ({"env": {"A": "1\0"}}, "env['A']: must not contain NUL bytes"),
    ({"env": {"A=B": "1"}}, "env: names must not contain '='"),
    ({"env": {"": "1"}}, "env: names must not be empty"),
    ({"log": "/tmp/a\0.log"}, "log: must not contain NUL bytes"),
    ({"cwd": "/tmp/\0"}, "cwd: must not contain NUL bytes"),
    ({"name": "n\0"}, "name: must not contain NUL bytes"),
    ({"command": " \t\x1c"}, "command: must not be blank"),
    ({"resources": "CORES/2 bad/"}, "resources: bad resource word 'bad/' (expected NAME, N"),
]


@pytest.mark.parametrize(("change", "message"), UNRUNNABLE)
def test_a_spec_a_tasker_cannot_run_is_refused_and_nothing_queued(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    async def body(c: httpx.AsyncClient, srv: Service) -> None:
        r = await c.post("/api/v1/jobs", json={**OK, **change})
        assert r.status_code == 422, r.text
        assert r.json()["error"] == "invalid"
        assert r.json()["message"].startswith(message)
        # the same spec inside a batch names its index; the good job before it is not queued
        r = await c.post("/api/v1/jobs", json={"jobs": [OK, {**OK, **change}]})
        assert r.status_code == 422, r.text
        assert r.json()["message"].startswith(f"jobs[1].{message}")
        assert (await c.get("/api/v1/queue")).json() == {"ids": []}
        assert srv.state.next_id == 1
        r = await c.post("/api/v1/jobs", json=OK)  # the server goes on serving
        assert r.status_code == 201 and r.json() == {"ids": [1]}

    run(tmp_path, body)


# -- messages a person can read ------------------------------------------------------------

MESSAGES = [
    ({"command": []}, "command: must not be empty"),
    ({"command": ""}, "command: must not be empty"),
    ({"command": 5}, "command: must be a list of strings or a string"),
    ({"command": ["a", 5]}, "command[1]: must be a string"),
    ({"cwd": "/tmp"}, "command: is required"),
    ({**OK, "cwd": "tmp"}, "cwd: must be an absolute path"),
    ({**OK, "priority": 0}, "priority: must be an integer from 1 to 15"),
    ({**OK, "priority": 16}, "priority: must be an integer from 1 to 15"),
    ({**OK, "max_attempts": 0}, "max_attempts: must be an integer from 1 to 1000"),
    ({**OK, "colour": "red"}, "colour: unknown field"),
    ({**OK, "env": {"A": 1}}, "env['A']: must be a string"),
    ([OK], "body: must be an object"),
    ({"jobs": []}, "jobs: must not be empty"),
    (
        {"jobs": [OK, OK, OK, {**OK, "env": {"A=B": "x"}}]},
        "jobs[3].env: names must not contain '='",
    ),
    ({"jobs": [OK, {"command": ""}]}, "jobs[1].command: must not be empty"),
]


@pytest.mark.parametrize(("spec", "message"), MESSAGES)
def test_validation_messages_are_one_readable_line(tmp_path: Path, spec: Any, message: str) -> None:
    async def body(c: httpx.AsyncClient, srv: Service) -> str:
        r = await c.post("/api/v1/jobs", json=spec)
        assert r.status_code == 422, r.text
        return str(r.json()["message"])

    got = run(tmp_path, body)
    assert got.startswith(message)
    assert "\n" not in got and "Input should" not in got and "constrained" not in got


def test_several_problems_say_how_many_more(tmp_path: Path) -> None:
    async def body(c: httpx.AsyncClient, srv: Service) -> str:
        r = await c.post("/api/v1/jobs", json={"command": [], "priority": 0, "name": 1})
        return str(r.json()["message"])

    assert run(tmp_path, body) == "command: must not be empty (and 2 more problems)"


def test_query_and_path_errors_are_readable(tmp_path: Path) -> None:
    async def body(c: httpx.AsyncClient, srv: Service) -> list[tuple[int, str]]:
        out = []
        for url in ("/api/v1/jobs?limit=x", "/api/v1/jobs/abc", "/api/v1/jobs/1/wait?timeout=x"):
            r = await c.get(url)
            out.append((r.status_code, r.json()["message"]))
        return out

    assert run(tmp_path, body) == [
        (422, "limit: must be an integer"),
        (422, "job_id: must be an integer"),
        (422, "timeout: must be a number"),
    ]


def test_an_unknown_state_filter_is_a_400_naming_the_states(tmp_path: Path) -> None:
    async def body(c: httpx.AsyncClient, srv: Service) -> list[httpx.Response]:
        return [await c.get("/api/v1/jobs", params={"state": s}) for s in ("bogus", "queued")]

    bogus, queued = run(tmp_path, body)
    assert bogus.status_code == 400
    assert bogus.json() == {
        "error": "invalid",
        "message": "state: must be one of queued, waiting, running, done, failed, stopped, lost",
    }
    assert queued.status_code == 200


# -- strict types --------------------------------------------------------------------------

STRICT_JOB = [
    {"priority": True},
    {"priority": "4"},
    {"priority": 4.5},
    {"max_attempts": "3"},
    {"rerunnable": 1},
    {"rerunnable": "false"},
    {"name": 7},
    {"resources": 2},
    {"cwd": ["/tmp"]},
]


@pytest.mark.parametrize("change", STRICT_JOB)
def test_job_fields_take_their_own_type_only(tmp_path: Path, change: dict[str, Any]) -> None:
    async def body(c: httpx.AsyncClient, srv: Service) -> httpx.Response:
        return await c.post("/api/v1/jobs", json={**OK, **change})

    r = run(tmp_path, body)
    assert r.status_code == 422, r.text
    assert r.json()["message"].startswith(f"{next(iter(change))}: must be")


def test_an_integer_written_with_a_zero_fraction_is_that_integer(tmp_path: Path) -> None:
    """``4.0`` and ``4`` are one JSON number (and an integer to JSON Schema); ``4.5`` is not."""

    async def body(c: httpx.AsyncClient, srv: Service) -> Any:
        r = await c.post("/api/v1/jobs", json={**OK, "priority": 9.0, "max_attempts": 2.0})
        assert r.status_code == 201, r.text
        return (await c.get("/api/v1/jobs/1")).json()

    job = run(tmp_path, body)
    assert (job["priority"], job["max_attempts"]) == (9, 2)
    assert isinstance(job["priority"], int)


STRICT_TASKER = [
    ("register", {"host": "h", "slots": True}, "slots: must be an integer from 0 to 100000"),
    ("register", {"host": "h", "slots": "2"}, "slots: must be an integer from 0 to 100000"),
    ("register", {"host": "h", "slots": 1, "rebooted": "yes"}, "rebooted: must be true or"),
    ("register", {"host": "h", "slots": 1, "pid": 1.5}, "pid: must be a 64-bit integer"),
    ("register", {"host": "h", "slots": 1, "resources": "é"}, "resources: bad resource word"),
    ("sync", {"wait": "1"}, "wait: must be a number from 0 to 300"),
    ("sync", {"wait": True}, "wait: must be a number from 0 to 300"),
    ("sync", {"running": [{"job": "1", "attempt": 1}]}, "running[0].job: must be a 64-bit"),
    ("sync", {"finished": [{"job": 1, "attempt": 1, "exit_code": "0"}]}, "finished[0].exit_co"),
    ("sync", {"running": [{"job": -(2**63) - 1, "attempt": 1}]}, "running[0].job: must be a"),
]


@pytest.mark.parametrize(("route", "data", "message"), STRICT_TASKER)
def test_tasker_reports_are_strict_too(
    tmp_path: Path, route: str, data: dict[str, Any], message: str
) -> None:
    async def body(c: httpx.AsyncClient, srv: Service) -> httpx.Response:
        auth = {"Authorization": f"Bearer {TASKER_TOKEN}"}
        r = await c.post(
            "/api/v1/taskers/t1/register", json={"host": "h", "slots": 1}, headers=auth
        )
        assert r.status_code == 200, r.text
        return await c.post(f"/api/v1/taskers/t1/{route}", json=data, headers=auth)

    r = run(tmp_path, body)
    assert r.status_code == 422, r.text
    assert r.json()["message"].startswith(message)


def test_a_tasker_name_is_ascii(tmp_path: Path) -> None:
    async def body(c: httpx.AsyncClient, srv: Service) -> list[int]:
        auth = {"Authorization": f"Bearer {TASKER_TOKEN}"}
        out = []
        for name in ("t-1.a@b", "tä", "t 1"):
            r = await c.post(
                f"/api/v1/taskers/{name}/register", json={"host": "h", "slots": 1}, headers=auth
            )
            out.append(r.status_code)
        return out

    assert run(tmp_path, body) == [200, 422, 422]


def test_server_stop_takes_a_boolean_freeze(tmp_path: Path) -> None:
    async def body(c: httpx.AsyncClient, srv: Service) -> list[int]:
        out = []
        for data in ({"freeze": "no"}, {"freeze": 1}, {"frozen": True}, {"freeze": True}):
            out.append((await c.post("/api/v1/server/stop", json=data)).status_code)
        out.append((await c.post("/api/v1/server/stop")).status_code)  # no body: a plain stop
        return out + srv.stops  # type: ignore[attr-defined]

    assert run(tmp_path, body) == [422, 422, 422, 200, 200, True, False]


# -- authentication and methods ------------------------------------------------------------


def test_the_bearer_scheme_is_case_insensitive(tmp_path: Path) -> None:
    async def body(c: httpx.AsyncClient, srv: Service) -> list[int]:
        out = []
        for auth in (f"bearer {TOKEN}", f"BEARER {TOKEN}", f"  Bearer   {TOKEN} ", "Bearer", ""):
            r = await c.get("/api/v1/queue", headers={"Authorization": auth})
            out.append(r.status_code)
        r = await c.get("/api/v1/queue", headers={"Authorization": f"Basic {TOKEN}"})
        assert r.headers["WWW-Authenticate"] == "Bearer"
        return [*out, r.status_code]

    assert run(tmp_path, body) == [200, 200, 200, 401, 401, 401]


def test_a_405_says_which_methods_the_path_has(tmp_path: Path) -> None:
    async def body(c: httpx.AsyncClient, srv: Service) -> list[tuple[int, str | None]]:
        out = []
        for method, url in (
            ("PUT", "/api/v1/jobs"),  # GET (FastAPI) and POST (a plain route) on one path
            ("GET", "/api/v1/taskers/t1/sync"),
            ("DELETE", "/api/v1/queue"),
        ):
            r = await c.request(method, url)
            out.append((r.status_code, r.headers.get("allow")))
            assert r.json()["error"] == "method_not_allowed"
        return out

    assert run(tmp_path, body) == [(405, "GET, POST"), (405, "POST"), (405, "GET")]
