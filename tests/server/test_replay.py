"""Replay equals live (invariant 2): random command sequences, journaled, replayed.

The live side applies events exactly as the engine does; the replay side reads them back
from a real journal file (and from a snapshot plus the rest), and both states must be
identical in everything observable. Cutting the journal inside its last record must give
the state of the prefix.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from crq.server import commands, replay, sanity, snapshot
from crq.server.commands import lose_tasker
from crq.server.events import encode
from crq.server.journal import frame
from crq.server.models import BadRequest, ResultReport
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.core import Core, fingerprint, write_journal

TASKERS = ["t1", "t2", "t3"]
RESOURCES = ["", "CORES/2", "RAM/100", "License:vcs", "linux", "CORES/1 License:vcs/2"]

op = st.one_of(
    st.tuples(
        st.just("submit"),
        st.integers(1, 4),
        st.integers(1, 15),
        st.sampled_from(RESOURCES),
        st.sampled_from([None, {"A": "1"}, {"B": "2"}]),
        st.booleans(),
        st.sampled_from([None, "k1", "k2"]),  # Idempotency-Key: repeats, mismatches
        st.sampled_from(["alice", "bob"]),  # the owner
    ),
    st.tuples(
        st.just("register"),
        st.sampled_from(TASKERS),
        st.integers(0, 4),
        st.sampled_from(["", "RAM/200 linux", "linux CORES/8"]),
        st.booleans(),
        st.sampled_from(["s1", "s2"]),  # another session than the holder's takes over
        st.sampled_from(["", "alice"]),  # a tasker running as one user runs only theirs
    ),
    st.tuples(st.just("dispatch")),
    st.tuples(st.just("start"), st.integers(0, 50)),
    st.tuples(st.just("finish"), st.integers(0, 50), st.sampled_from([0, 1, None])),
    st.tuples(st.just("stale"), st.integers(0, 50)),
    st.tuples(st.just("stop"), st.integers(0, 50), st.sampled_from([None, "alice", "op"])),
    st.tuples(st.just("rerun"), st.integers(0, 50), st.sampled_from([None, "alice", "op"])),
    st.tuples(st.just("forget"), st.integers(0, 50), st.sampled_from([None, "alice"])),
    st.tuples(
        st.just("token"),
        st.sampled_from(["alice", "bob"]),
        st.sampled_from([None, "readonly", "operator"]),
        st.sampled_from([None, 5.0, 100.0]),  # expires, seconds from now
    ),
    st.tuples(st.just("revoke"), st.integers(0, 5)),
    st.tuples(  # server/gates.py: dependencies, holds, arrays
        st.just("after"),
        st.integers(1, 3),
        st.lists(
            st.tuples(st.sampled_from(["afterok", "afterany", "afternotok"]), st.integers(0, 50)),
            min_size=1,
            max_size=3,
        ),
        st.booleans(),  # the batch's second job waits for its first
        st.booleans(),  # held
    ),
    st.tuples(st.just("array"), st.integers(1, 6), st.sampled_from([None, 1, 2]), st.booleans()),
    st.tuples(st.just("hold"), st.integers(0, 50), st.sampled_from([None, "alice"])),
    st.tuples(st.just("release"), st.integers(0, 50), st.sampled_from([None, "op"])),
    st.tuples(st.just("lose"), st.sampled_from(TASKERS)),
    st.tuples(st.just("expire"), st.integers(0, 40)),  # seconds pass, old keys expire
    st.tuples(st.just("takeover"), st.sampled_from(["http://a", "http://b"])),  # a new leader
)


def run(ops: list[tuple]) -> Core:
    core = Core({"License:vcs": 3})
    for o in ops:
        kind = o[0]
        running = [j for j in core.state.jobs.values() if j.state == "running"]
        try:
            if kind == "submit":
                spec = {"priority": o[2], "resources": o[3], "env": o[4], "rerunnable": o[5]}
                ids = core.submit(o[1], key=o[6], user=o[7], **spec)
                if o[6] is not None:  # at once again: the same ids, nothing queued
                    seq = core.state.seq
                    assert core.submit(o[1], key=o[6], user=o[7], **spec) == ids
                    assert core.state.seq == seq
            elif kind == "register":
                core.register(
                    o[1], slots=o[2], resources=o[3], rebooted=o[4], session=o[5], user=o[6]
                )
            elif kind == "dispatch":
                core.dispatch()
            elif kind in ("start", "finish", "stale") and running:
                job = running[o[1] % len(running)]
                if kind == "start":
                    core.start(job.tasker, job.id, job.attempt)
                elif kind == "finish":
                    core.finish(job.tasker, job.id, job.attempt, o[2])
                else:  # a superseded attempt reports: must change nothing
                    before = fingerprint(core.state)
                    core.finish(job.tasker, job.id, job.attempt - 1, 0)
                    core.finish("t-other", job.id, job.attempt, 0)
                    rep = [ResultReport(job=job.id, attempt=job.attempt, exit_code=0)]
                    out = commands.reports(core.state, job.tasker, [], rep, 0.0, session="x")
                    assert out.events == []  # another session reports: refused
                    assert fingerprint(core.state) == before
            elif kind == "after":
                ids = sorted(core.state.jobs) or [1]
                deps = [{"type": t, "job": ids[i % len(ids)]} for t, i in o[2]]
                specs = [{"after": deps, "hold": o[4]}] * o[1]
                if o[3] and o[1] > 1:
                    specs = [specs[0], {"after": [{"type": "afterok", "index": 0}]}, *specs[2:]]
                core.submit_specs(specs)
            elif kind == "array":
                arr = {"start": 1, "stop": o[1], "max_running": o[2]}
                core.submit(1, array=arr, hold=o[3])
            elif kind in ("stop", "rerun", "forget", "hold", "release") and core.state.jobs:
                ids = sorted(core.state.jobs)
                cmd = getattr(commands, kind)
                core.emit(cmd(core.state, ids[o[1] % len(ids)], core.tick(), o[2]))
            elif kind == "token":
                now = core.tick()
                until = None if o[3] is None else now + o[3]
                events, _ = commands.issue_token(core.state, o[1], o[2], until, "", "admin", now)
                core.emit(events)
            elif kind == "revoke":
                ids = sorted(core.state.tokens) or ["none"]
                token_id = ids[o[1] % len(ids)]
                core.emit(commands.revoke_token(core.state, token_id, "op", core.tick()))
            elif kind == "lose" and o[1] in core.state.taskers:
                core.emit(lose_tasker(core.state, o[1], "lost", core.tick()))
            elif kind == "takeover":
                st_ = core.state
                prev = {"epoch": st_.epoch, **st_.leader} if st_.epoch else {}
                ev = commands.take_over(st_.epoch + 1, st_.seq, {"url": o[1]}, prev, core.tick())
                core.emit([ev])
            elif kind == "expire":
                core.now += o[1]
                core.emit(commands.expire_keys(core.state, core.tick(), core.window))
        except BadRequest:
            pass  # refused: changes nothing, checked below by replay equality
    return core


def replayed(trace: Path) -> dict:
    return fingerprint(replay.load(trace, None).state)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op, max_size=60), st.integers(0, 60))
def test_replay_equals_live(ops: list[tuple], split: int) -> None:
    core = run(ops)
    live = fingerprint(core.state)
    assert sanity.check(core.state, set(core.state.taskers)).findings == []  # waits agree…
    tmp = Path(tempfile.mkdtemp())
    try:
        write_journal(tmp / "a", core.events)
        assert replayed(tmp / "a") == live
        assert replay.load(tmp / "a", None).state.id_ceiling == core.state.id_ceiling
        # snapshot after a prefix, then the rest of the journal
        split = min(split, len(core.events))
        prefix = Core()
        prefix.emit(core.events[:split])
        (tmp / "b").mkdir()
        snapshot.write(prefix.state, tmp / "b", fsync=False, chunk=3)
        write_journal(tmp / "b", core.events[split:], first_seq=split + 1)
        assert replayed(tmp / "b") == live
        assert replay.load(tmp / "b", None).state.id_ceiling == core.state.id_ceiling
    finally:
        shutil.rmtree(tmp)


@settings(max_examples=25, deadline=None)
@given(st.lists(op, min_size=1, max_size=30))
def test_torn_last_record_recovers_the_prefix(ops: list[tuple]) -> None:
    core = run(ops)
    if not core.events:
        return
    prefix = Core()
    prefix.emit(core.events[:-1])
    want = fingerprint(prefix.state)
    head = b"".join(frame(i + 1, encode(e)) for i, e in enumerate(core.events[:-1]))
    last = frame(len(core.events), encode(core.events[-1]))
    tmp = Path(tempfile.mkdtemp())
    try:
        step = max(1, len(last) // 40)
        for cut in range(0, len(last), step):
            trace = tmp / str(cut)
            trace.mkdir()
            (trace / "CR.000001").write_bytes(head + last[:cut])
            out = replay.load(trace, None)
            assert fingerprint(out.state) == want
            assert out.bytes_discarded == cut
            assert (trace / "CR.000001").stat().st_size == len(head)
    finally:
        shutil.rmtree(tmp)


def test_cut_at_every_byte_of_the_last_two_records(tmp_path: Path) -> None:
    """A finish, then a submit whose specs are raw lines: every cut replays the prefix."""
    core = Core()
    core.register("t1", slots=1)
    (first,) = core.submit(1, command="echo 'a\nb'", env={"K": "v\nw"})
    core.dispatch()
    core.start("t1", first, 1)
    core.finish("t1", first, 1, 0)
    core.submit(3, command=["printf", "%s\n", "x y"], name="n\nm")
    assert [e["e"] for e in core.events[-2:]] == ["finish", "submit"]
    records = [frame(i + 1, encode(e)) for i, e in enumerate(core.events)]
    head = b"".join(records[:-2])
    tail = b"".join(records[-2:])
    wants = {}
    for n in (len(records) - 2, len(records) - 1):
        prefix = Core()
        prefix.emit(core.events[:n])
        wants[n] = fingerprint(prefix.state)
    for cut in range(len(tail)):
        trace = tmp_path / str(cut)
        trace.mkdir()
        (trace / "CR.000001").write_bytes(head + tail[:cut])
        out = replay.load(trace, None)
        whole = len(records) - 2 + (cut >= len(records[-2]))
        assert fingerprint(out.state) == wants[whole], cut
        assert out.bytes_discarded == cut - (len(records[-2]) if whole > len(records) - 2 else 0)
