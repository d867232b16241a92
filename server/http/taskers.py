"""The tasker routes: register and sync (server/http/hot.py), and the tasker list."""

from __future__ import annotations

from crq.server.http import auth
from crq.server.http.adapt import endpoint
from crq.server.http.hot import Handlers
from crq.server.http.views import API, JSON, tasker_json
from crq.server.service import Service
from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route


def routes(srv: Service) -> list[BaseRoute]:
    engine = srv.engine
    hot = Handlers(srv)
    router = APIRouter()

    @router.get(API + "/taskers")
    async def taskers(request: Request) -> Response:
        await auth.client(srv, request)
        out = [tasker_json(srv, t.name) for t in srv.state.taskers.values()]
        await engine.durable()
        return JSON({"taskers": out})

    return [
        *router.routes,
        Route(API + "/taskers/{name}/register", endpoint(hot.register), methods=["POST"]),
        Route(API + "/taskers/{name}/sync", endpoint(hot.sync), methods=["POST"]),
    ]
