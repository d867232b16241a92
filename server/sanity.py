"""The global sanity check: the state agrees with itself and with the taskers.

Checks, after Accelerator's list: every running job is on a live tasker that confirmed it;
each tasker runs exactly the jobs that name it; slot and resource use equals what running
jobs hold (invariant 5); global resource use likewise; state counters and queue buckets
match the jobs, and the scheduler's indexes match both; ids are unique and below
``next_id``, as are the ids idempotency keys answer. With ``fix``, derived data is
recomputed in place and orphaned attempts are recovered through journaled events.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from functools import partial
from operator import attrgetter

from crq.server.events import Event, recover
from crq.server.offers import build
from crq.server.state import TASKER_READY, Bucket, Job, State

from crq.wire import QUEUED, RUNNING, WAITING


@dataclass
class Result:
    findings: list[str] = field(default_factory=list)
    fixed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings or len(self.fixed) == len(self.findings)

    def as_dict(self) -> dict[str, object]:
        return {"ok": self.ok, "findings": self.findings, "fixed": self.fixed}


Repair = Callable[[], None]


@dataclass
class _Finder:
    """Records a finding, and with ``fix`` repairs it at once (later checks see the repair)."""

    result: Result
    fix: bool

    def __call__(self, msg: str, repair: Repair | None = None) -> None:
        self.result.findings.append(msg)
        if self.fix and repair is not None:
            repair()
            self.result.fixed.append(msg)


def check(
    state: State,
    confirmed: Collection[str],
    fix: bool = False,
    emit: Callable[[list[Event]], None] | None = None,
) -> Result:
    """``confirmed``: taskers that have registered with this server process."""
    r = Result()
    found = _Finder(r, fix)
    running = [j for j in state.jobs.values() if j.state == RUNNING]
    _orphaned_attempts(state, running, confirmed, found, emit)
    _stray_holds(state, found)
    _tasker_use(state, fix, found)
    _global_use(state, running, found)
    counts = Counter(map(attrgetter("state"), state.jobs.values()))
    _counters(state, counts, found)
    _buckets(state, counts, found)
    _waits(state, counts, found)
    _next_id(state, found)
    _keys(state, found)
    _index(state, found)  # last: the repairs above change what it is built from
    return r


def _orphaned_attempts(
    state: State,
    running: list[Job],
    confirmed: Collection[str],
    found: _Finder,
    emit: Callable[[list[Event]], None] | None,
) -> None:
    """A running job whose tasker is unknown, not ready, unconfirmed or not holding it:
    its attempt is recovered (a journaled event)."""
    now = time.time()
    for job in running:
        why = _orphaned(state, job, confirmed)
        if why:
            ev = recover(job.id, job.attempt, f"sanity: {why}", now)
            found(f"job {job.id} is running but {why}", partial(emit, [ev]) if emit else None)


def _orphaned(state: State, job: Job, confirmed: Collection[str]) -> str | None:
    t = state.taskers.get(job.tasker or "")
    if t is None:
        return f"unknown tasker {job.tasker}"
    if t.state != TASKER_READY:
        return f"tasker {t.name} is {t.state}"
    if t.name not in confirmed:
        return f"tasker {t.name} has not confirmed it"
    if job.id not in t.running:
        return f"tasker {t.name} does not hold it"
    return None


def _stray_holds(state: State, found: _Finder) -> None:
    """A tasker holding a job that does not run there: the hold is dropped."""
    for t in state.taskers.values():
        for job_id in sorted(t.running):
            job = state.jobs.get(job_id)
            if job is None or job.state != RUNNING or job.tasker != t.name:
                found(
                    f"tasker {t.name} holds job {job_id}, which does not run there",
                    partial(t.running.discard, job_id),
                )


def _tasker_use(state: State, fix: bool, found: _Finder) -> None:
    """Free slots and resources of a tasker against what its jobs hold (invariant 5)."""
    for t in state.taskers.values():
        free, free_slots = dict(t.free), t.free_slots
        state.recount_tasker(t)
        if free != t.free or free_slots != t.free_slots:
            msg = (
                f"tasker {t.name}: free {free_slots} slots {free}, "
                f"but its jobs leave {t.free_slots} slots {t.free}"
            )
            if not fix:
                t.free, t.free_slots = free, free_slots
            found(msg, _recounted)


def _recounted() -> None:
    """Nothing left to do: the check recounted the tasker already."""


def _global_use(state: State, running: list[Job], found: _Finder) -> None:
    """Global resources in use against what running jobs hold, and against the totals."""
    used: Counter[str] = Counter()
    for job in running:
        for k, v in job.need.globals:
            used[k] += v
    actual = {k: v for k, v in state.global_used.items() if v}
    if actual != dict(+used):
        found(
            f"global resources in use {actual}, running jobs hold {dict(+used)}",
            lambda: setattr(state, "global_used", dict(used)),
        )
    for k, v in used.items():
        if v > state.global_total.get(k, 0):
            found(f"{k}: {v} in use, more than the {state.global_total.get(k, 0)} configured")


def _counters(state: State, counts: Counter[str], found: _Finder) -> None:
    """The per-state job counters against the jobs."""
    wrong = {s: (n, counts.get(s, 0)) for s, n in state.counts.items() if n != counts.get(s, 0)}
    if wrong:
        found(
            f"state counters wrong (counted, actual): {wrong}",
            lambda: state.counts.update({s: counts.get(s, 0) for s in state.counts}),
        )


def _buckets(state: State, counts: Counter[str], found: _Finder) -> None:
    """Each job is queued in the one bucket of its key, so: every bucket holds as many live
    entries as its count, and all buckets together hold every queued job."""
    live = {key: _live_entries(state, b) for key, b in state.buckets.items()}
    bad = [key for key, b in state.buckets.items() if b.count != live[key]]
    missing = counts.get(QUEUED, 0) - sum(live.values())
    if missing or bad:
        found(
            f"queue buckets disagree with queued jobs ({missing} jobs missing, "
            f"{len(bad)} bucket counts wrong)",
            lambda: _rebuild_buckets(state),
        )


def _waits(state: State, counts: Counter[str], found: _Finder) -> None:
    """Every waiting job has its reason to wait (server/gates.py), and only they have one;
    a waiting job without one would wait forever. Repair: such jobs are queued."""
    jobs = state.jobs
    stray = [i for i in state.waits if (j := jobs.get(i)) is None or j.state != WAITING]
    lost = [j for j in jobs.values() if j.state == WAITING and j.id not in state.waits]
    if stray or lost:
        found(
            f"waiting jobs disagree with their reasons to wait ({len(lost)} waiting without "
            f"one, {len(stray)} reasons of jobs not waiting)",
            lambda: _mend_waits(state, stray, lost),
        )


def _mend_waits(state: State, stray: list[int], lost: list[Job]) -> None:
    for i in stray:
        del state.waits[i]
    for job in lost:
        state.counts[WAITING] -= 1
        state.counts[QUEUED] += 1
        job.state = QUEUED
        state.enqueue(job)


def _next_id(state: State, found: _Finder) -> None:
    """Ids are given from ``next_id``: it must be above every job's id."""
    if state.jobs and max(state.jobs) >= state.next_id:
        found(
            f"next id {state.next_id} not above the highest id {max(state.jobs)}",
            lambda: setattr(state, "next_id", max(state.jobs) + 1),
        )


