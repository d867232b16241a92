"""The events: what each kind carries (the catalogue), and how it is written as a journal
record and read back.

Every change of the state is one of the kinds declared here (``State.apply`` has one
handler per kind). They are ``TypedDict``s, so at run time an event is the plain dict orjson
writes, at no cost, while mypy checks both ends: the commands that build events and the
handlers that apply them. A kind's fields only grow, and a new field is ``NotRequired``
while journals written without it may still be replayed (see ``snapshot.VERSION``).

Most events are one JSON object. A submit event is the exception, because it is nearly all
of a big journal: each job's cold fields (command, cwd, log) live in memory as their JSON
bytes (``Job.spec``), and the record keeps those bytes raw, one per line after the event's
own JSON. So neither a live submit nor a replay encodes a spec twice, and a replay splits
the record instead of parsing every spec. orjson never writes a raw newline (it escapes
control characters in strings), so a line break can only be a separator.

A submit event: ``{"e": "submit", "t", "user", "jobs": [[id, priority, resources, name,
env, rerunnable, max_attempts], …]}`` plus ``"specs"``: the spec bytes, in job order,
and, for a request with an Idempotency-Key, ``"key"`` and ``"kd"`` (its body's digest).
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired, TypedDict

import orjson

# -- the catalogue: one TypedDict a kind; ``t`` is the time the command decided it ----------


class Env(TypedDict):
    """An environment, defined once and named by ``id`` in the jobs that share it."""

    e: Literal["env"]
    id: int
    env: dict[str, str]


class Ids(TypedDict):
    """Ids below ``ceiling`` are reserved (server/marks.py keeps the mark outside too)."""

    e: Literal["ids"]
    t: float
    ceiling: int
    next_id: NotRequired[int]  # at start after a lost journal tail: ids jump past the loss


class Submit(TypedDict):
    """Jobs queued together: a row a job (SUBMIT_FIELDS), its spec bytes in ``specs``."""

    e: Literal["submit"]
    t: float
    user: str
    jobs: list[list[Any]]
    specs: list[bytes]  # written raw after the record's JSON, one a line (see encode)
    key: NotRequired[str]  # the request's Idempotency-Key (absent: none, or an older journal)
    kd: NotRequired[str]  # with ``key``: a digest of the request body (server/commands.py)
    # server/gates.py: [[index in jobs, [[type, parent id], …]], …], and the indexes held
    after: NotRequired[list[list[Any]]]
    held: NotRequired[list[int]]


class ArrayEvent(TypedDict):
    """An array: ``count`` jobs from id ``first`` sharing one row and one spec (SPEC 10);
    element k has index ``start + k * step``."""

    e: Literal["array"]
    t: float
    user: str
    first: int
    count: int
    start: int
    step: int
    max_running: int | None
    job: list[Any]  # SUBMIT_FIELDS without the id: priority, resources, name, env, …
    spec: str  # the spec's JSON, shared by every element
    after: NotRequired[list[list[Any]]]  # [[type, parent id], …], for every element
    held: NotRequired[bool]
    key: NotRequired[str]
    kd: NotRequired[str]


class Hold(TypedDict):
    """Jobs kept from dispatch (queued or waiting ones), at their place in the queue."""

    e: Literal["hold"]
    t: float
    jobs: list[int]
    by: NotRequired[str]


class Release(TypedDict):
    """Held jobs let go: queued again unless dependencies still hold them back."""

    e: Literal["release"]
    t: float
    jobs: list[int]
    by: NotRequired[str]


class KeysExpire(TypedDict):
    """Idempotency keys of submits before ``before`` are forgotten (the window passed)."""

    e: Literal["keys_expire"]
    t: float
    before: float


class Dispatch(TypedDict):
    """The scheduler gives attempt ``attempt`` of a queued job to a tasker."""

    e: Literal["dispatch"]
    t: float
    job: int
    attempt: int
    tasker: str


class Start(TypedDict):
    """The tasker reports the attempt's process running."""

    e: Literal["start"]
    t: float
    job: int
    attempt: int
    pid: int | None
    started: float


class Finish(TypedDict):
    """The tasker reports the attempt ended: done, failed or (if asked to) stopped."""

    e: Literal["finish"]
    t: float
    job: int
    attempt: int
    exit_code: int | None
    signal: int | None
    reason: str | None
    started: float
    ended: float


class Recover(TypedDict):
    """The attempt is gone (tasker lost, host rebooted, operator): requeue or give up."""

    e: Literal["recover"]
    t: float
    job: int
    attempt: int
    reason: str
    charge: NotRequired[bool]  # False: a planned stop, the attempt is not counted
    by: NotRequired[str]  # who recovered it by hand (ncmgr cleanup --job)


class Stop(TypedDict):
    """Stop a job: at once if queued, else when its tasker reports it ended."""

    e: Literal["stop"]
    t: float
    job: int
    by: NotRequired[str]  # who asked (absent: an older journal, or the server itself)


