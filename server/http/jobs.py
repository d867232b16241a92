"""The client routes on jobs: submit and get (server/http/hot.py), list, wait, control."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import Any, Literal

from crq.server import commands, identity
from crq.server.events import Event
from crq.server.http import auth
from crq.server.http.adapt import endpoint
from crq.server.http.hot import Call, Handlers
from crq.server.http.views import API, JSON, job_json, may_see_private
from crq.server.models import BadRequest, BulkControl, Ended, parse_json, validate
from crq.server.service import Service
from crq.server.state import Job, State
from fastapi import APIRouter, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from crq.wire import (
    JOB_STATES,
    QUEUED,
    RUNNING,
    WAITING,
)

SCAN_BUDGET = 100_000  # ids one page request may examine
CONTROL_SLICE = 500  # ids of a bulk control between two turns of the event loop
Control = Callable[[State, int, float, str | None], list[Event]]


def routes(srv: Service) -> list[BaseRoute]:
    engine = srv.engine
    hot = Handlers(srv)
    router = APIRouter()

    @router.get(API + "/jobs")
    async def list_jobs(
        request: Request,
        state: str | None = None,
        user: str | None = None,
        limit: int = 1000,
        after: int = 0,
        array: int | None = None,
        order: Literal["asc", "desc"] = "asc",
        before: int = 0,
    ) -> Response:
        """Oldest first from ``after``; with ``order=desc`` newest first, from below ``before``
        (0: the newest) down to ``after``. Either way ``next`` is where the next page starts:
        give it as ``after`` (asc) or ``before`` (desc)."""
        await auth.client(srv, request)
        if state is not None and state not in JOB_STATES:
            raise BadRequest(400, "invalid", f"state: must be one of {', '.join(JOB_STATES)}")
        limit = max(1, min(limit, 10_000))
        out: list[dict[str, Any]] = []
        nxt = None
        st = srv.state
        low, high = max(after, 0) + 1, st.next_id  # the ids to look at: low <= id < high
        if array is not None:  # the elements of one array: its range of ids
            arr = st.arrays.get(array)
            if arr is None:
                raise BadRequest(404, "not_found", f"no array {array}")
            low, high = max(arr.first, low), arr.first + arr.count
        ids: Iterable[int]
        if order == "desc":
            if before > 0:
                high = min(high, before)
            ids, last = range(high - 1, low - 1, -1), high
        else:
            # ids are monotonic: a page after N starts at N+1 instead of from the first
            ids = st.jobs.keys() if after <= 0 and array is None else range(low, high)
            last = after
        # A sparse filter (a few running jobs among a million) would walk every id in one
        # go and stall the event loop: stop after SCAN_BUDGET ids and give ``next`` so the
        # client goes on from there. A page may then be short, even empty, with a ``next``.
        budget = SCAN_BUDGET
        for job_id in ids:
            if budget == 0:
                nxt = last
                break
            budget -= 1
            job = st.jobs.get(job_id)
            if (
                job is not None
                and (not state or job.state == state)
                and (not user or job.user == user)
            ):
                if len(out) == limit:
                    nxt = out[-1]["id"]
                    break
                out.append(job_json(st, job, full=False))
            last = job_id
        await engine.durable()
        return JSON({"jobs": out, "next": nxt})

    def _get_job(job_id: int) -> Job:
        job = srv.state.jobs.get(job_id)
        if job is None:
            raise BadRequest(404, "not_found", f"no job {job_id}")
        return job

    @router.get(API + "/jobs/{job_id}")
    async def get_job(request: Request, job_id: int) -> Response:
        call = Call(request.headers, request.body, {"job_id": str(job_id)})
        status, payload, _ = await hot.get_job(call)
        return JSON(payload, status_code=status)

    @router.get(API + "/jobs/{job_id}/wait")
    async def wait_job(request: Request, job_id: int, timeout: float = 30.0) -> Response:
        who = await auth.client(srv, request)
        job = _get_job(job_id)
        if job.state in (QUEUED, WAITING, RUNNING):
            await engine.wait_final(job_id, max(0.0, min(timeout, 300.0)))
        await engine.durable()
        job = srv.state.jobs.get(job_id, job)
        return JSON(job_json(srv.state, job, private=may_see_private(who, job)))

    @router.post(API + "/ended")
    async def ended_jobs(request: Request, timeout: float = 30.0) -> Response:
        """The jobs of ``ids`` that have ended, at once when there are any; else a long poll
        until one does, or any job above ``newer_than`` does (a job whose id the watcher
        does not know yet: its submit's answer may still be on the way), at most ``timeout``
        s. One request watches many jobs (crq.client.Executor). A read: nothing journaled.
        Ids the server does not hold come back in ``unknown``; ``pending`` counts the rest."""
        await auth.client(srv, request)
        body = await request.body()
        want = validate(Ended, parse_json(body) if body else {})
        timeout = max(0.0, min(timeout, 300.0))
        st = srv.state

        def answer() -> tuple[list[dict[str, Any]], list[int], list[int]]:
            ended: list[dict[str, Any]] = []
            unknown: list[int] = []
            pending: list[int] = []
            for job_id in want.ids:
                job = st.jobs.get(job_id)
                if job is None:
                    unknown.append(job_id)
                elif job.state in (QUEUED, WAITING, RUNNING):
                    pending.append(job_id)
                else:
                    ended.append(job_json(st, job, full=False))
            return ended, unknown, pending

        ended, unknown, pending = answer()
        if not ended and not unknown and (pending or want.newer_than is not None):
            await engine.wait_any(pending, want.newer_than, timeout)
            ended, unknown, pending = answer()
        await engine.durable()
        return JSON({"jobs": ended, "unknown": unknown, "pending": len(pending)})

    @router.get(API + "/queue")
    async def queue(request: Request) -> Response:
        await auth.client(srv, request)
        ids = list(srv.state.queue_order())
        await engine.durable()
        return JSON({"ids": ids})

    async def _may(request: Request, action: str, job_id: int) -> str:
        """Who asks: a user for its own job, an operator or admin for any (403 else)."""
        who = await auth.client(srv, request)
        identity.control(who, action, job_id, _get_job(job_id).user)
        return who.user

    async def _control(request: Request, job_id: int, action: str, command: Control) -> Response:
        by = await _may(request, action, job_id)
        engine.emit(command(srv.state, job_id, time.time(), by))
        await engine.durable()
        return JSON(job_json(srv.state, _get_job(job_id)))

    commands_of: dict[str, Control] = {
        "stop": commands.stop,
        "rerun": commands.rerun,
        "hold": commands.hold,
        "release": commands.release,
        "forget": commands.forget,
    }

    @router.post(API + "/control")
    async def control_many(request: Request) -> Response:
        """One action on many jobs (``crq stop --user U``, the UI's bulk rerun): each id is
        checked and applied as its own route would, in order, and one durable wait answers
        them all. Per id: 200 with the job's state, or the status and error its route gives."""
        who = await auth.client(srv, request, auth.USER, "control jobs")
        want = validate(BulkControl, parse_json(await request.body()))
        command = commands_of[want.action]
        results: list[dict[str, Any]] = []
        for n, job_id in enumerate(want.ids):
            if n and n % CONTROL_SLICE == 0:
                await asyncio.sleep(0)  # a long list lets other requests through
            try:
                identity.control(who, want.action, job_id, _get_job(job_id).user)
                engine.emit(command(srv.state, job_id, time.time(), who.user))
            except BadRequest as e:
                results.append(
                    {"id": job_id, "status": e.status, "error": e.code, "message": e.message}
                    | e.extra
                )
                continue
            results.append({"id": job_id, "status": 200})
        await engine.durable()
        st = srv.state
        for r in results:
            if r["status"] != 200:
                continue
            if want.action == "forget":
                r["forgotten"] = True
            elif (job := st.jobs.get(r["id"])) is not None:
                w = st.waits.get(job.id)
                r.update(
                    state=job.state,
                    tasker=job.tasker,
                    reason=w.reason() if w is not None else job.reason,
                )
        failed = sum(r["status"] != 200 for r in results)
        return JSON({"results": results, "ok": len(results) - failed, "failed": failed})

    @router.post(API + "/jobs/{job_id}/stop")
    async def stop_job(request: Request, job_id: int) -> Response:
        return await _control(request, job_id, "stop", commands.stop)

    @router.post(API + "/jobs/{job_id}/rerun")
    async def rerun_job(request: Request, job_id: int) -> Response:
        return await _control(request, job_id, "rerun", commands.rerun)

    @router.post(API + "/jobs/{job_id}/hold")
    async def hold_job(request: Request, job_id: int) -> Response:
        return await _control(request, job_id, "hold", commands.hold)

    @router.post(API + "/jobs/{job_id}/release")
    async def release_job(request: Request, job_id: int) -> Response:
        return await _control(request, job_id, "release", commands.release)

    @router.delete(API + "/jobs/{job_id}")
    async def forget_job(request: Request, job_id: int) -> Response:
        by = await _may(request, "forget", job_id)
        engine.emit(commands.forget(srv.state, job_id, time.time(), by))
        await engine.durable()
        return JSON({"id": job_id, "forgotten": True})

    return [Route(API + "/jobs", endpoint(hot.submit), methods=["POST"]), *router.routes]
