"""Commands: check a request against the state and return the events that carry it out.

Every producer of events is here (the scheduler's dispatch aside, server/scheduler.py):
requests of clients and taskers, the monitor's lost taskers, the operator's cleanup, a clean
stop's release. Nothing here changes the state; the engine applies and journals what is returned. A
refused command raises BadRequest and so changes nothing (invariant 6). Reports from
taskers are fenced by ``(job, attempt)``: only the current attempt on the tasker it was
sent to may start or finish a job (invariant 4).

A tasker name belongs to the session that registered it: a secret the tasker keeps in its
state dir and shows at every request; the state keeps only its hash (``Tasker.session``).
Another session takes the name only from a holder that is lost or silent past the tasker
timeout, and the takeover recovers every attempt of the old session. So the running
attempts of a name were all dispatched to its current session, and reports under any
other session are refused (invariant 9: no one acts as someone else).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import hmac
import math
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from crq.server import events as event
from crq.server import gates, identity
from crq.server.events import (
    ArrayEvent,
    EpochEvent,
    Event,
    Hold,
    Release,
    Rerun,
    Stop,
    TokenIssue,
    TokenRevoke,
    spec_bytes,
)
from crq.server.models import (
    MAX_ARRAY,
    MAX_BATCH,
    MAX_KILL_GRACE,
    MAX_TIME_LIMIT,
    After,
    AttemptRef,
    BadRequest,
    Batch,
    JobSpec,
    Register,
    ResultReport,
    RunningReport,
    parse_submit,
)
from crq.server.resources import ResourceError, parse_capacity
from crq.server.state import TASKER_READY, Job, State, env_digest
from pydantic import ValidationError

from crq.wire import FINAL_STATES, QUEUED, RUNNING, WAITING

Ref = tuple[int, int]


def _job(state: State, job_id: int) -> Job:
    job = state.jobs.get(job_id)
    if job is None:
        raise BadRequest(404, "not_found", f"no job {job_id}")
    return job


ID_BLOCK = 10_000  # ids reserved at a time: one high-water mark write per block


def reserve_ids(state: State, last: int, now: float) -> list[Event]:
    """A new block of ids when ``last`` is past the reserved ones (see State._ids)."""
    if last < state.id_ceiling:
        return []
    return [{"e": "ids", "t": now, "ceiling": (last // ID_BLOCK + 1) * ID_BLOCK + 1}]


SLICE = 2000  # jobs of a big submit checked between two turns of the event loop
_gc_pauses = [0, True]  # big submits under way, whether the collector was on before


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """The cyclic garbage collector off while big batches are checked and applied.

    A 100,000-job batch makes a few hundred thousand objects that either live on (jobs)
    or die by reference count (parsed JSON, pydantic models); none is in a cycle. Left
    on, the collector ran full passes over all of them, up to 0.35 s each, several per
    batch. After an accepted batch its jobs are frozen out of the collector's sight (as
    the checkpoint task does every 30 s) before it is turned back on.
    """
    if _gc_pauses[0] == 0:
        _gc_pauses[1] = gc.isenabled()
        gc.disable()
    _gc_pauses[0] += 1
    accepted = False
    try:
        yield
        accepted = True
    finally:
        _gc_pauses[0] -= 1
        if _gc_pauses[0] == 0 and _gc_pauses[1]:
            if accepted:  # not after a refusal: its garbage (a traceback's cycles) must go
                gc.freeze()
            gc.enable()


def submit(
    state: State, batch: Batch, user: str, now: float, key: tuple[str, str] | None = None
) -> tuple[list[Event], list[int]]:
    sub = Submission(batch.env, user, len(batch.jobs))
    sub.add(state, batch.jobs)
    return sub.events(state, now, key)


async def submit_sliced(
    state: State, data: Any, user: str, max_array: int = MAX_ARRAY
) -> Submission:
    """Validate and check a submit body; a big batch in slices, yielding in between.

    In one go, a 100,000-job batch held the event loop for seconds (pydantic, then the
    checks), and /healthz, syncs and every other request waited. Every job is checked
    before anything is emitted, so a refused batch still changes nothing.
    """
    jobs = data.get("jobs") if isinstance(data, dict) else None
    if not isinstance(jobs, list) or len(jobs) <= SLICE:
        batch = parse_submit(data)
        sub = Submission(batch.env, user, len(batch.jobs), max_array)
        sub.add(state, batch.jobs)
        return sub
    if len(jobs) > MAX_BATCH:  # said before validating millions of jobs only to refuse them
        raise BadRequest(
            422, "invalid", f"jobs: at most {MAX_BATCH} jobs in one submit, not {len(jobs)}"
        )
    head = parse_submit({**data, "jobs": jobs[:1]})  # all but the jobs: env, unknown keys
    specs: list[JobSpec] = []
    for at in range(0, len(jobs), SLICE):
        await asyncio.sleep(0)
        try:
            specs += Batch.model_validate({"jobs": jobs[at : at + SLICE]}).jobs
        except ValidationError:
            parse_submit(data)  # refused: in one go, for the message a small batch would get
            raise
    sub = Submission(head.env, user, len(jobs))
    for at in range(0, len(specs), SLICE):
        await asyncio.sleep(0)
        sub.add(state, specs[at : at + SLICE])
    return sub


class Submission:
    """A submit checked a slice at a time (``add``), then turned into events at once.

    Ids and env ids are given by ``events`` from the state as it is then, so whatever ran
    between the slices (other submits, forgets), the batch's ids are contiguous and the
    envs it refers to exist.
    """

    def __init__(
        self,
        batch_env: dict[str, str] | None,
        user: str,
        size: int,
        max_array: int = MAX_ARRAY,
    ) -> None:
        self.max_array = max_array  # config.toml's max_array
        self.batch_env = batch_env
        self.batch_digest = env_digest(batch_env) if batch_env else None
        self.user = user
        self.many = size > 1
        self.rows: list[list[Any]] = []  # the submit event's jobs; id, env as placeholders
        self.specs: list[bytes] = []
        self.envs: dict[str, dict[str, str]] = {}  # by digest, in order of first use
        # server/gates.py: a row's dependencies ([type, job id] or [type, -1 - batch index]
        # until ids are given) with its spec to finish then, the rows held, an array
        self.after: dict[int, tuple[list[list[Any]], dict[str, Any]]] = {}
        self.held: list[int] = []
        self.array: tuple[int, int, int, int | None] | None = None  # start, count, step, max

    def add(self, state: State, specs: Iterable[JobSpec]) -> None:
        """Check and convert the next jobs; BadRequest refuses the whole batch."""
        rows = self.rows
        for spec in specs:
            i = len(rows)
            where = f"jobs[{i}]." if self.many else ""
            try:
                need = state.needs.get(spec.resources)
            except ResourceError as e:
                raise BadRequest(422, "invalid", f"{where}resources: {e}") from None
            for k, _ in need.globals:
                if k not in state.global_total:
                    raise BadRequest(422, "invalid", f"{where}resources: unknown resource {k}")
            if spec.env is None:
                env, digest = self.batch_env, self.batch_digest
            else:
                env = spec.env
                digest = env_digest(env) if env else None
            if env and digest is not None and digest not in self.envs:
                self.envs[digest] = env
            command = spec.command
            if command is None and spec.script is None:
                raise BadRequest(422, "invalid", f"{where}command: is required")
            if spec.script is not None and isinstance(command, str):
                raise BadRequest(
                    422, "invalid", f"{where}command: with a script, a list of its arguments"
                )
            rows.append(
                [
                    i,
                    spec.priority,
                    need.resources,
                    spec.name or (_default_name(command) if command else "script"),
                    digest,
                    spec.rerunnable,
                    spec.max_attempts,
                ]
            )
            stored: dict[str, Any] = {
                "command": command or [],
                "cwd": spec.cwd or os.getcwd(),
                "log": spec.log,
            }
            # the new keys only when set: a plain job's spec costs what it did
            if spec.time_limit is not None:
                if not 0 < spec.time_limit <= MAX_TIME_LIMIT:
                    raise BadRequest(
                        422,
                        "invalid",
                        f"{where}time_limit: must be a number of seconds above 0 and at most "
                        f"{MAX_TIME_LIMIT:.0f} (366 days)",
                    )
                stored["time_limit"] = spec.time_limit
            if spec.kill_grace is not None:
                if not 0 <= spec.kill_grace <= MAX_KILL_GRACE:
                    raise BadRequest(
                        422,
                        "invalid",
                        f"{where}kill_grace: must be a number of seconds from 0 to "
                        f"{MAX_KILL_GRACE:.0f}",
                    )
                stored["kill_grace"] = spec.kill_grace
            if spec.script is not None:
                stored["script"] = spec.script
            if spec.hold:
                self.held.append(i)
            if spec.array is not None:
                self._array(spec, where)
            if spec.after:
                self.after[i] = (self._after(state, spec.after, i, where), stored)
                self.specs.append(b"")  # made in events(), once the batch's ids are known
            else:
                self.specs.append(spec_bytes(stored))

    def _after(self, state: State, after: list[After], i: int, where: str) -> list[list[Any]]:
        out: list[list[Any]] = []
        for k, a in enumerate(after):
            at = f"{where}after[{k}]"
            if (a.job is None) == (a.index is None):
                raise BadRequest(422, "invalid", f"{at}: give one of job or index")
            if a.index is not None:
                if a.index >= i:
                    raise BadRequest(
                        422, "invalid", f"{at}: index {a.index} is not an earlier job of the batch"
                    )
                out.append([a.type, -1 - a.index])
            else:
                assert a.job is not None
                if a.job not in state.jobs:
                    raise BadRequest(
                        422, "invalid", f"{at}: no job {a.job} (unknown, or forgotten)"
                    )
                out.append([a.type, a.job])
        return out

    def _array(self, spec: JobSpec, where: str) -> None:
        arr = spec.array
        assert arr is not None
        if self.many:
            raise BadRequest(422, "invalid", f"{where}array: an array is submitted alone")
        count = gates.array_size(arr.start, arr.stop, arr.step)
        if count < 1:
            raise BadRequest(422, "invalid", f"array: stop {arr.stop} is below start {arr.start}")
        if count > self.max_array:
            raise BadRequest(
                422, "invalid", f"array: at most {self.max_array} elements here, not {count}"
            )
        self.array = (arr.start, count, arr.step, arr.max_running)

    def _resolve_after(self, state: State, first: int) -> None:
        """Dependencies on the batch's own jobs get their ids; every other parent must
        still be there (one may have been forgotten while a big batch was checked)."""
        for i, (after, cold) in self.after.items():
            for dep in after:
                if dep[1] < 0:
                    dep[1] = first - 1 - dep[1]
                elif dep[1] not in state.jobs:
                    raise BadRequest(422, "invalid", f"after: no job {dep[1]} (forgotten)")
            cold["after"] = after
            self.specs[i] = spec_bytes(cold)

    def env_slices(self, state: State) -> Iterator[list[Event]]:
        """The env events of a big batch, a slice at a time, numbered from the state as it
        is when each slice is asked for: emit one, yield to the loop, ask for the next.
        An env defined so, ahead of its jobs, is unused until the submit; one left unused
        by a crash in between is harmless (as one a torn journal tail can leave)."""
        items = list(self.envs.items())
        for at in range(0, len(items), SLICE):
            events: list[Event] = []
            next_env = state.next_env
            for digest, env in items[at : at + SLICE]:
                if digest not in state.env_by_digest:
                    events.append({"e": "env", "id": next_env, "env": env})
                    next_env += 1
            if events:
                yield events

    def events(
        self, state: State, now: float, key: tuple[str, str] | None = None
    ) -> tuple[list[Event], list[int]]:
        """The env and submit events, numbered from the state now (call once, then emit).
        ``key``: the request's Idempotency-Key and body digest, journaled with the submit."""
        count = self.array[1] if self.array is not None else len(self.rows)
        self._resolve_after(state, state.next_id)
        events = reserve_ids(state, state.next_id + count - 1, now)
        env_ids: dict[str, int] = {}
        next_env = state.next_env
        for digest, env in self.envs.items():
            env_id = state.env_by_digest.get(digest)
            if env_id is None:
                env_id, next_env = next_env, next_env + 1
                events.append({"e": "env", "id": env_id, "env": env})
            env_ids[digest] = env_id
        first = state.next_id
        for row in self.rows:
            row[0] += first
            if row[4] is not None:
                row[4] = env_ids[row[4]]
        user = sys.intern(self.user)
        if self.array is not None:
            events.append(self._array_event(user, first, now, key))
            return events, list(range(first, first + count))
        sub: event.Submit = {
            "e": "submit",
            "t": now,
            "user": user,
            "jobs": self.rows,
            "specs": self.specs,
        }
        if key is not None:
            sub["key"], sub["kd"] = key
        if self.after:
            sub["after"] = [[i, after] for i, (after, _) in self.after.items()]
        if self.held:
            sub["held"] = self.held
        events.append(sub)
        return events, [row[0] for row in self.rows]

    def _array_event(
        self, user: str, first: int, now: float, key: tuple[str, str] | None
    ) -> ArrayEvent:
        assert self.array is not None
        start, count, step, cap = self.array
        ev: ArrayEvent = {
            "e": "array",
            "t": now,
            "user": user,
            "first": first,
            "count": count,
            "start": start,
            "step": step,
            "max_running": cap,
            "job": self.rows[0][1:],
            "spec": self.specs[0].decode(),
        }
        if 0 in self.after:
            ev["after"] = self.after[0][0]
        if self.held:
            ev["held"] = True
        if key is not None:
            ev["key"], ev["kd"] = key
        return ev


