"""The accounting history in process (server/history.py): what a row holds, the filters and
paging of the query, idempotent rewrites on replay, the durable-only rule, retention, and the
``GET /api/v1/history`` answers (422 for bad input)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from crq.server import commands, replay
from crq.server.history import History, HistoryError, Query, db_path, parse_time, query
from crq.server.service import Service
from crq.server.settings import SettingsError, load
from crq.server.state import State

from tests.core import Core, write_journal


def _count(path: Path) -> int:
    with sqlite3.connect(path) as con:
        return int(con.execute("SELECT count(*) FROM jobs").fetchone()[0])


def _rows(path: Path, **q: Any) -> list[dict[str, Any]]:
    rows, _ = query(path, Query(**q))
    return rows


def _workload(core: Core) -> dict[str, int]:
    """Jobs of two users that end every way, forgotten; their ids by what happened."""
    core.register("tk1", slots=4)
    ok, bad = core.submit(2, user="alice", name="build-x")
    [killed] = core.submit(1, user="bob", name="test-y")
    [held] = core.submit(1, user="bob", name="test-z", resources="CORES/64")  # never runs
    core.dispatch()
    core.start("tk1", ok, 1)
    core.finish("tk1", ok, 1, 0)
    core.start("tk1", bad, 1)
    core.finish("tk1", bad, 1, 3)
    core.emit(commands.stop(core.state, killed, core.tick(), "carol"))  # running: killed
    core.finish("tk1", killed, 1, None)
    core.emit(commands.stop(core.state, held, core.tick(), "bob"))
    for jid in (ok, bad, killed, held):
        core.emit(commands.forget(core.state, jid, core.tick(), "alice"))
    return {"ok": ok, "bad": bad, "killed": killed, "held": held}


@pytest.fixture
def hist(tmp_path: Path) -> Iterator[History]:
    h = History(db_path(tmp_path), sync_full=False)
    yield h
    h.close()


def test_a_row_holds_what_sacct_shows(core: Core, hist: History, tmp_path: Path) -> None:
    hist.attach(core.state)
    ids = _workload(core)
    assert hist.pending == 4
    assert hist.flush(core.state.seq) == 4
    rows = {r["id"]: r for r in _rows(db_path(tmp_path))}
    ok = rows[ids["ok"]]
    assert (ok["user"], ok["name"], ok["state"], ok["exit_code"]) == ("alice", "build-x", "done", 0)
    assert ok["host"] == "host-tk1" and ok["tasker"] == "tk1"
    assert ok["tries"] == 1 and len(ok["attempts"]) == 1
    assert ok["attempts"][0]["outcome"] == "done"
    assert ok["wait"] == pytest.approx(ok["started"] - ok["submitted"])
    assert ok["run"] == pytest.approx(ok["ended"] - ok["started"])
    assert ok["command"] == ["true"] and ok["cwd"] == "/tmp"
    assert ok["log"] == f"/tmp/crq.{ids['ok']}.log"
    assert ok["controls"][-1]["action"] == "forget" and ok["controls"][-1]["by"] == "alice"
    assert ok["forgotten_by"] == "alice"
    bad = rows[ids["bad"]]
    assert (bad["state"], bad["exit_code"]) == ("failed", 3)
    held = rows[ids["held"]]
    assert held["state"] == "stopped" and held["reason"] == "stopped while queued"
    assert held["started"] is None and held["wait"] is None and held["host"] is None
    assert [c["action"] for c in held["controls"]] == ["stop", "forget"]
    assert held["controls"][0]["by"] == "bob"
    assert "epoch" not in ok and "seq" not in ok


def test_a_row_keeps_the_log_name_the_job_wrote(core: Core, hist: History, tmp_path: Path) -> None:
    """``%A``, ``%a`` and ``%j`` expanded as for the running job, though the array is gone."""
    hist.attach(core.state)
    first, second = core.submit(1, array={"start": 3, "stop": 4}, log="/tmp/o.%A_%a.%j.log")
    [plain] = core.submit(1, log="/tmp/p.%A_%a.%j.log")
    for jid in (first, second, plain):
        core.emit(commands.stop(core.state, jid, core.tick(), "alice"))
        core.emit(commands.forget(core.state, jid, core.tick(), "alice"))
    assert not core.state.arrays
    hist.flush(core.state.seq)
    logs = {r["id"]: r["log"] for r in _rows(db_path(tmp_path))}
    assert logs[first] == f"/tmp/o.{first}_3.{first}.log"
    assert logs[second] == f"/tmp/o.{first}_4.{second}.log"
    assert logs[plain] == f"/tmp/p.{plain}_0.{plain}.log"


def test_filters_and_paging(core: Core, hist: History, tmp_path: Path) -> None:
    hist.attach(core.state)
    ids = _workload(core)
    hist.flush(core.state.seq)
    path = db_path(tmp_path)
    assert {r["id"] for r in _rows(path, user="bob")} == {ids["killed"], ids["held"]}
    assert [r["id"] for r in _rows(path, state="failed")] == [ids["bad"]]
    assert {r["id"] for r in _rows(path, name="test-*")} == {ids["killed"], ids["held"]}
    assert [r["id"] for r in _rows(path, name="build-[x]")] == [ids["ok"], ids["bad"]]
    assert _rows(path, name="BUILD-*") == []  # as the shell: case-sensitive
    everything = _rows(path)
    ended = sorted(r["ended"] for r in everything)
    assert len(_rows(path, since=ended[1])) == 3
    assert len(_rows(path, until=ended[1])) == 2
    assert len(_rows(path, since=ended[1], until=ended[2])) == 2
    seen, after = [], 0
    while True:
        page, nxt = query(path, Query(limit=1, after=after))
        seen += [r["id"] for r in page]
        if nxt is None:
            break
        after = nxt
    assert seen == sorted(ids.values())
    page, nxt = query(path, Query(limit=4))
    assert len(page) == 4 and nxt is None


def test_only_durable_forgets_are_written(core: Core, hist: History, tmp_path: Path) -> None:
    """A forget the journal does not hold yet may be lost in a crash, its job back in the
    queue: the writer waits for it to be durable."""
    hist.attach(core.state)
    [a] = core.submit(1)
    core.emit(commands.forget(core.state, a, core.tick()))
    first = core.state.seq
    [b] = core.submit(1)
    core.emit(commands.forget(core.state, b, core.tick()))
    assert hist.flush(first - 1) == 0
    assert hist.flush(first) == 1
    assert [r["id"] for r in _rows(db_path(tmp_path))] == [a]
    assert hist.flush(core.state.seq) == 1 and hist.pending == 0


def test_replay_rewrites_idempotently(core: Core, hist: History, tmp_path: Path) -> None:
    """Replay fires the hook again for forgets after the snapshot: one row a job, and a row
    written from the very same record is not even rebuilt."""
    hist.attach(core.state)
    ids = _workload(core)
    hist.flush(core.state.seq)
    trace = tmp_path / "trace.db"
    write_journal(trace, core.events)
    again = replay.load(trace, None, attach=hist.attach)
    assert hist.pending == 4
    assert hist.flush(again.state.seq) == 0  # the same records: nothing rebuilt
    assert _count(db_path(tmp_path)) == len(ids)
    # a row of another history (a deposed leader's, an accepted loss) is replaced
    with sqlite3.connect(db_path(tmp_path)) as con:
        con.execute("UPDATE jobs SET seq = seq + 1000, state = 'lost' WHERE id = ?", (ids["ok"],))
    replay.load(trace, None, attach=hist.attach)
    assert hist.flush(1 << 40) == 1
    assert _count(db_path(tmp_path)) == len(ids)
    assert _rows(db_path(tmp_path), state="done")[0]["id"] == ids["ok"]


def test_a_failed_commit_keeps_the_rows_queued(core: Core, tmp_path: Path) -> None:
    hist = History(db_path(tmp_path), sync_full=False)
    hist.attach(core.state)
    [a] = core.submit(1)
    core.emit(commands.forget(core.state, a, core.tick()))
    locker = sqlite3.connect(db_path(tmp_path), timeout=0)
    locker.execute("BEGIN EXCLUSIVE")
    with pytest.raises(sqlite3.OperationalError):
        hist.flush(core.state.seq, busy=0.05)
    assert hist.pending == 1
    locker.rollback()
    locker.close()
    assert hist.flush(core.state.seq) == 1
    hist.close()


def test_retention_by_age_and_size(core: Core, hist: History, tmp_path: Path) -> None:
    hist.attach(core.state)
    ids = []
    for _ in range(30):
        [j] = core.submit(1)
        core.emit(commands.forget(core.state, j, core.tick()))
        ids.append(j)
    hist.flush(core.state.seq)
    path = db_path(tmp_path)
    cut = _rows(path, limit=100)[10]["forgotten"]
    assert hist.prune(cut, 1000, batch=3) == 10
    assert [r["id"] for r in _rows(path, limit=100)] == ids[10:]
    assert hist.prune(0.0, 5, batch=4) == 15
    assert [r["id"] for r in _rows(path, limit=100)] == ids[25:]


def test_settle_commits_what_a_snapshot_covers(core: Core, hist: History) -> None:
    """Before a checkpoint forks: every forget applied, durable or not yet, is committed."""
    hist.attach(core.state)
    durable = [0]
    hist.start(lambda: durable[0], None)
    [a, b, c] = core.submit(3)
    core.emit(commands.forget(core.state, a, core.tick()))
    durable[0] = core.state.seq
    core.emit(commands.forget(core.state, b, core.tick()))

    async def barrier() -> None:  # as the journal's: durable up to what was applied
        durable[0] = core.state.seq
        core.emit(commands.forget(core.state, c, core.tick()))  # applied meanwhile

    asyncio.run(hist.settle(core.state, barrier))
    assert hist.pending == 0 and hist.through >= core.state.seq
    assert hist.written == 3


def test_parse_time() -> None:
    assert parse_time("1700000000.5") == 1700000000.5
    assert parse_time("2026-12-03T00:00:00+00:00") == 1796256000.0
    assert parse_time("2026-12-03") > 0
    for bad in ("yesterday", "nan", "inf", "2026-13-01", ""):
        with pytest.raises(ValueError):
            parse_time(bad)


def test_the_route_answers_and_refuses(api: Any) -> None:
    async def body(client: httpx.AsyncClient, srv: Service) -> None:
        r = await client.post("/api/v1/jobs", json={"command": ["true"], "cwd": "/tmp"})
        [job] = r.json()["ids"]
        srv.engine.emit(commands.stop(srv.state, job, 1.0, "admin"))
        r = await client.delete(f"/api/v1/jobs/{job}")
        assert r.status_code == 200, r.text
        r = await client.get("/api/v1/history")  # waits for the writer: read your forgets
        assert r.status_code == 200, r.text
        page = r.json()
        assert [j["id"] for j in page["jobs"]] == [job] and page["next"] is None
        assert page["jobs"][0]["state"] == "stopped"
        r = await client.get("/api/v1/history", params={"user": "nobody"})
        assert r.json() == {"jobs": [], "next": None}
        for params, word in (
            ({"state": "exploded"}, "state"),
            ({"since": "yesterday"}, "since"),
            ({"until": "2026-02-30"}, "until"),
            ({"limit": 0}, "limit"),
            ({"limit": 10_001}, "limit"),
            ({"limit": "x"}, "limit"),
            ({"after": -1}, "after"),
        ):
            r = await client.get("/api/v1/history", params=params)
            assert r.status_code == 422, (params, r.text)
            assert r.json()["error"] == "invalid" and word in r.json()["message"], r.text
            assert "\n" not in r.json()["message"]
        r = await client.get("/api/v1/history", headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401

    api.run(body)


def test_a_state_without_history_hook_is_unchanged() -> None:
    """No hook, no cost: a plain State forgets as before."""
    core = Core()
    [a] = core.submit(1)
    core.emit(commands.forget(core.state, a, core.tick()))
    assert a not in core.state.jobs and isinstance(core.state, State)


def test_history_settings_are_checked(tmp_path: Path) -> None:
    s = load(["--swd", str(tmp_path)])
    assert (s.history_days, s.history_max_rows) == (90.0, 10_000_000)
    for flags in (["--history-days", "0"], ["--history-max-rows", "-1"]):
        with pytest.raises(SettingsError):
            load(["--swd", str(tmp_path), *flags])
    (tmp_path / "config.toml").write_text("history_days = 30\nhistory_max_rows = 5000\n")
    s = load(["--swd", str(tmp_path)])
    assert (s.history_days, s.history_max_rows) == (30.0, 5000)


def test_a_damaged_database_is_refused_clearly(tmp_path: Path) -> None:
    db_path(tmp_path).write_bytes(b"this is no SQLite file, " * 100)
    with pytest.raises(HistoryError, match="accounting.db"):
        History(db_path(tmp_path))


def test_a_job_whose_row_cannot_be_made_holds_nothing_back(
    core: Core, hist: History, tmp_path: Path
) -> None:
    hist.attach(core.state)
    [odd, fine] = core.submit(2)
    core.state.jobs[odd].spec = b"not json"  # a spec of a form this code does not know
    for jid in (odd, fine):
        core.emit(commands.forget(core.state, jid, core.tick()))
    assert hist.flush(core.state.seq) == 2
    rows = {r["id"]: r for r in _rows(db_path(tmp_path))}
    assert rows[fine]["command"] == ["true"]
    assert rows[odd]["reason"].startswith("history row incomplete")
