"""The HTTP API (SPEC section 4): thin handlers over commands, engine and state.

Every handler that answers from the state first awaits the journal barrier, so nothing
leaves the process before the events it reflects are durable (invariant 1).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from crq.server import commands
from crq.server.engine import Engine, Link
from crq.server.httplimits import BodyLimit
from crq.server.models import (
    MAX_BODY,
    TASKER_NAME,
    BadRequest,
    Register,
    StopServer,
    Sync,
    describe,
    parse_json,
    validate,
)
from crq.server.openapi import allowed_methods, install_openapi
from crq.server.settings import Settings
from crq.server.state import TASKER_LOST, Job, State, Tasker
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import FileResponse, Response

from crq import __version__
from crq.wire import (
    JOB_STATES,
    MODE_NORMAL,
    MODE_RECOVERING,
    QUEUED,
    SESSION_HEADER,
    USER_HEADER,
)

log = logging.getLogger("crq.http")
STATIC = Path(__file__).parent / "static"
VERSION = __version__


class JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error(status: int, code: str, message: str, **extra: Any) -> JSON:
    return JSON({"error": code, "message": message, **extra}, status_code=status)


class Server:
    """What the handlers share: settings, engine, tokens, identity of this process."""

    def __init__(
        self, settings: Settings, engine: Engine, admin: str, tasker: str, instance: str, url: str
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.admin_token = admin.encode()
        self.tasker_token = tasker.encode()
        self.instance = instance
        self.url = url
        self.started_at = time.time()
        self.recovery: Callable[[], dict[str, Any] | None] = lambda: None
        self.request_stop: Callable[[bool], None] = lambda freeze: None
        self.sanity: Callable[[bool], dict[str, Any]] = self._sanity
        self.on_register: Callable[[str, Register, commands.Outcome], None] = lambda *a: None
        self.recovery_task: asyncio.Task[None] | None = None
        self.checkpoints = {"written": 0, "failed": 0}  # forked checkpoints since start

    def _sanity(self, fix: bool) -> dict[str, Any]:
        from crq.server import sanity

        engine = self.engine
        return sanity.check(engine.state, set(engine.links), fix, engine.emit).as_dict()

    @property
    def state(self) -> State:
        return self.engine.state


def _token(request: Request) -> bytes:
    """The credentials of ``Authorization: Bearer <token>``; the scheme is case-insensitive
    (RFC 7235), so ``bearer`` and ``BEARER`` do too."""
    scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise BadRequest(401, "unauthorized", "missing bearer token (Authorization: Bearer …)")
    return token.encode()


def job_json(state: State, job: Job, full: bool = True) -> dict[str, Any]:
    spec = orjson.loads(job.spec)
    cur = job.current()
    out = {
        "id": job.id,
        "name": job.name,
        "user": job.user,
        "state": job.state,
        "priority": job.priority,
        "resources": job.need.text,
        "command": spec["command"],
        "cwd": spec["cwd"],
        "log": log_path(job.id, spec),
        "rerunnable": job.rerunnable,
        "max_attempts": job.max_attempts,
        "attempt": job.attempt,
        "tasker": job.tasker,
        "host": cur.host if cur and job.tasker else None,
        "pid": job.pid,
        "submitted": job.submitted,
        "started": job.started,
        "ended": job.ended,
        "exit_code": job.exit_code,
        "signal": job.signal,
        "reason": job.reason,
    }
    if full:
        out["env"] = state.env_of(job)
        out["attempts"] = [a.to_dict() for a in job.attempts or ()]
    return out


def log_path(job_id: int, spec: dict[str, Any]) -> str:
    return spec["log"] or os.path.join(spec["cwd"], f"crq.{job_id}.log")


SCAN_BUDGET = 100_000  # ids one page request may examine
BIG_BODY = 1 << 20  # a submit body over this is parsed and applied with the collector paused


def create_app(srv: Server) -> FastAPI:
    app = FastAPI(
        title="crq",
        version=VERSION,
        docs_url="/api/docs",
        redoc_url=None,
        openapi_url="/api/openapi.json",
    )
    install_openapi(app, lambda: srv.state.global_total)
    app.add_middleware(BodyLimit, limit=MAX_BODY)
    engine = srv.engine
    api = "/api/v1"

    @app.exception_handler(BadRequest)
    async def _bad(request: Request, e: BadRequest) -> Response:
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        resp = error(e.status, e.code, e.message)
        if headers:
            resp.headers.update(headers)
        return resp

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> Response:
        return error(422, "invalid", describe(list(e.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        resp = error(e.status_code, code, f"{request.method} {request.url.path}: {e.detail}")
        resp.headers.update(e.headers or {})
        if e.status_code == 405:  # every method of the path, not only the first route's
            resp.headers["Allow"] = allowed_methods(app, request.scope)
        return resp

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception) -> Response:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error(500, "internal", f"internal error: {type(e).__name__}: {e}")

    def client(request: Request) -> str:
        """Admits an admin-token holder outside crash recovery; returns the user."""
        if not hmac.compare_digest(_token(request), srv.admin_token):
            if hmac.compare_digest(_token(request), srv.tasker_token):
                raise BadRequest(403, "forbidden", "the tasker token opens only tasker endpoints")
            raise BadRequest(401, "unauthorized", "bad token")
        if engine.mode == MODE_RECOVERING:
            raise Recovering(srv.recovery() or {})
        return request.headers.get(USER_HEADER) or "admin"

    def admin(request: Request) -> None:
        if not hmac.compare_digest(_token(request), srv.admin_token):
            raise BadRequest(401, "unauthorized", "bad token: this needs the admin token")

    def tasker_auth(request: Request) -> None:
        token = _token(request)
        if not (
            hmac.compare_digest(token, srv.tasker_token)
            or hmac.compare_digest(token, srv.admin_token)
        ):
            raise BadRequest(401, "unauthorized", "bad tasker token")

    @app.exception_handler(Recovering)
    async def _recovering(request: Request, e: Recovering) -> Response:
        left = e.progress.get("seconds_left") or 5
        resp = error(
            503,
            "crash_recovery",
            "the queue is in crash recovery; retry later",
            recovery=e.progress,
        )
        resp.headers["Retry-After"] = str(max(1, min(30, int(left))))
        return resp

    # -- clients --------------------------------------------------------------------------

    # The hot routes (submit, tasker register/sync) are plain Starlette routes: they parse
    # their own bodies, and FastAPI's per-request machinery would cost half the budget.
    async def submit(request: Request) -> Response:
        user = client(request)
        if engine.shutting_down:
            raise BadRequest(503, "stopping", "the server is stopping")
        body = await request.body()
        if len(body) <= BIG_BODY:
            ids = await _submit(parse_json(body), user)
        else:
            with commands.collector_paused():
                ids = await _submit(parse_json(body), user)
        await engine.durable()
        return JSON({"ids": ids}, status_code=201)

    async def _submit(data: Any, user: str) -> list[int]:
        """A batch of more than SLICE jobs is checked, and its envs defined, in slices that
        let other requests through, then applied as one submit event: still all accepted
        or all refused, its ids contiguous."""
        sub = await commands.submit_sliced(srv.state, data, user)
        if len(sub.rows) > commands.SLICE:
            if engine.shutting_down:  # while it was checked
                raise BadRequest(503, "stopping", "the server is stopping")
            for envs in sub.env_slices(srv.state):
                engine.emit(envs)
                await asyncio.sleep(0)
        events, ids = sub.events(srv.state, time.time())
        engine.emit(events)
        return ids

    app.add_route(api + "/jobs", submit, methods=["POST"])

    @app.get(api + "/jobs")
    async def list_jobs(
        request: Request,
        state: str | None = None,
        user: str | None = None,
        limit: int = 1000,
        after: int = 0,
    ) -> Response:
        client(request)
        if state is not None and state not in JOB_STATES:
            raise BadRequest(400, "invalid", f"state: must be one of {', '.join(JOB_STATES)}")
        limit = max(1, min(limit, 10_000))
        out = []
        nxt = None
        st = srv.state
        # ids are monotonic: a page after N starts at N+1 instead of rescanning from the first
        ids = st.jobs.keys() if after <= 0 else range(after + 1, st.next_id)
        # A sparse filter (a few running jobs among a million) would walk every id in one
        # go and stall the event loop: stop after SCAN_BUDGET ids and give ``next`` so the
        # client goes on from there. A page may then be short, even empty, with a ``next``.
        budget, last = SCAN_BUDGET, after
        for job_id in ids:
            if budget == 0:
                nxt = last
                break
            budget -= 1
            job = st.jobs.get(job_id)
            if (
                job is not None
                and (not state or job.state == state)
                and (not user or job.user == user)
            ):
                if len(out) == limit:
                    nxt = out[-1]["id"]
                    break
                out.append(job_json(st, job, full=False))
            last = job_id
        await engine.durable()
        return JSON({"jobs": out, "next": nxt})

    def _get_job(job_id: int) -> Job:
        job = srv.state.jobs.get(job_id)
        if job is None:
            raise BadRequest(404, "not_found", f"no job {job_id}")
        return job

    @app.get(api + "/jobs/{job_id}")
    async def get_job(request: Request, job_id: int) -> Response:
        client(request)
        job = _get_job(job_id)
        await engine.durable()
        return JSON(job_json(srv.state, job))

    @app.get(api + "/jobs/{job_id}/wait")
    async def wait_job(request: Request, job_id: int, timeout: float = 30.0) -> Response:
        client(request)
        job = _get_job(job_id)
        if job.state in ("queued", "running"):
            await engine.wait_final(job_id, max(0.0, min(timeout, 300.0)))
        await engine.durable()
        job = srv.state.jobs.get(job_id, job)
        return JSON(job_json(srv.state, job))

    @app.get(api + "/queue")
    async def queue(request: Request) -> Response:
        client(request)
        ids = list(srv.state.queue_order())
        await engine.durable()
        return JSON({"ids": ids})

    async def _control(request: Request, job_id: int, command: Any) -> Response:
        client(request)
        engine.emit(command(srv.state, job_id, time.time()))
        await engine.durable()
        return JSON(job_json(srv.state, _get_job(job_id)))

    @app.post(api + "/jobs/{job_id}/stop")
    async def stop_job(request: Request, job_id: int) -> Response:
        return await _control(request, job_id, commands.stop)

    @app.post(api + "/jobs/{job_id}/rerun")
    async def rerun_job(request: Request, job_id: int) -> Response:
        return await _control(request, job_id, commands.rerun)

    @app.delete(api + "/jobs/{job_id}")
    async def forget_job(request: Request, job_id: int) -> Response:
        client(request)
        engine.emit(commands.forget(srv.state, job_id, time.time()))
        await engine.durable()
        return JSON({"id": job_id, "forgotten": True})

    @app.get(api + "/taskers")
    async def taskers(request: Request) -> Response:
        client(request)
        out = [tasker_json(srv, t.name) for t in srv.state.taskers.values()]
        await engine.durable()
        return JSON({"taskers": out})

    @app.get(api + "/server")
    async def server_info(request: Request) -> Response:
        token = _token(request)
        if not (
            hmac.compare_digest(token, srv.admin_token)
            or hmac.compare_digest(token, srv.tasker_token)
        ):
            raise BadRequest(401, "unauthorized", "bad token")
        st = srv.state
        journal = engine.journal
        # On a full disk every reply waits for the journal; this one answers, so that
        # `ncmgr status` can say why, but without the counts nothing durable backs yet.
        stalled = not await engine.durable_or_disk_full()
        return JSON(
            {
                "queue": srv.settings.queue,
                "mode": engine.mode,
                "pid": os.getpid(),
                "host": os.uname().nodename,
                "url": srv.url,
                "instance": srv.instance,
                "version": VERSION,
                "started_at": srv.started_at,
                "counts": None if stalled else st.counts,
                "taskers": len(st.taskers),
                "recovery": srv.recovery(),
                "journal": {
                    "seq": st.seq,
                    "durable_seq": journal.durable_seq,
                    "segment": journal.segment,
                    "disk_full_since": journal.stalled_since,
                },
            }
        )

    @app.post(api + "/server/stop")
    async def server_stop(request: Request) -> Response:
        admin(request)
        body = await request.body()
        freeze = validate(StopServer, parse_json(body) if body else {}).freeze
        srv.request_stop(freeze)
        return JSON({"stopping": True, "freeze": freeze})

    @app.post(api + "/server/sanity")
    async def sanity(request: Request, fix: int = 0) -> Response:
        admin(request)
        result = srv.sanity(bool(fix))
        await engine.durable()
        return JSON(result)

    # -- manual recovery (ncmgr cleanup) -------------------------------------------------

    @app.get(api + "/cleanup")
    async def cleanup_list(request: Request) -> Response:
        from crq.server import cleanup

        admin(request)
        contact = {n: link.last_contact for n, link in engine.links.items()}
        out = cleanup.incomplete(srv.state, contact, time.time(), srv.settings.heartbeat)
        await engine.durable()
        return JSON({"incomplete": out})

    async def _cleanup(request: Request, make: Callable[[], list[Any]]) -> Response:
        from crq.server import cleanup

        admin(request)
        events = make()
        engine.emit(events)
        done = cleanup.summary(srv.state, events)  # before the next dispatch pass runs
        for ev in events:
            if ev["e"] == "tasker_lost":
                engine.links.pop(ev["name"], None)
        await engine.durable()
        return JSON({"recovered": done})

    @app.post(api + "/cleanup/jobs/{job_id}")
    async def cleanup_job(request: Request, job_id: int) -> Response:
        from crq.server import cleanup

        return await _cleanup(request, lambda: cleanup.recover_job(srv.state, job_id, time.time()))

    @app.post(api + "/cleanup/hosts/{host}")
    async def cleanup_host(request: Request, host: str) -> Response:
        from crq.server import cleanup

        return await _cleanup(request, lambda: cleanup.dead_host(srv.state, host, time.time()))

    # -- taskers --------------------------------------------------------------------------

    async def register(request: Request) -> Response:
        name = request.path_params["name"]
        tasker_auth(request)
        _check_name(name)
        secret = _session_secret(request)
        body = validate(Register, parse_json(await request.body()))
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
            resp = error(e.status, e.code, e.message)
            resp.headers["Retry-After"] = str(max(1, math.ceil(e.retry_after)))
            return resp
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
        srv.on_register(name, body, out)
        if link is None:
            link = engine.links[name] = Link(name)
        link.last_contact = now
        link.generation += 1
        link.wake.set()
        await engine.durable()
        answer = {
            "kill": [{"job": j, "attempt": a} for j, a in sorted(out.kill)],
            "ack": [{"job": j, "attempt": a} for j, a in out.ack],
            "heartbeat": srv.settings.heartbeat,
            "instance": srv.instance,
        }
        if issued is not None:
            answer["session"] = issued
        return JSON(answer)

    async def sync(request: Request) -> Response:
        name = request.path_params["name"]
        tasker_auth(request)
        body = validate(Sync, parse_json(await request.body()))
        st = srv.state
        tasker = st.taskers.get(name)
        link = engine.links.get(name)
        if tasker is None or link is None or tasker.state == TASKER_LOST:
            raise BadRequest(409, "unknown_tasker", f"tasker {name} must register first")
        session = _sync_session(request, tasker)
        now = time.time()
        link.last_contact = now
        link.generation += 1
        generation = link.generation
        out = commands.reports(st, name, body.started, body.finished, now, session=session)
        engine.emit(out.events)
        reported = {(r.job, r.attempt) for r in body.started} | {
            (r.job, r.attempt) for r in body.finished
        }
        deadline = now + min(body.wait, srv.settings.heartbeat * 3)
        replaced = False
        while True:
            link.wake.clear()
            if tasker.session != session:  # taken over meanwhile: its orders are not ours
                replaced, send, kill = True, [], set(out.kill)
                break
            send, kill = commands.sync_orders(st, name, body.running, reported)
            kill |= out.kill | link.kill
            left = deadline - time.time()
            if (
                send
                or kill
                or out.ack
                or left <= 0
                or engine.shutting_down
                or link.generation != generation
            ):
                break
            try:
                await asyncio.wait_for(link.wake.wait(), left)
            except TimeoutError:
                pass
        if not replaced:
            link.kill -= kill
        await engine.durable()
        if tasker.session == session:
            link.last_contact = time.time()
        return JSON(
            {
                "dispatch": [dispatch_json(st, job) for job in send],
                "kill": [{"job": j, "attempt": a} for j, a in sorted(kill)],
                "ack": [{"job": j, "attempt": a} for j, a in out.ack],
                "shutdown": engine.shutting_down and not engine.freeze,
            }
        )

    app.add_route(api + "/taskers/{name}/register", register, methods=["POST"])
    app.add_route(api + "/taskers/{name}/sync", sync, methods=["POST"])

    # -- probes, metrics, UI --------------------------------------------------------------

    @app.get("/healthz")
    async def healthz() -> Response:
        return JSON({"ok": True})

    @app.get("/readyz")
    async def readyz() -> Response:
        if engine.mode != MODE_NORMAL:
            return error(
                503, "crash_recovery", "the queue is in crash recovery", recovery=srv.recovery()
            )
        return JSON({"ok": True, "mode": engine.mode})

    @app.get("/metrics")
    async def metrics() -> Response:
        from crq.server.metrics import render

        body, content_type = render(srv)
        return Response(body, media_type=content_type)

    @app.get("/")
    async def index() -> Response:
        if engine.mode == MODE_RECOVERING:
            return error(
                503,
                "crash_recovery",
                "the queue is in crash recovery; retry later",
                recovery=srv.recovery(),
            )
        return FileResponse(STATIC / "index.html")

    @app.get("/static/{name}")
    async def static(name: str) -> Response:
        kinds = {"app.js": "text/javascript", "style.css": "text/css"}  # a whitelist: no paths
        if name not in kinds:
            raise BadRequest(404, "not_found", f"no static file {name[:40]!r}")
        return FileResponse(STATIC / name, media_type=kinds[name])

    return app


class Recovering(Exception):
    def __init__(self, progress: dict[str, Any]) -> None:
        super().__init__("crash recovery")
        self.progress = progress


def _session_secret(request: Request) -> str:
    """The session secret a tasker request shows ("" if none); a malformed one is refused."""
    secret = request.headers.get(SESSION_HEADER, "")
    if secret and not (
        16 <= len(secret) <= 256 and all(c.isascii() and (c.isalnum() or c in "-_") for c in secret)
    ):
        raise BadRequest(
            422, "invalid", f"{SESSION_HEADER}: 16 to 256 characters of A-Z a-z 0-9 - _"
        )
    return secret


def _sync_session(request: Request, tasker: Tasker) -> str:
    """The hash of the request's session, which must be the one holding the name."""
    secret = _session_secret(request)
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


def _check_name(name: str) -> None:
    if not TASKER_NAME.fullmatch(name):
        raise BadRequest(422, "invalid", f"bad tasker name {name[:40]!r}")


def tasker_json(srv: Server, name: str) -> dict[str, Any]:
    t = srv.state.taskers[name]
    link = srv.engine.links.get(name)
    if t.state == TASKER_LOST:
        state = "lost"
    elif link is None:
        state = "gone"
    elif t.free_slots <= 0:
        state = "full"
    else:
        state = "ready"
    return {
        "name": t.name,
        "host": t.host,
        "state": state,
        "slots": t.slots,
        "free_slots": t.free_slots,
        "resources": t.resources,
        "running": sorted(t.running),
        "last_contact": link.last_contact if link else None,
        "registered": t.registered,
    }


def dispatch_json(state: State, job: Job) -> dict[str, Any]:
    spec = orjson.loads(job.spec)
    return {
        "job": job.id,
        "attempt": job.attempt,
        "command": spec["command"],
        "cwd": spec["cwd"],
        "env": state.env_of(job),
        "log": log_path(job.id, spec),
        "name": job.name,
    }


__all__ = ["Server", "create_app", "job_json", "QUEUED"]
