"""Bare ASGI: headers, bodies and JSON answers without Starlette.

What the boot app, the standby and the hot routes need of HTTP, and no more: a Starlette
``Request`` and ``Response`` per call cost more than the rest of a submit, and importing
Starlette (or FastAPI, pydantic) would delay the first answer of a restarted server.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

import orjson

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

JSON_TYPE = (b"content-type", b"application/json")
CLOSE = (b"connection", b"close")


class TooLarge(Exception):
    """A request body over the limit (413); the answer closes the connection."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body over {limit} bytes")


class Disconnected(Exception):
    """The client went away mid-body: no one to answer."""


def headers_of(scope: Scope) -> dict[str, str]:
    """The request's headers by lower-case name; the first of a repeated one (as Starlette)."""
    out: dict[str, str] = {}
    for name, value in scope["headers"]:
        key = name.decode("latin-1")
        if key not in out:
            out[key] = value.decode("latin-1")
    return out


async def read_body(receive: Receive, headers: dict[str, str], limit: int) -> bytes:
    """The whole body; refused as soon as it is over ``limit`` (a declared length before
    any byte is read, a chunked one once the running count passes it)."""
    declared = headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise TooLarge(limit)
    message = await receive()
    if message["type"] == "http.disconnect":
        raise Disconnected()
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        if len(body) > limit:
            raise TooLarge(limit)
        return body
    chunks = [body]
    seen = len(body)
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Disconnected()
        chunk = message.get("body", b"")
        seen += len(chunk)
        if seen > limit:
            raise TooLarge(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def send_json(
    send: Send, status: int, body: bytes, headers: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    """One complete JSON answer (the headers Starlette's ``Response`` would give)."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-length", b"%d" % len(body)), JSON_TYPE, *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


def error_body(code: str, message: str, **extra: Any) -> bytes:
    """The error answer of every route: ``{"error", "message", …}``."""
    return orjson.dumps({"error": code, "message": message, **extra})


def encode_headers(headers: dict[str, str] | None) -> list[tuple[bytes, bytes]]:
    if not headers:
        return []
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