def body_digest(body: bytes) -> str:
    """What a key remembers of its request: enough to tell another body from a retry."""
    return hashlib.blake2b(body, digest_size=8).hexdigest()


def repeated(
    state: State, user: str, key: str, digest: str, now: float, window: float
) -> list[int] | None:
    """The ids of an earlier submit under this key and user within ``window`` seconds, or
    None. The same key with another body is refused: the client reused a key by mistake.
    Ids of jobs forgotten since are still the answer: they were the first answer."""
    entry = state.keys.get((user, key))
    if entry is None or now - entry[2] > window:
        return None
    first, count, _, kd = entry
    if kd != digest:
        raise BadRequest(
            422,
            "idempotency_mismatch",
            f"Idempotency-Key {key} was used for another request (jobs {first}.."
            f"{first + count - 1}): a new request needs a new key",
        )
    return list(range(first, first + count))


def expire_keys(state: State, now: float, window: float) -> list[Event]:
    """Forget the keys older than ``window``, once the oldest one is (a periodic task)."""
    oldest = next(iter(state.keys.values()), None)
    if oldest is None or now - oldest[2] <= window:
        return []
    return [{"e": "keys_expire", "t": now, "before": now - window}]


def _default_name(command: list[str] | str) -> str:
    word = command[0] if isinstance(command, list) else command.split(maxsplit=1)[0]
    return os.path.basename(word)[:256]


