"""A job's output (SPEC section 10): ``GET /api/v1/jobs/{id}/log?offset=&max=``.

The server reads the log itself when the file is there (same host, shared filesystem), in a
thread so a slow disk never holds the event loop. Otherwise it asks the tasker of the job's
last attempt: the ask rides the next answer to that tasker's sync long poll (which returns
at once for it), and the tasker answers with ``POST /api/v1/taskers/{name}/logs`` carrying
the chunk; nothing is copied unless asked. No answer within ``log_timeout`` is a 504.

The answer is the bytes themselves, with headers a follower needs: ``X-Crq-Log-Offset``
(the offset to ask next), ``X-Crq-Log-Size`` (the file's size now), ``X-Crq-Job-State`` and
``X-Crq-Job-Ended`` (1 once the job is in a final state: read until the offset reaches the
size, then stop), ``X-Crq-Log-Source`` (server, tasker or none) and ``X-Crq-Log-Missing``
(1: there is no such file yet). The job state is taken before the file is read, so a job
seen ended has written everything the read returns.

Who may read: the job's owner, and operators and admins (SPEC 9); a readonly role or another
user is refused (a log may hold what ``GET /api/v1/jobs/{id}`` does not show). The file is
read only if the owner could read it (crq/logread.py), whoever the server runs as.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import errno
import secrets
import time
from typing import Annotated, Any

import orjson
from crq.server import identity
from crq.server.http import auth
from crq.server.http.views import API, log_path
from crq.server.identity import OPERATOR, Identity
from crq.server.models import STRICT, BadRequest, parse_json, validate
from crq.server.service import Service
from crq.server.state import TASKER_LOST, Job
from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field
from starlette.responses import Response
from starlette.routing import BaseRoute

from crq.logread import DEFAULT_CHUNK, MAX_CHUNK, LogRefused, read_chunk
from crq.wire import FINAL_STATES

#: the rule a refused log read names (SPEC 9's 403s name theirs)
OWN_LOGS = "own-logs"
#: the longest error text a tasker may send back
MAX_MESSAGE = 1000


class LogChunk(BaseModel):
    """A tasker's answer to a log ask: the chunk (base64) and the file's size, or why not
    (``error``: not_found, refused or failed, with ``message``)."""

    model_config = STRICT

    id: Annotated[str, Field(min_length=1, max_length=64)]
    data: Annotated[str, Field(max_length=(MAX_CHUNK * 4) // 3 + 4)] = ""
    size: Annotated[int, Field(ge=0)] = 0
    error: Annotated[str, Field(max_length=32)] | None = None
    message: Annotated[str, Field(max_length=MAX_MESSAGE)] = ""


def may_read_log(who: Identity, job: Job) -> None:
    """The owner, operators and admins read a job's log; nobody else."""
    if who.user == job.user or who.at_least(OPERATOR):
        return
    raise identity.forbid(
        who,
        f"read the log of job {job.id} of {job.user}",
        OWN_LOGS,
        "a job's log is its owner's (operator or admin may read any)",
    )


def _answer(job: Job, state: str, offset: int, data: bytes, size: int, source: str) -> Response:
    missing = source == "none"
    nxt = offset + len(data) if offset <= size else size  # a shrunk file: from its end
    headers = {
        "X-Crq-Log-Offset": str(nxt),
        "X-Crq-Log-Size": str(size),
        "X-Crq-Job-State": state,
        "X-Crq-Job-Ended": "1" if state in FINAL_STATES else "0",
        "X-Crq-Log-Source": source,
        "X-Crq-Log-Missing": "1" if missing else "0",
        "Cache-Control": "no-store",
    }
    return Response(data, 200, headers, "application/octet-stream")


