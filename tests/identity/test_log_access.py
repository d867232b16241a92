"""Who may read a job's log (``GET /api/v1/jobs/{id}/log``), and what: the owner, operators
and admins; and only a file the owner could read, though the server runs as root (a user
naming another's file, or a root-only one, as the log gets nothing back). Real users, a
real root tasker running the jobs as them."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.rigs import CrqServer, Tasker
from tests.users import ALICE, BOB, CAROL, OPS, Users

ENV = {"PATH": "/usr/bin:/bin"}


@pytest.fixture
def rig(
    crq_server: Callable[..., CrqServer], crq_tasker: Callable[..., Tasker], unix_users: Users
) -> tuple[CrqServer, Users]:
    if os.geteuid() != 0:
        pytest.skip("a tasker runs jobs as their owners only as root")
    srv = crq_server("--heartbeat", "2", start=False)
    srv.swd.mkdir(parents=True)
    (srv.swd / "config.toml").write_text(f'[roles]\n"@{OPS}" = "operator"\n')
    srv.start()
    crq_tasker("tk1", "--swd", str(srv.swd), "--slots", "4")
    return srv, unix_users


def _token(srv: CrqServer, user: str) -> str:
    return str(srv.request("POST", "/tokens", json={"user": user})["token"])


def _run(srv: CrqServer, token: str, **spec: Any) -> dict[str, Any]:
    r = srv.api("POST", "/jobs", token=token, json={"env": ENV, **spec})
    assert r.status_code == 201, r.text
    [job] = r.json()["ids"]
    return srv.wait(job)


def test_the_owner_operators_and_admins_read_a_log_others_do_not(
    rig: tuple[CrqServer, Users],
) -> None:
    srv, users = rig
    alice = _token(srv, ALICE)
    log = str(users.home(ALICE) / f"crq.{uuid.uuid4().hex[:12]}.log")
    j = _run(srv, alice, command="echo private", cwd=str(users.home(ALICE)), log=log)
    assert j["state"] == "done", j
    os.chmod(log, 0o600)  # alice's alone: still hers to read
    for token in (alice, _token(srv, CAROL), None):
        r = srv.api("GET", f"/jobs/{j['id']}/log", token=token)
        assert (r.status_code, r.content) == (200, b"private\n"), r.text
    r = srv.api("GET", f"/jobs/{j['id']}/log", token=_token(srv, BOB))
    assert r.status_code == 403 and r.json()["rule"] == "own-logs", r.text
    assert r.json()["message"] == (
        f"{BOB} (role user) may not read the log of job {j['id']} of {ALICE}: "
        "a job's log is its owner's (operator or admin may read any)"
    )


@pytest.mark.parametrize("where", ["root-only", "other-home", "shadow"])
def test_a_log_path_its_owner_cannot_read_is_not_served(
    rig: tuple[CrqServer, Users], where: str
) -> None:
    srv, users = rig
    if where == "root-only":
        target = users.root / f"secret.{uuid.uuid4().hex[:8]}"
        target.write_text("root's secret\n")
        target.chmod(0o600)
    elif where == "other-home":  # readable by all, but in bob's 0700 home
        target = users.home(BOB) / f"notes.{uuid.uuid4().hex[:8]}"
        target.write_text("bob's notes\n")
        target.chmod(0o644)
        os.chown(target, users.uid[BOB], users.gid[BOB])
    else:
        target = Path("/etc/shadow")
        if not target.exists():
            pytest.skip("no /etc/shadow here")
    before = target.read_bytes()
    alice = _token(srv, ALICE)
    j = _run(srv, alice, command="true", cwd=str(users.home(ALICE)), log=str(target))
    assert j["state"] == "failed", j  # its job could not open it either
    assert target.read_bytes() == before
    for token in (alice, None):  # not to alice, and not to an admin through alice's job
        r = srv.api("GET", f"/jobs/{j['id']}/log", token=token)
        assert r.status_code == 403, r.text
        assert r.json()["rule"] == "own-logs"
        assert r.json()["message"].startswith(f"job {j['id']}: {ALICE} may not ")
        assert before not in r.content
