"""Why a job is not running yet: read from the state, changing nothing.

The pieces are those the gates (server/gates.py) and the scheduler (server/scheduler.py)
decide by: a hold, each dependency and its parent's state, the array's ``max_running``
cap, then, for a queued job, the global resources it asks for and each tasker's offer
(could it ever run the job, and could it now). The answer is for people: each finding is
also said in one line (``reasons``).
"""

from __future__ import annotations

from typing import Any

from crq.server import gates
from crq.server.offers import Tasker
from crq.server.resources import Need
from crq.server.state import TASKER_LOST, Job, State

from crq.wire import QUEUED, WAITING

POSITION_SCAN = 100_000  # queued jobs looked at, at most, to tell the place in the queue


def why(state: State, job: Job, linked: set[str]) -> dict[str, Any]:
    """The reasons ``job`` waits or stays queued; ``linked``: taskers with a live link."""
    out: dict[str, Any] = {"id": job.id, "state": job.state, "reasons": []}
    reasons: list[str] = out["reasons"]
    if job.state not in (QUEUED, WAITING):
        reasons.append(f"job {job.id} is {job.state}: it waits for nothing")
        return out
    w = state.waits.get(job.id)
    out["held"] = bool(w is not None and w.held)
    if out["held"]:
        reasons.append("held: release it to let it run")
    deps = []
    for kind, parent in state.after_of(job):
        p = state.jobs.get(parent) if isinstance(parent, int) else None
        outcome = p.state if p is not None else gates.FORGOTTEN
        ok = gates.met(kind, outcome)
        deps.append({"type": kind, "job": parent, "state": outcome, "met": ok})
        if ok is None:
            reasons.append(f"waits for job {parent} ({kind}; it is {outcome})")
        elif ok is False:
            reasons.append(gates.broken_reason(kind, parent, outcome))
    out["dependencies"] = deps
    arr = state.array_of(job.id)
    if arr is not None and arr.max_running is not None:
        limited = bool(w is not None and w.limited)
        out["array"] = {
            "id": arr.first,
            "max_running": arr.max_running,
            "active": arr.active,
            "limited": limited,
        }
        if limited:
            reasons.append(
                f"array {arr.first} is at its cap: {arr.active} of %{arr.max_running} "
                "queued or running"
            )
    if job.state == QUEUED:
        _queued(state, job, linked, out)
    elif not reasons:
        reasons.append(w.reason() if w is not None else "waiting")
    return out


def _queued(state: State, job: Job, linked: set[str], out: dict[str, Any]) -> None:
    reasons: list[str] = out["reasons"]
    need = job.need
    short = []
    for name, amount in need.globals:
        free = state.global_free(name)
        total = state.global_total.get(name)
        entry = {"name": name, "need": amount, "free": free, "total": total}
        out.setdefault("globals", []).append(entry)
        if total is None:
            short.append(name)
            reasons.append(f"global resource {name} is not configured on this server")
        elif free < amount:
            short.append(name)
            reasons.append(f"short of {name}: needs {amount}, {free} of {total} free")
    taskers = [_tasker(t, need, t.name in linked) for t in state.taskers.values()]
    out["taskers"] = taskers
    could = [t for t in taskers if t["could"]]
    now = [t for t in could if t["now"]]
    if not taskers:
        reasons.append("no tasker is registered")
    elif not could:
        reasons.append(f"no tasker offers what it needs ({need.resources})")
    elif not now:
        reasons.append(
            f"every tasker that could run it is busy or away ({len(could)} could, when free)"
        )
    elif not short:
        reasons.append(f"{len(now)} tasker(s) could run it now: it is next in its turn")
    ahead = 0
    for i, job_id in enumerate(state.queue_order()):
        if job_id == job.id or i >= POSITION_SCAN:
            break
        ahead += 1
    out["ahead"] = ahead  # queued jobs before it in dispatch order (at most POSITION_SCAN)


def _tasker(t: Tasker, need: Need, linked: bool) -> dict[str, Any]:
    """Whether the tasker could run the need when idle, could now, and why not."""
    why_not: list[str] = []
    if t.runs_as and t.runs_as != need.user:
        why_not.append(f"runs only {t.runs_as}'s jobs")
    missing = sorted(need.attributes - t.attributes)
    if missing:
        why_not.append(f"lacks {' '.join(missing)}")
    for k, v in need.local:
        if t.capacity.get(k, 0) < v:
            why_not.append(f"has {k}/{t.capacity.get(k, 0)} of {v}")
    could = not why_not
    busy: list[str] = []
    if could:
        if t.state == TASKER_LOST:
            busy.append("lost")
        elif not linked:
            busy.append("not connected")
        if t.free_slots <= 0:
            busy.append(f"all {t.slots} slots in use")
        for k, v in need.local:
            if t.free.get(k, 0) < v:
                busy.append(f"{k}: {t.free.get(k, 0)} free of {v} needed")
    return {
        "name": t.name,
        "host": t.host,
        "could": could,
        "now": could and not busy,
        "why_not": why_not + busy,
    }


__all__ = ["why"]
