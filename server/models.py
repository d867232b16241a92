"""Request bodies, validated with limits so bad input is refused whole and changes nothing."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from client.wire import MAX_ATTEMPTS_DEFAULT, PRIORITY_DEFAULT, PRIORITY_MAX, PRIORITY_MIN

MAX_BODY = 64 << 20
MAX_BATCH = 100_000
MAX_ARG = 64 << 10
MAX_ENV_VARS = 4096

Arg = Annotated[str, Field(max_length=MAX_ARG)]
Env = Annotated[
    dict[Annotated[str, Field(min_length=1, max_length=1024)], Arg], Field(max_length=MAX_ENV_VARS)
]
Name = Annotated[str, Field(max_length=256)]
Path_ = Annotated[str, Field(min_length=1, max_length=4096)]


class BadRequest(Exception):
    """A refused request: HTTP status, error code, one readable line."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _absolute(path: str | None) -> str | None:
    if path is not None and not path.startswith("/"):
        raise ValueError("must be an absolute path (taskers run on other hosts and directories)")
    return path


AbsPath = Annotated[Path_, AfterValidator(_absolute)]


class JobSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    command: (
        Annotated[list[Arg], Field(min_length=1, max_length=10_000)]
        | Annotated[str, Field(min_length=1, max_length=MAX_ARG)]
    )
    cwd: AbsPath | None = None
    env: Env | None = None
    name: Name | None = None
    priority: Annotated[int, Field(ge=PRIORITY_MIN, le=PRIORITY_MAX)] = PRIORITY_DEFAULT
    resources: Annotated[str, Field(max_length=1000)] = ""
    rerunnable: bool = True
    max_attempts: Annotated[int, Field(ge=1, le=1000)] = MAX_ATTEMPTS_DEFAULT
    log: AbsPath | None = None


class Batch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    jobs: Annotated[list[JobSpec], Field(min_length=1, max_length=MAX_BATCH)]
    env: Env | None = None


class AttemptRef(BaseModel):
    job: int
    attempt: int


class RunningReport(AttemptRef):
    pid: int | None = None
    started: float | None = None


class ResultReport(AttemptRef):
    exit_code: int | None = None
    signal: int | None = None
    started: float | None = None
    ended: float | None = None
    reason: Annotated[str, Field(max_length=4096)] | None = None
    lost: bool = False  # no result: the attempt died with its tasker (recovered, not failed)


class Register(BaseModel):
    host: Name
    pid: int = 0
    slots: Annotated[int, Field(ge=0, le=100_000)]
    resources: Annotated[str, Field(max_length=1000)] = ""
    boot_id: Name = ""
    rebooted: bool = False
    state_id: Name = ""
    running: list[RunningReport] = []
    finished: list[ResultReport] = []


class Sync(BaseModel):
    started: list[RunningReport] = []
    finished: list[ResultReport] = []
    running: list[AttemptRef] = []
    wait: Annotated[float, Field(ge=0, le=300)] = 0.0


def _is_type_tag(part: object) -> bool:
    """pydantic names union branches in error paths (``list[constrained-str]``): skip them."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "Batch", "JobSpec"))


def _one_line(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(
        str(p) for p in err["loc"] if p not in ("Batch", "JobSpec", "str", "list[str]")
    )
    more = f" (and {e.error_count() - 1} more problems)" if e.error_count() > 1 else ""
    return f"{where or 'body'}: {err['msg']}{more}"


def parse_json(body: bytes) -> Any:
    if len(body) > MAX_BODY:
        raise BadRequest(413, "too_large", f"request body over {MAX_BODY} bytes")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise BadRequest(400, "bad_json", f"malformed JSON: {e}") from None


def validate(model: type[BaseModel], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise BadRequest(422, "invalid", _one_line(e)) from None


def parse_submit(data: Any) -> Batch:
    if isinstance(data, dict) and "jobs" in data:
        return validate(Batch, data)
    return Batch(jobs=[validate(JobSpec, data)])
