"""Who may do what (SPEC section 9), against a real server: personal tokens, MUNGE
credentials made by real users through a real munged, roles from config.toml (users and
@groups), the rule a 403 names, and tokens that outlive kill -9 and a clean restart."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from crq.server.openapi import OPS

from crq import munge
from tests.munged import Munged
from tests.rigs import CrqServer, env_with_root, wait_until
from tests.users import ALICE, BOB, CAROL, Users
from tests.users import OPS as OPS_GROUP

QUEUED = {"command": ["true"], "cwd": "/tmp"}  # no tasker here: it stays queued


def _config(swd: Path, munged: Munged | None = None, **extra: str) -> None:
    swd.mkdir(parents=True, exist_ok=True)
    roles = ['crqtro = "readonly"', 'crqtop = "operator"', f'"@{OPS_GROUP}" = "operator"']
    lines = ["[roles]", *roles]
    top = [f'munge_socket = "{munged.socket}"'] if munged else []
    top += [f"{k} = {v}" for k, v in extra.items()]
    (swd / "config.toml").write_text("\n".join([*top, *lines]) + "\n")


def _server(
    make: Callable[..., CrqServer], tmp_path: Path, munged: Munged | None = None
) -> CrqServer:
    swd = tmp_path / "q.swd"
    _config(swd, munged)
    return make(swd=swd)


def _issue(srv: CrqServer, user: str, role: str | None = None, **more: Any) -> str:
    out = srv.request("POST", "/tokens", json={"user": user, "role": role, **more})
    assert out["user"] == user and out["token"].startswith("crq_")
    return str(out["token"])


def _as(srv: CrqServer, token: str, method: str, path: str, **kw: Any) -> Any:
    return srv.api(method, path, token=token, **kw)


def _munge_as(user: str, socket: str) -> str:
    """A credential made by ``user`` itself: the ``munge`` command run as that user."""
    out = subprocess.run(
        ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups",
         "munge", "--socket", socket, "--no-input"],
        capture_output=True, check=True,
    )  # fmt: skip
    return out.stdout.decode().strip()


def _munge(srv: CrqServer, cred: str, method: str, path: str, **kw: Any) -> Any:
    import httpx

    return httpx.request(
        method, f"{srv.url}/api/v1{path}", headers={"Authorization": f"Munge {cred}"},
        timeout=30, **kw,
    )  # fmt: skip


# -- the role matrix --------------------------------------------------------------------

#: The least role of every client route: readonly < user < operator < admin; "tasker" for the
#: taskers' routes (no personal token opens them); "own" = user, on the caller's own job.
LEAST: dict[tuple[str, str], str] = {
    ("post", "/api/v1/jobs"): "user",
    ("get", "/api/v1/jobs"): "readonly",
    ("get", "/api/v1/jobs/{job_id}"): "readonly",
    ("get", "/api/v1/jobs/{job_id}/wait"): "readonly",
    ("get", "/api/v1/jobs/{job_id}/log"): "own",
    ("get", "/api/v1/history"): "readonly",
    ("get", "/api/v1/queue"): "readonly",
    ("post", "/api/v1/jobs/{job_id}/stop"): "own",
    ("post", "/api/v1/jobs/{job_id}/rerun"): "own",
    ("post", "/api/v1/jobs/{job_id}/hold"): "own",
    ("post", "/api/v1/jobs/{job_id}/release"): "own",
    ("delete", "/api/v1/jobs/{job_id}"): "own",
    ("get", "/api/v1/taskers"): "readonly",
    ("get", "/api/v1/dash/jobs"): "readonly",
    ("get", "/api/v1/jobs/{job_id}/why"): "readonly",
    ("post", "/api/v1/ended"): "readonly",
    ("post", "/api/v1/control"): "user",
    ("get", "/api/v1/stats/series"): "readonly",
    ("get", "/api/v1/server"): "readonly",
    ("post", "/api/v1/server/stop"): "admin",
    ("post", "/api/v1/server/failover"): "admin",
    ("post", "/api/v1/server/sanity"): "operator",
    ("get", "/api/v1/cleanup"): "operator",
    ("post", "/api/v1/cleanup/jobs/{job_id}"): "operator",
    ("post", "/api/v1/cleanup/hosts/{host}"): "operator",
    ("post", "/api/v1/taskers/{name}/register"): "tasker",
    ("post", "/api/v1/taskers/{name}/sync"): "tasker",
    ("post", "/api/v1/taskers/{name}/logs"): "tasker",
    ("get", "/api/v1/whoami"): "readonly",
    ("post", "/api/v1/tokens"): "readonly",
    ("get", "/api/v1/tokens"): "readonly",
    ("delete", "/api/v1/tokens/{token_id}"): "readonly",
}
RANK = {"readonly": 0, "user": 1, "own": 1, "operator": 2, "admin": 3, "tasker": 9}
BODIES: dict[tuple[str, str], Any] = {
    ("post", "/api/v1/jobs"): QUEUED,
    ("post", "/api/v1/server/stop"): {},
    ("post", "/api/v1/server/failover"): {},
    ("post", "/api/v1/tokens"): {},
    ("post", "/api/v1/taskers/{name}/register"): {},
    ("post", "/api/v1/taskers/{name}/sync"): {},
    ("post", "/api/v1/taskers/{name}/logs"): {},
    ("post", "/api/v1/control"): {"action": "hold", "ids": [1]},
}


def test_the_matrix_names_every_client_route() -> None:
    client_routes = {k for k, op in OPS.items() if op[4]}
    assert client_routes == set(LEAST), "a new route needs its least role here"


def test_the_role_matrix_over_every_client_route(
    crq_server: Callable[..., CrqServer], tmp_path: Path
) -> None:
    """Each role, on each route: refused with 403 and the rule below its least role, never
    refused (401 or 403) at or above it. Admin routes that end the server are tried only
    below admin."""
    srv = _server(crq_server, tmp_path)
    tokens = {
        "readonly": _issue(srv, "crqtro"),  # role by config.toml
        "user": _issue(srv, ALICE),  # default
        "operator": _issue(srv, "crqtop"),
    }
    for role, tok in tokens.items():
        assert _as(srv, tok, "GET", "/whoami").json()["role"] == role
    [other] = srv.submit({**QUEUED, "name": "root's"})
    for (method, path), least in sorted(LEAST.items()):
        for role, tok in tokens.items():
            if least == "admin" and RANK[role] >= 3:
                continue
            own = None
            if "{job_id}" in path:
                own = other
                if RANK[role] >= 1:  # a job of the caller's own
                    r = _as(srv, tok, "POST", "/jobs", json=QUEUED)
                    [own] = r.json()["ids"]
            url = (
                path.removeprefix("/api/v1")
                .replace("{job_id}", str(own))
                .replace("{name}", "tk1")
                .replace("{host}", "nohost")
                .replace("{token_id}", "00000000")
            )
            kw: dict[str, Any] = {}
            if (method, path) in BODIES:
                kw["json"] = BODIES[(method, path)]
            if path.endswith("/wait"):
                kw["params"] = {"timeout": 0}
            r = _as(srv, tok, method.upper(), url, **kw)
            what = f"{role} {method.upper()} {path}: {r.status_code} {r.text[:200]}"
            allowed = RANK[role] >= RANK[least]
            if least == "own" and own == other:
                allowed = RANK[role] >= RANK["operator"]
            if allowed:
                assert r.status_code not in (401, 403), what
            else:
                assert r.status_code == 403, what
                assert r.json()["error"] == "forbidden", what
                if least != "tasker":
                    assert r.json()["rule"], what
    assert srv.proc is not None and srv.proc.poll() is None


def test_users_control_only_their_own_jobs(
    crq_server: Callable[..., CrqServer], tmp_path: Path
) -> None:
    srv = _server(crq_server, tmp_path)
    alice, bob, op = _issue(srv, ALICE), _issue(srv, BOB), _issue(srv, "crqtop")
    [job] = _as(srv, bob, "POST", "/jobs", json=QUEUED).json()["ids"]
    assert srv.request("GET", f"/jobs/{job}")["user"] == BOB
    for method, path in (
        ("POST", "stop"),
        ("POST", "rerun"),
        ("POST", "hold"),
        ("POST", "release"),
        ("DELETE", ""),
    ):
        r = _as(srv, alice, method, f"/jobs/{job}/{path}".rstrip("/"))
        assert r.status_code == 403, r.text
        assert r.json()["rule"] == "own-jobs"
        assert BOB in r.json()["message"] and ALICE in r.json()["message"]
    assert srv.request("GET", f"/jobs/{job}")["state"] == "queued"  # refused: nothing changed
    assert _as(srv, bob, "POST", f"/jobs/{job}/hold").json()["state"] == "waiting"  # its own
    assert _as(srv, bob, "POST", f"/jobs/{job}/release").json()["state"] == "queued"
    r = _as(srv, op, "POST", f"/jobs/{job}/stop")
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "stopped"
    assert _as(srv, bob, "POST", f"/jobs/{job}/rerun").status_code == 200
    history = srv.request("GET", f"/jobs/{job}")["history"]
    assert [(h["action"], h["by"]) for h in history] == [
        ("hold", BOB),
        ("release", BOB),
        ("stop", "crqtop"),
        ("rerun", BOB),
    ]


def test_bulk_control_checks_each_job_as_its_own_route(
    crq_server: Callable[..., CrqServer], tmp_path: Path
) -> None:
    """``POST /control``: alice's jobs held, bob's refused with the rule, an unknown id 404,
    in order; a readonly caller is refused as a whole; an operator holds bob's."""
    srv = _server(crq_server, tmp_path)
    alice, bob, op, ro = (_issue(srv, u) for u in (ALICE, BOB, "crqtop", "crqtro"))
    mine = _as(srv, alice, "POST", "/jobs", json={"jobs": [QUEUED, QUEUED]}).json()["ids"]
    [theirs] = _as(srv, bob, "POST", "/jobs", json=QUEUED).json()["ids"]
    ids = [mine[0], theirs, 999_999, mine[1]]
    r = _as(srv, alice, "POST", "/control", json={"action": "hold", "ids": ids})
    assert r.status_code == 200, r.text
    got = r.json()
    assert (got["ok"], got["failed"]) == (2, 2)
    assert [x["id"] for x in got["results"]] == ids
    assert [x["status"] for x in got["results"]] == [200, 403, 404, 200]
    assert got["results"][0]["state"] == "waiting" and got["results"][0]["reason"]
    assert got["results"][1]["rule"] == "own-jobs" and got["results"][1]["error"] == "forbidden"
    assert srv.request("GET", f"/jobs/{theirs}")["state"] == "queued"  # refused: unchanged
    refused = _as(srv, ro, "POST", "/control", json={"action": "stop", "ids": mine})
    assert refused.status_code == 403 and refused.json()["rule"] == "readonly"
    for bad in ({"action": "explode", "ids": mine}, {"action": "stop", "ids": []}, {}):
        assert _as(srv, alice, "POST", "/control", json=bad).status_code == 422
    r = _as(srv, op, "POST", "/control", json={"action": "stop", "ids": [theirs, *mine]})
    assert [x["state"] for x in r.json()["results"]] == ["stopped"] * 3
    history = srv.request("GET", f"/jobs/{theirs}")["history"]
    assert [(h["action"], h["by"]) for h in history] == [("stop", "crqtop")]
    again = _as(srv, alice, "POST", "/control", json={"action": "stop", "ids": mine}).json()
    assert [x["status"] for x in again["results"]] == [409, 409]  # already ended
    assert " is already " in again["results"][0]["message"]
    gone = _as(srv, alice, "POST", "/control", json={"action": "forget", "ids": mine}).json()
    assert [x.get("forgotten") for x in gone["results"]] == [True, True]