def stop(state: State, job_id: int, now: float, by: str | None = None) -> list[Event]:
    job = _job(state, job_id)
    if job.state in FINAL_STATES:
        raise BadRequest(409, "conflict", f"job {job_id} is already {job.state}")
    if job.stop_requested:
        return []
    ev: Stop = {"e": "stop", "t": now, "job": job_id}
    if by is not None:
        ev["by"] = by
    return [ev]


def rerun(state: State, job_id: int, now: float, by: str | None = None) -> list[Event]:
    job = _job(state, job_id)
    if job.state not in FINAL_STATES:
        raise BadRequest(409, "conflict", f"job {job_id} is {job.state}; only ended jobs rerun")
    for kind, parent_id in state.after_of(job):
        parent = state.jobs.get(parent_id)
        if parent is not None and gates.met(kind, parent.state) is False:
            raise BadRequest(
                409,
                "conflict",
                f"job {job_id}: {gates.broken_reason(kind, parent_id, parent.state)}; "
                f"rerun job {parent_id} first",
            )
    ev: Rerun = {"e": "rerun", "t": now, "job": job_id}
    if by is not None:
        ev["by"] = by
    return [ev]


def hold(state: State, job_id: int, now: float, by: str | None = None) -> list[Event]:
    job = _job(state, job_id)
    if job.state not in (QUEUED, WAITING):
        raise BadRequest(
            409, "conflict", f"job {job_id} is {job.state}; only queued or waiting jobs hold"
        )
    w = state.waits.get(job_id)
    if w is not None and w.held:
        return []
    ev: Hold = {"e": "hold", "t": now, "jobs": [job_id]}
    if by is not None:
        ev["by"] = by
    return [ev]


