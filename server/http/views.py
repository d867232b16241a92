"""How jobs, taskers and dispatches look on the wire, and the JSON answer itself."""

from __future__ import annotations

import os
from typing import Any

import orjson
from crq.server.gates import Array, expand_log
from crq.server.identity import OPERATOR, Identity
from crq.server.service import Service
from crq.server.state import TASKER_LOST, Job, State
from starlette.responses import Response

API = "/api/v1"
LIMIT_KEYS = ("time_limit", "kill_grace")


class JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error(status: int, code: str, message: str, **extra: Any) -> JSON:
    return JSON({"error": code, "message": message, **extra}, status_code=status)


def job_json(state: State, job: Job, full: bool = True, private: bool = True) -> dict[str, Any]:
    """The job as the API shows it. Without ``private`` (a caller who is neither its owner nor
    an operator) its environment and stored script, which may hold secrets, are left out:
    ``env`` is null and ``script`` absent."""
    spec = orjson.loads(job.spec)
    cur = job.current()
    arr = state.array_of(job.id)
    w = state.waits.get(job.id)
    out = {
        "id": job.id,
        "name": job.name,
        "user": job.user,
        "state": job.state,
        "priority": job.priority,
        "resources": job.need.resources,
        "command": spec["command"],
        "cwd": spec["cwd"],
        "log": log_path(job.id, spec, arr),
        "rerunnable": job.rerunnable,
        "max_attempts": job.max_attempts,
        "attempt": job.attempt,
        "tasker": job.tasker,
        "host": cur.host if cur and job.tasker else None,
        "pid": job.pid,
        "submitted": job.submitted,
        "started": job.started,
        "ended": job.ended,
        "exit_code": job.exit_code,
        "signal": job.signal,
        "reason": w.reason() if w is not None else job.reason,
        "held": w is not None and w.held,
        "after": spec.get("after") or [],
        "array": arr.first if arr is not None else None,
        "index": arr.index(job.id) if arr is not None else None,
    }
    for key in LIMIT_KEYS:  # only in the spec of a job that has them
        if key in spec:
            out[key] = spec[key]
    if full and private and "script" in spec:
        out["script"] = spec["script"]
    if full:
        out["env"] = state.env_of(job) if private else None
        out["attempts"] = [a.to_dict() for a in job.attempts or ()]
        out["history"] = [
            {"t": t, "action": action, "by": by} for t, action, by in state.controls.get(job.id, ())
        ]
    return out


def may_see_private(who: Identity, job: Job) -> bool:
    """Env and script: the owner's, and an operator's or admin's (as ``scontrol`` shows a
    batch script to its owner and to operators only)."""
    return who.user == job.user or who.at_least(OPERATOR)


def log_path(job_id: int, spec: dict[str, Any], arr: Array | None = None) -> str:
    """The job's log: ``log`` with ``%j``, ``%A``, ``%a`` expanded, or crq.<id>.log in cwd."""
    if not spec["log"]:
        return os.path.join(spec["cwd"], f"crq.{job_id}.log")
    if arr is None:
        return expand_log(spec["log"], job_id, None, None)
    return expand_log(spec["log"], job_id, arr.first, arr.index(job_id))


def tasker_json(srv: Service, name: str) -> dict[str, Any]:
    t = srv.state.taskers[name]
    link = srv.engine.links.get(name)
    if t.state == TASKER_LOST:
        state = "lost"
    elif link is None:
        state = "gone"
    elif t.free_slots <= 0:
        state = "full"
    else:
        state = "ready"
    return {
        "name": t.name,
        "host": t.host,
        "state": state,
        "slots": t.slots,
        "free_slots": t.free_slots,
        "resources": t.resources,
        "capacity": t.capacity,
        "free": t.free,
        "attributes": sorted(t.attributes),
        "running": sorted(t.running),
        "last_contact": link.last_contact if link else None,
        "registered": t.registered,
    }


def dispatch_json(state: State, job: Job) -> dict[str, Any]:
    spec = orjson.loads(job.spec)
    env = state.env_of(job)
    arr = state.array_of(job.id)
    if arr is not None:
        env = {**env, "CRQ_ARRAY_ID": str(arr.first), "CRQ_ARRAY_INDEX": str(arr.index(job.id))}
    out = {
        "job": job.id,
        "attempt": job.attempt,
        "command": spec["command"],
        "cwd": spec["cwd"],
        "env": env,
        "log": log_path(job.id, spec, arr),
        "name": job.name,
        "user": job.user,  # a root tasker runs the job as this user (tasker/runas.py)
    }
    for key in (*LIMIT_KEYS, "script"):
        if key in spec:
            out[key] = spec[key]
    for name, amount in job.need.local:  # a few pairs: no dict made per dispatch
        if name == "RAM":
            out["ram"] = amount  # MB: what a tasker with --enforce-memory holds the job to
    return out