def test_env_and_script_are_the_owners_and_operators_only(
    crq_server: Callable[..., CrqServer], tmp_path: Path
) -> None:
    """A job's environment and stored script may hold secrets: another user sees the job,
    not them."""
    srv = _server(crq_server, tmp_path)
    alice, bob, op = _issue(srv, ALICE), _issue(srv, BOB), _issue(srv, "crqtop")
    spec = {**QUEUED, "env": {"API_KEY": "s3cret"}, "script": "#!/bin/sh\necho s3cret\n"}
    [job] = _as(srv, bob, "POST", "/jobs", json=spec).json()["ids"]
    for token in (bob, op):
        seen = _as(srv, token, "GET", f"/jobs/{job}").json()
        assert seen["env"]["API_KEY"] == "s3cret" and "s3cret" in seen["script"]
    other = _as(srv, alice, "GET", f"/jobs/{job}")
    assert other.status_code == 200 and other.json()["user"] == BOB
    assert other.json()["env"] is None and "script" not in other.json()
    assert "s3cret" not in other.text
    waited = _as(srv, alice, "GET", f"/jobs/{job}/wait", params={"timeout": 0})
    assert waited.status_code == 200 and "s3cret" not in waited.text


def test_a_readonly_user_lists_but_does_not_submit(
    crq_server: Callable[..., CrqServer], tmp_path: Path
) -> None:
    srv = _server(crq_server, tmp_path)
    ro = _issue(srv, "crqtro")
    srv.submit(QUEUED)
    assert len(_as(srv, ro, "GET", "/jobs").json()["jobs"]) == 1
    r = _as(srv, ro, "POST", "/jobs", json=QUEUED)
    assert (r.status_code, r.json()["rule"]) == (403, "readonly")
    assert len(srv.request("GET", "/jobs")["jobs"]) == 1


