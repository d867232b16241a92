"""The tasker routes: register and sync (hot, plain Starlette), and the tasker list."""

from __future__ import annotations

import logging
import math
import secrets
import time

from crq.server import commands
from crq.server.http import auth
from crq.server.http.views import API, JSON, dispatch_json, error, tasker_json
from crq.server.models import BadRequest, Register, Sync, parse_json, validate
from crq.server.service import Service
from crq.server.state import TASKER_LOST
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

log = logging.getLogger("crq.http")


def routes(srv: Service) -> list[BaseRoute]:
    engine = srv.engine
    router = APIRouter()

    async def register(request: Request) -> Response:
        name = request.path_params["name"]
        auth.tasker(srv, request)
        auth.check_name(name)
        secret = auth.session_secret(request)
        body = validate(Register, parse_json(await request.body()))
        issued = None
        if not secret:  # a tasker without a secret of its own gets one made here
            secret = issued = secrets.token_urlsafe(32)
        session = commands.session_hash(secret)
        now = time.time()
        link = engine.links.get(name)
        silent_for = now - (link.last_contact if link is not None else srv.started_at)
        held = srv.state.taskers.get(name)
        try:
            out = commands.register(
                srv.state, name, body, now, session, silent_for, srv.settings.tasker_timeout
            )
        except commands.NameInUse as e:
            log.warning("tasker %s from host %s pid %s refused: %s", name, body.host, body.pid, e)
            resp = error(e.status, e.code, e.message)
            resp.headers["Retry-After"] = str(max(1, math.ceil(e.retry_after)))
            return resp
        if held is not None and held.session and held.session != session:
            log.warning(
                "tasker %s taken over by a new session (host %s pid %s); the old one "
                "(host %s pid %s) was %s",
                name, body.host, body.pid, held.host, held.pid,
                held.state if held.state == TASKER_LOST else f"silent {silent_for:.0f} s",
            )  # fmt: skip
            if link is not None:
                link.kill.clear()  # orders for the old session's attempts, recovered now
        engine.emit(out.events)
        if srv.recovery is not None:
            srv.recovery.on_register(name, body, out)
        engine.touch(name, now)
        await engine.durable()
        answer = {
            "kill": [{"job": j, "attempt": a} for j, a in sorted(out.kill)],
            "ack": [{"job": j, "attempt": a} for j, a in out.ack],
            "heartbeat": srv.settings.heartbeat,
            "instance": srv.instance,
            "epoch": srv.epoch,
            "queue_id": srv.queue_id,
        }
        if issued is not None:
            answer["session"] = issued
        return JSON(answer)

    async def sync(request: Request) -> Response:
        name = request.path_params["name"]
        auth.tasker(srv, request)
        body = validate(Sync, parse_json(await request.body()))
        st = srv.state
        tasker = st.taskers.get(name)
        if tasker is None or name not in engine.links or tasker.state == TASKER_LOST:
            raise BadRequest(409, "unknown_tasker", f"tasker {name} must register first")
        session = auth.sync_session(request, tasker)
        now = time.time()
        link = engine.touch(name, now)
        out = commands.reports(st, name, body.started, body.finished, now, session=session)
        engine.emit(out.events)
        reported = {(r.job, r.attempt) for r in body.started} | {
            (r.job, r.attempt) for r in body.finished
        }
        deadline = now + min(body.wait, srv.settings.heartbeat * 3)
        send, kill = await engine.wait_orders(link, session, body.running, reported, out, deadline)
        await engine.durable()
        if tasker.session == session:
            link.last_contact = time.time()
        return JSON(
            {
                "dispatch": [dispatch_json(st, job) for job in send],
                "kill": [{"job": j, "attempt": a} for j, a in sorted(kill)],
                "ack": [{"job": j, "attempt": a} for j, a in out.ack],
                "shutdown": engine.shutting_down and not engine.freeze,
                "epoch": srv.epoch,
                "queue_id": srv.queue_id,
            }
        )

    @router.get(API + "/taskers")
    async def taskers(request: Request) -> Response:
        auth.client(srv, request)
        out = [tasker_json(srv, t.name) for t in srv.state.taskers.values()]
        await engine.durable()
        return JSON({"taskers": out})

    return [
        *router.routes,
        Route(API + "/taskers/{name}/register", register, methods=["POST"]),
        Route(API + "/taskers/{name}/sync", sync, methods=["POST"]),
    ]
