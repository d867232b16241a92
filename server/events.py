"""How an event is written as a journal record, and read back.

Most events are one JSON object. A submit event is the exception, because it is nearly all
of a big journal: each job's cold fields (command, cwd, log) live in memory as their JSON
bytes (``Job.spec``), and the record keeps those bytes raw, one per line after the event's
own JSON. So neither a live submit nor a replay encodes a spec twice, and a replay splits
the record instead of parsing every spec. orjson never writes a raw newline (it escapes
control characters in strings), so a line break can only be a separator.

A submit event: ``{"e": "submit", "t", "user", "jobs": [[id, priority, resources, name,
env, rerunnable, max_attempts], …]}`` plus ``"specs"``: the spec bytes, in job order.
"""

from __future__ import annotations

from typing import Any

import orjson

Event = dict[str, Any]

SUBMIT_FIELDS = ("id", "priority", "resources", "name", "env", "rerunnable", "max_attempts")
NL = b"\n"


def encode(ev: Event) -> bytes:
    specs = ev.get("specs")
    if specs is None:
        return orjson.dumps(ev)
    head = orjson.dumps({k: v for k, v in ev.items() if k != "specs"})
    return NL.join([head, *specs])


def decode(payload: bytes) -> Event:
    if payload.find(NL) < 0:
        ev: Event = orjson.loads(payload)
        if ev.get("e") == "submit" and "specs" not in ev:
            _upgrade_submit(ev)
        return ev
    lines = payload.split(NL)
    ev = orjson.loads(lines[0])
    del lines[0]
    if len(lines) != len(ev["jobs"]):
        raise ValueError(f"submit record has {len(lines)} specs for {len(ev['jobs'])} jobs")
    ev["specs"] = lines
    return ev


def spec_bytes(spec: dict[str, Any]) -> bytes:
    """A spec's JSON as an exact-size bytes (orjson's own result keeps a larger buffer)."""
    return bytes(memoryview(orjson.dumps(spec)))


def _upgrade_submit(ev: Event) -> None:
    """A submit written before specs were kept raw (jobs as objects, each with its spec)."""
    jobs = ev["jobs"]
    ev["specs"] = [spec_bytes(j["spec"]) for j in jobs]
    ev["jobs"] = [[j[k] for k in SUBMIT_FIELDS] for j in jobs]
