"""The recovery monitor: taskers silent past ``tasker_timeout`` are declared lost.

Their running attempts are recovered (requeued at their old position if rerunnable with
attempts left, else lost) and their slots and resources released, all as journaled
events, so a crash half-way recovers the same way. If such a tasker comes back, its
reports are fenced: it is told to kill the superseded attempts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from crq.server.state import TASKER_READY, Event, State

from crq.wire import MODE_NORMAL

if TYPE_CHECKING:
    from crq.server.app import Server

log = logging.getLogger("crq.monitor")


def lose_tasker(state: State, name: str, reason: str, now: float) -> list[Event]:
    tasker = state.taskers[name]
    events: list[Event] = [{"e": "tasker_lost", "t": now, "name": name, "reason": reason}]
    for job_id in sorted(tasker.running):
        job = state.jobs[job_id]
        events.append(
            {"e": "recover", "t": now, "job": job_id, "attempt": job.attempt, "reason": reason}
        )
    return events


def silent(srv: Server, now: float) -> list[str]:
    """Ready taskers not heard from for tasker_timeout (counting from our start if never)."""
    limit = srv.settings.tasker_timeout
    out = []
    for name, t in srv.state.taskers.items():
        if t.state != TASKER_READY:
            continue
        link = srv.engine.links.get(name)
        last = link.last_contact if link is not None else srv.started_at
        if now - last > limit:
            out.append(name)
    return out


async def watch(srv: Server) -> None:
    engine = srv.engine
    period = max(0.2, min(1.0, srv.settings.tasker_timeout / 10))
    while True:
        await asyncio.sleep(period)
        if engine.mode != MODE_NORMAL or engine.shutting_down:
            continue
        now = time.time()
        for name in silent(srv, now):
            t = srv.state.taskers[name]
            log.warning(
                "tasker %s silent for over %.0f s: lost, recovering %d jobs",
                name,
                srv.settings.tasker_timeout,
                len(t.running),
            )
            engine.emit(lose_tasker(srv.state, name, f"tasker {name} lost (silent)", now))
            engine.links.pop(name, None)
