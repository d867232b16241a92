"""Who is calling (SPEC section 9), and the tasker sessions.

In order: a MUNGE credential (``Authorization: Munge <cred>``: uid and gid as munged vouches
for them), a personal token (``Bearer crq_…``: kept hashed), the swd's admin token (the queue
owner's, admin; ``X-Crq-User`` names the user it acts for: that user owns what it submits,
and only the admin token may name one), the tasker token (tasker routes only). A MUNGE decode
is a round trip to munged (~0.1 ms), so it runs in a worker thread, many per hand-off, while
the event loop goes on (server/http/mungepool.py); a token costs one sha256 and a dict lookup.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Mapping
from typing import Protocol

from crq.server import commands
from crq.server.http import mungepool
from crq.server.identity import (
    ADMIN,
    OPERATOR,
    READONLY,
    TOKEN_PREFIX,
    USER,
    Identity,
    groups_of,
    owner_name,
    require,
    role_of,
    token_hash,
    valid_user,
)
from crq.server.models import BadRequest
from crq.server.service import Recovering, Service
from crq.server.state import Tasker

from crq import munge
from crq.wire import MODE_RECOVERING, SESSION_HEADER, USER_HEADER, valid_tasker_name

TASKER = "tasker"  # the role of the tasker token (tasker routes only)


class Request(Protocol):
    """What the checks read of a request: its headers (a Starlette request, a hot call)."""

    @property
    def headers(self) -> Mapping[str, str]: ...


def _credentials(request: Request) -> tuple[str, str]:
    """``Authorization``'s scheme (lower case) and credentials; the scheme is
    case-insensitive (RFC 7235)."""
    scheme, _, cred = request.headers.get("authorization", "").strip().partition(" ")
    cred = cred.strip()
    scheme = scheme.lower()
    if scheme not in ("bearer", "munge") or not cred:
        raise BadRequest(
            401, "unauthorized", "missing credentials (Authorization: Bearer <token> or Munge …)"
        )
    return scheme, cred


def token(request: Request) -> bytes:
    """The credentials of ``Authorization: Bearer <token>``."""
    scheme, cred = _credentials(request)
    if scheme != "bearer":
        raise BadRequest(401, "unauthorized", "missing bearer token (Authorization: Bearer …)")
    return cred.encode()


async def _munge_identity(srv: Service, cred: str, taskers: bool) -> Identity:
    """munged's answer (server/http/mungepool.py), then the names of this host."""
    s = srv.settings
    try:
        got = await mungepool.decoder(s.munge_socket or None).decode(cred)
    except munge.MungeError as e:
        raise BadRequest(401, "unauthorized", f"MUNGE credential refused: {e}") from None
    if got.user is None:
        raise BadRequest(
            401, "unauthorized", f"MUNGE credential of uid {got.uid}, unknown on this host"
        )
    user = got.user
    groups = groups_of(user, got.gid)
    if taskers and user in (s.tasker_users or ["root", owner_name()]):
        return Identity(user, TASKER, "munge", got.uid, groups)
    return Identity(user, role_of(s.roles, user, groups), "munge", got.uid, groups)


def _token_identity(srv: Service, tok: bytes, acting_for: str | None) -> Identity | None:
    """The identity of a bearer token, None for the tasker token."""
    if hmac.compare_digest(tok, srv.admin_token):
        # acting for a user (X-Crq-User: the CLI sends its unix user, a gateway its
        # users'): jobs are that user's, the role stays the token's
        return Identity(acting_for or owner_name(), ADMIN, "admin_token")
    if hmac.compare_digest(tok, srv.tasker_token):
        return None
    if tok.startswith(TOKEN_PREFIX.encode()):
        entry = srv.state.token_by_hash.get(token_hash(tok))
        if entry is not None:
            if entry.expires is not None and entry.expires <= time.time():
                raise BadRequest(401, "unauthorized", f"token {entry.id} expired")
            groups = groups_of(entry.user)
            role = entry.role or role_of(srv.settings.roles, entry.user, groups)
            return Identity(entry.user, role, "token", None, groups, entry.id)
    raise BadRequest(401, "unauthorized", "bad token")


async def identify(srv: Service, request: Request, taskers: bool = False) -> Identity:
    """Who the request comes from, in any mode; the tasker token is ``role`` tasker."""
    scheme, cred = _credentials(request)
    if scheme == "munge":
        return await _munge_identity(srv, cred, taskers)
    acting_for = request.headers.get(USER_HEADER.lower()) or None
    if acting_for is not None and not valid_user(acting_for):
        raise BadRequest(
            422, "invalid", f"{USER_HEADER}: a user name (letters, digits, . _ -; up to 64)"
        )
    who = _token_identity(srv, cred.encode(), acting_for)
    if who is None:
        return Identity("tasker", TASKER, "tasker_token")
    if acting_for and acting_for != who.user and who.via != "admin_token":
        raise BadRequest(403, "forbidden", f"{USER_HEADER} is honoured from the admin token only")
    return who


async def client(srv: Service, request: Request, role: str = READONLY, what: str = "") -> Identity:
    """A client (not the tasker token) of at least ``role``, outside crash recovery."""
    who = await identify(srv, request)
    if who.role == TASKER:
        raise BadRequest(403, "forbidden", "the tasker token opens only tasker endpoints")
    if srv.engine.mode == MODE_RECOVERING:
        raise Recovering(srv.progress() or {})
    if role != READONLY:
        require(who, role, what)
    return who


async def submitter(srv: Service, request: Request) -> Identity:
    return await client(srv, request, USER, "submit jobs")


async def operator(srv: Service, request: Request, what: str) -> Identity:
    return await client(srv, request, OPERATOR, what)


async def admin(srv: Service, request: Request, what: str = "do this") -> Identity:
    """An admin, in any mode (a stop during recovery must work)."""
    who = await identify(srv, request)
    if who.role == TASKER:
        raise BadRequest(401, "unauthorized", "bad token: this needs the admin token or an admin")
    require(who, ADMIN, what)
    return who


async def tasker(srv: Service, request: Request) -> None:
    """The tasker token, the admin token, or a MUNGE credential of a tasker user."""
    who = await identify(srv, request, taskers=True)
    if who.role not in (TASKER, ADMIN) or (who.role == ADMIN and who.via != "admin_token"):
        raise BadRequest(
            403,
            "forbidden",
            f"{who.user} is not a tasker here (the tasker token, or MUNGE of tasker_users)",
        )


async def any_token(srv: Service, request: Request) -> Identity:
    """Anyone known, the tasker token too (the server status)."""
    return await identify(srv, request)


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


__all__ = ["USER", "Identity", "admin", "client", "identify", "operator", "submitter", "tasker"]