def test_a_token_is_no_more_than_its_holder(
    crq_server: Callable[..., CrqServer], tmp_path: Path
) -> None:
    """A user's token cannot mint tokens for others or of a higher role, nor act for
    another user through X-Crq-User."""
    srv = _server(crq_server, tmp_path)
    alice = _issue(srv, ALICE)
    r = _as(srv, alice, "POST", "/tokens", json={"user": BOB})
    assert (r.status_code, r.json()["rule"]) == (403, "own-tokens")
    r = _as(srv, alice, "POST", "/tokens", json={"role": "admin"})
    assert (r.status_code, r.json()["rule"]) == (403, "own-tokens")
    mine = _as(srv, alice, "POST", "/tokens", json={"note": "browser"}).json()
    assert (mine["user"], mine["role"]) == (ALICE, "user")
    r = _as(srv, alice, "POST", "/jobs", json=QUEUED, headers={"X-Crq-User": BOB})
    assert r.status_code == 403
    assert [t["user"] for t in _as(srv, alice, "GET", "/tokens").json()["tokens"]] == [ALICE] * 2
    assert len(srv.request("GET", "/tokens")["tokens"]) == 2  # the admin sees all
    # the admin token acting for a user: that user owns the job, the role stays admin
    r = srv.api("POST", "/jobs", json=QUEUED, headers={"X-Crq-User": BOB})
    assert r.status_code == 201
    assert srv.request("GET", f"/jobs/{r.json()['ids'][0]}")["user"] == BOB


