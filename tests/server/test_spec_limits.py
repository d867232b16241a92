"""The spec keys of SPEC section 10 this part adds: ``time_limit``, ``kill_grace``, ``script``.

Kept in a job's stored spec only when set (a plain job's spec is as long as before), shown
in its JSON, passed to the tasker in its dispatch (with ``ram``, the MB of ``RAM/N``);
bad values and oversize scripts are refused whole with one line naming the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from crq.server.http.views import dispatch_json
from crq.server.models import MAX_SCRIPT
from crq.server.service import Service

from tests.core import run_app

OK = {"command": ["true"], "cwd": "/tmp"}


def run(tmp: Path, body: Any) -> Any:
    return run_app(tmp / "q.swd", body, "--heartbeat", "0.05")


def test_limits_and_scripts_are_kept_shown_and_dispatched(tmp_path: Path) -> None:
    async def body(c: httpx.AsyncClient, srv: Service) -> None:
        jobs = [
            OK,
            {**OK, "time_limit": 90, "kill_grace": 0, "resources": "RAM/50"},
            {"cwd": "/tmp", "script": "#!/bin/sh\necho hi\n"},
            {"cwd": "/tmp", "script": "echo $1", "command": ["a"], "time_limit": 1.5},
        ]
        r = await c.post("/api/v1/jobs", json={"jobs": jobs})
        assert r.status_code == 201, r.text
        plain, limited, script, both = (srv.state.jobs[i] for i in r.json()["ids"])
        assert orjson.loads(plain.spec).keys() == {"command", "cwd", "log"}
        assert dispatch_json(srv.state, plain).keys() == {
            "job", "attempt", "command", "cwd", "env", "log", "name", "user"
        }  # fmt: skip
        d = dispatch_json(srv.state, limited)
        assert (d["time_limit"], d["kill_grace"], d["ram"]) == (90, 0, 50)
        d = dispatch_json(srv.state, script)
        assert (d["script"], d["command"], script.name) == ("#!/bin/sh\necho hi\n", [], "script")
        d = dispatch_json(srv.state, both)
        assert (d["command"], d["time_limit"], "kill_grace" in d) == (["a"], 1.5, False)
        j = (await c.get(f"/api/v1/jobs/{both.id}")).json()
        assert (j["script"], j["time_limit"], j["command"]) == ("echo $1", 1.5, ["a"])

    run(tmp_path, body)


BAD = [
    ({**OK, "time_limit": 0}, "time_limit: must be a number of seconds above 0"),
    ({**OK, "time_limit": -5}, "time_limit: must be a number of seconds above 0"),
    ({**OK, "time_limit": 1e12}, "time_limit: must be a number of seconds above 0 and at most"),
    ({**OK, "time_limit": "90"}, "time_limit: must be a number"),
    ({**OK, "time_limit": True}, "time_limit: must be a number"),
    ({**OK, "kill_grace": -1}, "kill_grace: must be a number of seconds from 0 to 86400"),
    ({"cwd": "/tmp"}, "command: is required"),
    ({"cwd": "/tmp", "script": 5}, "script: must be a string"),
    ({"cwd": "/tmp", "script": "x", "command": "echo"}, "command: with a script, a list"),
    ({"cwd": "/tmp", "script": "x" * (MAX_SCRIPT + 1)}, "script: must have at most 1048576"),
    ({"cwd": "/tmp", "script": "\u00e9" * (MAX_SCRIPT // 2 + 1)}, "script: must be at most"),
]


@pytest.mark.parametrize(("spec", "message"), BAD)
def test_bad_limits_and_oversize_scripts_are_refused_and_nothing_queued(
    tmp_path: Path, spec: dict[str, Any], message: str
) -> None:
    async def body(c: httpx.AsyncClient, srv: Service) -> None:
        r = await c.post("/api/v1/jobs", json={"jobs": [OK, spec]})
        assert r.status_code == 422, r.text
        assert r.json()["message"].startswith(f"jobs[1].{message}"), r.json()
        assert srv.state.next_id == 1

    run(tmp_path, body)