def release(state: State, job_id: int, now: float, by: str | None = None) -> list[Event]:
    job = _job(state, job_id)
    w = state.waits.get(job_id)
    if w is None or not w.held:
        if job.state in (QUEUED, WAITING):
            return []  # not held: nothing to do, as for a second release
        raise BadRequest(409, "conflict", f"job {job_id} is {job.state}, not held")
    ev: Release = {"e": "release", "t": now, "jobs": [job_id]}
    if by is not None:
        ev["by"] = by
    return [ev]


def forget(state: State, job_id: int, now: float, by: str | None = None) -> list[Event]:
    job = _job(state, job_id)
    if job.state == RUNNING:
        raise BadRequest(409, "conflict", f"job {job_id} is running; stop it first")
    ev = event.forget([job_id], now)
    if by is not None:
        ev["by"] = by
    return [ev]


# -- personal tokens (SPEC 9; server/identity.py) -----------------------------------------


def issue_token(
    state: State,
    user: str,
    role: str | None,
    expires: float | None,
    note: str,
    by: str,
    now: float,
) -> tuple[list[Event], str]:
    """The event of a new token, and its text (shown once; the event keeps its hash)."""
    token_id, text = identity.new_token()
    while token_id in state.tokens:
        token_id, text = identity.new_token()
    ev: TokenIssue = {
        "e": "token_issue",
        "t": now,
        "id": token_id,
        "user": user,
        "role": role,
        "hash": identity.token_hash(text.encode()),
        "expires": expires,
        "by": by,
        "note": note,
    }
    return [ev], text


