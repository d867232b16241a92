"""The on-disk formats: raw spec lines are safe, and files of the earlier format still load.

An upgrade must not lose a queue: a trace.db written before submit records kept their
specs raw (journal) and before snapshots held jobs in chunks (snapshot version 1) is read
into the same state as the current format.
"""

from __future__ import annotations

from pathlib import Path
from typing import get_args, get_type_hints

import orjson
from crq.server import commands, events, replay, snapshot
from crq.server.journal import frame
from crq.server.state import Job, State

from tests.core import Core, fingerprint, write_journal

AWKWARD = {
    "command": "printf 'a\\nb\\r\\n' && echo \"q\" \u2028 \u00e9",
    "cwd": "/tmp/x\ny",
    "env": {"NL": "1\n2", "Q": '"'},
    "name": "two\nlines",
}


def busy_core() -> Core:
    """Queued, running, finished and stopped jobs, with an env and newlines everywhere."""
    core = Core()
    core.register("t1", slots=2)
    core.submit(3, **AWKWARD)
    core.submit(2, command=["sleep", "1"], priority=9)
    core.dispatch()
    running = [j for j in core.state.jobs.values() if j.state == "running"]
    core.start("t1", running[0].id, running[0].attempt)
    core.finish("t1", running[0].id, running[0].attempt, 3)
    core.emit(commands.stop(core.state, 5, core.tick()))
    return core


def test_submit_record_keeps_specs_raw_and_round_trips() -> None:
    core = Core()
    core.submit(2, **AWKWARD)
    ev = next(e for e in core.events if e["e"] == "submit")
    data = events.encode(ev)
    head, *specs = data.split(b"\n")
    assert len(specs) == 2 and all(orjson.loads(s)["cwd"] == "/tmp/x\ny" for s in specs)
    assert events.decode(data) == ev


def test_journal_of_the_earlier_format_replays_to_the_same_state(tmp_path: Path) -> None:
    core = busy_core()
    old = []
    for ev in core.events:
        if ev["e"] == "submit":  # then: jobs as objects, each holding its spec as an object
            jobs = [
                {**dict(zip(events.SUBMIT_FIELDS, row, strict=True)), "spec": orjson.loads(spec)}
                for row, spec in zip(ev["jobs"], ev["specs"], strict=True)
            ]
            ev = {"e": "submit", "t": ev["t"], "user": ev["user"], "jobs": jobs}
        old.append(ev)
    trace = tmp_path / "trace.db"
    trace.mkdir()
    with open(trace / "CR.000001", "wb") as f:
        for i, ev in enumerate(old):
            f.write(frame(i + 1, orjson.dumps(ev)))
    assert fingerprint(replay.load(trace, None).state) == fingerprint(core.state)


def _v1_record(j: Job) -> list:
    """Version 1: one record a job, the spec as a string after the need, submitted at 14."""
    r = snapshot._job_row(j)
    return [*r[:6], j.spec.decode(), *r[6:9], *r[10:14], r[9], *r[14:]]


def test_snapshot_version_1_loads_to_the_same_state(tmp_path: Path) -> None:
    core = busy_core()
    st: State = core.state
    records: list = [
        {
            "kind": "crq-snapshot",
            "version": 1,
            "seq": st.seq,
            "next_id": st.next_id,
            "next_env": st.next_env,
            "created": 0.0,
            "global_total": st.global_total,
            "jobs": len(st.jobs),
        }
    ]
    records += [{"env": k, "vars": v} for k, v in st.envs.items()]
    records += [{"tasker": snapshot._tasker_record(t)} for t in st.taskers.values()]
    records += [_v1_record(j) for j in st.jobs.values()]
    records.append({"end": len(records) + 1})
    path = tmp_path / f"snapshot.{st.seq:012d}"
    path.write_bytes(b"".join(frame(i + 1, orjson.dumps(r)) for i, r in enumerate(records)))
    assert fingerprint(snapshot.read(path)) == fingerprint(st)


def test_snapshot_chunks_of_every_size_load_to_the_same_state(tmp_path: Path) -> None:
    core = busy_core()
    for chunk in (1, 2, 4, 1000):
        trace = tmp_path / str(chunk)
        trace.mkdir()
        path = snapshot.write(core.state, trace, fsync=False, chunk=chunk)
        assert fingerprint(snapshot.read(path)) == fingerprint(core.state)
        write_journal(trace, [], first_seq=core.state.seq + 1)
        assert fingerprint(replay.load(trace, None).state) == fingerprint(core.state)