def routes(srv: Service) -> list[BaseRoute]:
    engine = srv.engine
    router = APIRouter()

    async def from_tasker(job: Job, path: str, offset: int, size: int) -> tuple[bytes, int] | None:
        """The chunk as the job's tasker reads it; None when it has no such file."""
        last = job.attempts[-1] if job.attempts else None
        name = last.tasker if last is not None else None
        tasker = srv.state.taskers.get(name) if name else None
        link = engine.links.get(name) if name else None
        silent = time.time() - link.last_contact if link is not None else 0.0
        if tasker is None or link is None or tasker.state == TASKER_LOST:
            raise BadRequest(
                404,
                "log_unavailable",
                f"the log of job {job.id} ({path}) is not readable on the server's host, "
                f"and its tasker {name or '?'} is not connected",
            )
        if silent > engine.fresh_within:  # as dispatch does: a silent tasker is not asked
            raise BadRequest(
                404,
                "log_unavailable",
                f"the log of job {job.id} ({path}) is not readable on the server's host, "
                f"and its tasker {name} has been silent for {silent:.0f} s",
            )
        ask = secrets.token_hex(8)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        link.log_waits[ask] = fut
        link.logs.append(
            {"id": ask, "job": job.id, "path": path, "user": job.user, "offset": offset,
             "max": size}
        )  # fmt: skip
        link.wake.set()
        try:
            got = await asyncio.wait_for(fut, srv.settings.log_timeout)
        except TimeoutError:
            raise BadRequest(
                504,
                "tasker_timeout",
                f"tasker {name} did not send the log of job {job.id} within "
                f"{srv.settings.log_timeout:g} s",
            ) from None
        finally:
            link.log_waits.pop(ask, None)
            link.logs[:] = [a for a in link.logs if a["id"] != ask]
        if got.get("error") == "not_found":
            return None
        if got.get("error"):
            code = "forbidden" if got["error"] == "refused" else "log_unreadable"
            status = 403 if got["error"] == "refused" else 502
            err = BadRequest(status, code, f"job {job.id}: tasker {name}: {got.get('message')}")
            if status == 403:
                err.extra = {"rule": OWN_LOGS}
            raise err
        return bytes(got["data"]), int(got["size"])

    @router.get(API + "/jobs/{job_id}/log")
    async def job_log(
        request: Request,
        job_id: int,
        offset: Annotated[int, Query(ge=0)] = 0,
        most: Annotated[int, Query(alias="max", ge=1)] = DEFAULT_CHUNK,
    ) -> Response:
        who = await auth.client(srv, request)
        job = srv.state.jobs.get(job_id)
        if job is None:
            raise BadRequest(404, "not_found", f"no job {job_id}")
        may_read_log(who, job)
        size = min(most, MAX_CHUNK)
        spec = orjson.loads(job.spec)
        path = log_path(job.id, spec, srv.state.array_of(job.id))  # %j %A %a expanded
        state = job.state  # before the read: an ended job has written all of it
        await engine.durable()
        if not job.attempts:  # never dispatched: no log anywhere yet
            return _answer(job, state, offset, b"", 0, "none")
        if srv.settings.log_via != "tasker":
            try:
                data, total = await asyncio.to_thread(read_chunk, path, offset, size, job.user)
                return _answer(job, state, offset, data, total, "server")
            except LogRefused as e:
                raise _refused(job, str(e)) from None
            except OSError as e:
                local = e.errno not in (errno.ENOENT, errno.ENOTDIR, errno.EACCES, errno.ESTALE)
                if srv.settings.log_via == "server" or local:
                    if e.errno in (errno.ENOENT, errno.ENOTDIR):
                        return _answer(job, state, offset, b"", 0, "none")
                    raise BadRequest(
                        502, "log_unreadable", f"job {job.id}: {path}: {e.strerror or e}"
                    ) from None
        got = await from_tasker(job, path, offset, size)
        if got is None:
            return _answer(job, state, offset, b"", 0, "none")
        return _answer(job, state, offset, got[0], got[1], "tasker")

    @router.post(API + "/taskers/{name}/logs")
    async def tasker_log(request: Request, name: str) -> Response:
        """A tasker's answer to a log ask it got in a sync answer."""
        await auth.tasker(srv, request)
        tasker = srv.state.taskers.get(name)
        link = engine.links.get(name)
        if tasker is None or link is None or tasker.state == TASKER_LOST:
            raise BadRequest(409, "unknown_tasker", f"tasker {name} must register first")
        auth.sync_session(request, tasker)
        chunk = validate(LogChunk, parse_json(await request.body()))
        try:
            data = base64.b64decode(chunk.data, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest(422, "invalid", "data: not base64") from None
        if len(data) > MAX_CHUNK:
            raise BadRequest(422, "invalid", f"data: over {MAX_CHUNK} bytes")
        fut = link.log_waits.get(chunk.id)
        taken = fut is not None and not fut.done()
        if fut is not None and taken:
            fut.set_result(
                {"data": data, "size": max(chunk.size, len(data)), "error": chunk.error,
                 "message": chunk.message}
            )  # fmt: skip
        # an ask that timed out meanwhile is no error of the tasker's: it is told so
        return Response(orjson.dumps({"taken": taken}), 200, None, "application/json")

    return list(router.routes)


def _refused(job: Job, why: str) -> BadRequest:
    err = BadRequest(403, "forbidden", f"job {job.id}: {why}")
    err.extra = {"rule": OWN_LOGS}
    return err
