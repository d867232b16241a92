"""The hot handlers (server/http/hot.py) as Starlette endpoints, for the full app."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from crq.server.http.hot import Call, Handler
from crq.server.http.views import JSON
from starlette.requests import Request
from starlette.responses import Response


def endpoint(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    async def serve(request: Request) -> Response:
        status, payload, headers = await handler(
            Call(request.headers, request.body, request.path_params)
        )
        return JSON(payload, status_code=status, headers=headers)

    return serve
