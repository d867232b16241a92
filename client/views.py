"""How ``crq`` and ``ncmgr`` show jobs, taskers and server status: rows for
:func:`~crq.client.table.format_table` and text pages, from the JSON the server sends."""

from __future__ import annotations

import shlex
import time
from collections.abc import Iterable
from typing import Any

from crq.client.errors import recovery_progress
from crq.client.table import (
    ago,
    cell,
    clip,
    clock,
    duration,
    exit_status,
    format_table,
    key_values,
    when,
)

from crq import wire

NAME_WIDTH = 32


def job_rows(jobs: Iterable[dict[str, Any]], now: float | None = None) -> list[list[str]]:
    now = time.time() if now is None else now
    rows = []
    for job in jobs:
        name = job.get("name") or command_text(job.get("command"))
        rows.append(
            [
                str(job.get("id")),
                cell(job.get("state")),
                cell(job.get("priority")),
                cell(job.get("user")),
                clip(cell(name), NAME_WIDTH),
                cell(job.get("tasker")),
                ago(job.get("submitted"), now),
                exit_status(job),
            ]
        )
    return rows


JOB_HEADERS = ("ID", "STATE", "PRIO", "USER", "NAME", "TASKER", "SUBMITTED", "EXIT")

HISTORY_HEADERS = (
    "ID", "USER", "NAME", "STATE", "EXIT", "HOST", "SUBMITTED", "WAIT", "RUN", "ATTEMPTS",
    "REASON",
)  # fmt: skip


def history_rows(jobs: Iterable[dict[str, Any]], now: float | None = None) -> list[list[str]]:
    """``crq history``: what sacct shows, a line a job that left the queue."""
    now = time.time() if now is None else now
    return [
        [
            str(job.get("id")),
            cell(job.get("user")),
            clip(cell(job.get("name") or command_text(job.get("command"))), NAME_WIDTH),
            cell(job.get("state")),
            exit_status(job),
            cell(job.get("host")),
            clock(job.get("submitted"), now),
            duration(job.get("wait")),
            duration(job.get("run")),
            cell(job.get("tries")),
            clip(cell(job.get("reason")), 48),
        ]
        for job in jobs
    ]


def command_text(command: Any) -> str:
    if isinstance(command, list):
        return shlex.join(str(c) for c in command)
    return "" if command is None else str(command)


def info_text(job: dict[str, Any], show_env: bool = False, now: float | None = None) -> str:
    """The ``crq info`` page: fields, then the attempts table."""
    now = time.time() if now is None else now
    state = str(job.get("state"))
    status = exit_status(job)
    state_line = state + (f", exit {status}" if status != "-" else "")
    attempt = job.get("attempt")
    attempts_line = f"{attempt or 0} of at most {job.get('max_attempts', '?')}, " + (
        "rerunnable" if job.get("rerunnable", True) else "not rerunnable"
    )
    where = None
    if job.get("tasker"):
        where = str(job["tasker"])
        if job.get("host"):
            where += f" on {job['host']}"
        if job.get("pid"):
            where += f" (pid {job['pid']})"
    submitted, started, ended = job.get("submitted"), job.get("started"), job.get("ended")
    started_text = when(started, now)
    if started and submitted:
        started_text += f", queued {duration(started - submitted)}"
    ended_text = when(ended, now)
    if ended and started:
        ended_text += f", ran {duration(ended - started)}"
    elif started and state == wire.RUNNING:
        started_text += f", running {duration(now - started)}"
    env = job.get("env")
    pairs: list[tuple[str, Any]] = [
        ("id", job.get("id")),
        ("name", job.get("name")),
        ("state", state_line),
        *([("reason", job["reason"])] if job.get("reason") else []),
        ("user", job.get("user")),
        ("command", command_text(job.get("command"))),
        ("cwd", job.get("cwd")),
        ("log", job.get("log")),
        ("priority", job.get("priority")),
        ("resources", job.get("resources")),
        ("attempts", attempts_line),
        ("tasker", where),
        ("submitted", when(submitted, now)),
        ("started", started_text),
        ("ended", ended_text),
    ]
    if isinstance(env, dict):
        pairs.append(("env", f"{len(env)} variables" + ("" if show_env else " (--env shows)")))
    lines = [key_values(pairs)]
    if show_env and isinstance(env, dict):
        lines.append("")
        lines.extend(f"  {k}={v}" for k, v in sorted(env.items()))
    attempts = job.get("attempts") or []
    if attempts:
        rows = []
        for a in attempts:
            ran = (
                duration(a["ended"] - a["started"]) if a.get("ended") and a.get("started") else "-"
            )
            rows.append(
                [
                    cell(a.get("attempt")),
                    cell(a.get("tasker")),
                    cell(a.get("host")),
                    clock(a.get("dispatched"), now),
                    clock(a.get("started"), now),
                    clock(a.get("ended"), now),
                    ran,
                    cell(a.get("outcome")),
                    cell(a.get("exit_code")),
                ]
            )
        headers = ("#", "TASKER", "HOST", "DISPATCHED", "STARTED", "ENDED", "RAN", "OUTCOME")
        table = format_table((*headers, "EXIT"), rows, right=(0, 6, 8))
        lines += ["", "attempts:", *("  " + line for line in table.splitlines())]
    return "\n".join(lines)