def revoke_token(state: State, token_id: str, by: str, now: float) -> list[Event]:
    if token_id not in state.tokens:
        raise BadRequest(404, "not_found", f"no token {token_id}")
    ev: TokenRevoke = {"e": "token_revoke", "t": now, "id": token_id, "by": by}
    return [ev]


TOKEN_KEEP = 86_400.0  # an expired token is still listed (as expired) for a day, then dropped


def prune_tokens(state: State, now: float, keep: float = TOKEN_KEEP) -> list[Event]:
    """Expired tokens are dropped a while after they expired (a periodic task), as
    revocations by ``expiry``: they open nothing already; kept, they would pile up."""
    out: list[Event] = []
    for t in state.tokens.values():
        if t.expires is not None and t.expires < now - keep:
            ev: TokenRevoke = {"e": "token_revoke", "t": now, "id": t.id, "by": "expiry"}
            out.append(ev)
    return out


@dataclass
class Outcome:
    """What a tasker's reports lead to: events to apply, reports to ack, attempts to kill."""

    events: list[Event] = field(default_factory=list)
    ack: list[Ref] = field(default_factory=list)
    kill: set[Ref] = field(default_factory=set)


def session_hash(secret: str) -> str:
    """What the server keeps of a session secret: enough to recognise it, useless to steal."""
    return hashlib.blake2b(secret.encode(), digest_size=16).hexdigest()


