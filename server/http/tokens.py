"""Who am I, and personal tokens: issue (shown once), list, revoke (SPEC section 9)."""

from __future__ import annotations

import time
from typing import Any

from crq.server import commands, identity
from crq.server.http import auth
from crq.server.http.views import API, JSON
from crq.server.identity import ADMIN, MAX_NOTE, RANK, ROLES, Identity
from crq.server.models import BadRequest, parse_json
from crq.server.service import Service
from crq.server.state import Token
from fastapi import APIRouter, Request
from starlette.responses import Response
from starlette.routing import BaseRoute

MAX_EXPIRES = 10 * 365 * 86400.0


def routes(srv: Service) -> list[BaseRoute]:
    engine = srv.engine
    router = APIRouter()

    @router.get(API + "/whoami")
    async def whoami(request: Request) -> Response:
        """Answers in every mode (the UI asks first, also during recovery)."""
        who = await auth.identify(srv, request)
        return JSON(who.as_json())

    @router.post(API + "/tokens")
    async def issue(request: Request) -> Response:
        who = await auth.client(srv, request)
        user, role, expires, note = _issue_body(who, parse_json(await request.body() or b"{}"))
        now = time.time()
        until = None if expires is None else now + expires
        events, text = commands.issue_token(srv.state, user, role, until, note, who.user, now)
        engine.emit(events)
        await engine.durable()
        token_id = events[0]["id"]  # type: ignore[typeddict-item]
        shown = role or identity.role_of(srv.settings.roles, user, identity.groups_of(user))
        return JSON(
            {"id": token_id, "token": text, "user": user, "role": shown, "expires": until},
            status_code=201,
        )

    @router.get(API + "/tokens")
    async def listing(request: Request) -> Response:
        who = await auth.client(srv, request)
        mine = [t for t in srv.state.tokens.values() if _sees(who, t)]
        await engine.durable()
        return JSON({"tokens": [t.as_json() for t in mine]})

    @router.delete(API + "/tokens/{token_id}")
    async def revoke(request: Request, token_id: str) -> Response:
        who = await auth.client(srv, request)
        tok = srv.state.tokens.get(token_id)
        if tok is None or not _sees(who, tok):
            raise BadRequest(404, "not_found", f"no token {token_id[:40]}")
        engine.emit(commands.revoke_token(srv.state, token_id, who.user, time.time()))
        await engine.durable()
        return JSON({"id": token_id, "revoked": True})

    return list(router.routes)


def _sees(who: Identity, tok: Token) -> bool:
    return who.at_least(ADMIN) or tok.user == who.user


def _issue_body(who: Identity, data: Any) -> tuple[str, str | None, float | None, str]:
    """The checked request: an admin issues for anyone, anyone else for itself and no
    role above its own."""
    if not isinstance(data, dict) or set(data) - {"user", "role", "expires", "note"}:
        raise BadRequest(422, "invalid", "a token request has user, role, expires and note")
    user = data.get("user") or who.user
    role = data.get("role")
    expires = data.get("expires")
    note = data.get("note") or ""
    if not isinstance(user, str) or not identity.valid_user(user):
        raise BadRequest(422, "invalid", "user: a user name (letters, digits, . _ -; up to 64)")
    if role is not None and role not in ROLES:
        raise BadRequest(422, "invalid", f"role: one of {', '.join(reversed(ROLES))}")
    if expires is not None and (
        isinstance(expires, bool)
        or not isinstance(expires, int | float)
        or not 0 < expires <= MAX_EXPIRES
    ):
        raise BadRequest(422, "invalid", "expires: seconds from now, above 0, at most 10 years")
    if not isinstance(note, str) or len(note) > MAX_NOTE or not note.isprintable():
        raise BadRequest(422, "invalid", f"note: up to {MAX_NOTE} printable characters")
    if not who.at_least(ADMIN):
        if user != who.user:
            raise identity.forbid(
                who,
                f"issue a token for {user}",
                identity.OWN_TOKENS,
                "only an admin issues tokens for others",
            )
        if role is not None and RANK[role] > RANK[who.role]:
            raise identity.forbid(
                who, f"issue a token of role {role}", identity.OWN_TOKENS, "not above one's own"
            )
        if role is None:
            role = who.role  # a user's own token never outgrows what it had
    return user, role, None if expires is None else float(expires), note
