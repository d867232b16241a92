"""The OpenAPI document (``/api/openapi.json``): every route, its answers and its errors.

The hot routes (submit, tasker register and sync) are plain Starlette routes that FastAPI
does not see; their request bodies are described from the very pydantic models that
validate them, so the document cannot drift from what is enforced. Every error answer is
``{"error", "message", …}`` (never FastAPI's ``{"detail"}``), and each route lists the
statuses it can really answer; ``tests/server/test_openapi.py`` runs schemathesis against it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from crq.server.http.logs import LogChunk
from crq.server.models import (
    ABS_PATH,
    BLANKS,
    ENV_NAME,
    NO_NUL,
    SHELL_LINE,
    Batch,
    BulkControl,
    Ended,
    JobSpec,
    Register,
    StopServer,
    Sync,
)
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema
from starlette.routing import Match
from starlette.types import Scope

from crq.wire import (
    IDEMPOTENCY_HEADER,
    IDEMPOTENCY_KEY_PATTERN,
    JOB_STATES,
    SESSION_HEADER,
    TASKER_NAME_PATTERN,
)

Schema = dict[str, Any]


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(required: list[str], **props: Schema) -> Schema:
    return {"type": "object", "required": required, "properties": props}


def _nullable(kind: str) -> Schema:
    return {"type": [kind, "null"]}


INT, NUM, STR, BOOL = ({"type": t} for t in ("integer", "number", "string", "boolean"))
INTS: Schema = {"type": "array", "items": INT}
ATTEMPTS: Schema = {"type": "array", "items": _ref("Attempt")}
ATTEMPTS_ANY: Schema = {"type": "array", "items": {"type": "object"}}

_JOB: dict[str, Schema] = {
    "id": INT,
    "name": STR,
    "user": STR,
    "state": {"type": "string", "enum": list(JOB_STATES)},
    "priority": INT,
    "resources": STR,
    "command": {"anyOf": [{"type": "array", "items": STR}, STR]},
    "cwd": STR,
    "log": STR,
    "rerunnable": BOOL,
    "max_attempts": INT,
    "attempt": INT,
    "tasker": _nullable("string"),
    "host": _nullable("string"),
    "pid": _nullable("integer"),
    "submitted": NUM,
    "started": _nullable("number"),
    "ended": _nullable("number"),
    "exit_code": _nullable("integer"),
    "signal": _nullable("integer"),
    "reason": _nullable("string"),
    "held": BOOL,
    "after": {"type": "array", "items": {"type": "array"}},  # [type, parent id] pairs
    "array": _nullable("integer"),
    "index": _nullable("integer"),
}

#: Answers (what the handlers in server/app.py return), beside the request models.
ANSWERS: dict[str, Schema] = {
    "Error": {
        **_obj(["error", "message"], error=STR, message=STR),
        "description": "Every refusal: a machine-readable code and one readable line.",
    },
    "Recovering": {
        **_obj(["error", "message", "recovery"], error=STR, message=STR, recovery={}),
        "description": "Crash recovery (503, with Retry-After): the progress so far.",
    },
    "Ids": _obj(["ids"], ids=INTS),
    "JobSummary": _obj(list(_JOB), **_JOB),
    "Job": _obj(
        [*_JOB, "env", "attempts"],
        **_JOB,
        env={"type": ["object", "null"], "additionalProperties": STR},
        attempts={"type": "array", "items": {"type": "object"}},
    ),
    "JobPage": _obj(
        ["jobs", "next"],
        jobs={"type": "array", "items": _ref("JobSummary")},
        next={
            **_nullable("integer"),
            "description": "give it as `after` (or with order=desc as `before`) for the next page",
        },
    ),
    "EndedJobs": _obj(
        ["jobs", "unknown", "pending"],
        jobs={"type": "array", "items": _ref("JobSummary")},
        unknown={**INTS, "description": "ids the server does not hold"},
        pending={**INT, "description": "how many of the ids have not ended"},
    ),
    "Forgotten": _obj(["id", "forgotten"], id=INT, forgotten=BOOL),
    "Controlled": _obj(
        ["results", "ok", "failed"],
        results={
            "type": "array",
            "items": _obj(
                ["id", "status"],
                id=INT,
                status={**INT, "description": "what this id's own route would have answered"},
                state=STR,
                tasker=_nullable("string"),
                reason=_nullable("string"),
                forgotten=BOOL,
                error=STR,
                message=STR,
                rule=STR,
            ),
        },
        ok=INT,
        failed=INT,
    ),
    "HistoryPage": _obj(
        ["jobs", "next"],
        jobs={"type": "array", "items": _ref("HistoryRow")},
        next={**_nullable("integer"), "description": "give it as `after` for the next page"},
    ),
    "HistoryRow": {
        **_obj(
            ["id", "user", "name", "state", "submitted", "tries", "attempts", "controls"],
            id=INT,
            user=STR,
            name=STR,
            state=STR,
            priority=INT,
            resources=STR,
            command={"anyOf": [{"type": "array", "items": STR}, STR]},
            cwd=STR,
            log=STR,
            submitted=NUM,
            started=_nullable("number"),
            ended=_nullable("number"),
            wait={**_nullable("number"), "description": "started - submitted, seconds"},
            run={**_nullable("number"), "description": "ended - started, seconds"},
            host=_nullable("string"),
            tasker=_nullable("string"),
            exit_code=_nullable("integer"),
            signal=_nullable("integer"),
            reason=_nullable("string"),
            tries=INT,
            attempts=ATTEMPTS_ANY,
            controls={"type": "array", "items": {"type": "object"}},
            forgotten=NUM,
            forgotten_by=_nullable("string"),
        ),
        "description": "A job as it was when it left the queue (the accounting history).",
    },
    "DashJobs": _obj(
        ["jobs", "next", "users"],
        jobs={"type": "array", "items": _ref("JobSummary")},
        next={**_nullable("integer"), "description": "give it as `before` for the next page"},
        users={"type": "array", "items": STR, "description": "users of the jobs looked at"},
    ),
    "Why": _obj(
        ["id", "state", "reasons"],
        id=INT,
        state=STR,
        reasons={"type": "array", "items": STR, "description": "each finding in one line"},
        held=BOOL,
        dependencies={"type": "array", "items": {"type": "object"}},
        array={"type": "object"},
        globals={"type": "array", "items": {"type": "object"}},
        taskers={"type": "array", "items": {"type": "object"}},
        ahead=INT,
    ),
    "Series": _obj(
        ["fields", "interval", "samples"],
        fields={"type": "array", "items": STR},
        interval=NUM,
        samples={"type": "array", "items": {"type": "array"}},
    ),
    "Taskers": _obj(
        ["taskers"],
        taskers={
            "type": "array",
            "items": _obj(
                ["name", "host", "state", "slots", "free_slots", "running"],
                name=STR,
                host=STR,
                state={"type": "string", "enum": ["ready", "full", "gone", "lost"]},
                slots=INT,
                free_slots=INT,
                resources=STR,
                running=INTS,
                last_contact=_nullable("number"),
                registered=NUM,
            ),
        },
    ),
    "ServerInfo": _obj(
        ["queue", "mode", "pid", "url", "instance", "version", "counts", "journal"],
        queue=STR,
        mode=STR,
        pid=INT,
        host=STR,
        url=STR,
        instance=STR,
        version=STR,
        started_at=NUM,
        counts={"type": ["object", "null"], "additionalProperties": INT},
        taskers=INT,
        recovery={"type": ["object", "null"]},
        journal={"type": "object"},
        epoch=INT,
        previous={"type": ["object", "null"]},
        election=STR,
        standbys={"type": "array", "items": STR},
    ),
    "Stopping": _obj(["stopping", "freeze"], stopping=BOOL, freeze=BOOL),
    "Whoami": _obj(
        ["user", "role", "via", "groups", "may"],
        user=STR,
        role={"type": "string", "enum": ["admin", "operator", "user", "readonly", "tasker"]},
        via={"type": "string", "enum": ["munge", "token", "admin_token", "tasker_token"]},
        groups={"type": "array", "items": STR},
        may={"type": "object", "additionalProperties": BOOL},
    ),
    "Issued": _obj(
        ["id", "token", "user", "role", "expires"],
        id=STR,
        token={**STR, "description": "shown this once only; the server keeps its hash"},
        user=STR,
        role=STR,
        expires=_nullable("number"),
    ),
    "Tokens": _obj(
        ["tokens"],
        tokens={
            "type": "array",
            "items": _obj(
                ["id", "user", "role", "created", "expires", "by", "note"],
                id=STR,
                user=STR,
                role=_nullable("string"),
                created=NUM,
                expires=_nullable("number"),
                by=STR,
                note=STR,
            ),
        },
    ),
    "Revoked": _obj(["id", "revoked"], id=STR, revoked=BOOL),
    "HandingOver": _obj(
        ["handing_over", "to", "standbys"],
        handing_over=BOOL,
        to=_nullable("string"),
        standbys={"type": "array", "items": STR},
    ),
    "Sanity": _obj(
        ["ok", "findings", "fixed"],
        ok=BOOL,
        findings={"type": "array", "items": STR},
        fixed={"type": "array", "items": STR},
    ),
    "Incomplete": _obj(["incomplete"], incomplete={"type": "array", "items": {"type": "object"}}),
    "Recovered": _obj(["recovered"], recovered={"type": "array", "items": {"type": "object"}}),
    "Attempt": _obj(["job", "attempt"], job=INT, attempt=INT),
    "Registered": _obj(
        ["kill", "ack", "heartbeat", "instance"],
        kill=ATTEMPTS,
        ack=ATTEMPTS,
        heartbeat=NUM,
        instance=STR,
        session={
            **STR,
            "description": f"a session made for a tasker that sent no {SESSION_HEADER}",
        },
    ),
    "Orders": _obj(
        ["dispatch", "kill", "ack", "shutdown"],
        dispatch={
            "type": "array",
            "items": _obj(
                ["job", "attempt", "command", "cwd", "env", "log", "name", "user"],
                job=INT,
                attempt=INT,
                command=_JOB["command"],
                cwd=STR,
                env={"type": ["object", "null"], "additionalProperties": STR},
                log=STR,
                name=STR,
                user={**STR, "description": "the job's owner: a root tasker runs it as them"},
            ),
        },
        kill=ATTEMPTS,
        ack=ATTEMPTS,
        shutdown=BOOL,
        logs={
            "type": "array",
            "description": "log reads asked of this tasker: answer each with POST …/logs",
            "items": _obj(
                ["id", "job", "path", "user", "offset", "max"],
                id=STR,
                job=INT,
                path=STR,
                user=STR,
                offset=INT,
                max=INT,
            ),
        },
    ),
    "Taken": _obj(["taken"], taken={**BOOL, "description": "false: the ask had timed out"}),
    "Ok": _obj(["ok"], ok=BOOL, mode=STR),
}

_WHY = {
    400: "malformed JSON, a query value outside its set, or a malformed Idempotency-Key",
    401: "no token, or a wrong one (WWW-Authenticate: Bearer)",
    403: "the tasker token on a client route, or the caller's role does not allow it: "
    "`rule` names the rule (own-jobs, own-logs, readonly, operator-only, admin-only, root-jobs, "
    "own-tokens)",
    404: "no such job, tasker or file",
    409: "the job's state does not allow it; the tasker name is held by another session "
    "(Retry-After), or the tasker must register first",
    413: "the body is too large",
    422: "a field is invalid: the message names it (`jobs[3].env: …`); "
    "`idempotency_mismatch`: the Idempotency-Key was used for another body",
    502: "the log could not be read (an I/O error here, or the tasker's)",
    503: "crash recovery (Retry-After), or the server is stopping",
    504: "the job's tasker did not send its log in time (`log_timeout`)",
}
CLIENT = (401, 403, 503)  # any client route: tokens, then crash recovery
BODY = (400, 413, 422)  # a route that reads a JSON body
JOB_ID = (404, 422)

#: (method, path) -> summary, success status, answer schema, error statuses, needs a token.
Op = tuple[str, int, str, tuple[int, ...], bool]
OPS: dict[tuple[str, str], Op] = {
    ("post", "/api/v1/jobs"): ("Submit one job spec or a batch", 201, "Ids", CLIENT + BODY, True),
    ("get", "/api/v1/jobs"): ("List jobs, paged", 200, "JobPage", CLIENT + (400, 404, 422), True),
    ("get", "/api/v1/jobs/{job_id}"): ("One job, with attempts", 200, "Job", CLIENT + JOB_ID, True),
    ("get", "/api/v1/jobs/{job_id}/wait"): (
        "Long poll until the job ends (at most `timeout` s, 300 at most)",
        200,
        "Job",
        CLIENT + JOB_ID,
        True,
    ),
    ("post", "/api/v1/ended"): (
        "Which of `ids` have ended: at once if any has, else a long poll until one of them, "
        "or any job above `newer_than`, ends (at most `timeout` s, 300 at most)",
        200,
        "EndedJobs",
        CLIENT + BODY,
        True,
    ),
    ("get", "/api/v1/jobs/{job_id}/log"): (
        "A chunk of the job's log (owner, operator, admin): bytes from `offset`, at most "
        "`max` (1 MiB at most); headers X-Crq-Log-Offset (ask next), X-Crq-Log-Size, "
        "X-Crq-Job-State, X-Crq-Job-Ended (1: stop once the offset reaches the size), "
        "X-Crq-Log-Source (server, tasker, none), X-Crq-Log-Missing",
        200,
        "",
        CLIENT + JOB_ID + (502, 504),
        True,
    ),
    ("get", "/api/v1/queue"): ("Queued job ids in dispatch order", 200, "Ids", CLIENT, True),
    ("get", "/api/v1/history"): (
        "Jobs that left the queue (the accounting history, like sacct), paged by id",
        200,
        "HistoryPage",
        CLIENT + (422,),
        True,
    ),
    ("post", "/api/v1/jobs/{job_id}/stop"): (
        "Stop a job",
        200,
        "Job",
        CLIENT + JOB_ID + (409,),
        True,
    ),
    ("post", "/api/v1/jobs/{job_id}/rerun"): (
        "Queue an ended job again",
        200,
        "Job",
        CLIENT + JOB_ID + (409,),
        True,
    ),
    ("post", "/api/v1/jobs/{job_id}/hold"): (
        "Keep a queued or waiting job from dispatch, at its place",
        200,
        "Job",
        CLIENT + JOB_ID + (409,),
        True,
    ),
    ("post", "/api/v1/jobs/{job_id}/release"): (
        "Let a held job go",
        200,
        "Job",
        CLIENT + JOB_ID + (409,),
        True,
    ),
    ("post", "/api/v1/control"): (
        "One action (stop, rerun, hold, release, forget) on up to 10,000 jobs: each id "
        "checked and applied as its own route would, one durable wait for all",
        200,
        "Controlled",
        CLIENT + BODY,
        True,
    ),
    ("delete", "/api/v1/jobs/{job_id}"): (
        "Forget an ended job",
        200,
        "Forgotten",
        CLIENT + JOB_ID + (409,),
        True,
    ),
    ("get", "/api/v1/taskers"): ("Taskers", 200, "Taskers", CLIENT, True),
    # the dashboard's reads (server/http/dash.py)
    ("get", "/api/v1/dash/jobs"): (
        "Jobs newest first, filtered by states, user and a search of id, name and command",
        200,
        "DashJobs",
        CLIENT + (400, 422),
        True,
    ),
    ("get", "/api/v1/jobs/{job_id}/why"): (
        "Why a job waits or stays queued: hold, dependencies, array cap, resources, taskers",
        200,
        "Why",
        CLIENT + JOB_ID,
        True,
    ),
    ("get", "/api/v1/stats/series"): (
        "The dashboard's samples (queue depth, running, throughput, wait) since `since`",
        200,
        "Series",
        CLIENT + (422,),
        True,
    ),
    ("get", "/api/v1/server"): (
        "Server state (admin or tasker token)",
        200,
        "ServerInfo",
        (401,),
        True,
    ),
    ("post", "/api/v1/server/stop"): ("Clean stop (admin)", 200, "Stopping", (401,) + BODY, True),
    ("post", "/api/v1/server/failover"): (
        "Hand leadership over to a standby (admin; SPEC section 8)",
        202,
        "HandingOver",
        (401, 409) + BODY,
        True,
    ),
    ("post", "/api/v1/server/sanity"): (
        "Global sanity check (admin)",
        200,
        "Sanity",
        (401, 422),
        True,
    ),
    ("get", "/api/v1/cleanup"): ("Incomplete jobs (admin)", 200, "Incomplete", (401,), True),
    ("post", "/api/v1/cleanup/jobs/{job_id}"): (
        "Recover one running job (admin)",
        200,
        "Recovered",
        (401, 404, 409, 422),
        True,
    ),
    ("post", "/api/v1/cleanup/hosts/{host}"): (
        "Recover every job of the taskers on a dead host (admin)",
        200,
        "Recovered",
        (401, 404),
        True,
    ),
    ("post", "/api/v1/taskers/{name}/register"): (
        "A tasker (re)joins with its running jobs and unreported results",
        200,
        "Registered",
        (401, 409) + BODY,
        True,
    ),
    ("post", "/api/v1/taskers/{name}/sync"): (
        "Tasker long poll: reports in, dispatches and kills out",
        200,
        "Orders",
        (401, 409) + BODY,
        True,
    ),
    ("post", "/api/v1/taskers/{name}/logs"): (
        "A tasker's answer to a log read asked in a sync answer",
        200,
        "Taken",
        (401, 409) + BODY,
        True,
    ),
    ("get", "/api/v1/whoami"): (
        "Who the server takes the caller for: user, role, how identified (any mode)",
        200,
        "Whoami",
        (401, 403),
        True,
    ),
    ("post", "/api/v1/tokens"): (
        "Issue a personal token (for oneself; an admin for anyone)",
        201,
        "Issued",
        CLIENT + BODY,
        True,
    ),
    ("get", "/api/v1/tokens"): ("Personal tokens (an admin: all)", 200, "Tokens", CLIENT, True),
    ("delete", "/api/v1/tokens/{token_id}"): (
        "Revoke a personal token",
        200,
        "Revoked",
        CLIENT + (404,),
        True,
    ),
    ("get", "/healthz"): ("Alive", 200, "Ok", (), False),
    ("get", "/readyz"): ("Ready (503 while recovering)", 200, "Ok", (503,), False),
    ("get", "/metrics"): ("Prometheus metrics", 200, "", (), False),
    ("get", "/"): ("The browser UI", 200, "", (503,), False),
    ("get", "/static/{name}"): ("UI files", 200, "", (404,), False),
}
_TIME: Schema = {
    "type": "string",
    "pattern": r"^(-?[0-9]{1,12}(\.[0-9]{1,6})?"
    r"|20[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8]))$",
    "description": "epoch seconds, or an ISO date or date-time (local time unless zoned)",
}
HISTORY_PARAMS: dict[str, Schema] = {
    "state": {"type": "string", "enum": list(dict.fromkeys((*JOB_STATES, "waiting")))},
    "since": _TIME,
    "until": _TIME,
    "limit": {"type": "integer", "minimum": 1, "maximum": 10_000, "default": 100},
    "after": {"type": "integer", "minimum": 0, "default": 0},
}
#: Bodies of the routes FastAPI does not read itself: (model names, required).
BODIES: dict[tuple[str, str], tuple[tuple[str, ...], bool]] = {
    ("post", "/api/v1/jobs"): (("JobSpec", "Batch"), True),
    ("post", "/api/v1/taskers/{name}/register"): (("Register",), True),
    ("post", "/api/v1/taskers/{name}/sync"): (("Sync",), True),
    ("post", "/api/v1/ended"): (("Ended",), False),
    ("post", "/api/v1/control"): (("BulkControl",), True),
    ("post", "/api/v1/taskers/{name}/logs"): (("LogChunk",), True),
    ("post", "/api/v1/server/stop"): (("StopServer",), False),
    ("post", "/api/v1/server/failover"): (("Failover",), False),
    ("post", "/api/v1/tokens"): (("TokenRequest",), False),
}
MEDIA = {
    "/api/v1/jobs/{job_id}/log": "application/octet-stream",
    "/metrics": "text/plain",
    "/": "text/html",
    "/static/{name}": {"text/javascript": {"schema": STR}, "text/css": {"schema": STR}},
}
TASKER_PARAMS: list[Schema] = [
    {
        "name": "name",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": TASKER_NAME_PATTERN, "maxLength": 128},
    },
    {
        "name": SESSION_HEADER,
        "in": "header",
        "required": False,
        "description": "the session holding the tasker name (register makes one without)",
        "schema": {"type": "string", "pattern": "^(?:[A-Za-z0-9_-]{16,256})?$"},
    },
]

#: Said in words, not as a parameter: a fuzzer sending one would reuse short keys with other
#: bodies, and a 422 for a schema-valid request reads to it as a wrong refusal.
SUBMIT_NOTE = (
    f"With a header `{IDEMPOTENCY_HEADER}` (pattern `{IDEMPOTENCY_KEY_PATTERN}`), a repeat with "
    "the same key and user within the server's `idempotency_window` answers the first "
    "submit's ids (201) and queues nothing; the same key with another body is refused (422 "
    "`idempotency_mismatch`), a malformed key too (400)."
)


_NUL = {"pattern": "\\x00"}
#: The validators' patterns (anchored, since pydantic searches) in the equivalent form the
#: document gives them: "contains no NUL" as a ``not``. A ``[^\x00]*`` beside ``maxLength``
#: gets folded by tools into ``[^\x00]{0,65536}``, which takes seconds to compile, and a
#: short unanchored pattern such as ``^/`` into ``^/{1,4096}$``, which means something else.
DOC_FORMS: dict[str, Schema] = {
    NO_NUL: {"not": _NUL},
    ENV_NAME: {"not": {"pattern": "[=\\x00]"}},
    ABS_PATH: {"not": {"anyOf": [_NUL, {"pattern": "^[^/]"}]}},
    SHELL_LINE: {"not": {"anyOf": [_NUL, {"pattern": f"^[{BLANKS}]*$"}]}},
}


def _doc_forms(node: Any) -> None:
    if isinstance(node, dict):
        if node.get("pattern") in DOC_FORMS:
            node.update(DOC_FORMS[node.pop("pattern")])
        for value in node.values():
            _doc_forms(value)
    elif isinstance(node, list):
        for value in node:
            _doc_forms(value)


def allowed_methods(app: FastAPI, scope: Scope) -> str:
    """The ``Allow`` header of a 405: the methods of every route of this path."""
    methods: set[str] = set()
    for route in app.router.routes:
        match, _ = route.matches(scope)
        if match != Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return ", ".join(sorted(methods))


def install_openapi(app: FastAPI, known: Callable[[], Iterable[str]] = tuple) -> None:
    """Serve :func:`build` as the app's OpenAPI document (built once, on first request).
    ``known``: the global resources this server was configured with (config.toml)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build(app, known())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _responses(method: str, path: str, op: Op) -> dict[str, Any]:
    _, ok, answer, errors, _ = op
    media = MEDIA.get(path)
    if isinstance(media, dict):
        content = media
    elif media:
        content = {media: {"schema": STR}}
    else:
        content = {"application/json": {"schema": _ref(answer)}}
    out: dict[str, Any] = {str(ok): {"description": "OK", "content": content}}
    for status in errors:
        schema = _ref("Recovering" if status == 503 and path != "/api/v1/jobs" else "Error")
        if status == 503 and path == "/api/v1/jobs":
            schema = {"anyOf": [_ref("Recovering"), _ref("Error")]}
        resp: dict[str, Any] = {
            "description": _WHY[status],
            "content": {"application/json": {"schema": schema}},
        }
        if status == 401:
            resp["headers"] = {"WWW-Authenticate": {"schema": STR, "required": True}}
        if status == 503 and path.startswith("/api/") or status == 409 and "register" in path:
            resp["headers"] = {"Retry-After": {"schema": STR}}
        out[str(status)] = resp
    return out


