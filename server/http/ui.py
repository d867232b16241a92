"""Probes, metrics and the browser UI's files."""

from __future__ import annotations

from pathlib import Path

from crq.server.http.views import JSON, error
from crq.server.metrics import render
from crq.server.models import BadRequest
from crq.server.pages import recovery_page, wants_html
from crq.server.service import Service
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, Response
from starlette.routing import BaseRoute

from crq.wire import MODE_NORMAL, MODE_RECOVERING

STATIC = Path(__file__).parent.parent / "static"


def routes(srv: Service) -> list[BaseRoute]:
    engine = srv.engine
    router = APIRouter()

    @router.get("/healthz")
    async def healthz() -> Response:
        return JSON({"ok": True})

    @router.get("/readyz")
    async def readyz() -> Response:
        if engine.mode != MODE_NORMAL:
            return error(
                503, "crash_recovery", "the queue is in crash recovery", recovery=srv.progress()
            )
        return JSON({"ok": True, "mode": engine.mode})

    @router.get("/metrics")
    async def metrics() -> Response:
        body, content_type = render(srv)
        return Response(body, media_type=content_type)

    @router.get("/")
    async def index(request: Request) -> Response:
        if engine.mode == MODE_RECOVERING:
            if wants_html(request.headers.get("accept", "")):
                page = recovery_page(srv.settings.queue, srv.progress())
                headers = {"Retry-After": "1", "Cache-Control": "no-store"}
                return HTMLResponse(page, 503, headers)
            return error(
                503,
                "crash_recovery",
                "the queue is in crash recovery; retry later",
                recovery=srv.progress(),
            )
        return FileResponse(STATIC / "index.html")

    @router.get("/static/{name}")
    async def static(name: str) -> Response:
        kinds = {"app.js": "text/javascript", "style.css": "text/css"}  # a whitelist: no paths
        if name not in kinds:
            raise BadRequest(404, "not_found", f"no static file {name[:40]!r}")
        return FileResponse(STATIC / name, media_type=kinds[name])

    return list(router.routes)
