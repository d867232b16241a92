"""How jobs, taskers and dispatches look on the wire, and the JSON answer itself."""

from __future__ import annotations

import os
from typing import Any

import orjson
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


def job_json(state: State, job: Job, full: bool = True) -> dict[str, Any]:
    spec = orjson.loads(job.spec)
    cur = job.current()
    out = {
        "id": job.id,
        "name": job.name,
        "user": job.user,
        "state": job.state,
        "priority": job.priority,
        "resources": job.need.resources,
        "command": spec["command"],
        "cwd": spec["cwd"],
        "log": log_path(job.id, spec),
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
        "reason": job.reason,
    }
    for key in LIMIT_KEYS:  # only in the spec of a job that has them
        if key in spec:
            out[key] = spec[key]
    if full and "script" in spec:
        out["script"] = spec["script"]
    if full:
        out["env"] = state.env_of(job)
        out["attempts"] = [a.to_dict() for a in job.attempts or ()]
        out["history"] = [
            {"t": t, "action": action, "by": by} for t, action, by in state.controls.get(job.id, ())
        ]
    return out


def log_path(job_id: int, spec: dict[str, Any]) -> str:
    return str(spec["log"] or os.path.join(spec["cwd"], f"crq.{job_id}.log"))


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
        "running": sorted(t.running),
        "last_contact": link.last_contact if link else None,
        "registered": t.registered,
    }


def dispatch_json(state: State, job: Job) -> dict[str, Any]:
    spec = orjson.loads(job.spec)
    out = {
        "job": job.id,
        "attempt": job.attempt,
        "command": spec["command"],
        "cwd": spec["cwd"],
        "env": state.env_of(job),
        "log": log_path(job.id, spec),
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