@pytest.mark.parametrize("name", ["a b", "../etc", "-rf", "x" * 70, "bob:0", "é"])
def test_a_user_name_must_be_one_a_host_could_have(
    crq_server: Callable[..., CrqServer], tmp_path: Path, name: str
) -> None:
    """Owners are resolved by name on every tasker host: X-Crq-User and a token's user are
    user names, or a 422 that changes nothing."""
    srv = _server(crq_server, tmp_path)
    r = srv.api("POST", "/jobs", json=QUEUED, headers={"X-Crq-User": name.encode()})
    assert r.status_code == 422 and "X-Crq-User" in r.json()["message"], r.text
    r = srv.api("POST", "/tokens", json={"user": name})
    assert r.status_code == 422, r.text
    assert (
        srv.request("GET", "/jobs")["jobs"] == [] and srv.request("GET", "/tokens")["tokens"] == []
    )


def test_forged_expired_and_revoked_tokens_get_401(
    crq_server: Callable[..., CrqServer], tmp_path: Path
) -> None:
    srv = _server(crq_server, tmp_path)
    good = _issue(srv, ALICE)
    token_id = good.split("_")[1]
    forged = good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")
    short = _issue(srv, ALICE, expires=1)
    for bad in (forged, f"crq_{token_id}_x", "crq_", "not-a-token", srv.tasker_token[:-1]):
        assert _as(srv, bad, "GET", "/jobs").status_code == 401, bad
    time.sleep(1.5)
    r = _as(srv, short, "GET", "/jobs")
    assert r.status_code == 401 and "expired" in r.json()["message"]
    assert _as(srv, good, "GET", "/jobs").status_code == 200
    assert srv.request("DELETE", f"/tokens/{token_id}")["revoked"] is True
    assert _as(srv, good, "GET", "/jobs").status_code == 401
    assert _as(srv, srv.tasker_token, "GET", "/jobs").status_code == 403


