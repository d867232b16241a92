"""The HTTP app: the route groups of server/http/ under one set of error answers.

Every handler that answers from the state first awaits the journal barrier, so nothing
leaves the process before the events it reflects are durable (invariant 1).
"""

from __future__ import annotations

from crq.server.http import admin, dash, errors, history, jobs, logs, taskers, tokens, ui
from crq.server.http.bodylimit import BodyLimit
from crq.server.http.hot import Hot
from crq.server.http.views import error, job_json
from crq.server.journal import Deposed
from crq.server.models import MAX_BODY, BadRequest, describe
from crq.server.openapi import allowed_methods, install_openapi
from crq.server.service import Recovering, Service
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from crq import __version__


def serving_app(srv: Service) -> Hot:
    """The whole app at once: the hot router with the full app behind it. (A server builds
    the two apart: it serves the hot routes before the full app is in.)"""
    hot = Hot(srv)
    hot.install(create_app(srv))
    return hot


def _json(answer: tuple[int, bytes, dict[str, str]]) -> Response:
    status, body, headers = answer
    return Response(body, status, headers or None, "application/json")


def create_app(srv: Service) -> FastAPI:
    routes = [*jobs.routes(srv), *taskers.routes(srv), *admin.routes(srv), *tokens.routes(srv)]
    routes += history.routes(srv)
    routes += logs.routes(srv)
    routes += dash.routes(srv)
    routes += ui.routes(srv)
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
        return _json(errors.bad_request(e))

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
        return _json(errors.recovering(e))

    @app.exception_handler(Deposed)
    async def _deposed(request: Request, e: Deposed) -> Response:
        return _json(errors.deposed(srv, e))

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception) -> Response:
        return _json(errors.internal(request.method, request.url.path, e))

    return app


__all__ = ["create_app", "job_json", "serving_app"]
