"""``Client.submit`` against a real server process that is recovering or down: the submit is
retried under its Idempotency-Key until the server takes it, and the job is queued once.

The server is a real ``python -m crq.server`` (tests/rigs.py); what makes it recover is a
tasker it had given a job to, played here over HTTP by the test, which also ends the
recovery by registering that tasker again once the client said it is waiting.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from crq.client.api import Client

from crq import wire
from tests.rigs import PATIENCE, CrqServer, wait_until

SECRET = "ghost-session-secret-0123456789"


class Submitter:
    """``Client.submit`` in a thread, with what it said through ``notify``."""

    def __init__(self, srv: CrqServer, name: str, cwd: Path) -> None:
        self.client = Client(url=srv.url, token=srv.admin_token, queue=srv.queue)
        self.notes: list[str] = []
        self.client.notify = self.notes.append
        self.ids: list[int] = []
        self.error: BaseException | None = None
        spec = {"command": ["true"], "cwd": str(cwd), "name": name, "resources": "nowhere"}
        self.thread = threading.Thread(target=self._run, args=(spec,), daemon=True)
        self.thread.start()

    def _run(self, spec: dict[str, Any]) -> None:
        try:
            self.ids.append(self.client.submit(spec))
        except BaseException as e:  # noqa: BLE001 - handed to the test's thread
            self.error = e

    def said(self, words: str) -> bool:
        return any(words in n for n in self.notes)

    def result(self) -> list[int]:
        self.thread.join(PATIENCE)
        self.client.close()
        assert not self.thread.is_alive(), f"submit still retrying: {self.notes}"
        assert self.error is None, self.error
        return self.ids


def named(srv: CrqServer, name: str) -> list[int]:
    return [j["id"] for j in srv.request("GET", "/jobs")["jobs"] if j["name"] == name]


def register_ghost(srv: CrqServer) -> httpx.Response:
    return srv.api(
        "POST",
        "/taskers/ghost/register",
        token=srv.tasker_token,
        json={"host": "ghost-host", "pid": 4242, "slots": 1},
        headers={wire.SESSION_HEADER: SECRET},
    )


def test_a_submit_during_crash_recovery_rides_it_out_once(
    crq_server: Callable[..., CrqServer], tmp_path: Path
) -> None:
    srv = crq_server("--recovery-grace", "300")
    assert register_ghost(srv).status_code == 200
    (held,) = srv.submit({"command": ["sleep", "1"], "cwd": str(tmp_path)})
    wait_until(lambda: srv.request("GET", f"/jobs/{held}")["state"] == "running")
    srv.kill9()
    srv.start(port=srv.port)  # the ghost had a job: recovery waits for it
    assert srv.api("GET", "/jobs").status_code == 503
    sub = Submitter(srv, "during-recovery", tmp_path)
    wait_until(lambda: sub.said("is in crash recovery"))
    assert sub.ids == [] and sub.thread.is_alive()
    assert register_ghost(srv).status_code == 200  # back: the recovery ends
    (job,) = sub.result()
    assert named(srv, "during-recovery") == [job]
    assert sub.notes[0].endswith("waiting to submit"), sub.notes


def test_a_submit_while_the_server_is_down_succeeds_once_it_is_back(
    crq_server: Callable[..., CrqServer], tmp_path: Path
) -> None:
    srv = crq_server()
    srv.kill9()
    sub = Submitter(srv, "while-down", tmp_path)
    wait_until(lambda: sub.said("connection refused"))
    assert sub.ids == [] and sub.thread.is_alive()
    srv.start(port=srv.port)
    (job,) = sub.result()
    assert named(srv, "while-down") == [job]
    # the outage, said once; then, if the restart caught it in its (short) crash recovery,
    # that too, once: every start of a killed server is a takeover (an epoch event)
    assert "retrying for up to 120 s" in sub.notes[0], sub.notes
    assert all("crash recovery" in n for n in sub.notes[1:]) and len(sub.notes) <= 2, sub.notes
