"""The start: a restarted server answers before its state is loaded, and says when it is ready.

server/main.py serves a boot app as soon as it has the port and the election, then loads the
state and FastAPI in threads (server/leading.py). These tests check what is answered in
which order, never how fast: the speed is bench/recovery.py's.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import httpx

from tests.rigs import PATIENCE, ROOT, CrqServer, env_with_root, server_argv, wait_until

OK = {"command": ["true"], "cwd": "/tmp"}
BATCH = 10_000
BATCHES = 20  # 200,000 jobs to replay: a loading phase long enough to be seen


def test_the_boot_imports_no_web_framework_and_no_state() -> None:
    """What the first answer waits for: FastAPI, pydantic and the state come after it."""
    heavy = ("fastapi", "pydantic", "starlette", "crq.server.state", "crq.server.app")
    code = f"import sys, crq.server.main; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env_with_root(), capture_output=True
    )
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode().strip() == "[]"


def _observe(srv: CrqServer, token: str) -> tuple[list[str], dict[str, Any]]:
    """Poll a starting server until it is ready: each kind of answer, in the order it first
    came, and ``/healthz`` once ready."""
    seen: list[str] = []

    def note(what: str) -> None:
        if what not in seen:
            seen.append(what)

    def ready() -> bool:
        try:
            health = httpx.get(f"{srv.url}/healthz", timeout=PATIENCE)
        except httpx.HTTPError:
            return False  # not listening yet
        loading = bool(health.json().get("loading"))
        note("alive, loading" if loading else "alive")
        headers = {"Authorization": f"Bearer {token}"}
        r = httpx.post(f"{srv.url}/api/v1/jobs", json=OK, headers=headers, timeout=PATIENCE)
        body: dict[str, Any] = r.json()
        if r.status_code == 503:
            assert body["error"] == "crash_recovery" and r.headers["Retry-After"], body
            phase = (body.get("recovery") or {}).get("phase")
            note("submit 503 loading" if phase == "loading" else "submit 503 recovering")
        else:
            assert r.status_code == 201, body
        readyz = httpx.get(f"{srv.url}/readyz", timeout=PATIENCE)
        note(f"readyz {readyz.status_code}")
        return readyz.status_code == 200

    assert srv.proc is not None
    wait_until(ready, timeout=PATIENCE, step=0.001)
    return seen, httpx.get(f"{srv.url}/healthz", timeout=PATIENCE).json()


def test_a_restarted_server_answers_while_it_loads_then_turns_ready(crq_server: Any) -> None:
    srv: CrqServer = crq_server()
    token = srv.admin_token
    for _ in range(BATCHES):
        srv.request("POST", "/jobs", json={"jobs": [OK] * BATCH})
    srv.kill9()
    # spawned by hand: the rig's start would wait for the loading to end
    srv.proc = subprocess.Popen(
        server_argv(srv.queue, srv.swd, srv.port, *srv.extra),
        cwd=ROOT, env=env_with_root(), stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    seen, health = _observe(srv, token)
    # alive and refusing (503, come back) while loading, not ready until every route is in
    assert seen[:3] == ["alive, loading", "submit 503 loading", "readyz 503"], seen
    assert seen[-1] == "readyz 200", seen
    assert health == {"ok": True}, health  # ready: /healthz no longer says loading
    # every acknowledged submit is there, and the ids go on
    info = srv.request("GET", "/server")
    assert info["counts"]["queued"] >= BATCH * BATCHES
