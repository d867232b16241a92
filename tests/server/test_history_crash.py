"""The accounting history with real processes: a tasker runs jobs, they are forgotten, and
``crq history`` shows them; and no forgotten job is ever missing from accounting.db after a
kill -9, whether it hit before the writer's commit or right after a checkpoint.

``--history-delay`` (a test-only setting) holds each of the writer's batches before its
commit, so the window between an acknowledged forget and its row is wide and certain.
"""

from __future__ import annotations

import json
import random
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from crq.server import snapshot

from tests.rigs import ROOT, CrqServer, Tasker, env_with_root, wait_until


def _db(srv: CrqServer) -> Path:
    return srv.swd / "accounting.db"


def _ids_in_db(srv: CrqServer) -> list[int]:
    """Every id in accounting.db, as read from the file (not through the server)."""
    if not _db(srv).exists():
        return []
    con = sqlite3.connect(f"file:{_db(srv)}?mode=ro", uri=True, timeout=30)
    try:
        return [int(r[0]) for r in con.execute("SELECT id FROM jobs ORDER BY id")]
    except sqlite3.OperationalError:  # no table yet
        return []
    finally:
        con.close()


def _forget_queued(srv: CrqServer, n: int) -> list[int]:
    """n jobs nobody runs, stopped and forgotten: acknowledged forgets."""
    ids = srv.submit(*({"command": ["true"], "cwd": "/tmp", "resources": "CORES/999"},) * n)
    for jid in ids:
        srv.request("POST", f"/jobs/{jid}/stop")
        srv.request("DELETE", f"/jobs/{jid}")
    return ids


