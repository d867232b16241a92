"""The queue's in-memory state and the one function that changes it.

``State.apply(event)`` is the only writer, used alike by live operation (after a command
validated the event) and by replay of the journal, so both end in the same state
(SPEC invariant 2). Events are plain dicts keyed by ``"e"``; they carry every time and
decision they depend on, so applying them is deterministic.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, overload

import orjson
from crq.server import gates
from crq.server.events import (
    ArrayEvent,
    Dispatch,
    Env,
    EpochEvent,
    Event,
    Finish,
    Forget,
    Hold,
    Ids,
    KeysExpire,
    Recover,
    Release,
    Rerun,
    Resources,
    Start,
    Stop,
    Submit,
    TaskerJoin,
    TaskerLost,
    TokenIssue,
    TokenRevoke,
)
from crq.server.gates import Array, Wait
from crq.server.offers import TASKER_READY as TASKER_READY  # re-exported: state names it
from crq.server.offers import Offers, build
from crq.server.offers import Tasker as Tasker
from crq.server.resources import Need, NeedCache, parse_capacity

from crq.wire import DONE, FAILED, FINAL_STATES, LOST, QUEUED, RUNNING, STOPPED, WAITING

TASKER_LOST = "lost"
T = TypeVar("T")
ACTIVE = frozenset((QUEUED, RUNNING))  # what an array's max_running counts


#: An idempotency key's entry: (first id, job count, time of the submit, body digest); its
#: ids are first .. first + count - 1 (a submit's ids are contiguous).
KeyEntry = tuple[int, int, float, str]
# a control action on a job: time, action, who (kept only for jobs that had one)
Control = tuple[float, str, str]


@dataclass(slots=True)
class Token:
    """A personal token as the server keeps it: never its text, only the hash of it."""

    id: str
    user: str
    role: str | None
    hash: str
    expires: float | None
    created: float
    by: str
    note: str

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "user": self.user,
            "role": self.role,
            "created": self.created,
            "expires": self.expires,
            "by": self.by,
            "note": self.note,
        }


def env_digest(env: dict[str, str]) -> str:
    return hashlib.blake2b(
        orjson.dumps(env, option=orjson.OPT_SORT_KEYS), digest_size=16
    ).hexdigest()


class Attempt:
    __slots__ = (
        "attempt",
        "tasker",
        "host",
        "dispatched",
        "started",
        "ended",
        "outcome",
        "exit_code",
        "reason",
    )

    def __init__(self, attempt: int, tasker: str, host: str, dispatched: float) -> None:
        self.attempt = attempt
        self.tasker = tasker
        self.host = host
        self.dispatched = dispatched
        self.started: float | None = None
        self.ended: float | None = None
        self.outcome: str | None = None
        self.exit_code: int | None = None
        self.reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Attempt:
        a = cls(d["attempt"], d["tasker"], d["host"], d["dispatched"])
        a.started, a.ended, a.outcome, a.exit_code = (
            d["started"],
            d["ended"],
            d["outcome"],
            d["exit_code"],
        )
        a.reason = d.get("reason")
        return a


class Run:
    """What a job holds once it was dispatched or stopped; None until then (a queued job's
    22 fields as 11 saves 80 bytes of each of a million queued jobs)."""

    __slots__ = (
        "attempt",
        "tries",
        "tasker",
        "pid",
        "started",
        "ended",
        "exit_code",
        "signal",
        "reason",
        "stop_requested",
        "attempts",
    )

    def __init__(self) -> None:
        self.attempt = 0
        self.tries = 0
        self.tasker: str | None = None
        self.pid: int | None = None
        self.started: float | None = None
        self.ended: float | None = None
        self.exit_code: int | None = None
        self.signal: int | None = None
        self.reason: str | None = None
        self.stop_requested = False
        self.attempts: list[Attempt] | None = None


class RunField(Generic[T]):
    """A job's field kept in its Run: the default while it has none; setting the default
    on a job without one makes none."""

    def __init__(self, default: T) -> None:
        self.default = default
        self.slot: Any = None

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = Run.__dict__[name]  # the Run slot's own descriptor: no lookup by name

    @overload
    def __get__(self, job: None, owner: type) -> RunField[T]: ...
    @overload
    def __get__(self, job: Job, owner: type) -> T: ...
    def __get__(self, job: Job | None, owner: type) -> T | RunField[T]:
        if job is None:
            return self
        run = job.run
        if run is None:
            return self.default
        value: T = self.slot.__get__(run)
        return value

    def __set__(self, job: Job, value: T) -> None:
        run = job.run
        if run is None:
            if value is self.default or value == self.default:
                return
            run = job.run = Run()
        self.slot.__set__(run, value)


class Job:
    """One job. Cold fields (command, cwd, log) stay serialized in ``spec``, and those of
    its attempts in ``run`` (None until it is dispatched or stopped), to save memory."""

    __slots__ = (
        "id",
        "state",
        "priority",
        "user",
        "name",
        "need",
        "spec",
        "env",
        "rerunnable",
        "max_attempts",
        "submitted",
        "run",
    )

    attempt = RunField[int](0)
    tries = RunField[int](0)
    tasker = RunField[str | None](None)
    pid = RunField[int | None](None)
    started = RunField[float | None](None)
    ended = RunField[float | None](None)
    exit_code = RunField[int | None](None)
    signal = RunField[int | None](None)
    reason = RunField[str | None](None)
    stop_requested = RunField[bool](False)
    attempts = RunField[list[Attempt] | None](None)

    def __init__(
        self,
        id: int,
        priority: int,
        user: str,
        name: str,
        need: Need,
        spec: bytes,
        env: int | None,
        rerunnable: bool,
        max_attempts: int,
        submitted: float,
    ) -> None:
        self.id = id
        self.state = QUEUED
        self.priority = priority
        self.user = user
        self.name = name
        self.need = need
        self.spec = spec
        self.env = env
        self.rerunnable = rerunnable
        self.max_attempts = max_attempts
        self.submitted = submitted
        self.run: Run | None = None

    def current(self) -> Attempt | None:
        return self.attempts[-1] if self.attempts else None


class Bucket:
    """Queued jobs of one priority and one need, a heap of ids (id order is queue order).

    Entries go stale when a job leaves the queue; they are dropped lazily when they reach
    the top, so leaving the queue costs O(1).
    """

    __slots__ = ("priority", "need", "heap", "count")

    def __init__(self, priority: int, need: Need) -> None:
        self.priority = priority
        self.need = need
        self.heap: list[int] = []
        self.count = 0

    def head(self, jobs: dict[int, Job]) -> int | None:
        heap = self.heap
        while heap:
            job = jobs.get(heap[0])
            if (
                job is not None
                and job.state == QUEUED
                and job.need is self.need
                and job.priority == self.priority
            ):
                return heap[0]
            heapq.heappop(heap)
        return None


class State:
    def __init__(self, global_resources: dict[str, int] | None = None) -> None:
        self.seq = 0  # sequence number of the last event applied
        self.next_id = 1
        self.id_ceiling = 1  # ids below it are reserved (see the "ids" event)
        self.epoch = 0  # of the leader whose records these are (server/fence.py)
        self.leader: dict[str, Any] = {}  # who that is: url, host, instance, election
        self.jobs: dict[int, Job] = {}
        self.taskers: dict[str, Tasker] = {}
        self.envs: dict[int, dict[str, str]] = {}
        self.env_refs: dict[int, int] = {}
        self.env_by_digest: dict[str, int] = {}
        self.next_env = 1
        self.buckets: dict[tuple[int, str], Bucket] = {}
        self.counts: dict[str, int] = dict.fromkeys(
            (QUEUED, WAITING, RUNNING, DONE, FAILED, STOPPED, LOST), 0
        )
        self.global_total: dict[str, int] = dict(global_resources or {})
        self.global_used: dict[str, int] = {}
        self.needs = NeedCache()
        self.offers = Offers()  # derived indexes of the scheduler (server/offers.py)
        # (user, Idempotency-Key) of the submits within the window, oldest first
        self.keys: dict[tuple[str, str], KeyEntry] = {}
        self.tokens: dict[str, Token] = {}  # personal tokens by id
        self.token_by_hash: dict[str, Token] = {}
        self.controls: dict[int, list[Control]] = {}  # job id → who stopped, reran it…
        # server/gates.py: why waiting jobs wait, who waits for whom, the arrays
        self.waits: dict[int, Wait] = {}
        self.dependents: dict[int, list[tuple[int, str]]] = {}
        self.arrays: dict[int, Array] = {}  # by first id
        self.array_firsts: list[int] = []  # their first ids, ascending
        self.capped = 0  # arrays with a max_running
        self._ending: list[tuple[int, str]] | None = None  # parents to settle (see _settle)
        # the time of the event being applied, for the stops it cascades to (set by the
        # handlers whose event can end a job: not per event, replay's hot path)
        self._now = 0.0
        self.on_final: Callable[[Job], None] | None = None
        self.on_forget: Callable[[Job, Forget], None] | None = None  # server/history.py
        # a kind's handler; typed Any here, each handler takes its kind's TypedDict
        self._apply: dict[str, Callable[[Any], None]] = {
            "env": self._env,
            "ids": self._ids,
            "submit": self._submit,
            "dispatch": self._dispatch,
            "start": self._start,
            "finish": self._finish,
            "recover": self._recover,
            "stop": self._stop,
            "rerun": self._rerun,
            "forget": self._forget,
            "tasker": self._tasker,
            "tasker_lost": self._tasker_lost,
            "resources": self._resources,
            "epoch": self._epoch,
            "keys_expire": self._keys_expire,
            "token_issue": self._token_issue,
            "token_revoke": self._token_revoke,
            "array": self._array,
            "hold": self._hold,
            "release": self._release_held,
        }

    # -- the one writer -------------------------------------------------------------------

    def apply(self, event: Event, seq: int | None = None) -> None:
        self._apply[event["e"]](event)
        self.seq = self.seq + 1 if seq is None else seq

    # -- queries --------------------------------------------------------------------------

    def queue_order(self) -> Iterator[int]:
        """Queued ids in dispatch order: priority (high first), then id."""
        jobs = self.jobs
        ids = {
            i
            for b in self.buckets.values()
            if b.count
            for i in b.heap
            if (j := jobs.get(i)) is not None and j.state == QUEUED
        }
        return iter(sorted(ids, key=lambda i: (-jobs[i].priority, i)))

    def global_free(self, name: str) -> int:
        return self.global_total.get(name, 0) - self.global_used.get(name, 0)

    def env_of(self, job: Job) -> dict[str, str]:
        return self.envs.get(job.env, {}) if job.env is not None else {}

    # -- helpers of apply -----------------------------------------------------------------

    def _set_state(self, job: Job, state: str) -> None:
        old = job.state
        self.counts[old] -= 1
        self.counts[state] += 1
        job.state = state
        if self.capped and (old in ACTIVE) != (state in ACTIVE):
            self._array_moved(job, state in ACTIVE)
        if state in FINAL_STATES:
            if self.on_final is not None:
                self.on_final(job)
            if job.id in self.dependents:
                self._settle(job.id, state)

    # -- what keeps jobs waiting (server/gates.py) ------------------------------------------

    def array_of(self, job_id: int) -> Array | None:
        firsts = self.array_firsts
        if not firsts:
            return None
        at = bisect.bisect_right(firsts, job_id) - 1
        if at < 0:
            return None
        arr = self.arrays[firsts[at]]
        return arr if arr.has(job_id) else None

    def _array_moved(self, job: Job, active: bool) -> None:
        """A capped array's element came into or left the queued-or-running count: one
        that left makes room for the next element waiting for the cap, lowest id first."""
        arr = self.array_of(job.id)
        if arr is None or arr.max_running is None:
            return
        arr.active += 1 if active else -1
        while arr.limited and arr.active < arr.max_running:
            job_id = heapq.heappop(arr.limited)
            w = self.waits.get(job_id)
            if w is not None and w.limited:
                w.limited = False
                self._unblock(self.jobs[job_id], w)

    def _wait(self, job: Job, held: bool, after: Iterable[list[Any]], t: float) -> None:
        """A job that was not queued (new, or ended and rerun) starts waiting: for its
        hold, its parents still running, or its array's cap; queued at once if for none,
        stopped if a parent already ended the wrong way."""
        self.counts[job.state] -= 1
        self.counts[WAITING] += 1
        job.state = WAITING
        w = self.waits[job.id] = Wait(held)
        jobs, dependents = self.jobs, self.dependents
        for kind, parent_id in after:
            parent = jobs.get(parent_id)
            if parent is None:  # forgotten since (a rerun's parent: a submit refuses one)
                continue  # it gates no more, as commands.rerun checks
            ok = gates.met(kind, parent.state)
            if ok is None:
                w.pending += 1
                dependents.setdefault(parent_id, []).append((job.id, kind))
            elif not ok:
                self._stop_waiting(job, gates.broken_reason(kind, parent_id, parent.state), t)
                return
        self._unblock(job, w)

    def _unblock(self, job: Job, w: Wait) -> None:
        """Queue a waiting job if nothing holds it back (its array's cap: it waits its turn)."""
        if w.held or w.pending or w.limited:
            return
        if self.capped:
            arr = self.array_of(job.id)
            if arr is not None and arr.max_running is not None and arr.active >= arr.max_running:
                w.limited = True
                heapq.heappush(arr.limited, job.id)
                return
        del self.waits[job.id]
        self.enqueue(job)
        self._set_state(job, QUEUED)

    def _stop_waiting(self, job: Job, reason: str, t: float) -> None:
        self.waits.pop(job.id, None)
        job.ended = t
        job.reason = reason
        self._set_state(job, STOPPED)

    def _settle(self, parent_id: int, outcome: str) -> None:
        """The jobs waiting for ``parent_id`` learn its outcome: released, or stopped if it
        broke their dependency, and so on down the chain. Iterative: a chain of 100,000
        stopped at its head must not recurse 100,000 deep."""
        if self._ending is not None:  # within a settle already: its loop takes this one
            self._ending.append((parent_id, outcome))
            return
        ending = self._ending = [(parent_id, outcome)]
        try:
            while ending:
                pid, out = ending.pop()
                t = self._now
                for child_id, kind in self.dependents.pop(pid, ()):
                    w = self.waits.get(child_id)
                    if w is None:  # stopped or forgotten meanwhile
                        continue
                    child = self.jobs[child_id]
                    if gates.met(kind, out):
                        w.pending -= 1
                        self._unblock(child, w)
                    else:
                        self._stop_waiting(child, gates.broken_reason(kind, pid, out), t)
        finally:
            self._ending = None

    def enqueue(self, job: Job) -> None:
        """Queue a queued job in its bucket (also used by a snapshot's load)."""
        self.enqueue_all((job,))

    def enqueue_all(self, jobs: Iterable[Job]) -> None:
        """enqueue of many jobs: a run of jobs of one bucket looks it up once."""
        buckets = self.buckets
        key: tuple[int, str] | None = None
        bucket: Bucket | None = None
        heap: list[int] = []
        n = 0
        for job in jobs:
            if key != (job.priority, job.need.text):
                if bucket is not None:
                    self._filled(bucket, n)
                key, n = (job.priority, job.need.text), 0
                bucket = buckets.get(key)
                if bucket is None:
                    bucket = buckets[key] = Bucket(job.priority, job.need)
                heap = bucket.heap
            heapq.heappush(heap, job.id)
            n += 1
        if bucket is not None:
            self._filled(bucket, n)

    def _filled(self, bucket: Bucket, n: int) -> None:
        """``n`` jobs joined the bucket; one that was empty is news for the scheduler."""
        if bucket.count <= 0 and n:
            self.offers.filled(bucket.need, bucket.priority)
            self.offers.pending.needs.add(bucket.need.text)
        bucket.count += n

    def _dequeue(self, job: Job) -> None:
        key = (job.priority, job.need.text)
        bucket = self.buckets[key]
        bucket.count -= 1
        if bucket.count <= 0:
            del self.buckets[key]  # its heap holds only stale ids now
            self.offers.emptied(bucket.need)

    def bucket_alive(self, priority: int, text: str) -> bool:
        b = self.buckets.get((priority, text))
        return b is not None and b.count > 0

    def reindex(self) -> None:
        """The scheduler's indexes from scratch (snapshot load, sanity repair)."""
        passed = self.offers.pending.passed
        self.offers = build(
            self.taskers.values(),
            ((b.priority, b.need) for b in self.buckets.values() if b.count > 0),
        )
        self.offers.pending.passed = passed

    def _release(self, job: Job) -> None:
        tasker = self.taskers.get(job.tasker or "")
        if tasker is not None and job.id in tasker.running:
            tasker.running.discard(job.id)
            tasker.give(job.need)
            self.offers.place(tasker)
            self.offers.pending.taskers.add(tasker.name)
        for k, v in job.need.globals:
            self.global_used[k] = self.global_used.get(k, 0) - v
            self.offers.pending.globals.add(k)

    def _end_attempt(self, job: Job, outcome: str, ended: float, exit_code: int | None) -> None:
        cur = job.current()
        if cur is not None and cur.attempt == job.attempt and cur.outcome is None:
            cur.ended, cur.outcome, cur.exit_code = ended, outcome, exit_code
            cur.reason = job.reason  # kept here: the job's own reason is cleared on redispatch

    # -- event handlers -------------------------------------------------------------------

    def _env(self, ev: Env) -> None:
        env_id = ev["id"]
        self.envs[env_id] = ev["env"]
        self.env_refs.setdefault(env_id, 0)
        self.env_by_digest[env_digest(ev["env"])] = env_id
        self.next_env = max(self.next_env, env_id + 1)

    def _ids(self, ev: Ids) -> None:
        """Ids below ``ceiling`` are reserved; with ``next_id``, ids jump past a possible loss.

        A reservation is recorded outside the journal too (server/marks.py) before any of
        its ids is acknowledged, so ids lost with a journal tail are never handed out again.
        """
        self.id_ceiling = max(self.id_ceiling, ev["ceiling"])
        if "next_id" in ev:
            self.next_id = max(self.next_id, ev["next_id"])

    def _submit(self, ev: Submit) -> None:
        # the hot loop of a replay: add_job inlined, the jobs enqueued together
        t, user = ev["t"], ev["user"]
        jobs, env_refs, need_of = self.jobs, self.env_refs, self.needs.get
        intern = sys.intern  # names repeat (the command's by default): one string each
        new = []
        for (job_id, priority, resources, name, env, rerunnable, max_attempts), spec in zip(
            ev["jobs"], ev["specs"], strict=True
        ):
            job = Job(job_id, priority, user, intern(name), need_of(resources, user), spec, env,
                      rerunnable, max_attempts, t)  # fmt: skip
            jobs[job_id] = job
            new.append(job)
            if env is not None:
                env_refs[env] = env_refs.get(env, 0) + 1
        if new:
            self.next_id = max(self.next_id, new[-1].id + 1)  # ids ascend within a submit
        if "after" in ev or "held" in ev:
            self._submit_gated(ev, new)
        elif new:
            self.enqueue_all(new)
            self.counts[QUEUED] += len(new)
        if "key" in ev and new:
            self.remember_key(user, ev["key"], (new[0].id, len(new), t, ev["kd"]))

    def _submit_gated(self, ev: Submit, new: list[Job]) -> None:
        """The jobs of a submit with holds or dependencies: the others queued as usual, then
        these in order (a job may wait for an earlier one of the same batch)."""
        self._now = ev["t"]
        after = {i: deps for i, deps in ev.get("after", ())}
        held = set(ev.get("held", ()))
        plain = [job for i, job in enumerate(new) if i not in after and i not in held]
        self.enqueue_all(plain)
        self.counts[QUEUED] += len(new)
        for i, job in enumerate(new):
            if i in after or i in held:
                self._wait(job, i in held, after.get(i, ()), ev["t"])

    def _array(self, ev: ArrayEvent) -> None:
        t, user, first, n = ev["t"], sys.intern(ev["user"]), ev["first"], ev["count"]
        self._now = t
        priority, resources, name, env, rerunnable, max_attempts = ev["job"]
        spec = ev["spec"].encode()  # one bytes for every element
        need, name = self.needs.get(resources, user), sys.intern(name)
        new = [Job(i, priority, user, name, need, spec, env, rerunnable, max_attempts, t)
               for i in range(first, first + n)]  # fmt: skip
        jobs = self.jobs
        for job in new:
            jobs[job.id] = job
        if env is not None:
            self.env_refs[env] = self.env_refs.get(env, 0) + n
        arr = Array(first, n, ev["start"], ev["step"], ev["max_running"])
        self.add_array(arr)
        self.next_id = max(self.next_id, first + n)
        self.counts[QUEUED] += n
        after, held = ev.get("after", ()), ev.get("held", False)
        if arr.max_running is None and not after and not held:
            self.enqueue_all(new)
        else:
            for job in new:
                self._wait(job, held, after, t)
        if "key" in ev:
            self.remember_key(user, ev["key"], (first, n, t, ev["kd"]))

    def add_array(self, arr: Array) -> None:
        self.arrays[arr.first] = arr
        bisect.insort(self.array_firsts, arr.first)
        if arr.max_running is not None:
            self.capped += 1

    def _drop_array(self, arr: Array) -> None:
        del self.arrays[arr.first]
        self.array_firsts.remove(arr.first)
        if arr.max_running is not None:
            self.capped -= 1

    def _hold(self, ev: Hold) -> None:
        for job_id in ev["jobs"]:
            job = self.jobs[job_id]
            self._control(job_id, ev["t"], "hold", ev.get("by"))
            w = self.waits.get(job_id)
            if w is not None:
                w.held = True
            elif job.state == QUEUED:
                self._dequeue(job)
                self.waits[job_id] = Wait(held=True)
                self._set_state(job, WAITING)

    def _release_held(self, ev: Release) -> None:
        for job_id in ev["jobs"]:
            self._control(job_id, ev["t"], "release", ev.get("by"))
            w = self.waits.get(job_id)
            if w is not None and w.held:
                w.held = False
                self._unblock(self.jobs[job_id], w)

    def remember_key(self, user: str, key: str, entry: KeyEntry) -> None:
        """A key's entry, placed last (so keys stay oldest first: a reused one moves)."""
        k = (sys.intern(user), key)
        self.keys.pop(k, None)
        self.keys[k] = entry

    def add_job(self, job: Job) -> None:
        self.jobs[job.id] = job
        self.counts[job.state] += 1
        if job.env is not None:
            self.env_refs[job.env] = self.env_refs.get(job.env, 0) + 1
        self.next_id = max(self.next_id, job.id + 1)

    def _dispatch(self, ev: Dispatch) -> None:
        job = self.jobs[ev["job"]]
        tasker = self.taskers[ev["tasker"]]
        self._dequeue(job)
        run = job.run
        if run is None:
            run = job.run = Run()
        run.attempt = ev["attempt"]
        run.tries += 1
        run.tasker = tasker.name
        run.pid = run.started = run.ended = run.exit_code = run.signal = run.reason = None
        if run.attempts is None:
            run.attempts = []
        run.attempts.append(Attempt(run.attempt, tasker.name, tasker.host, ev["t"]))
        tasker.running.add(job.id)
        tasker.take(job.need)
        self.offers.place(tasker)
        for k, v in job.need.globals:
            self.global_used[k] = self.global_used.get(k, 0) + v
        self._set_state(job, RUNNING)

    def _start(self, ev: Start) -> None:
        job = self.jobs[ev["job"]]
        job.pid = ev["pid"]
        job.started = ev["started"]
        cur = job.current()
        if cur is not None:
            cur.started = ev["started"]

    def _finish(self, ev: Finish) -> None:
        self._now = ev["t"]
        job = self.jobs[ev["job"]]
        self._release(job)
        job.exit_code, job.signal, job.reason = ev["exit_code"], ev["signal"], ev["reason"]
        if job.started is None:
            job.started = ev["started"]
            if (cur := job.current()) is not None:
                cur.started = ev["started"]
        job.ended = ev["ended"]
        if job.stop_requested:
            state = STOPPED
        elif ev["exit_code"] == 0 and ev["signal"] is None and not ev["reason"]:
            state = DONE
        else:
            state = FAILED
        self._end_attempt(job, state, ev["ended"], ev["exit_code"])
        self._set_state(job, state)

    def _recover(self, ev: Recover) -> None:
        """The attempt is gone (tasker lost, host rebooted, operator): requeue or give up."""
        self._now = ev["t"]
        job = self.jobs[ev["job"]]
        self._control(job.id, ev["t"], "cleanup", ev.get("by"))
        self._release(job)
        if not ev.get("charge", True):
            job.tries -= 1  # not the job's fault (a planned stop): the attempt is not counted
        job.ended = ev["t"]
        job.reason = ev["reason"]
        if job.stop_requested:
            outcome = state = STOPPED
        elif job.rerunnable and job.tries < job.max_attempts:
            outcome, state = "requeued", QUEUED
        else:
            outcome = state = LOST
            if job.rerunnable:
                job.reason = f"{ev['reason']}; gave up after {job.tries} attempts"
        self._end_attempt(job, outcome, ev["t"], None)
        if state == QUEUED:
            job.tasker = job.pid = job.started = job.ended = None
            self.enqueue(job)
        self._set_state(job, state)

    def _control(self, job_id: int, t: float, action: str, by: str | None) -> None:
        if by is not None:
            self.controls.setdefault(job_id, []).append((t, action, sys.intern(by)))

    def _stop(self, ev: Stop) -> None:
        self._now = ev["t"]
        job = self.jobs[ev["job"]]
        self._control(job.id, ev["t"], "stop", ev.get("by"))
        if job.state == QUEUED:
            self._dequeue(job)
            job.ended = ev["t"]
            job.reason = "stopped while queued"
            self._set_state(job, STOPPED)
        elif job.state == WAITING:
            self._stop_waiting(job, "stopped while waiting", ev["t"])
        else:
            job.stop_requested = True

    def _rerun(self, ev: Rerun) -> None:
        self._now = ev["t"]
        job = self.jobs[ev["job"]]
        self._control(job.id, ev["t"], "rerun", ev.get("by"))
        job.tries = 0
        job.stop_requested = False
        job.tasker = job.pid = job.started = job.ended = None
        job.exit_code = job.signal = job.reason = None
        after = self.after_of(job)
        if after:  # its dependencies hold again, against the parents as they are now
            self._wait(job, False, after, ev["t"])
            return
        if self.capped and (arr := self.array_of(job.id)) and arr.max_running is not None:
            self._wait(job, False, (), ev["t"])
            return
        self.enqueue(job)
        self._set_state(job, QUEUED)

    def after_of(self, job: Job) -> list[list[Any]]:
        """A job's dependencies as submitted ([type, parent id] pairs; from its cold spec)."""
        if b'"after"' not in job.spec:
            return []
        after: list[list[Any]] = orjson.loads(job.spec).get("after") or []
        return after

    def _forget(self, ev: Forget) -> None:
        self._now = ev["t"]
        for job_id in ev["jobs"]:
            job = self.jobs.pop(job_id, None)
            if job is not None and self.on_forget is not None:
                self.on_forget(job, ev)  # before its controls go: the history keeps them
            self.controls.pop(job_id, None)
            if job is None:
                continue
            self.counts[job.state] -= 1
            if job.state == QUEUED:
                self._dequeue(job)
            elif job.state == WAITING:
                self.waits.pop(job_id, None)
            if self.array_firsts and (arr := self.array_of(job_id)) is not None:
                if self.capped and job.state in ACTIVE:
                    self._array_moved(job, False)
                arr.left -= 1
                if arr.left <= 0:
                    self._drop_array(arr)
            if job_id in self.dependents:  # forgotten before it ended
                self._settle(job_id, job.state if job.state in FINAL_STATES else gates.FORGOTTEN)
            if job.env is not None:
                left = self.env_refs[job.env] = self.env_refs[job.env] - 1
                if left <= 0:
                    self._drop_env(job.env)

    def _drop_env(self, env_id: int) -> None:
        env = self.envs.pop(env_id, None)
        self.env_refs.pop(env_id, None)
        if env is not None:
            self.env_by_digest.pop(env_digest(env), None)

    def _tasker(self, ev: TaskerJoin) -> None:
        capacity, attributes = parse_capacity(ev["resources"], ev["slots"])  # first: may raise
        tasker = self.taskers.get(ev["name"])
        if tasker is None:
            tasker = self.taskers[ev["name"]] = Tasker(ev["name"])
        tasker.host, tasker.pid, tasker.boot_id = ev["host"], ev["pid"], ev["boot_id"]
        tasker.state_id = ev.get("state_id", "")
        tasker.session = ev.get("session", "")  # absent in journals from before sessions
        tasker.runs_as = ev.get("user", "")
        tasker.slots, tasker.resources = ev["slots"], ev["resources"]
        tasker.capacity, tasker.attributes = capacity, attributes
        tasker.registered = ev["t"]
        tasker.state = TASKER_READY
        self.recount_tasker(tasker)
        self.offers.place(tasker)
        self.offers.pending.taskers.add(tasker.name)

    def load_tasker(self, ev: TaskerJoin) -> Tasker:
        """A tasker as a snapshot recorded it: its registration, applied (the caller then
        sets its state and running jobs)."""
        self._tasker(ev)
        return self.taskers[ev["name"]]

    def recount_tasker(self, tasker: Tasker) -> None:
        """Free capacity = offer minus what its running jobs hold (also used by sanity)."""
        tasker.free = dict(tasker.capacity)
        tasker.free_slots = tasker.slots
        for job_id in tasker.running:
            tasker.free_slots -= 1
            for k, v in self.jobs[job_id].need.local:
                tasker.free[k] = tasker.free.get(k, 0) - v

    def _tasker_lost(self, ev: TaskerLost) -> None:
        tasker = self.taskers.get(ev["name"])
        if tasker is not None:
            tasker.state = TASKER_LOST
            self.offers.place(tasker)

    def _resources(self, ev: Resources) -> None:
        self.global_total = dict(ev["totals"])
        self.offers.pending.full = True

    def _epoch(self, ev: EpochEvent) -> None:
        self.epoch, self.leader = ev["epoch"], dict(ev["leader"])

    def _keys_expire(self, ev: KeysExpire) -> None:
        """Drop the oldest keys, up to the first one submitted at or after ``before``."""
        keys, before = self.keys, ev["before"]
        gone = []
        for k, entry in keys.items():  # collected first: deleting while iterating is an error
            if entry[2] >= before:
                break
            gone.append(k)
        for k in gone:
            del keys[k]

    def _token_issue(self, ev: TokenIssue) -> None:
        token = Token(
            ev["id"], ev["user"], ev["role"], ev["hash"], ev["expires"], ev["t"], ev["by"],
            ev["note"],
        )  # fmt: skip
        self.add_token(token)

    def add_token(self, token: Token) -> None:
        self.tokens[token.id] = token
        self.token_by_hash[token.hash] = token

    def _token_revoke(self, ev: TokenRevoke) -> None:
        token = self.tokens.pop(ev["id"], None)
        if token is not None:
            self.token_by_hash.pop(token.hash, None)
