"""The error answers, one mapping for the hot routes (server/http/hot.py) and FastAPI's."""

from __future__ import annotations

import asyncio
import logging

from crq.server.asgi import error_body
from crq.server.journal import Deposed
from crq.server.models import BadRequest
from crq.server.service import Recovering, Service

log = logging.getLogger("crq.http")

Headers = dict[str, str]


def bad_request(e: BadRequest) -> tuple[int, bytes, Headers]:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else {}
    return e.status, error_body(e.code, e.message, **e.extra), headers


def recovering(e: Recovering) -> tuple[int, bytes, Headers]:
    left = e.progress.get("seconds_left") or 5
    body = error_body(
        "crash_recovery", "the queue is in crash recovery; retry later", recovery=e.progress
    )
    return 503, body, {"Retry-After": str(max(1, min(30, int(left))))}


def deposed(srv: Service, e: Deposed) -> tuple[int, bytes, Headers]:
    """Refused, and this server steps down (soon, not within the request)."""
    if srv.step_down is not None:
        asyncio.get_running_loop().call_soon(srv.step_down, str(e))
    body = error_body("standby", f"this server is no longer the leader ({e})", leader=None)
    return 503, body, {"Retry-After": "1"}


def internal(method: str, path: str, e: Exception) -> tuple[int, bytes, Headers]:
    log.exception("internal error on %s %s", method, path, exc_info=e)
    return 500, error_body("internal", f"internal error: {type(e).__name__}: {e}"), {}


def answer(srv: Service, method: str, path: str, e: Exception) -> tuple[int, bytes, Headers]:
    """The answer to an exception a handler raised."""
    if isinstance(e, BadRequest):
        return bad_request(e)
    if isinstance(e, Recovering):
        return recovering(e)
    if isinstance(e, Deposed):
        return deposed(srv, e)
    return internal(method, path, e)
