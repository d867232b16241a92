"""``GET /api/v1/history``: the jobs that left the queue, like sacct (server/history.py).

As ``GET /api/v1/jobs``, any client sees every user's jobs (``user=`` filters). The answer
includes every forget acknowledged before the request (it waits, briefly, for the writer);
the SQLite query runs in a thread of its own, on a read-only connection, never on the loop.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from crq.server import history
from crq.server.http import auth
from crq.server.http.views import API, JSON
from crq.server.models import BadRequest
from crq.server.service import Service
from fastapi import APIRouter, Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from crq.wire import JOB_STATES

#: what a forgotten job can be: ended, or never run (queued, waiting), never running
STATES = tuple(dict.fromkeys((*JOB_STATES, "waiting")))
CATCH_UP = 5.0  # seconds a query waits for the writer at most, then answers what is there


def routes(srv: Service) -> list[BaseRoute]:
    router = APIRouter()
    pool = ThreadPoolExecutor(4, thread_name_prefix="crq-history-query")
    path = history.db_path(srv.settings.swd)

    @router.get(API + "/history")
    async def get_history(
        request: Request,
        user: str | None = None,
        state: str | None = None,
        since: str | None = None,
        until: str | None = None,
        name: str | None = None,
        limit: int = 100,
        after: int = 0,
    ) -> Response:
        await auth.client(srv, request)
        q = _query(user, state, since, until, name, limit, after)
        target = srv.state.seq
        await srv.engine.durable()
        loop = asyncio.get_running_loop()
        writer = srv.history
        if writer is not None:
            await loop.run_in_executor(pool, writer.wait_through, target, CATCH_UP)
        rows, nxt = await loop.run_in_executor(pool, history.query, path, q)
        return JSON({"jobs": rows, "next": nxt})

    return list(router.routes)


def _query(
    user: str | None,
    state: str | None,
    since: str | None,
    until: str | None,
    name: str | None,
    limit: int,
    after: int,
) -> history.Query:
    """The checked filters: a bad one is a 422 naming it, and nothing is read."""
    if state is not None and state not in STATES:
        raise BadRequest(422, "invalid", f"state: one of {', '.join(STATES)}")
    if not 1 <= limit <= history.MAX_LIMIT:
        raise BadRequest(422, "invalid", f"limit: from 1 to {history.MAX_LIMIT}")
    if after < 0:
        raise BadRequest(422, "invalid", "after: a job id (the `next` of the previous page)")
    times: list[float | None] = []
    for field, text in (("since", since), ("until", until)):
        try:
            times.append(None if text is None else history.parse_time(text))
        except ValueError as e:
            raise BadRequest(422, "invalid", f"{field}: {e}") from None
    return history.Query(user, state, times[0], times[1], name, limit, after)