class NameInUse(BadRequest):
    """A live session holds the tasker name; ``retry_after``: seconds until it may be taken."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(409, "tasker_name_in_use", message)
        self.retry_after = retry_after


def _holds(state: State, tasker: str, session: str | None) -> bool:
    """Whether ``session`` may report for the name's attempts (None: the caller checked).

    A name with no session yet (a journal from before sessions) is its claimant's, so an
    upgrade keeps its running jobs.
    """
    t = state.taskers.get(tasker)
    if session is None or t is None or not t.session:
        return True
    return hmac.compare_digest(t.session, session)


def _current(state: State, tasker: str, ref: Ref) -> Job | None:
    job = state.jobs.get(ref[0])
    if job is not None and job.state == RUNNING and job.attempt == ref[1] and job.tasker == tasker:
        return job
    return None


def reports(
    state: State,
    tasker: str,
    started: Iterable[RunningReport],
    finished: Iterable[ResultReport],
    now: float,
    out: Outcome | None = None,
    session: str | None = None,
) -> Outcome:
    """Apply what the current attempts report; ack all, kill the stale rivals.

    ``session``: the hash of the reporting session; attempts of a name are its session's,
    so under another session nothing is current.
    """
    out = out or Outcome()
    mine = _holds(state, tasker, session)
    done: set[Ref] = set()
    for r in started:
        ref = (r.job, r.attempt)
        out.ack.append(ref)
        job = _current(state, tasker, ref) if mine else None
        if job is None:
            if not _ended(state, ref):
                out.kill.add(ref)  # superseded: its job went on without it
        elif job.started is None:
            out.events.append(
                {
                    "e": "start",
                    "t": now,
                    "job": r.job,
                    "attempt": r.attempt,
                    "pid": r.pid,
                    "started": r.started or now,
                }
            )
    for f in finished:
        ref = (f.job, f.attempt)
        out.ack.append(ref)
        if ref in done or not mine or _current(state, tasker, ref) is None:
            continue  # a duplicate or a superseded attempt: recorded at most once
        done.add(ref)
        if f.lost:  # killed with its tasker, as the monitor would find it: the rerun policy
            reason = f.reason or f"attempt lost with tasker {tasker}"
            out.events.append(event.recover(f.job, f.attempt, reason, now))
            continue
        out.events.append(
            {
                "e": "finish",
                "t": now,
                "job": f.job,
                "attempt": f.attempt,
                "exit_code": f.exit_code,
                "signal": f.signal,
                "reason": f.reason,
                "started": f.started or now,
                "ended": f.ended or now,
            }
        )
    return out


def _ended(state: State, ref: Ref) -> bool:
    """Whether this very attempt already finished (a late duplicate, not a stale rival)."""
    job = state.jobs.get(ref[0])
    return job is not None and job.attempt == ref[1] and job.state in FINAL_STATES


def register(
    state: State,
    name: str,
    body: Register,
    now: float,
    session: str = "",
    silent_for: float = math.inf,
    timeout: float = 0.0,
) -> Outcome:
    """A tasker (re)joins: adopt what it still runs, record what it finished, fence the rest.

    ``session`` is the hash of the secret the request showed; ``silent_for`` how long the
    name's link has been silent. A name held by another session that is ready and heard
    from within ``timeout`` is refused (NameInUse); one lost or silent longer is taken
    over, and then nothing of the old session is adopted: its attempts are recovered.
    """
    try:  # before any event: an offer the state cannot apply must change nothing
        parse_capacity(body.resources, body.slots)
    except ResourceError as e:
        raise BadRequest(422, "invalid", f"resources: {e}") from None
    tasker = state.taskers.get(name)
    takeover = (
        tasker is not None
        and bool(tasker.session)
        and not hmac.compare_digest(tasker.session, session)
    )
    if takeover and tasker is not None and tasker.state == TASKER_READY and silent_for <= timeout:
        raise NameInUse(
            f"tasker name {name} is held by a live tasker (host {tasker.host}, pid "
            f"{tasker.pid}, heard from {silent_for:.0f} s ago): give this one another --name; "
            f"the name frees after {timeout:.0f} s of silence, or at once with "
            f"`ncmgr cleanup --dead-host {name}`",
            retry_after=timeout - silent_for,
        )
    out = Outcome()
    out.events.append(
        {
            "e": "tasker",
            "t": now,
            "name": name,
            "host": body.host,
            "pid": body.pid,
            "slots": body.slots,
            "resources": body.resources,
            "boot_id": body.boot_id,
            "state_id": body.state_id,
            "session": session,
            **({"user": body.user} if body.user else {}),  # type: ignore[typeddict-item]
        }
    )
    reports(state, name, body.running, body.finished, now, out, session)
    known = {(r.job, r.attempt) for r in body.running} | {(r.job, r.attempt) for r in body.finished}
    if takeover:
        known = set()  # refused above: the old session's attempts are not this one's
    remembers = tasker is not None and bool(body.state_id) and tasker.state_id == body.state_id
    for job_id in sorted(tasker.running) if tasker else ():
        job = state.jobs[job_id]
        if (job_id, job.attempt) in known:
            continue
        if takeover:
            reason = f"tasker {name} taken over by another session (host {body.host})"
        elif body.rebooted:
            reason = f"host {body.host} rebooted"
        elif job.started is not None:
            reason = f"tasker {name} restarted without it"
        elif remembers:
            continue  # never received (the tasker remembers all it spawned): sent again
        else:
            # Dispatched, never confirmed, and the tasker lost its memory (new state dir):
            # it may have run and died. A new, counted attempt keeps fencing exact and lets
            # a job that kills its host before reporting still end lost after max_attempts.
            reason = f"tasker {name} came back without its state (attempt never confirmed)"
        out.events.append(event.recover(job_id, job.attempt, reason, now))
    return out


def lose_tasker(state: State, name: str, reason: str, now: float) -> list[Event]:
    """A tasker is lost (silent, did not come back, declared dead): recover its attempts."""
    tasker = state.taskers[name]
    events: list[Event] = [event.tasker_lost(name, reason, now)]
    for job_id in sorted(tasker.running):
        events.append(event.recover(job_id, state.jobs[job_id].attempt, reason, now))
    return events


def release_running(state: State, now: float) -> list[Event]:
    """A clean stop without --freeze: taskers kill their jobs; requeue them, uncharged."""
    return [
        event.recover(j.id, j.attempt, "server stopped", now, charge=False)
        for j in state.jobs.values()
        if j.state == RUNNING
    ]


CLEANUP_REASON = "manual cleanup"  # ncmgr cleanup (server/cleanup.py)


def recover_job(state: State, job_id: int, now: float, by: str | None = None) -> list[Event]:
    """The operator recovers a running attempt (``ncmgr cleanup --job``)."""
    job = _job(state, job_id)
    if job.state != RUNNING:
        raise BadRequest(
            409, "conflict", f"job {job_id} is {job.state}, not running: nothing to recover"
        )
    reason = f"{CLEANUP_REASON}: job {job_id} recovered by the operator"
    ev = event.recover(job_id, job.attempt, reason, now)
    if by is not None:
        ev["by"] = by
    return [ev]


def dead_host(state: State, host: str, now: float) -> list[Event]:
    """The operator declares a host (or a tasker name) dead: its taskers are lost."""
    names = [n for n, t in state.taskers.items() if t.host == host or n == host]
    if not names:
        raise BadRequest(404, "not_found", f"no tasker on host {host}")
    events: list[Event] = []
    for name in names:
        events += lose_tasker(state, name, f"{CLEANUP_REASON}: host {host} declared dead", now)
    return events


def action_of(job: Job) -> str:
    """What a recover did to the job, as cleanup and recovery reports say it."""
    return "requeued" if job.state == QUEUED else job.state


def sync_orders(
    state: State, name: str, running: Iterable[AttemptRef], reported: set[Ref]
) -> tuple[list[Job], set[Ref]]:
    """Dispatches still to deliver and attempts to kill, derived from the state.

    A dispatch is repeated until the tasker reports the attempt, so a lost answer loses
    nothing; the tasker ignores attempts it already has.
    """
    have = {(r.job, r.attempt) for r in running} | reported
    kill: set[Ref] = set()
    for ref in have:
        job = state.jobs.get(ref[0])
        if job is None or job.state == QUEUED or job.attempt != ref[1]:
            kill.add(ref)
        elif job.state == RUNNING and (job.tasker != name or job.stop_requested):
            kill.add(ref)
    tasker = state.taskers.get(name)
    send = []
    for job_id in tasker.running if tasker else ():
        job = state.jobs[job_id]
        if job.started is None and (job_id, job.attempt) not in have:
            send.append(job)
    return send, kill


def take_over(
    epoch: int, after: int, leader: dict[str, Any], prev: dict[str, Any], now: float
) -> EpochEvent:
    """The first event of a leader: its epoch, whom it follows, where it took over."""
    return {"e": "epoch", "t": now, "epoch": epoch, "after": after, "leader": leader, "prev": prev}
