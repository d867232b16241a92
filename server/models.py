"""Request bodies, validated with limits so bad input is refused whole and changes nothing."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeAlias, TypeVar

import orjson
from crq.server.refused import BadRequest as BadRequest
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    WithJsonSchema,
)
from pydantic.config import JsonDict
from pydantic_core import PydanticCustomError

from crq.wire import MAX_ARRAY as MAX_ARRAY  # re-exported: commands name it here
from crq.wire import MAX_ATTEMPTS_DEFAULT, PRIORITY_DEFAULT, PRIORITY_MAX, PRIORITY_MIN

MAX_BODY = 64 << 20
MAX_BATCH = 100_000
MAX_ARG = 64 << 10
MAX_ENV_VARS = 4096
MAX_SCRIPT = 1 << 20  # bytes of a stored script (SPEC section 10)
MAX_TIME_LIMIT = 366 * 86400.0  # a year: past it a limit is a typo, and no float trouble

# Patterns run in pydantic-core's regex engine: no Python call per field on the hot path.
#: What a tasker cannot pass to exec, open or a path: a NUL byte ends a C string.
NO_NUL = r"^[^\x00]*$"
#: An environment name: no NUL and no ``=`` (``A=B=c`` would set ``A`` to ``B=c``).
ENV_NAME = r"^[^=\x00]*$"
#: Absolute, since taskers run on other hosts and in other directories.
ABS_PATH = r"^/[^\x00]*$"
#: Every character ``str.split()`` splits on, spelled out: ``\s`` differs between Python,
#: Rust and ECMA regexes (``\x1c``-``\x1f``, ``\ufeff``).
BLANKS = r"\t-\r\x1c- \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
#: A shell command line with something in it besides blanks.
SHELL_LINE = rf"^[^\x00]*[^{BLANKS}\x00][^\x00]*$"
#: What server/resources.py parses (Python's ``\w`` and ``\d``): ``NAME``, ``NAME/N``,
#: ``Kind:NAME``, N < 10^12, between blanks. For the document only: the parser itself checks
#: (submit and register), naming the bad word.
RESOURCE_WORD = r"[A-Za-z_][\w.:+-]*(?:/\d{1,12})?"
RESOURCES = rf"^[{BLANKS}]*(?:{RESOURCE_WORD}(?:[{BLANKS}]+{RESOURCE_WORD})*[{BLANKS}]*)?$"
#: A tasker's name (the path of its routes).

Arg = Annotated[str, Field(max_length=MAX_ARG, pattern=NO_NUL)]
EnvName = Annotated[str, Field(min_length=1, max_length=1024, pattern=ENV_NAME)]
Env = Annotated[
    dict[EnvName, Arg],
    Field(max_length=MAX_ENV_VARS),
    # pydantic would say ``patternProperties``, which lets other names through unchecked
    WithJsonSchema(
        {
            "type": "object",
            "maxProperties": MAX_ENV_VARS,
            "propertyNames": {"minLength": 1, "maxLength": 1024, "pattern": ENV_NAME},
            "additionalProperties": {"type": "string", "maxLength": MAX_ARG, "pattern": NO_NUL},
        }
    ),
]
Name = Annotated[str, Field(max_length=256)]
JobName = Annotated[str, Field(max_length=256, pattern=NO_NUL)]
AbsPath = Annotated[str, Field(min_length=1, max_length=4096, pattern=ABS_PATH)]
Resources = Annotated[str, Field(max_length=1000, json_schema_extra={"pattern": RESOURCES})]
Argv = Annotated[list[Arg], Field(min_length=1, max_length=10_000)]
ShellLine = Annotated[str, Field(min_length=1, max_length=MAX_ARG, pattern=SHELL_LINE)]
#: Strict: JSON ``true`` is not the number 1 and ``"4"`` is not 4.
STRICT = ConfigDict(strict=True)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def _integral(value: float) -> int:
    # past 2**53 a float is no longer exact: -2**63 - 1 would read as -2**63
    if not value.is_integer() or abs(value) > 2**53:
        raise PydanticCustomError("int_from_float", "Input should be a whole number")
    return int(value)


def _script_size(text: str) -> str:
    # pydantic counts characters; the limit is on what the tasker writes, in UTF-8 bytes
    if len(text) > MAX_SCRIPT // 4 and len(text.encode(errors="surrogatepass")) > MAX_SCRIPT:
        raise PydanticCustomError(
            "script_too_large", f"must be at most {MAX_SCRIPT} bytes (1 MiB) in UTF-8"
        )
    return text


#: A stored script's content: the length check in pydantic-core first, bytes after.
Script = Annotated[
    str,
    Field(max_length=MAX_SCRIPT, json_schema_extra={"description": "at most 1 MiB in UTF-8"}),
    AfterValidator(_script_size),
]
MAX_KILL_GRACE = 86400.0
#: Bounds checked in ``Submission.add``, which says them in a sentence; shown here for the
#: document.
TimeLimit = Annotated[
    float, Field(json_schema_extra={"exclusiveMinimum": 0, "maximum": MAX_TIME_LIMIT})
]
KillGrace = Annotated[float, Field(json_schema_extra={"minimum": 0, "maximum": MAX_KILL_GRACE})]


def integer(lo: int = INT64_MIN, hi: int = INT64_MAX) -> Any:
    """A JSON integer from ``lo`` to ``hi``: ``4``, or ``4.0`` (the same JSON number, and an
    integer to JSON Schema), never ``true``, ``"4"`` or ``4.5``. An int is checked in
    pydantic-core; only a number written with a fraction costs a Python call. 64 bits at
    most, so that every accepted number can be journaled."""
    return Annotated[
        Annotated[int, Strict(), Field(ge=lo, le=hi)]
        | Annotated[float, Strict(), Field(ge=lo, le=hi), AfterValidator(_integral)],
        Field(union_mode="left_to_right"),
        WithJsonSchema({"type": "integer", "minimum": lo, "maximum": hi}),
    ]


if TYPE_CHECKING:  # to mypy the Python type; pydantic checks the bounds below
    Int: TypeAlias = int
    Priority: TypeAlias = int
    Attempts: TypeAlias = int
    Slots: TypeAlias = int
    Index: TypeAlias = int
    Step: TypeAlias = int
    ArrayIndex: TypeAlias = int
else:
    Int = integer()
    Priority = integer(PRIORITY_MIN, PRIORITY_MAX)
    Attempts = integer(1, 1000)
    Slots = integer(0, 100_000)
    Index = integer(0, 2**52)  # below 2**53: a float past it rounds into the range
    Step = integer(1, 2**52)
    ArrayIndex = integer(0, 999_999)  # as Slurm's MaxArraySize: indexes below the size


MAX_AFTER = 1000  # dependencies of one job


class After(BaseModel):
    """A dependency (SPEC 10): on job ``job``, or on the batch's earlier job ``index``."""

    model_config = ConfigDict(strict=True, extra="forbid")

    type: Literal["afterok", "afterany", "afternotok"] = "afterok"
    job: Index | None = None
    index: Index | None = None


