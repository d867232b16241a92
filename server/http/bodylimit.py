"""The body limit of the full app (the hot routes read theirs in server/asgi.py)."""

from __future__ import annotations

from typing import Any

from crq.server.models import BadRequest
from starlette.requests import ClientDisconnect

Scope = dict[str, Any]
Message = dict[str, Any]


class BodyLimit:
    """ASGI middleware: a body over ``limit`` bytes is refused (413) as soon as it is.

    A declared Content-Length over the limit is refused on the first read, before any
    byte of the body; a chunked body as soon as the running count passes it. The refusal
    is raised from ``receive``, so the handler's own error handling answers it, and the
    reply closes the connection so the rest of the body is not read. A client gone
    mid-body (or timed out, see ``http_protocol``) is no internal error.
    """

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit
        declared = 0
        for name, value in scope["headers"]:
            if name == b"content-length":
                declared = int(value) if value.isdigit() else 0
                break
        seen = 0
        refused = False

        def too_large() -> BadRequest:
            nonlocal refused
            refused = True
            return BadRequest(413, "too_large", f"request body over {limit} bytes")

        async def limited_receive() -> Message:
            nonlocal seen
            if declared > limit:
                raise too_large()
            message: Message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise too_large()
            return message

        async def closing_send(message: Message) -> None:
            if refused and message["type"] == "http.response.start":
                message = {**message, "headers": [*message["headers"], (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, limited_receive, closing_send)
        except ClientDisconnect:
            pass  # gone mid-body (or timed out): no one to answer, nothing to log
