"""One dispatch pass: match queued jobs to free taskers.

Buckets (one per priority and need) are visited through a heap keyed by their head job, so
jobs leave in queue order across buckets, and a pass costs O(buckets + dispatches), not
O(queued jobs). A bucket nothing can run now is skipped, not allowed to block the rest.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

from crq.server.state import TASKER_READY, Event, State, Tasker


def dispatch_pass(
    state: State,
    emit: Callable[[Event], None],
    now: float,
    eligible: Callable[[Tasker], bool],
) -> int:
    """Emit dispatch events until no queued job fits anywhere; returns how many."""
    ready = [
        t
        for t in state.taskers.values()
        if t.state == TASKER_READY and t.free_slots > 0 and eligible(t)
    ]
    if not ready:
        return 0
    jobs = state.jobs
    heap: list[tuple[int, int, tuple[int, str]]] = []
    for key, bucket in list(state.buckets.items()):
        head = bucket.head(jobs) if bucket.count > 0 else None
        if head is None:
            if bucket.count <= 0:
                del state.buckets[key]
            continue
        heap.append((-bucket.priority, head, key))
    heapq.heapify(heap)
    sent = 0
    while heap and ready:
        _, head, key = heapq.heappop(heap)
        bucket = state.buckets[key]
        need = bucket.need
        if any(state.global_free(k) < v for k, v in need.globals):
            continue
        best: Tasker | None = None
        for t in ready:
            if t.fits(need) and (best is None or t.free_slots > best.free_slots):
                best = t
        if best is None:
            continue
        job = jobs[head]
        emit(
            {
                "e": "dispatch",
                "t": now,
                "job": head,
                "attempt": job.attempt + 1,
                "tasker": best.name,
            }
        )
        sent += 1
        if best.free_slots <= 0:
            ready.remove(best)
        nxt = bucket.head(jobs)
        if nxt is not None:
            heapq.heappush(heap, (-bucket.priority, nxt, key))
    return sent
