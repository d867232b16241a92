"""The dashboard's read routes: jobs newest first with search, why a job waits, the series.

Read-only and answered from memory, with the auth of every other read route (any role;
refused during crash recovery like them).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from crq.server.http import auth
from crq.server.http.views import API, JSON, job_json
from crq.server.models import BadRequest
from crq.server.samples import FIELDS
from crq.server.service import Service
from crq.server.state import Job
from crq.server.why import why
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from crq.wire import JOB_STATES

SCAN_BUDGET = 100_000  # ids one request examines, at most (as GET /jobs)
MAX_LIMIT = 1000


def _matches(job: Job, q: str, qb: bytes) -> bool:
    """``q`` in the id, the name (any case) or the command (as written)."""
    return q == str(job.id) or q in job.name.lower() or qb in job.spec.lower()


def routes(srv: Service) -> list[BaseRoute]:
    engine = srv.engine
    router = APIRouter()

    @router.get(API + "/dash/jobs")
    async def dash_jobs(
        request: Request,
        state: str = "",
        user: str = "",
        q: str = "",
        before: int = 0,
        limit: int = 200,
    ) -> Response:
        """Newest first; ``state`` may name several (``failed,lost``); ``before``: paging."""
        await auth.client(srv, request)
        states = {s for s in state.split(",") if s}
        bad = states - set(JOB_STATES)
        if bad:
            raise BadRequest(400, "invalid", f"state: must be of {', '.join(JOB_STATES)}")
        limit = max(1, min(limit, MAX_LIMIT))
        st = srv.state
        top = st.next_id - 1 if before <= 0 else min(before - 1, st.next_id - 1)
        ql = q.strip().lower()
        qb = ql.encode()
        out: list[dict[str, Any]] = []
        users: set[str] = set()
        nxt = None
        ids: Iterable[int] = range(top, 0, -1)
        budget = SCAN_BUDGET
        for job_id in ids:
            if budget == 0:
                nxt = job_id + 1
                break
            budget -= 1
            job = st.jobs.get(job_id)
            if job is None:
                continue
            users.add(job.user)
            if states and job.state not in states:
                continue
            if user and job.user != user:
                continue
            if ql and not _matches(job, ql, qb):
                continue
            if len(out) == limit:
                nxt = out[-1]["id"]
                break
            out.append(job_json(st, job, full=False))
        await engine.durable()
        return JSON({"jobs": out, "next": nxt, "users": sorted(users)})

    @router.get(API + "/jobs/{job_id}/why")
    async def job_why(request: Request, job_id: int) -> Response:
        await auth.client(srv, request)
        job = srv.state.jobs.get(job_id)
        if job is None:
            raise BadRequest(404, "not_found", f"no job {job_id}")
        out = why(srv.state, job, set(engine.links))
        await engine.durable()
        return JSON(out)

    @router.get(API + "/stats/series")
    async def series(request: Request, since: float = 0.0) -> Response:
        """Samples taken at or after ``since`` (epoch seconds; negative: that many seconds
        back from now), oldest first, each a list in the order of ``fields``."""
        await auth.client(srv, request)
        if since < 0:
            since = time.time() + since
        sampler = srv.samples
        rows = sampler.since(since) if sampler is not None else []
        interval = sampler.interval if sampler is not None else srv.settings.sample_interval
        return JSON({"fields": list(FIELDS), "interval": interval, "samples": rows})

    return list(router.routes)
