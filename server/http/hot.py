"""The hot routes, served by a bare ASGI router in front of FastAPI.

Submit (one job or a batch), tasker register and sync, ``GET`` of one job, the server status
and the probes are matched by method and exact path and answered here: FastAPI's middleware
and routing cost more than the submit itself. Everything else goes on to the full app
(server/app.py), which also serves these handlers (server/http/adapt.py) for the OpenAPI
document and in-process tests. Same checks and answers either way: the auth of
server/http/auth.py, the errors of server/http/errors.py, the body limit (413, then the
connection is closed), nothing to answer when the client left mid-body.

A leader serves this router as soon as its state is loaded; the full app comes later
(``install``), built while the hot routes already answer: until then ``/readyz`` says not
ready and the other routes wait for it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from crq.server import commands, identity
from crq.server.asgi import (
    CLOSE,
    ASGIApp,
    Disconnected,
    Receive,
    Scope,
    Send,
    TooLarge,
    encode_headers,
    error_body,
    headers_of,
    read_body,
    send_json,
)
from crq.server.http import auth, errors
from crq.server.http.views import API, dispatch_json, job_json, may_see_private
from crq.server.identity import Identity
from crq.server.models import MAX_BODY, BadRequest, Register, Sync, parse_json, validate
from crq.server.service import Service
from crq.server.standby import loading_reply
from crq.server.state import TASKER_LOST

from crq import __version__
from crq.wire import IDEMPOTENCY_HEADER, IDEMPOTENCY_KEY_RULE, MODE_NORMAL, valid_idempotency_key

log = logging.getLogger("crq.http")

BIG_BODY = 1 << 20  # a submit body over this is parsed and applied with the collector paused
JOBS = API + "/jobs"
JOB_PREFIX = JOBS + "/"
TASKER_PREFIX = API + "/taskers/"

#: status, JSON payload, extra headers
Answer = tuple[int, Any, dict[str, str] | None]


@dataclass(slots=True)
class Call:
    """What a hot handler reads of a request."""

    headers: Mapping[str, str]
    body: Callable[[], Awaitable[bytes]]
    params: Mapping[str, str]


Handler = Callable[[Call], Awaitable[Answer]]


class Handlers:
    """The hot routes of one serving process."""

    def __init__(self, srv: Service) -> None:
        self.srv = srv
        self.engine = srv.engine

    # -- jobs -----------------------------------------------------------------------------

    async def submit(self, call: Call) -> Answer:
        began = time.perf_counter()
        srv, engine = self.srv, self.engine
        who = await auth.submitter(srv, call)
        user = who.user
        if user == "root" or (who.uid == 0):
            _root_jobs(srv, who)
        if engine.shutting_down:
            raise BadRequest(503, "stopping", "the server is stopping")
        key = _idempotency_key(call.headers)
        body = await call.body()
        keyed = (key, commands.body_digest(body)) if key is not None else None
        ids = self._repeated(user, keyed)
        if ids is None:
            if len(body) <= BIG_BODY:
                ids = await self._submit(parse_json(body), user, keyed)
            else:
                with commands.collector_paused():
                    ids = await self._submit(parse_json(body), user, keyed)
        # also for a repeat: the first answer may not be durable yet when the repeat comes
        await engine.durable()
        engine.observed.submit.observe(time.perf_counter() - began)
        return 201, {"ids": ids}, None

    def _repeated(self, user: str, keyed: tuple[str, str] | None) -> list[int] | None:
        if keyed is None:
            return None
        window = self.srv.settings.idempotency_window
        return commands.repeated(self.srv.state, user, *keyed, time.time(), window)

    async def _submit(self, data: Any, user: str, keyed: tuple[str, str] | None) -> list[int]:
        """A batch of more than SLICE jobs is checked, and its envs defined, in slices that
        let other requests through, then applied as one submit event: still all accepted
        or all refused, its ids contiguous."""
        srv, engine = self.srv, self.engine
        sub = await commands.submit_sliced(srv.state, data, user, srv.settings.max_array)
        if len(sub.rows) > commands.SLICE:
            if engine.shutting_down:  # while it was checked
                raise BadRequest(503, "stopping", "the server is stopping")
            for envs in sub.env_slices(srv.state):
                engine.emit(envs)
                await asyncio.sleep(0)
        # a retry of this very request may have come and gone while it was checked
        ids = self._repeated(user, keyed)
        if ids is not None:
            return ids
        events, ids = sub.events(srv.state, time.time(), keyed)
        engine.emit(events)
        return ids

    async def get_job(self, call: Call) -> Answer:
        who = await auth.client(self.srv, call)
        job_id = int(call.params["job_id"])
        job = self.srv.state.jobs.get(job_id)
        if job is None:
            raise BadRequest(404, "not_found", f"no job {job_id}")
        await self.engine.durable()
        return 200, job_json(self.srv.state, job, private=may_see_private(who, job)), None

    async def server_info(self, call: Call) -> Answer:
        srv, engine = self.srv, self.engine
        await auth.any_token(srv, call)
        st = srv.state
        journal = engine.journal
        # On a full disk every reply waits for the journal; this one answers, so that
        # `ncmgr status` can say why, but without the counts nothing durable backs yet.
        # (re-read after the wait: a batch applied meanwhile may be what now waits for space)
        stalled = not await engine.durable_or_disk_full() or journal.stalled_since is not None
        info = {
            "queue": srv.settings.queue,
            "mode": engine.mode,
            "pid": os.getpid(),
            "host": os.uname().nodename,
            "url": srv.url,
            "instance": srv.instance,
            "version": __version__,
            "started_at": srv.started_at,
            "counts": None if stalled else st.counts,
            "taskers": len(st.taskers),
            "recovery": srv.progress(),
            "epoch": srv.epoch,
            "previous": srv.previous or None,
            "election": srv.settings.election.split("://")[0],
            "standbys": srv.standbys(),
            "journal": {
                "seq": st.seq,
                "durable_seq": journal.durable_seq,
                "segment": journal.segment,
                "disk_full_since": journal.stalled_since,
            },
        }
        return 200, info, None

    # -- taskers --------------------------------------------------------------------------

    async def register(self, call: Call) -> Answer:
        srv, engine = self.srv, self.engine
        name = call.params["name"]
        await auth.tasker(srv, call)
        auth.check_name(name)
        secret = auth.session_secret(call)
        body = validate(Register, parse_json(await call.body()))
        issued = None
        if not secret:  # a tasker without a secret of its own gets one made here
            secret = issued = secrets.token_urlsafe(32)
        session = commands.session_hash(secret)
        now = time.time()
        link = engine.links.get(name)
        silent_for = now - (link.last_contact if link is not None else srv.started_at)
        held = srv.state.taskers.get(name)
        try:
            out = commands.register(
                srv.state, name, body, now, session, silent_for, srv.settings.tasker_timeout
            )
        except commands.NameInUse as e:
            log.warning("tasker %s from host %s pid %s refused: %s", name, body.host, body.pid, e)
            retry = {"Retry-After": str(max(1, math.ceil(e.retry_after)))}
            return e.status, {"error": e.code, "message": e.message}, retry
        if held is not None and held.session and held.session != session:
            log.warning(
                "tasker %s taken over by a new session (host %s pid %s); the old one "
                "(host %s pid %s) was %s",
                name, body.host, body.pid, held.host, held.pid,
                held.state if held.state == TASKER_LOST else f"silent {silent_for:.0f} s",
            )  # fmt: skip
            if link is not None:
                link.kill.clear()  # orders for the old session's attempts, recovered now
        engine.emit(out.events)
        if srv.recovery is not None:
            srv.recovery.on_register(name, body, out)
        engine.touch(name, now)
        await engine.durable()
        answer = {
            "kill": [{"job": j, "attempt": a} for j, a in sorted(out.kill)],
            "ack": [{"job": j, "attempt": a} for j, a in out.ack],
            "heartbeat": srv.settings.heartbeat,
            "instance": srv.instance,
            "epoch": srv.epoch,
            "queue_id": srv.queue_id,
        }
        if issued is not None:
            answer["session"] = issued
        return 200, answer, None

    async def sync(self, call: Call) -> Answer:
        srv, engine = self.srv, self.engine
        name = call.params["name"]
        await auth.tasker(srv, call)
        body = validate(Sync, parse_json(await call.body()))
        st = srv.state
        tasker = st.taskers.get(name)
        if tasker is None or name not in engine.links or tasker.state == TASKER_LOST:
            raise BadRequest(409, "unknown_tasker", f"tasker {name} must register first")
        session = auth.sync_session(call, tasker)
        now = time.time()
        link = engine.touch(name, now)
        out = commands.reports(st, name, body.started, body.finished, now, session=session)
        engine.emit(out.events)
        reported = {(r.job, r.attempt) for r in body.started} | {
            (r.job, r.attempt) for r in body.finished
        }
        deadline = now + min(body.wait, srv.settings.heartbeat * 3)
        send, kill = await engine.wait_orders(link, session, body.running, reported, out, deadline)
        await engine.durable()
        if tasker.session == session:
            link.last_contact = time.time()
        logs = link.logs  # log reads asked meanwhile (server/http/logs.py)
        if logs:
            link.logs = []
        answer = {
            "dispatch": [dispatch_json(st, job) for job in send],
            "kill": [{"job": j, "attempt": a} for j, a in sorted(kill)],
            "ack": [{"job": j, "attempt": a} for j, a in out.ack],
            "shutdown": engine.shutting_down and not engine.freeze,
            "epoch": srv.epoch,
            "queue_id": srv.queue_id,
        }
        if logs:
            answer["logs"] = logs
        return 200, answer, None


def _root_jobs(srv: Service, who: Identity) -> None:
    """Jobs of root run as root on every tasker host: refused unless config.toml allows
    them, or the queue is root's own and this is its admin token (the embedded set-up)."""
    if srv.settings.allow_root_jobs:
        return
    if who.via == "admin_token" and identity.owner_name() == "root":
        return
    raise identity.forbid(
        who,
        "submit jobs as root",
        identity.ROOT_JOBS,
        "jobs of root are refused (allow_root_jobs = true in config.toml allows them)",
    )