def tasker_rows(taskers: Iterable[dict[str, Any]], now: float | None = None) -> list[list[str]]:
    now = time.time() if now is None else now
    rows = []
    for t in taskers:
        running = [str(j) for j in t.get("running") or []]
        slots = t.get("slots")
        busy = len(running)
        if slots is not None and t.get("free_slots") is not None:
            busy = int(slots) - int(t["free_slots"])
        rows.append(
            [
                cell(t.get("name")),
                cell(t.get("host")),
                cell(t.get("state")),
                f"{busy}/{cell(slots)}",
                clip(",".join(running), 30) or "-",
                ago(t.get("last_contact"), now),
                cell(t.get("resources")),
            ]
        )
    return rows


TASKER_HEADERS = ("NAME", "HOST", "STATE", "SLOTS", "RUNNING", "LAST CONTACT", "RESOURCES")


def describe_end(job: dict[str, Any]) -> str:
    """``job 12 failed (exit 1, <reason>)``."""
    state = job.get("state", "unknown")
    details = []
    status = exit_status(job)
    if status != "-":
        details.append(f"exit {status}")
    if job.get("reason"):
        details.append(str(job["reason"]))
    tail = f" ({', '.join(details)})" if details else ""
    return f"job {job.get('id')} {state}{tail}"


def counts_text(counts: dict[str, Any]) -> str:
    """``3 queued, 2 running, 100 done`` in the canonical state order."""
    parts = [f"{counts[s]} {s}" for s in wire.JOB_STATES if counts.get(s)]
    parts += [f"{n} {s}" for s, n in counts.items() if s not in wire.JOB_STATES and n]
    return ", ".join(parts) or "none"


def recovery_text(recovery: dict[str, Any]) -> str:
    text = recovery_progress(recovery, approx=False)
    expected = recovery.get("expected") or []
    back = set(recovery.get("reconnected") or [])
    missing = [t for t in expected if t not in back]
    if missing:
        text += f" (missing: {', '.join(map(str, missing))})"
    if recovery.get("events_replayed") is not None:
        text += f", {recovery['events_replayed']} events replayed"
    return text


SERVER_HEADERS = ("ROLE", "MODE", "URL", "PID", "HOST", "EPOCH", "INSTANCE")


def server_table(servers: Iterable[tuple[dict[str, Any], dict[str, Any] | None]]) -> str:
    """``ncmgr status``'s list of a queue's servers: each one's ``servers/<instance>.json``
    with what it answered just now (None: it did not)."""
    rows = []
    for info, live in servers:
        now = live or {}
        mode = now.get("mode") or f"{cell(info.get('mode'))}, not answering"
        leads = now.get("mode") in (wire.MODE_NORMAL, wire.MODE_RECOVERING)
        epoch = now.get("epoch") if now.get("epoch") is not None else info.get("epoch")
        rows.append(
            [
                "leader" if leads else ("standby" if now else "-"),
                mode,
                cell(now.get("url") or info.get("url")),
                cell(now.get("pid") or info.get("pid")),
                cell(now.get("host") or info.get("host")),
                cell(epoch),
                cell(now.get("instance") or info.get("instance")),
            ]
        )
    return format_table(SERVER_HEADERS, rows, right=(3, 5))