def _history(srv: CrqServer, **params: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    after = 0
    while True:
        page = srv.request("GET", "/history", params={**params, "after": after, "limit": 500})
        out += page["jobs"]
        if page["next"] is None:
            return out
        after = page["next"]


def _crq(srv: CrqServer, *args: str) -> subprocess.CompletedProcess[str]:
    token = srv.swd / "security" / "admin.token"
    return subprocess.run(
        [sys.executable, "-m", "crq.client.cli", "--server", srv.url, "--token-file", str(token),
         *args],
        cwd=ROOT, env=env_with_root(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_crq_history_shows_what_ran(
    crq_server: Callable[..., CrqServer], crq_tasker: Callable[..., Tasker], tmp_path: Path
) -> None:
    srv = crq_server("--heartbeat", "2")
    crq_tasker("tk1", "--swd", str(srv.swd), "--slots", "2")
    work = tmp_path / "work"
    work.mkdir()
    ok, bad = srv.submit(
        {"command": ["sleep", "0.2"], "cwd": str(work), "name": "fine"},
        {"command": "exit 3", "cwd": str(work), "name": "broken"},
    )
    assert srv.wait(ok)["state"] == "done" and srv.wait(bad)["state"] == "failed"
    for jid in (ok, bad):
        srv.request("DELETE", f"/jobs/{jid}")
    out = _crq(srv, "history", "--json")
    assert out.returncode == 0, out.stderr
    rows = {r["id"]: r for r in map(json.loads, out.stdout.splitlines())}
    assert set(rows) == {ok, bad}
    assert (rows[ok]["state"], rows[ok]["exit_code"], rows[ok]["tasker"]) == ("done", 0, "tk1")
    assert rows[ok]["host"] and rows[ok]["tries"] == 1
    assert rows[ok]["run"] >= 0.2 and rows[ok]["wait"] >= 0
    assert (rows[bad]["state"], rows[bad]["exit_code"]) == ("failed", 3)
    table = _crq(srv, "history", "--state", "failed", "--since", "1h")
    assert table.returncode == 0, table.stderr
    head, *lines = table.stdout.splitlines()
    assert head.split() == [
        "ID", "USER", "NAME", "STATE", "EXIT", "HOST", "SUBMITTED", "WAIT", "RUN", "ATTEMPTS",
        "REASON",
    ]  # fmt: skip
    assert len(lines) == 1 and lines[0].split()[:5] == [str(bad), lines[0].split()[1], "broken",
                                                        "failed", "3"]  # fmt: skip
    assert _crq(srv, "history", "--name", "fin*", "--json").stdout.count('"id"') == 1
    refused = _crq(srv, "history", "--since", "someday")
    assert refused.returncode == 1 and "since" in refused.stderr


def test_no_forgotten_job_is_missing_after_kill9_before_the_commit(
    crq_server: Callable[..., CrqServer],
) -> None:
    """Killed while the rows of acknowledged forgets wait for their commit, many times: the
    next start writes each of them, once."""
    srv = crq_server("--history-delay", "1.0")
    rng = random.Random(14)
    forgotten: list[int] = []
    missing_at_kill = 0
    for _ in range(6):
        forgotten += _forget_queued(srv, rng.randint(1, 6))
        missing_at_kill += len(set(forgotten) - set(_ids_in_db(srv)))
        time.sleep(rng.uniform(0.0, 1.3))  # before, during or after the writer's commit
        srv.kill9()
        srv.start()
        # the restart replayed the forgets: the rows come, each once
        wait_until(lambda want=set(forgotten): set(_ids_in_db(srv)) >= want)
    assert missing_at_kill > 0, "the kills never hit the window: the test proves nothing"
    ids = _ids_in_db(srv)
    assert ids == sorted(set(ids)) and set(ids) == set(forgotten)
    assert [r["id"] for r in _history(srv)] == sorted(forgotten)


def test_a_checkpoint_never_covers_a_forget_without_its_row(
    crq_server: Callable[..., CrqServer],
) -> None:
    """A forget before the newest snapshot is not replayed: once a snapshot covers it, its
    row must be committed already. Checked the moment each snapshot appears, then through a
    kill -9 right after it."""
    srv = crq_server("--history-delay", "0.5", "--checkpoint-bytes", "1")
    trace = srv.swd / "trace.db"
    forgotten: list[int] = []
    for _ in range(3):
        forgotten += _forget_queued(srv, 3)
        seq = srv.request("GET", "/server")["journal"]["seq"]  # the forgets are at or before
        covering = wait_until(
            lambda seq=seq: [
                p for p in snapshot.list_snapshots(trace) if snapshot.snapshot_seq(p) >= seq
            ]
        )
        have = set(_ids_in_db(srv))
        assert set(forgotten) <= have, (covering, sorted(set(forgotten) - have))
        srv.kill9()
        srv.start()
        wait_until(lambda want=set(forgotten): set(_ids_in_db(srv)) >= want)
    ids = _ids_in_db(srv)
    assert ids == sorted(set(ids)) and set(ids) == set(forgotten)
    srv.stop()  # a clean stop writes every row before its snapshot
    assert set(_ids_in_db(srv)) == set(forgotten)


def test_autoforget_writes_the_history(
    crq_server: Callable[..., CrqServer], crq_tasker: Callable[..., Tasker], tmp_path: Path
) -> None:
    """Jobs autoforget drops (a second after they ended) are in the history, the stopped one
    with who stopped it."""
    srv = crq_server("--heartbeat", "2", "--autoforget-done", "1", "--autoforget-other", "1")
    crq_tasker("tk1", "--swd", str(srv.swd))
    ran, stopped = srv.submit(
        {"command": ["true"], "cwd": str(tmp_path)},
        {"command": ["true"], "cwd": str(tmp_path), "resources": "CORES/999"},
    )
    srv.request("POST", f"/jobs/{stopped}/stop")
    assert srv.wait(ran)["state"] == "done"
    wait_until(lambda: srv.api("GET", f"/jobs/{ran}").status_code == 404)
    wait_until(lambda: srv.api("GET", f"/jobs/{stopped}").status_code == 404)
    rows = {r["id"]: r for r in _history(srv)}
    assert rows[ran]["state"] == "done" and rows[ran]["host"]
    assert rows[stopped]["state"] == "stopped" and rows[stopped]["forgotten_by"] is None
    assert [c["action"] for c in rows[stopped]["controls"]] == ["stop"]
    metrics = httpx.get(f"{srv.url}/metrics", timeout=30).text
    assert "crq_history_rows_total 2.0" in metrics and "crq_history_pending 0.0" in metrics


def test_a_damaged_accounting_db_stops_the_start_naming_it(
    crq_server: Callable[..., CrqServer],
) -> None:
    srv = crq_server(start=False)
    srv.swd.mkdir(parents=True)
    _db(srv).write_bytes(b"no database here " * 200)
    with pytest.raises(AssertionError, match=r"accounting\.db.*move it aside"):
        srv.start()
