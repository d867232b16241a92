"""The indexed dispatch pass gives exactly what a pass over every bucket and tasker gives,
and its indexes are derived state: rebuilt after replay or a snapshot load, they equal the
ones the live state maintained."""

from __future__ import annotations

import heapq
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from crq.server import commands, replay, sanity, snapshot
from crq.server.events import Event
from crq.server.models import BadRequest
from crq.server.offers import build
from crq.server.scheduler import dispatch_pass
from crq.server.state import TASKER_READY, State, Tasker
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.core import Core, fingerprint, write_journal

TASKERS = [f"t{i}" for i in range(12)]
OFFERS = ["", "RAM/200 linux", "linux CORES/8", "RAM/100", "gpu RAM/400", "CORES/1"]
NEEDS = [
    "",
    "CORES/2",
    "RAM/100",
    "License:vcs",
    "linux",
    "CORES/1 License:vcs/2",
    "gpu",
    "RAM/300",
]


def reference_pass(
    state: State, emit: Callable[[Event], None], now: float, eligible: Callable[[Tasker], bool]
) -> int:
    """The pass before the indexes, O(buckets x taskers): every bucket, every tasker."""
    ready = [
        t
        for t in state.taskers.values()
        if t.state == TASKER_READY and t.free_slots > 0 and eligible(t)
    ]
    jobs = state.jobs
    heap = []
    for key, bucket in state.buckets.items():
        head = bucket.head(jobs) if bucket.count > 0 else None
        if head is not None:
            heap.append((-bucket.priority, head, key))
    heapq.heapify(heap)
    sent = 0
    while heap and ready:
        _, head, key = heapq.heappop(heap)
        bucket = state.buckets[key]
        need = bucket.need
        if any(state.global_free(k) < v for k, v in need.globals):
            continue
        best = None
        for t in ready:
            if t.fits(need) and (best is None or t.free_slots > best.free_slots):
                best = t
        if best is None:
            continue
        emit({"e": "dispatch", "t": now, "job": head, "attempt": jobs[head].attempt + 1,
              "tasker": best.name})  # fmt: skip
        sent += 1
        if best.free_slots <= 0:
            ready.remove(best)
        if bucket.count > 0 and (nxt := bucket.head(jobs)) is not None:
            heapq.heappush(heap, (-bucket.priority, nxt, key))
    return sent


op = st.one_of(
    st.tuples(
        st.just("submit"),
        st.integers(1, 5),
        st.integers(1, 5),
        st.sampled_from(NEEDS),
    ),
    st.tuples(
        st.just("register"),
        st.sampled_from(TASKERS),
        st.integers(0, 5),
        st.sampled_from(OFFERS),
    ),
    st.tuples(st.just("dispatch"), st.none() | st.sets(st.sampled_from(TASKERS))),
    st.tuples(st.just("dispatch"), st.none()),
    st.tuples(st.just("finish"), st.integers(0, 80)),
    st.tuples(st.just("lose"), st.sampled_from(TASKERS)),
    st.tuples(st.just("stop"), st.integers(0, 80)),
    st.tuples(st.just("rerun"), st.integers(0, 80)),
)


def step(core: Core, o: tuple, pass_: Callable[..., int]) -> None:
    kind = o[0]
    state = core.state
    running = sorted(j.id for j in state.jobs.values() if j.state == "running")
    try:
        if kind == "submit":
            core.submit(o[1], priority=o[2], resources=o[3])
        elif kind == "register":
            core.register(o[1], slots=o[2], resources=o[3])
        elif kind == "dispatch":
            live = o[1]
            pass_(
                state,
                lambda ev: core.emit([ev]),
                core.tick(),
                lambda t: live is None or t.name in live,
            )
        elif kind == "finish" and running:
            job = state.jobs[running[o[1] % len(running)]]
            assert job.tasker is not None
            core.finish(job.tasker, job.id, job.attempt, 0)
        elif kind == "lose" and o[1] in state.taskers:
            core.emit(commands.lose_tasker(state, o[1], "lost", core.tick()))
        elif kind in ("stop", "rerun") and state.jobs:
            ids = sorted(state.jobs)
            core.emit(getattr(commands, kind)(state, ids[o[1] % len(ids)], core.tick()))
    except BadRequest:
        pass


def index_view(state: State) -> dict[str, object]:
    return state.offers.describe(state.bucket_alive)


def rebuilt_view(state: State) -> dict[str, object]:
    queued = ((b.priority, b.need) for b in state.buckets.values() if b.count > 0)
    return build(state.taskers.values(), queued).describe(state.bucket_alive)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op, max_size=80))
def test_indexed_pass_equals_the_full_pass(ops: list[tuple]) -> None:
    core, ref = Core({"License:vcs": 3}), Core({"License:vcs": 3})
    for o in ops:
        step(core, o, dispatch_pass)
        step(ref, o, reference_pass)
        assert core.events == ref.events
    assert fingerprint(core.state) == fingerprint(ref.state)
    assert index_view(core.state) == rebuilt_view(core.state)
    assert (
        sanity.check(core.state, set(core.state.taskers)).findings
        == sanity.check(ref.state, set(ref.state.taskers)).findings
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op, max_size=60), st.integers(0, 60))
def test_index_after_replay_and_snapshot_equals_live(ops: list[tuple], split: int) -> None:
    core = Core({"License:vcs": 3})
    for o in ops:
        step(core, o, dispatch_pass)
    live = index_view(core.state)
    tmp = Path(tempfile.mkdtemp())
    try:
        write_journal(tmp / "a", core.events)
        assert index_view(replay.load(tmp / "a", None).state) == live
        split = min(split, len(core.events))
        prefix = Core()
        prefix.emit(core.events[:split])
        (tmp / "b").mkdir()
        snapshot.write(prefix.state, tmp / "b", fsync=False, chunk=3)
        write_journal(tmp / "b", core.events[split:], first_seq=split + 1)
        loaded = replay.load(tmp / "b", None).state
        assert index_view(loaded) == live
        # a pass on the loaded state goes on exactly as one on the live state would
        again = Core()
        again.state, again.now = loaded, core.now
        step(again, ("dispatch", None), dispatch_pass)
        step(core, ("dispatch", None), reference_pass)
        assert again.events == core.events[len(core.events) - len(again.events) :]
    finally:
        shutil.rmtree(tmp)


MANY = [*NEEDS, *(f"CORES/{c} RAM/{r}" for c in (1, 2, 3) for r in (50, 100, 150, 400))]


def test_many_taskers_and_buckets_follow_queue_order() -> None:
    """200 taskers of 6 offers, 300 buckets: the pass equals the full one, event for event."""
    core, ref = Core({"License:vcs": 20}), Core({"License:vcs": 20})
    for c, pass_ in ((core, dispatch_pass), (ref, reference_pass)):
        for i in range(200):
            step(c, ("register", f"t{i:03d}", 1 + i % 4, OFFERS[i % 6]), pass_)
        for p in range(1, 16):
            for need in MANY:
                step(c, ("submit", 3, p, need), pass_)
        step(c, ("dispatch", {f"t{i:03d}" for i in range(0, 200, 3)}), pass_)
        step(c, ("dispatch", None), pass_)
        for n in range(300):
            step(c, ("finish", n * 7), pass_)
            if n % 5 == 0:
                step(c, ("submit", 1, n % 15 + 1, "CORES/2"), pass_)
            step(c, ("dispatch", None), pass_)
    assert core.events == ref.events
    assert index_view(core.state) == rebuilt_view(core.state)
