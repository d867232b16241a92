"""One dispatch pass: match queued jobs to free taskers, at the cost of what changed.

The rule is that of a pass over every bucket: buckets are taken in queue order (priority,
high first, then the id of their head job), each gives its head to the fitting eligible
tasker with the most free slots (the first registered among equals), until no queued job
fits anywhere; a bucket nothing can run now is skipped, not allowed to block the rest.

After a pass nothing queued fits any eligible tasker, so only what grew since can change
that (``state.offers.pending``, kept by State.apply): a tasker whose offer grew can only
take needs it fits now; a need that got a bucket with jobs, or whose global resource was
given back, may fit anywhere. The pass visits only those needs, each through its group's
top bucket, so a slot freed or a job queued costs about O(needs that tasker could run +
log) instead of O(buckets x taskers). A tasker found not eligible (silent) is remembered
and looked at again by the next pass, as the full pass would.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

from crq.server.events import Event
from crq.server.offers import Entry, Offers
from crq.server.resources import Need
from crq.server.state import TASKER_READY, Bucket, State, Tasker

FEW = 8  # more grown taskers than this: every need is looked at against all taskers


def dispatch_pass(
    state: State,
    emit: Callable[[Event], None],
    now: float,
    eligible: Callable[[Tasker], bool],
) -> int:
    """Emit dispatch events until no queued job fits anywhere; returns how many."""
    offers, taskers, jobs = state.offers, state.taskers, state.jobs
    pending = offers.pending
    seen: dict[str, bool] = {}

    def fresh(t: Tasker) -> bool:
        ok = seen.get(t.name)
        if ok is None:
            ok = seen[t.name] = eligible(t)
            if ok:
                pending.passed.discard(t.name)
            else:
                pending.passed.add(t.name)
        return ok

    for name in list(pending.passed):  # silent last time: eligible now is as grown
        t = taskers.get(name)
        if t is None or t.state != TASKER_READY or t.free_slots <= 0:
            pending.passed.discard(name)
        elif fresh(t):
            pending.taskers.add(name)
    grown = [
        t
        for name in sorted(pending.taskers, key=offers.order.__getitem__)
        if (t := taskers.get(name)) is not None
        and t.state == TASKER_READY
        and t.free_slots > 0
        and fresh(t)
    ]
    scope = _scope(state, offers, grown)
    pending.settled()

    def top(text: str) -> Bucket | None:
        p = offers.groups[text].top(lambda p: state.bucket_alive(p, text))
        return None if p is None else state.buckets[(p, text)]

    heap: list[tuple[int, int, str]] = []
    for text in scope:
        b = top(text)
        if b is not None and (head := b.head(jobs)) is not None:
            heap.append((-b.priority, head, text))
    heapq.heapify(heap)
    sent = 0
    while heap:
        negp, head, text = heapq.heappop(heap)
        b = top(text)
        if b is None or (now_head := b.head(jobs)) is None:
            continue
        if (-b.priority, now_head) != (negp, head):  # its top moved on: later in the order
            heapq.heappush(heap, (-b.priority, now_head, text))
            continue
        need = b.need
        if any(state.global_free(k) < v for k, v in need.globals):
            continue
        if scope[text]:
            best = _best_anywhere(offers, taskers, need, fresh)
        else:
            best = _best_of(offers, grown, need)
        if best is None:
            continue  # the need fits nowhere now: none of its buckets will this pass
        emit(
            {
                "e": "dispatch",
                "t": now,
                "job": head,
                "attempt": jobs[head].attempt + 1,
                "tasker": best.name,
            }
        )
        sent += 1
        b = top(text)
        if b is not None and (head := b.head(jobs)) is not None:
            heapq.heappush(heap, (-b.priority, head, text))
    return sent


def _scope(state: State, offers: Offers, grown: list[Tasker]) -> dict[str, bool]:
    """Needs to look at: True against every tasker, False only against the grown ones."""
    pending = offers.pending
    if pending.full or len(grown) > FEW:
        return {text: True for text, g in offers.groups.items() if g.live > 0}
    scope = dict.fromkeys(pending.needs, True)
    for k in pending.globals:
        scope.update(dict.fromkeys(offers.global_needs.get(k, ()), True))
    for t in grown:
        key = offers.class_of(t)
        for need in offers.class_needs[key].values() if key is not None else ():
            if need.text not in scope and t.fits(need):
                scope[need.text] = False
    return scope


def _best_of(offers: Offers, grown: list[Tasker], need: Need) -> Tasker | None:
    best: Tasker | None = None
    for t in grown:  # in registration order: the first of the most free wins
        if t.fits(need) and (best is None or t.free_slots > best.free_slots):
            best = t
    return best


def _best_anywhere(
    offers: Offers, taskers: dict[str, Tasker], need: Need, fresh: Callable[[Tasker], bool]
) -> Tasker | None:
    """The first fitting eligible tasker of each class that could run the need; the best."""
    best: Entry | None = None
    for key in offers.need_classes[need.text]:
        for entry in offers.classes[key]:
            if best is not None and entry >= best:
                break  # sorted: nothing further in this class beats the best
            t = taskers[entry[2]]
            if t.fits(need) and fresh(t):
                best = entry
                break
    return None if best is None else taskers[best[2]]