class Rerun(TypedDict):
    """An ended job queued again, its tries counted afresh."""

    e: Literal["rerun"]
    t: float
    job: int
    by: NotRequired[str]  # who asked (absent: an older journal, or the server itself)


class Forget(TypedDict):
    """Jobs dropped from the state (by a client, or autoforget of old ended jobs)."""

    e: Literal["forget"]
    t: float
    jobs: list[int]
    by: NotRequired[str]  # who asked (absent: autoforget, or an older journal)


class TaskerJoin(TypedDict):
    """A tasker (re)registers its offer (kind ``tasker``); its name is then its session's."""

    e: Literal["tasker"]
    t: float
    name: str
    host: str
    pid: int
    slots: int
    resources: str
    boot_id: str
    state_id: NotRequired[str]  # absent in journals from before state ids
    session: NotRequired[str]  # hash of the session secret; absent before sessions
    user: NotRequired[str]  # a tasker not running as root runs only this user's jobs


class TaskerLost(TypedDict):
    """A tasker is declared lost; its attempts come as ``recover`` events after it."""

    e: Literal["tasker_lost"]
    t: float
    name: str
    reason: str


class Resources(TypedDict):
    """The global resources configured at start."""

    e: Literal["resources"]
    t: float
    totals: dict[str, int]


class TokenIssue(TypedDict):
    """A personal token is issued: only its hash is kept (server/identity.py)."""

    e: Literal["token_issue"]
    t: float
    id: str
    user: str
    role: str | None  # None: the user's role by config.toml at each use
    hash: str
    expires: float | None
    by: str
    note: str


class TokenRevoke(TypedDict):
    """A personal token stops opening anything."""

    e: Literal["token_revoke"]
    t: float
    id: str
    by: str


class EpochEvent(TypedDict):
    """A leader takes over (server/fence.py): the first record of its epoch."""

    e: Literal["epoch"]
    t: float
    epoch: int
    after: int  # the journal it read ended at this seq
    leader: dict[str, Any]  # url, host, instance, election of the new leader
    prev: dict[str, Any]  # the same of the one before (epoch, url, …; {} for the first)


Event = (
    Env
    | Ids
    | Submit
    | Dispatch
    | Start
    | Finish
    | Recover
    | Stop
    | Rerun
    | Forget
    | TaskerJoin
    | TaskerLost
    | Resources
    | EpochEvent
    | KeysExpire
    | TokenIssue
    | TokenRevoke
    | ArrayEvent
    | Hold
    | Release
)


# -- constructors of the shapes built in several places -----------------------------------


def recover(job: int, attempt: int, reason: str, now: float, *, charge: bool = True) -> Recover:
    ev: Recover = {"e": "recover", "t": now, "job": job, "attempt": attempt, "reason": reason}
    if not charge:
        ev["charge"] = False
    return ev


def tasker_lost(name: str, reason: str, now: float) -> TaskerLost:
    return {"e": "tasker_lost", "t": now, "name": name, "reason": reason}


def forget(jobs: list[int], now: float) -> Forget:
    return {"e": "forget", "t": now, "jobs": jobs}


# -- the journal record ---------------------------------------------------------------------

SUBMIT_FIELDS = ("id", "priority", "resources", "name", "env", "rerunnable", "max_attempts")
NL = b"\n"


def encode(ev: Event) -> bytes:
    if ev["e"] != "submit":
        return orjson.dumps(ev)
    head = orjson.dumps({k: v for k, v in ev.items() if k != "specs"})
    return NL.join([head, *ev["specs"]])


def decode(payload: bytes) -> Event:
    """The event of a record; not checked against the catalogue (apply finds a bad one)."""
    rec: Any
    if payload.find(NL) < 0:
        rec = orjson.loads(payload)
        if rec.get("e") == "submit" and "specs" not in rec:
            _upgrade_submit(rec)
        ev: Event = rec
        return ev
    lines = payload.split(NL)
    rec = orjson.loads(lines[0])
    del lines[0]
    if len(lines) != len(rec["jobs"]):
        raise ValueError(f"submit record has {len(lines)} specs for {len(rec['jobs'])} jobs")
    rec["specs"] = lines
    ev = rec
    return ev


def spec_bytes(spec: dict[str, Any]) -> bytes:
    """A spec's JSON as an exact-size bytes (orjson's own result keeps a larger buffer)."""
    return bytes(memoryview(orjson.dumps(spec)))


def _upgrade_submit(ev: dict[str, Any]) -> None:
    """A submit written before specs were kept raw (jobs as objects, each with its spec)."""
    jobs = ev["jobs"]
    ev["specs"] = [spec_bytes(j["spec"]) for j in jobs]
    ev["jobs"] = [[j[k] for k in SUBMIT_FIELDS] for j in jobs]