def job_resources(known: Iterable[str]) -> str:
    """The pattern of a job's ``resources`` on this server: local words as the parser has
    them, and only the global (``Kind:NAME``) resources it knows; it refuses others (422)."""
    number = r"(?:/\d{1,12})?"
    words = [rf"[A-Za-z_][\w.+-]*{number}"]
    names = sorted(known)
    if names:  # '.' and '+' in a class: the same in Python, ECMA and Rust regexes
        quoted = ("".join(f"[{c}]" if c in ".+" else c for c in name) for name in names)
        words.append(f"(?:{'|'.join(quoted)}){number}")
    word = f"(?:{'|'.join(words)})"
    blank = f"[{BLANKS}]"
    return f"^{blank}*(?:{word}(?:{blank}+{word})*{blank}*)?$"


def build(app: FastAPI, known: Iterable[str] = ()) -> dict[str, Any]:
    """FastAPI's document (paths and parameters of its routes), completed: the hot routes
    added, every answer and error described, the bearer token declared."""
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    models: list[tuple[type[BaseModel], JsonSchemaMode]] = [
        (m, "validation")
        for m in (JobSpec, Batch, Register, Sync, StopServer, LogChunk, Ended, BulkControl)
    ]
    _, defs = models_json_schema(models, ref_template="#/components/schemas/{model}")
    _doc_forms(defs)
    schemas = {**defs.get("$defs", {}), **ANSWERS}
    resources = schemas["JobSpec"]["properties"]["resources"]
    resources["pattern"] = job_resources(known)
    resources["description"] = (
        "words NAME (an attribute), NAME/N (N units of a consumable), Kind:NAME[/N] (a "
        "global resource configured on this server)"
    )
    doc["components"] = {
        "schemas": schemas,
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
    }
    paths: dict[str, Any] = doc.setdefault("paths", {})
    for (method, path), op in OPS.items():
        item = paths.setdefault(path, {}).setdefault(method, {"parameters": []})
        item["summary"] = op[0]
        item.pop("operationId", None)
        item["operationId"] = f"{method}_{path}".replace("/", "_").strip("_")
        item["responses"] = _responses(method, path, op)
        if op[4]:
            item["security"] = [{"bearer": []}]
        if (method, path) in BODIES:
            names, required = BODIES[method, path]
            schema = _ref(names[0]) if len(names) == 1 else {"oneOf": [_ref(n) for n in names]}
            item["requestBody"] = {
                "required": required,
                "content": {"application/json": {"schema": schema}},
            }
        if "{name}" in path and path.startswith("/api/v1/taskers/"):
            item["parameters"] = TASKER_PARAMS
        if (method, path) == ("post", "/api/v1/jobs"):
            item["description"] = SUBMIT_NOTE
        for param in item.get("parameters", []):
            if path == "/api/v1/jobs" and param["name"] == "state":
                param["schema"] = {"type": "string", "enum": list(JOB_STATES)}
            elif path == "/api/v1/dash/jobs" and param["name"] == "state":
                one = "|".join(JOB_STATES)
                param["schema"] = {
                    "type": "string",
                    "pattern": f"^(({one})(,({one}))*)?$",
                    "description": "job states, comma-separated (failed,lost)",
                }
            elif path == "/api/v1/history" and param["name"] in HISTORY_PARAMS:
                param["schema"] = HISTORY_PARAMS[param["name"]]
            elif param.get("in") == "query" and "anyOf" in param.get("schema", {}):
                param["schema"] = param["schema"]["anyOf"][0]
    undescribed = [
        f"{m.upper()} {p}" for p, item in paths.items() for m in item if (m, p) not in OPS
    ]
    if undescribed:
        raise RuntimeError(f"routes missing from server/openapi.py OPS: {undescribed}")
    return doc