def _keys(state: State, found: _Finder) -> None:
    """A key answers ids that were given: below ``next_id`` (ids are never given twice)."""
    top = max((first + count - 1 for first, count, _, _ in state.keys.values()), default=0)
    if top >= state.next_id:
        found(
            f"next id {state.next_id} not above the id {top} an idempotency key answers",
            lambda: setattr(state, "next_id", top + 1),
        )


def _index(state: State, found: _Finder) -> None:
    """The scheduler's indexes (server/offers.py) against ones built afresh."""
    fresh = build(
        state.taskers.values(),
        ((b.priority, b.need) for b in state.buckets.values() if b.count > 0),
    )
    if fresh.describe(state.bucket_alive) != state.offers.describe(state.bucket_alive):
        found("the dispatch index disagrees with the taskers and buckets", state.reindex)
    elif found.fix and found.result.fixed:
        state.reindex()  # a repair above changed what it is built from, if not its view


def _live_entries(state: State, b: Bucket) -> int:
    """Distinct ids in the bucket's heap of jobs queued with its priority and need."""
    jobs = state.jobs
    return sum(
        1
        for i in set(b.heap)
        if (j := jobs.get(i)) is not None
        and j.state == QUEUED
        and j.need is b.need
        and j.priority == b.priority
    )


def _rebuild_buckets(state: State) -> None:
    state.buckets.clear()
    for job in sorted(state.jobs.values(), key=lambda j: j.id):
        if job.state == QUEUED:
            key = (job.priority, job.need.text)
            b = state.buckets.get(key)
            if b is None:
                b = state.buckets[key] = Bucket(job.priority, job.need)
            b.heap.append(job.id)
            b.count += 1
