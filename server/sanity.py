"""The global sanity check: the state agrees with itself and with the taskers.

Checks, after Accelerator's list: every running job is on a live tasker that confirmed it;
each tasker runs exactly the jobs that name it; slot and resource use equals what running
jobs hold (invariant 5); global resource use likewise; state counters and queue buckets
match the jobs; ids are unique and below ``next_id``. With ``fix``, derived data is
recomputed in place and orphaned attempts are recovered through journaled events.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from operator import attrgetter

from crq.server.state import TASKER_READY, Bucket, Event, State

from crq.wire import QUEUED, RUNNING


@dataclass
class Result:
    findings: list[str] = field(default_factory=list)
    fixed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings or len(self.fixed) == len(self.findings)

    def as_dict(self) -> dict[str, object]:
        return {"ok": self.ok, "findings": self.findings, "fixed": self.fixed}


def check(
    state: State,
    confirmed: Collection[str],
    fix: bool = False,
    emit: Callable[[list[Event]], None] | None = None,
) -> Result:
    """``confirmed``: taskers that have registered with this server process."""
    r = Result()
    now = time.time()

    def found(msg: str, repair: Callable[[], None] | None = None) -> None:
        r.findings.append(msg)
        if fix and repair is not None:
            repair()
            r.fixed.append(msg)

    jobs = state.jobs.values()
    running = [j for j in jobs if j.state == RUNNING]
    # running jobs <-> taskers
    orphans: list[Event] = []
    for job in running:
        t = state.taskers.get(job.tasker or "")
        why = None
        if t is None:
            why = f"unknown tasker {job.tasker}"
        elif t.state != TASKER_READY:
            why = f"tasker {t.name} is {t.state}"
        elif t.name not in confirmed:
            why = f"tasker {t.name} has not confirmed it"
        elif job.id not in t.running:
            why = f"tasker {t.name} does not hold it"
        if why:
            orphans.append(
                {
                    "e": "recover",
                    "t": now,
                    "job": job.id,
                    "attempt": job.attempt,
                    "reason": f"sanity: {why}",
                }
            )
            found(
                f"job {job.id} is running but {why}",
                (lambda ev=orphans[-1]: emit([ev])) if emit else None,
            )
    for t in state.taskers.values():
        for job_id in sorted(t.running):
            job = state.jobs.get(job_id)
            if job is None or job.state != RUNNING or job.tasker != t.name:
                found(
                    f"tasker {t.name} holds job {job_id}, which does not run there",
                    lambda t=t, job_id=job_id: t.running.discard(job_id),
                )
    # slot and resource accounting
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
            found(msg, lambda: None)
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
    # counters, buckets, ids
    counts = Counter(map(attrgetter("state"), jobs))
    wrong = {s: (n, counts.get(s, 0)) for s, n in state.counts.items() if n != counts.get(s, 0)}
    if wrong:
        found(
            f"state counters wrong (counted, actual): {wrong}",
            lambda: state.counts.update({s: counts.get(s, 0) for s in state.counts}),
        )
    # Each job is queued in the one bucket of its key, so: every bucket holds as many live
    # entries as its count, and all buckets together hold every queued job.
    live = {key: _live_entries(state, b) for key, b in state.buckets.items()}
    bad = [key for key, b in state.buckets.items() if b.count != live[key]]
    missing = counts.get(QUEUED, 0) - sum(live.values())
    if missing or bad:
        found(
            f"queue buckets disagree with queued jobs ({missing} jobs missing, "
            f"{len(bad)} bucket counts wrong)",
            lambda: _rebuild_buckets(state),
        )
    if state.jobs and max(state.jobs) >= state.next_id:
        found(
            f"next id {state.next_id} not above the highest id {max(state.jobs)}",
            lambda: setattr(state, "next_id", max(state.jobs) + 1),
        )
    return r


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