def test_tokens_outlive_kill9_and_a_clean_restart(
    crq_server: Callable[..., CrqServer], tmp_path: Path
) -> None:
    srv = _server(crq_server, tmp_path)
    keep, drop = _issue(srv, ALICE, "operator"), _issue(srv, BOB)
    srv.request("DELETE", f"/tokens/{drop.split('_')[1]}")
    [job] = _as(srv, keep, "POST", "/jobs", json=QUEUED).json()["ids"]
    _as(srv, keep, "POST", f"/jobs/{job}/stop")
    for restart in ("kill -9", "clean stop"):
        if restart == "kill -9":
            srv.kill9()  # the journal replays the token events
        else:
            srv.stop()  # the snapshot holds them
        srv.start()
        me = _as(srv, keep, "GET", "/whoami").json()
        assert (me["user"], me["role"], me["via"]) == (ALICE, "operator", "token"), restart
        assert _as(srv, drop, "GET", "/jobs").status_code == 401, restart
        history = srv.request("GET", f"/jobs/{job}")["history"]
        assert [(h["action"], h["by"]) for h in history] == [("stop", ALICE)], restart
    assert srv.request("POST", "/server/sanity")["ok"] is True


# -- MUNGE ------------------------------------------------------------------------------


def test_munge_identities_of_real_users_and_their_groups(
    crq_server: Callable[..., CrqServer], tmp_path: Path, munged: Munged, unix_users: Users
) -> None:
    """uid and gid as munged vouches for them, names and groups of this host: carol is an
    operator through @crqtops; a credential used twice, or of another key, is refused."""
    srv = _server(crq_server, tmp_path, munged)
    me = _munge(srv, _munge_as(ALICE, munged.socket), "GET", "/whoami").json()
    assert (me["user"], me["role"], me["via"]) == (ALICE, "user", "munge")
    me = _munge(srv, _munge_as(CAROL, munged.socket), "GET", "/whoami").json()
    assert (me["user"], me["role"]) == (CAROL, "operator") and OPS_GROUP in me["groups"]
    r = _munge(srv, _munge_as(BOB, munged.socket), "POST", "/jobs", json=QUEUED)
    assert r.status_code == 201, r.text
    [job] = r.json()["ids"]
    assert srv.request("GET", f"/jobs/{job}")["user"] == BOB
    r = _munge(srv, _munge_as(ALICE, munged.socket), "POST", f"/jobs/{job}/stop")
    assert (r.status_code, r.json()["rule"]) == (403, "own-jobs")
    r = _munge(srv, _munge_as(CAROL, munged.socket), "POST", f"/jobs/{job}/stop")
    assert r.status_code == 200
    assert srv.request("GET", f"/jobs/{job}")["history"][0]["by"] == CAROL
    # crq token: a MUNGE identity turned into a personal token (for the browser)
    tok = _munge(srv, _munge_as(ALICE, munged.socket), "POST", "/tokens", json={}).json()
    assert _as(srv, tok["token"], "GET", "/whoami").json()["user"] == ALICE


def test_replayed_and_foreign_munge_credentials_get_401(
    crq_server: Callable[..., CrqServer],
    tmp_path: Path,
    munged: Munged,
    foreign_munged: Munged,
) -> None:
    srv = _server(crq_server, tmp_path, munged)
    cred = munge.encode(socket=munged.socket)
    assert _munge(srv, cred, "GET", "/jobs").status_code == 200
    r = _munge(srv, cred, "GET", "/jobs")
    assert r.status_code == 401 and "replayed" in r.json()["message"].lower()
    r = _munge(srv, munge.encode(socket=foreign_munged.socket), "GET", "/jobs")
    assert r.status_code == 401
    assert _munge(srv, "MUNGE:junk:", "GET", "/jobs").status_code == 401
    assert srv.request("GET", "/jobs")["jobs"] == []