def _idempotency_key(headers: Mapping[str, str]) -> str | None:
    """The request's Idempotency-Key, None without one; a malformed one is refused."""
    key = headers.get(IDEMPOTENCY_HEADER.lower())
    if key is not None and not valid_idempotency_key(key):
        raise BadRequest(400, "invalid", f"{IDEMPOTENCY_HEADER}: {IDEMPOTENCY_KEY_RULE}")
    return key


class Hot:
    """The leader's ASGI app: the hot routes here, the rest to the full app once it is in."""

    def __init__(self, srv: Service) -> None:
        self.srv = srv
        self.handlers = h = Handlers(srv)
        self.full: ASGIApp | None = None
        self.full_in = asyncio.Event()
        self.exact: dict[tuple[str, str], Handler] = {
            ("POST", JOBS): h.submit,
            ("GET", API + "/server"): h.server_info,  # what ncmgr start and status poll
        }
        self.tasker_actions: dict[str, Handler] = {"register": h.register, "sync": h.sync}

    def install(self, app: ASGIApp) -> None:
        """The full app is built: serve the other routes, and say ready."""
        self.full = app
        self.full_in.set()

    def route(self, method: str, path: str) -> tuple[Handler, dict[str, str]] | None:
        """The hot handler of a request and its path parameters, or None."""
        found = self.exact.get((method, path))
        if found is not None:
            return found, {}
        if method == "POST" and path.startswith(TASKER_PREFIX):
            name, _, action = path[len(TASKER_PREFIX) :].partition("/")
            handler = self.tasker_actions.get(action)
            if handler is not None and name:
                return handler, {"name": name}
        elif method == "GET" and path.startswith(JOB_PREFIX):
            job_id = path[len(JOB_PREFIX) :]
            if job_id.isascii() and job_id.isdigit():
                return self.handlers.get_job, {"job_id": job_id}
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            method, path = scope["method"], scope["path"]
            if method == "GET" and path in ("/healthz", "/readyz"):
                await self._probe(path, send)
                return
            found = self.route(method, path)
            if found is not None:
                await self._serve(found[0], found[1], scope, receive, send)
                return
        full = self.full
        if full is None:
            await self.full_in.wait()
            full = self.full
            assert full is not None
        await full(scope, receive, send)

    async def _serve(
        self,
        handler: Handler,
        params: dict[str, str],
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        headers = headers_of(scope)

        def body() -> Awaitable[bytes]:
            return read_body(receive, headers, MAX_BODY)

        try:
            status, payload, extra = await handler(Call(headers, body, params))
        except TooLarge as e:
            await send_json(send, 413, error_body("too_large", str(e)), [CLOSE])
            return
        except Disconnected:
            return  # gone mid-body (or timed out): no one to answer, nothing to log
        except Exception as e:  # noqa: BLE001 - every error gets its answer (server/http/errors.py)
            status, data, extra = errors.answer(self.srv, scope["method"], scope["path"], e)
            await send_json(send, status, data, encode_headers(extra))
            return
        await send_json(send, status, orjson.dumps(payload), encode_headers(extra))

    async def _probe(self, path: str, send: Send) -> None:
        srv = self.srv
        if path == "/healthz":
            alive = {"ok": True} if self.full is not None else {"ok": True, "loading": True}
            await send_json(send, 200, orjson.dumps(alive))
        elif self.full is None:
            loading = orjson.dumps(loading_reply(srv.settings.queue))
            await send_json(send, 503, loading, [(b"retry-after", b"1")])
        elif srv.engine.mode != MODE_NORMAL:
            recovering = error_body(
                "crash_recovery", "the queue is in crash recovery", recovery=srv.progress()
            )
            await send_json(send, 503, recovering)
        else:
            await send_json(send, 200, orjson.dumps({"ok": True, "mode": MODE_NORMAL}))
