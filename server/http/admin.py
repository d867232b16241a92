"""The admin routes: server status, stop, the sanity check and manual recovery (cleanup)."""

from __future__ import annotations

import time
from collections.abc import Callable

from crq.server import cleanup, commands, identity
from crq.server.events import Event
from crq.server.http import auth
from crq.server.http.hot import Call, Handlers
from crq.server.http.views import API, JSON
from crq.server.models import BadRequest, Failover, StopServer, parse_json, validate
from crq.server.service import Service
from fastapi import APIRouter, Request
from starlette.responses import Response
from starlette.routing import BaseRoute


def routes(srv: Service) -> list[BaseRoute]:
    engine = srv.engine
    hot = Handlers(srv)
    router = APIRouter()

    @router.get(API + "/server")
    async def server_info(request: Request) -> Response:
        call = Call(request.headers, request.body, {})
        status, payload, _ = await hot.server_info(call)
        return JSON(payload, status_code=status)

    @router.post(API + "/server/stop")
    async def server_stop(request: Request) -> Response:
        await auth.admin(srv, request, "stop the server")
        body = await request.body()
        freeze = validate(StopServer, parse_json(body) if body else {}).freeze
        srv.request_stop(freeze)
        return JSON({"stopping": True, "freeze": freeze})

    @router.post(API + "/server/failover")
    async def server_failover(request: Request) -> Response:
        """Hand leadership over on purpose (``ncmgr failover``, as ``scontrol takeover``)."""
        await auth.admin(srv, request, "hand the queue over")
        body = await request.body()
        to = validate(Failover, parse_json(body) if body else {}).to
        live = srv.standbys()
        if not live:
            raise BadRequest(
                409, "no_standby", f"queue {srv.settings.queue} has no standby to take over"
            )
        srv.hand_over(to)
        return JSON({"handing_over": True, "to": to, "standbys": live}, status_code=202)

    @router.post(API + "/server/sanity")
    async def sanity(request: Request, fix: int = 0) -> Response:
        await _operator(request, "run the sanity check")
        result = srv.sanity(bool(fix))
        await engine.durable()
        return JSON(result)

    # -- manual recovery (ncmgr cleanup) -------------------------------------------------

    @router.get(API + "/cleanup")
    async def cleanup_list(request: Request) -> Response:
        await _operator(request, "list incomplete jobs")
        contact = {n: link.last_contact for n, link in engine.links.items()}
        out = cleanup.incomplete(srv.state, contact, time.time(), srv.settings.heartbeat)
        await engine.durable()
        return JSON({"incomplete": out})

    async def _operator(request: Request, what: str) -> str:
        """An operator or admin, in any mode (cleanup and sanity serve recovery too)."""
        who = await auth.identify(srv, request)
        if who.role == auth.TASKER:
            raise BadRequest(
                401, "unauthorized", "bad token: this needs the admin token or an operator"
            )
        identity.require(who, identity.OPERATOR, what)
        return who.user

    async def _cleanup(request: Request, make: Callable[[str], list[Event]]) -> Response:
        by = await _operator(request, "recover jobs by hand (cleanup)")
        events = make(by)
        engine.emit(events)
        done = cleanup.summary(srv.state, events)  # before the next dispatch pass runs
        await engine.durable()
        return JSON({"recovered": done})

    @router.post(API + "/cleanup/jobs/{job_id}")
    async def cleanup_job(request: Request, job_id: int) -> Response:
        return await _cleanup(
            request, lambda by: commands.recover_job(srv.state, job_id, time.time(), by)
        )

    @router.post(API + "/cleanup/hosts/{host}")
    async def cleanup_host(request: Request, host: str) -> Response:
        return await _cleanup(request, lambda _: commands.dead_host(srv.state, host, time.time()))

    return list(router.routes)
