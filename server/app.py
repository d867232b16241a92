"""The HTTP app: the route groups of server/http/ under one set of error answers.

Every handler that answers from the state first awaits the journal barrier, so nothing
leaves the process before the events it reflects are durable (invariant 1).
"""

from __future__ import annotations

import asyncio
import logging

from crq.server.http import admin, jobs, taskers, ui
from crq.server.http.views import error, job_json
from crq.server.httplimits import BodyLimit
from crq.server.journal import Deposed
from crq.server.models import MAX_BODY, BadRequest, describe
from crq.server.openapi import allowed_methods, install_openapi
from crq.server.service import Recovering, Service
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from crq import __version__

log = logging.getLogger("crq.http")


def create_app(srv: Service) -> FastAPI:
    routes = [*jobs.routes(srv), *taskers.routes(srv), *admin.routes(srv), *ui.routes(srv)]
    app = FastAPI(
        title="crq",
        version=__version__,
        docs_url="/api/docs",
        redoc_url=None,
        openapi_url="/api/openapi.json",
        routes=routes,
    )
    install_openapi(app, lambda: srv.state.global_total)
    app.add_middleware(BodyLimit, limit=MAX_BODY)

    @app.exception_handler(BadRequest)
    async def _bad(request: Request, e: BadRequest) -> Response:
        resp = error(e.status, e.code, e.message)
        if e.status == 401:
            resp.headers["WWW-Authenticate"] = "Bearer"
        return resp

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> Response:
        return error(422, "invalid", describe(list(e.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        resp = error(e.status_code, code, f"{request.method} {request.url.path}: {e.detail}")
        resp.headers.update(e.headers or {})
        if e.status_code == 405:  # every method of the path, not only the first route's
            resp.headers["Allow"] = allowed_methods(app, request.scope)
        return resp

    @app.exception_handler(Recovering)
    async def _recovering(request: Request, e: Recovering) -> Response:
        left = e.progress.get("seconds_left") or 5
        resp = error(
            503,
            "crash_recovery",
            "the queue is in crash recovery; retry later",
            recovery=e.progress,
        )
        resp.headers["Retry-After"] = str(max(1, min(30, int(left))))
        return resp

    @app.exception_handler(Deposed)
    async def _deposed(request: Request, e: Deposed) -> Response:
        resp = error(503, "standby", f"this server is no longer the leader ({e})", leader=None)
        resp.headers["Retry-After"] = "1"
        if srv.step_down is not None:
            asyncio.get_running_loop().call_soon(srv.step_down, str(e))
        return resp

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception) -> Response:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error(500, "internal", f"internal error: {type(e).__name__}: {e}")

    return app


__all__ = ["create_app", "job_json"]
