"""The global sanity check finds each kind of inconsistency, and ``fix`` repairs it.

Each test breaks one thing in a consistent state, by hand, as a bug or a bad file could;
the check must name it, fix it, and find nothing on a second run (invariant 5).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from crq.server import sanity
from crq.server.events import Event
from crq.server.state import State

from tests.core import Core, fingerprint

LIVE = {"t1", "t2"}


def consistent() -> Core:
    core = Core({"License:vcs": 2})
    core.register("t1", slots=2, resources="CORES/4")
    core.register("t2", slots=1)
    core.submit(3, resources="License:vcs CORES/2", priority=9)
    core.submit(4, priority=8)
    core.submit(2)
    core.dispatch()
    assert sanity.check(core.state, LIVE).findings == []
    return core


def first(state: State, st: str) -> int:
    return next(j.id for j in state.jobs.values() if j.state == st)


def drop_from_heap(state: State) -> None:
    job = state.jobs[first(state, "queued")]
    bucket = state.buckets[(job.priority, job.need.text)]
    bucket.heap.remove(job.id)
    bucket.heap.sort()


BREAKS: dict[str, tuple[Callable[[State], None], str]] = {
    "counter": (lambda s: s.counts.__setitem__("queued", s.counts["queued"] + 1), "counters"),
    "bucket count": (
        lambda s: setattr(next(iter(s.buckets.values())), "count", 99),
        "buckets",
    ),
    "job missing from its bucket": (drop_from_heap, "1 jobs missing"),
    "bucket gone": (lambda s: s.buckets.clear(), "jobs missing"),
    "free slots": (lambda s: setattr(s.taskers["t1"], "free_slots", 2), "slots"),
    "free resources": (lambda s: s.taskers["t1"].free.__setitem__("CORES", 4), "slots"),
    "global use": (lambda s: s.global_used.__setitem__("License:vcs", 0), "global"),
    "next id": (lambda s: setattr(s, "next_id", 3), "next id"),
    "idempotency key past next id": (
        lambda s: s.keys.__setitem__(("alice", "k"), (s.next_id, 2, 0.0, "d")),
        "idempotency key",
    ),
    "dispatch index of taskers": (lambda s: s.offers.order.update(t1=9), "dispatch index"),
    "dispatch index of a need": (lambda s: s.offers.groups.clear(), "dispatch index"),
    "tasker holds a job it does not run": (
        lambda s: s.taskers["t2"].running.add(first(s, "queued")),
        "does not run there",
    ),
}


@pytest.mark.parametrize("name", list(BREAKS))
def test_each_inconsistency_is_found_and_fixed(name: str) -> None:
    core = consistent()
    want = fingerprint(core.state)
    breaks, words = BREAKS[name]
    breaks(core.state)
    found = sanity.check(core.state, LIVE)
    assert found.findings and not found.ok and words in " ".join(found.findings)
    fixed = sanity.check(core.state, LIVE, fix=True, emit=core.emit)
    assert fixed.ok and fixed.fixed == fixed.findings
    assert sanity.check(core.state, LIVE).findings == []
    if "next id" not in name:  # repaired above the ids in use, not to its older value
        assert fingerprint(core.state) == want


def test_a_running_job_on_a_tasker_that_did_not_confirm_is_recovered() -> None:
    core = consistent()
    emitted: list[Event] = []

    def emit(events: list[Event]) -> None:
        emitted.extend(events)
        core.emit(events)

    on_t2 = [j.id for j in core.state.jobs.values() if j.tasker == "t2" and j.state == "running"]
    result = sanity.check(core.state, {"t1"}, fix=True, emit=emit)
    assert result.ok and len(result.findings) == len(on_t2) == 1
    assert [ev["e"] for ev in emitted] == ["recover"]
    assert core.state.jobs[on_t2[0]].state == "queued"
    assert sanity.check(core.state, {"t1"}).findings == []
