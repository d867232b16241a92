"""Who may call what: the admin token (clients, as a user), the tasker token, sessions."""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from typing import Protocol

from crq.server import commands
from crq.server.models import BadRequest
from crq.server.service import Recovering, Service
from crq.server.state import Tasker

from crq.wire import MODE_RECOVERING, SESSION_HEADER, USER_HEADER, valid_tasker_name


class Request(Protocol):
    """What the checks read of a request: its headers (a Starlette request, a hot call)."""

    @property
    def headers(self) -> Mapping[str, str]: ...


def token(request: Request) -> bytes:
    """The credentials of ``Authorization: Bearer <token>``; the scheme is case-insensitive
    (RFC 7235), so ``bearer`` and ``BEARER`` do too."""
    scheme, _, tok = request.headers.get("authorization", "").strip().partition(" ")
    tok = tok.strip()
    if scheme.lower() != "bearer" or not tok:
        raise BadRequest(401, "unauthorized", "missing bearer token (Authorization: Bearer …)")
    return tok.encode()


def client(srv: Service, request: Request) -> str:
    """Admits an admin-token holder outside crash recovery; returns the user."""
    if not hmac.compare_digest(token(request), srv.admin_token):
        if hmac.compare_digest(token(request), srv.tasker_token):
            raise BadRequest(403, "forbidden", "the tasker token opens only tasker endpoints")
        raise BadRequest(401, "unauthorized", "bad token")
    if srv.engine.mode == MODE_RECOVERING:
        raise Recovering(srv.progress() or {})
    return request.headers.get(USER_HEADER.lower()) or "admin"


def admin(srv: Service, request: Request) -> None:
    if not hmac.compare_digest(token(request), srv.admin_token):
        raise BadRequest(401, "unauthorized", "bad token: this needs the admin token")


def tasker(srv: Service, request: Request) -> None:
    tok = token(request)
    if not (
        hmac.compare_digest(tok, srv.tasker_token) or hmac.compare_digest(tok, srv.admin_token)
    ):
        raise BadRequest(401, "unauthorized", "bad tasker token")


def any_token(srv: Service, request: Request) -> None:
    """The admin or the tasker token (the server status)."""
    tok = token(request)
    if not (
        hmac.compare_digest(tok, srv.admin_token) or hmac.compare_digest(tok, srv.tasker_token)
    ):
        raise BadRequest(401, "unauthorized", "bad token")


def check_name(name: str) -> None:
    if not valid_tasker_name(name):
        raise BadRequest(422, "invalid", f"bad tasker name {name[:40]!r}")


def session_secret(request: Request) -> str:
    """The session secret a tasker request shows ("" if none); a malformed one is refused."""
    secret = request.headers.get(SESSION_HEADER.lower(), "")
    if secret and not (
        16 <= len(secret) <= 256 and all(c.isascii() and (c.isalnum() or c in "-_") for c in secret)
    ):
        raise BadRequest(
            422, "invalid", f"{SESSION_HEADER}: 16 to 256 characters of A-Z a-z 0-9 - _"
        )
    return secret


def sync_session(request: Request, tasker: Tasker) -> str:
    """The hash of the request's session, which must be the one holding the name."""
    secret = session_secret(request)
    session = commands.session_hash(secret) if secret else ""
    if not session or not hmac.compare_digest(session, tasker.session):
        why = "shows no session" if not secret else "shows another session"
        raise BadRequest(
            409,
            "wrong_session",
            f"tasker name {tasker.name} is held by the session that registered it (host "
            f"{tasker.host}, pid {tasker.pid}); this request {why} ({SESSION_HEADER}): "
            "register first",
        )
    return session