def test_taskers_by_munge_are_the_tasker_users_only(
    crq_server: Callable[..., CrqServer],
    crq_tasker: Callable[..., Any],
    tmp_path: Path,
    munged: Munged,
    unix_users: Users,
) -> None:
    """A real tasker without any token registers and runs jobs by its MUNGE credential (root
    is a tasker user by default); a user's credential on a tasker route is a 403."""
    srv = _server(crq_server, tmp_path, munged)
    body = {"host": "h", "slots": 1}
    r = _munge(srv, _munge_as(ALICE, munged.socket), "POST", "/taskers/evil/register", json=body)
    assert r.status_code == 403 and "not a tasker" in r.json()["message"], r.text
    t = crq_tasker("tk-munge", "--server", srv.url, start=False)
    env = {k: v for k, v in env_with_root().items() if k not in ("CRQ_TASKER_TOKEN", "CRQ_TOKEN")}
    t.start(env={**env, "CRQ_MUNGE_SOCKET": munged.socket})
    [job] = srv.submit({"command": ["true"], "cwd": "/tmp"})
    j = srv.wait(job)
    assert j["state"] == "done" and j["tasker"] == "tk-munge", j
    assert [x["name"] for x in srv.request("GET", "/taskers")["taskers"]] == ["tk-munge"]


def test_a_killed_munge_helper_is_started_again(
    crq_server: Callable[..., CrqServer], tmp_path: Path, munged: Munged
) -> None:
    """The server decodes MUNGE in a helper process (server/mungehelper.py): kill -9 of it
    costs at most the requests it held (503, retryable); the next one starts a new one."""
    import signal

    srv = _server(crq_server, tmp_path, munged)
    assert _munge(srv, munge.encode(socket=munged.socket), "GET", "/whoami").status_code == 200
    assert srv.proc is not None
    helpers = _helpers(srv.proc.pid)
    assert len(helpers) == 1, helpers
    os.kill(helpers[0], signal.SIGKILL)
    wait_until(lambda: _helpers(srv.proc.pid) != helpers if srv.proc else True)
    r = _munge(srv, munge.encode(socket=munged.socket), "GET", "/whoami")
    assert r.status_code == 200, r.text
    assert r.json()["via"] == "munge"
    assert len(_helpers(srv.proc.pid)) == 1


def _helpers(parent: int) -> list[int]:
    """Live helper processes of the server ``parent``."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()
            cmd = Path(f"/proc/{name}/cmdline").read_bytes()
        except OSError:
            continue
        if int(stat[1]) == parent and stat[0] != "Z" and b"crq.server.mungehelper" in cmd:
            found.append(int(name))
    return found


@pytest.mark.parametrize("allowed", [False, True])
def test_root_jobs_need_allow_root_jobs(
    crq_server: Callable[..., CrqServer], tmp_path: Path, munged: Munged, allowed: bool
) -> None:
    """Root's jobs would run as root on every tasker host: a MUNGE credential of root, or a
    token for root, submits only when config.toml allows it. The admin token of a queue that
    root owns (the embedded set-up) is the one exception."""
    swd = tmp_path / "q.swd"
    _config(swd, munged, allow_root_jobs="true" if allowed else "false")
    srv = crq_server(swd=swd)
    rooted = _issue(srv, "root", "user")
    for r in (
        _munge(srv, munge.encode(socket=munged.socket), "POST", "/jobs", json=QUEUED),
        _as(srv, rooted, "POST", "/jobs", json=QUEUED),
    ):
        if allowed:
            assert r.status_code == 201, r.text
        else:
            assert (r.status_code, r.json()["rule"]) == (403, "root-jobs"), r.text
    r = srv.api("POST", "/jobs", json=QUEUED, headers={"X-Crq-User": "root"})
    assert r.status_code == 201, r.text
    assert _as(srv, _issue(srv, ALICE), "POST", "/jobs", json=QUEUED).status_code == 201
    assert len(srv.request("GET", "/jobs")["jobs"]) == (4 if allowed else 2)