def test_a_chunk_whose_spec_count_is_wrong_is_damage(tmp_path: Path) -> None:
    core = busy_core()
    path = snapshot.write(core.state, tmp_path, fsync=False)
    data = path.read_bytes()
    records = [p for _, p in snapshot.RecordReader(path, data)]
    chunk = next(i for i, p in enumerate(records) if p[:1] == b"[")
    records[chunk] = records[chunk].rsplit(b"\n", 1)[0]  # one spec short
    path.write_bytes(b"".join(frame(i + 1, p) for i, p in enumerate(records)))
    try:
        snapshot.read(path)
    except snapshot.SnapshotError as e:
        assert "specs" in str(e)
    else:
        raise AssertionError("a short chunk was accepted")


def test_a_checksummed_record_that_is_no_event_is_refused_by_name(tmp_path: Path) -> None:
    core = busy_core()
    trace = tmp_path / "trace.db"
    write_journal(trace, core.events)
    bad = events.encode(next(e for e in core.events if e["e"] == "submit")) + b"\n{}"
    with open(trace / "CR.000001", "ab") as f:  # one spec too many: valid frame, bad event
        f.write(frame(len(core.events) + 1, bad))
    try:
        replay.load(trace, None)
    except replay.ReplayError as e:
        assert f"event {len(core.events) + 1} cannot be applied" in str(e)
        assert "CR.000001" in str(e)
    else:
        raise AssertionError("a malformed event was applied")


def test_tasker_sessions_survive_snapshot_and_replay_and_old_files_have_none(
    tmp_path: Path,
) -> None:
    core = busy_core()
    core.register("t2", slots=1, session="hash-of-a-secret")
    assert core.state.taskers["t2"].session == "hash-of-a-secret"
    path = snapshot.write(core.state, tmp_path, fsync=False)
    assert snapshot.read(path).taskers["t2"].session == "hash-of-a-secret"
    trace = tmp_path / "trace.db"
    write_journal(trace, core.events)
    assert replay.load(trace, None).state.taskers["t2"].session == "hash-of-a-secret"
    # written before sessions: tasker events and records without the field
    old = [{k: v for k, v in ev.items() if k != "session"} for ev in core.events]
    write_journal(tmp_path / "old", old)
    st = replay.load(tmp_path / "old", None).state
    assert {t.session for t in st.taskers.values()} == {""}
    records = [p for _, p in snapshot.RecordReader(path, path.read_bytes())]
    for i, p in enumerate(records):
        rec = orjson.loads(p) if p[:1] == b"{" else None
        if isinstance(rec, dict) and "tasker" in rec:
            del rec["tasker"]["session"]
            records[i] = orjson.dumps(rec)
    path.write_bytes(b"".join(frame(i + 1, p) for i, p in enumerate(records)))
    assert {t.session for t in snapshot.read(path).taskers.values()} == {""}


def test_the_event_catalogue_declares_every_kind_the_state_applies() -> None:
    """One TypedDict a kind: its ``e`` tag names a handler of State.apply, and back."""
    declared = {get_args(get_type_hints(kind)["e"])[0] for kind in get_args(events.Event)}
    assert declared == set(State()._apply)


def test_recover_of_a_planned_stop_is_uncharged_and_round_trips() -> None:
    charged = events.recover(3, 2, "tasker lost", 5.0)
    assert charged == {"e": "recover", "t": 5.0, "job": 3, "attempt": 2, "reason": "tasker lost"}
    planned = events.recover(3, 2, "server stopped", 5.0, charge=False)
    assert planned["charge"] is False
    for ev in (charged, planned, events.tasker_lost("t1", "silent", 5.0)):
        assert events.decode(events.encode(ev)) == ev


def test_older_snapshot_versions_load_and_version_4_keeps_tokens(tmp_path: Path) -> None:
    """Version 2 is version 3 without key records, version 3 is 4 without token and control
    records, 4 is 5 without waits and arrays: an older server's snapshot loads."""
    core = busy_core()
    path = snapshot.write(core.state, tmp_path, fsync=False)
    records = [p for _, p in snapshot.RecordReader(path, path.read_bytes())]
    header = orjson.loads(records[0])
    assert header["version"] == snapshot.VERSION == 5
    for older in (2, 3, 4):
        records[0] = orjson.dumps({**header, "version": older})
        path.write_bytes(b"".join(frame(i + 1, p) for i, p in enumerate(records)))
        loaded = snapshot.read(path)
        assert fingerprint(loaded) == fingerprint(core.state) and loaded.keys == {}
    core.submit(2, key="k")
    events, _ = commands.issue_token(core.state, "alice", "operator", None, "n", "root", 1.0)
    core.emit(events)
    live = [j.id for j in core.state.jobs.values() if j.state not in ("done", "failed", "stopped")]
    core.emit(commands.stop(core.state, live[0], 2.0, "alice"))
    path = snapshot.write(core.state, tmp_path, fsync=False)
    loaded = snapshot.read(path)
    assert loaded.keys == core.state.keys != {}
    assert fingerprint(loaded) == fingerprint(core.state) and loaded.tokens
    assert loaded.controls[live[0]] == [(2.0, "stop", "alice")]