class ArraySpec(BaseModel):
    """Elements ``start``, ``start + step`` … up to ``stop``; ``max_running`` at once."""

    model_config = ConfigDict(strict=True, extra="forbid")

    start: ArrayIndex = 0
    stop: ArrayIndex
    step: Step = 1
    max_running: Step | None = None


#: What Submission.add checks of ``command`` and ``script``, for the document: a command, or
#: a script with a list of arguments (or none).
COMMAND_OR_SCRIPT: JsonDict = {
    "anyOf": [
        {
            "required": ["command"],
            "properties": {"command": {"not": {"type": "null"}}, "script": {"type": "null"}},
        },
        {
            "required": ["script"],
            "properties": {"script": {"type": "string"}, "command": {"type": ["array", "null"]}},
        },
    ]
}


class JobSpec(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", json_schema_extra=COMMAND_OR_SCRIPT)

    # None only with a script (Submission.add says "is required" otherwise): the script
    # then runs with ``command`` as its arguments
    command: Argv | ShellLine | None = None
    cwd: AbsPath | None = None
    env: Env | None = None
    name: JobName | None = None
    priority: Priority = PRIORITY_DEFAULT
    resources: Resources = ""
    rerunnable: bool = True
    max_attempts: Attempts = MAX_ATTEMPTS_DEFAULT
    log: AbsPath | None = None
    after: Annotated[list[After], Field(max_length=MAX_AFTER)] | None = None
    array: ArraySpec | None = None
    hold: bool = False
    time_limit: TimeLimit | None = None  # seconds from the attempt's start
    kill_grace: KillGrace | None = None  # SIGTERM to SIGKILL at the limit (default 30 s)
    script: Script | None = None


class Batch(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    jobs: Annotated[list[JobSpec], Field(min_length=1, max_length=MAX_BATCH)]
    env: Env | None = None


class AttemptRef(BaseModel):
    model_config = STRICT

    job: Int
    attempt: Int


class RunningReport(AttemptRef):
    pid: Int | None = None
    started: float | None = None


class ResultReport(AttemptRef):
    exit_code: Int | None = None
    signal: Int | None = None
    started: float | None = None
    ended: float | None = None
    reason: Annotated[str, Field(max_length=4096)] | None = None
    lost: bool = False  # no result: the attempt died with its tasker (recovered, not failed)


class Register(BaseModel):
    model_config = STRICT

    host: Name
    pid: Int = 0
    slots: Slots
    resources: Resources = ""
    boot_id: Name = ""
    rebooted: bool = False
    state_id: Name = ""
    user: Name = ""  # the unix user a non-root tasker runs as ("": root, runs anyone's)
    running: list[RunningReport] = []
    finished: list[ResultReport] = []


class Sync(BaseModel):
    model_config = STRICT

    started: list[RunningReport] = []
    finished: list[ResultReport] = []
    running: list[AttemptRef] = []
    wait: Annotated[float, Field(ge=0, le=300)] = 0.0


MAX_CONTROL = 10_000  # ids of one POST /api/v1/control


class BulkControl(BaseModel):
    """``POST /api/v1/control``: one action on many jobs (server/http/jobs.py)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    action: Literal["stop", "rerun", "hold", "release", "forget"]
    ids: Annotated[list[Index], Field(min_length=1, max_length=MAX_CONTROL)]


class Ended(BaseModel):
    """``POST /api/v1/ended``: the jobs one watcher waits for (server/http/jobs.py)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    ids: Annotated[list[Index], Field(max_length=100_000)] = []
    newer_than: Index | None = None


class StopServer(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    freeze: bool = False


class TokenRequest(BaseModel):
    """``POST /api/v1/tokens`` (the OpenAPI document's; server/http/tokens.py checks it)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    user: str | None = Field(
        default=None, min_length=1, max_length=65, pattern=r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}\$?$"
    )
    role: Literal["admin", "operator", "user", "readonly"] | None = None
    expires: float | None = Field(default=None, gt=0, le=10 * 365 * 86400)
    note: str | None = Field(default=None, max_length=200)


class Failover(BaseModel):
    """``to``: only a standby on this host may take over (None: any)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    to: str | None = Field(default=None, min_length=1, max_length=255)


def _number_fields(*models: type[BaseModel]) -> dict[str, str]:
    """``priority`` -> ``an integer from 1 to 15``: what each number field takes, read from
    the JSON schema the OpenAPI document shows, so the message says what the document does."""
    out: dict[str, str] = {}
    for model in models:
        for name, prop in model.model_json_schema()["properties"].items():
            for schema in prop.get("anyOf", [prop]):
                if schema.get("type") not in ("integer", "number"):
                    continue
                kind = "an integer" if schema["type"] == "integer" else "a number"
                lo, hi = schema.get("minimum"), schema.get("maximum")
                if (lo, hi) == (INT64_MIN, INT64_MAX):
                    out[name] = "a 64-bit integer"
                elif lo is not None and hi is not None:
                    out[name] = f"{kind} from {lo} to {hi}"
                else:
                    out[name] = kind
    return out


_NUMBERS = _number_fields(JobSpec, ResultReport, Register, Sync)
_TYPES = {
    "string_type": "must be a string",
    "bool_type": "must be true or false",
    "list_type": "must be a list",
    "dict_type": "must be an object",
    "model_type": "must be an object",
    "model_attributes_type": "must be an object",
    "missing": "is required",
    "extra_forbidden": "unknown field",
    "json_invalid": "malformed JSON",
}
_NUMBER_ERRORS = ("int_", "float_", "greater_than", "less_than")
_PATTERNS = {
    ABS_PATH: "must be an absolute path (taskers run on other hosts and directories)",
    SHELL_LINE: "must not be blank",
    ENV_NAME: "must not contain '='",
}


def _message(err: Any, field: str) -> str:
    """One error as a person says it: ``must be an integer from 1 to 15``."""
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    if kind.startswith(_NUMBER_ERRORS):
        if field in _NUMBERS:
            return f"must be {_NUMBERS[field]}"
        return "must be a number" if kind.startswith("float") else "must be an integer"
    if kind in ("too_short", "string_too_short"):
        least = ctx.get("min_length", 1)
        if least == 1:
            return "must not be empty"
        return f"must have at least {least} {'characters' if 'string' in kind else 'items'}"
    if kind in ("too_long", "string_too_long"):
        what = "characters" if "string" in kind else "items"
        what = "entries" if ctx.get("field_type") == "Dictionary" else what
        return f"must have at most {ctx.get('max_length')} {what}"
    if kind == "string_pattern_mismatch":
        if isinstance(value, str) and "\0" in value:
            return "must not contain NUL bytes"
        return _PATTERNS.get(str(ctx.get("pattern")), str(err["msg"]))
    if kind == "value_error" and "error" in ctx:
        return str(ctx["error"])
    if kind in _TYPES:
        return _TYPES[kind]
    msg = str(err["msg"])
    return msg[:1].lower() + msg[1:]


#: How pydantic names a branch of a union in an error's path (``int``, ``list[str]``, …).
_TYPE_TAGS = frozenset(("int", "float", "str", "bool", "list", "dict", "none"))


def _is_tag(loc: tuple[Any, ...], i: int) -> bool:
    part = loc[i]
    if not isinstance(part, str) or part == "[key]" or (i > 0 and loc[i - 1] == "env"):
        return False
    return part in _TYPE_TAGS or not part.isidentifier()


def _path(loc: tuple[Any, ...]) -> tuple[str, str, str | None]:
    """``("jobs", 3, "env", "A=B", "[key]")`` -> ``("jobs[3].env", "[key]", None)``: the
    path shown, the field it ends in, and the branch of ``command``'s union it went
    through, if any (other unions, such as integers, say the same whichever branch)."""
    out, field, branch = "", "", None
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif _is_tag(loc, i):
            if field == "command":
                branch = part
        elif part == "[key]":
            field = "[key]"
        elif i > 0 and loc[i - 1] == "env":  # a variable's name
            if loc[i + 1 : i + 2] != ("[key]",):
                out += f"[{part if len(part) <= 40 else part[:40] + '…'!r}]"
        else:
            out += f".{part}" if out else str(part)
            field = str(part)
    return out, field, branch


def _branch_wanted(errors: list[Any]) -> str | None:
    """Of ``command``'s two shapes, the one the request meant (a list or a string): only its
    errors are worth telling. None when the value is neither."""
    for err in errors:
        loc = tuple(err["loc"])
        if len(loc) > 1 and loc[-2] == "command" and _is_tag(loc, len(loc) - 1):
            value = err.get("input")
            if isinstance(value, list):
                return "list"
            if isinstance(value, str):
                return "str"
            return None
    return "list"


def describe(errors: list[Any]) -> str:
    """pydantic's (or FastAPI's) errors as one readable line naming the field path:
    ``jobs[3].env: names must not contain '='``, ``command: must not be empty``."""
    lines: list[str] = []
    wanted = _branch_wanted(errors)
    for err in errors:
        loc = tuple(err["loc"])
        if loc and loc[0] in ("query", "path", "header", "cookie", "body"):
            loc = loc[1:]
        where, field, branch = _path(loc)
        if branch is not None:
            if wanted is None:
                line = f"{where}: must be a list of strings or a string"
                if line not in lines:
                    lines.append(line)
                continue
            if branch.startswith("list") != (wanted == "list"):
                continue
        message = _message(err, field)
        if field == "[key]":
            message = "names " + message
        line = f"{where or 'body'}: {message}"
        if line not in lines:
            lines.append(line)
    if not lines:
        return "invalid request"
    more = len(lines) - 1
    tail = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return lines[0] + tail


def parse_json(body: bytes) -> Any:
    if len(body) > MAX_BODY:
        raise BadRequest(413, "too_large", f"request body over {MAX_BODY} bytes")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise BadRequest(400, "bad_json", f"malformed JSON: {e}") from None


M = TypeVar("M", bound=BaseModel)


def validate(model: type[M], data: Any) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise BadRequest(422, "invalid", describe(e.errors(include_url=False))) from None


def parse_submit(data: Any) -> Batch:
    if isinstance(data, dict) and "jobs" in data:
        return validate(Batch, data)
    return Batch(jobs=[validate(JobSpec, data)])
