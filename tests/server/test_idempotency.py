"""Idempotent submits (SPEC section 8): a repeat with the same Idempotency-Key and user gets
the first answer's ids and queues nothing, across a kill -9, a snapshot and replay.

The handler tests run the real app in process (tests/core.py ``serving``); the last test
kills a real server with SIGKILL right after it acknowledged a keyed submit.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from crq.server import commands, replay, sanity, snapshot
from crq.server.service import Service

from crq.wire import IDEMPOTENCY_HEADER
from tests.core import Core, InProcess, fingerprint, write_journal
from tests.rigs import CrqServer, wait_until

OK = {"command": ["true"], "cwd": "/tmp"}
KEY = "0f8fad5bd9cb469fa16570867728950e"


def keyed(key: str | bytes, user: str = "alice") -> dict[str, Any]:
    return {IDEMPOTENCY_HEADER: key, "X-Crq-User": user}


async def post(c: httpx.AsyncClient, body: Any, key: str | bytes, user: str = "alice") -> Any:
    r = await c.post("/api/v1/jobs", json=body, headers=keyed(key, user))
    return r.status_code, r.json()


def test_a_repeat_answers_the_first_ids_and_queues_nothing(api: InProcess) -> None:
    async def body(c: httpx.AsyncClient, srv: Service) -> None:
        batch = {"jobs": [OK, OK, OK]}
        assert await post(c, batch, KEY) == (201, {"ids": [1, 2, 3]})
        seq = srv.state.seq
        assert await post(c, batch, KEY) == (201, {"ids": [1, 2, 3]})
        assert srv.state.seq == seq and len(srv.state.jobs) == 3
        # a key is the user's own, and another key is another submit
        assert await post(c, batch, KEY, user="bob") == (201, {"ids": [4, 5, 6]})
        assert await post(c, batch, "another-key") == (201, {"ids": [7, 8, 9]})
        # without a key, nothing is remembered: the same body queues again
        r = await c.post("/api/v1/jobs", json=OK)
        assert r.status_code == 201 and r.json() == {"ids": [10]}
        assert list(srv.state.keys) == [("alice", KEY), ("bob", KEY), ("alice", "another-key")]

    api.run(body)


def test_the_same_key_with_another_body_is_a_mismatch_and_changes_nothing(
    api: InProcess,
) -> None:
    async def body(c: httpx.AsyncClient, srv: Service) -> None:
        assert await post(c, OK, KEY) == (201, {"ids": [1]})
        seq = srv.state.seq
        status, js = await post(c, {**OK, "name": "other"}, KEY)
        assert status == 422 and js["error"] == "idempotency_mismatch", js
        assert KEY in js["message"] and "\n" not in js["message"]
        assert srv.state.seq == seq and len(srv.state.jobs) == 1

    api.run(body)


@pytest.mark.parametrize(
    "key", ["", "a b", "x" * 129, "tab\there", b"caf\xc3\xa9", " lead", "nul\x7f"]
)
def test_a_malformed_key_is_400_and_changes_nothing(api: InProcess, key: str | bytes) -> None:
    async def body(c: httpx.AsyncClient, srv: Service) -> Any:
        seq = srv.state.seq
        status, js = await post(c, OK, key)
        assert srv.state.seq == seq and not srv.state.jobs and not srv.state.keys
        return status, js["error"], "\n" in js["message"]

    assert api.run(body) == (400, "invalid", False)


def test_every_printable_ascii_key_up_to_128_is_taken(api: InProcess) -> None:
    async def body(c: httpx.AsyncClient, srv: Service) -> list[int]:
        out = []
        for key in ("x", "!~", "".join(chr(c) for c in range(0x21, 0x7F)), "k" * 128):
            status, js = await post(c, OK, key)
            out.append(status)
        return out

    assert api.run(body) == [201] * 4


def test_forgotten_jobs_are_still_the_answer(api: InProcess) -> None:
    async def body(c: httpx.AsyncClient, srv: Service) -> None:
        assert await post(c, OK, KEY) == (201, {"ids": [1]})
        r = await c.delete("/api/v1/jobs/1")
        assert r.status_code == 200, r.text
        assert await post(c, OK, KEY) == (201, {"ids": [1]})
        assert not srv.state.jobs

    api.run(body)


def test_a_key_past_the_window_is_ignored_then_expired(api: InProcess) -> None:
    async def body(c: httpx.AsyncClient, srv: Service) -> None:
        window = srv.settings.idempotency_window
        assert await post(c, OK, KEY) == (201, {"ids": [1]})
        assert commands.expire_keys(srv.state, time.time(), window) == []
        await asyncio.sleep(window * 1.5)  # the key's window passes
        # the lookup ignores it at once: a new submit, the key now names it
        assert await post(c, OK, KEY) == (201, {"ids": [2]})
        assert srv.state.keys[("alice", KEY)][0] == 2
        assert await post(c, OK, "other") == (201, {"ids": [3]})
        await asyncio.sleep(window * 1.5)
        expire = commands.expire_keys(srv.state, time.time(), window)
        assert [ev["e"] for ev in expire] == ["keys_expire"]
        srv.engine.emit(expire)
        assert srv.state.keys == {}

    api.run(body, "--idempotency-window", "0.2")


def test_a_retry_during_a_big_first_submit_gets_its_ids(api: InProcess) -> None:
    """A batch over SLICE jobs is checked in slices; a retry that comes meanwhile finds no
    key yet, and whichever is checked first queues the jobs: both answer the same ids."""

    async def body(c: httpx.AsyncClient, srv: Service) -> None:
        batch = {"jobs": [OK] * (commands.SLICE * 3)}
        first, second = await asyncio.gather(post(c, batch, KEY), post(c, batch, KEY))
        assert first == second and first[0] == 201, (first[0], second[0])
        assert len(srv.state.jobs) == commands.SLICE * 3

    api.run(body)


# -- the key in the journal and the snapshot ---------------------------------------------


def keyed_core() -> Core:
    core = Core()
    core.submit(2, key="k1")
    core.submit(1, key="k2", name="b")
    core.submit(1)  # no key
    core.now += 30  # k1 and k2 older than the window (20 s)
    core.submit(3, key="k1")  # past the window: queued anew, k1 now its key
    core.submit(1, key="k3")
    return core


def test_keys_survive_snapshot_and_replay(tmp_path: Path) -> None:
    core = keyed_core()
    assert list(core.state.keys) == [("alice", "k2"), ("alice", "k1"), ("alice", "k3")]
    write_journal(tmp_path / "a", core.events)
    assert fingerprint(replay.load(tmp_path / "a", None).state) == fingerprint(core.state)
    path = snapshot.write(core.state, tmp_path, fsync=False, chunk=2)
    loaded = snapshot.read(path)
    assert fingerprint(loaded) == fingerprint(core.state)
    assert sanity.check(loaded, set()).findings == []
    # a repeat after the reload is answered from the loaded keys
    again = Core()
    again.state, again.now = loaded, core.now
    assert again.submit(3, key="k1") == [5, 6, 7]
    assert again.state.seq == core.state.seq


def test_expiry_is_an_event_that_replays(tmp_path: Path) -> None:
    core = keyed_core()
    expire = commands.expire_keys(core.state, core.tick(), core.window)
    assert expire == [{"e": "keys_expire", "t": core.now, "before": core.now - core.window}]
    core.emit(expire)
    assert list(core.state.keys) == [("alice", "k1"), ("alice", "k3")]
    assert commands.expire_keys(core.state, core.tick(), core.window) == []
    write_journal(tmp_path, core.events)
    assert fingerprint(replay.load(tmp_path, None).state) == fingerprint(core.state)


# -- a real server, killed -------------------------------------------------------------------


def submit_keyed(srv: CrqServer, body: Any, key: str) -> httpx.Response:
    """The keyed submit, once the server takes clients (a restart may recover first)."""
    r = wait_until(
        lambda: (
            r if (r := srv.api("POST", "/jobs", json=body, headers=keyed(key))).status_code != 503
            else None
        )
    )  # fmt: skip
    assert isinstance(r, httpx.Response)
    return r


def test_a_keyed_submit_after_kill_9_and_restart_queues_nothing_new(crq_server: Any) -> None:
    srv: CrqServer = crq_server()
    body = {"jobs": [{**OK, "resources": "no_such_attribute"}] * 2}  # stays queued
    first = submit_keyed(srv, body, KEY)
    assert first.status_code == 201, first.text
    ids = first.json()["ids"]
    srv.kill9()
    srv.start(port=srv.port)
    again = submit_keyed(srv, body, KEY)
    assert again.status_code == 201 and again.json()["ids"] == ids, again.text
    mismatch = submit_keyed(srv, {"jobs": [OK]}, KEY)
    assert mismatch.status_code == 422 and mismatch.json()["error"] == "idempotency_mismatch"
    srv.stop()  # clean: a snapshot holds the key now
    srv.start(port=srv.port)
    assert submit_keyed(srv, body, KEY).json()["ids"] == ids
    listed = srv.request("GET", "/jobs")["jobs"]
    assert [j["id"] for j in listed] == ids
