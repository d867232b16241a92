"""The recovery monitor: taskers silent past ``tasker_timeout`` are declared lost.

Their running attempts are recovered (requeued at their old position if rerunnable with
attempts left, else lost) and their slots and resources released, all as journaled
events, so a crash half-way recovers the same way. If such a tasker comes back, its
reports are fenced: it is told to kill the superseded attempts. The loop that watches is
``tasks.watch``.
"""

from __future__ import annotations

from crq.server.service import Service
from crq.server.state import TASKER_READY


def silent(srv: Service, now: float) -> list[str]:
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
