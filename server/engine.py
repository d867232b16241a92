"""The engine: applies events, journals them, and drives dispatch.

``emit`` applies each event to the state and appends it to the journal in the same order;
callers then ``await durable()`` before anything leaves the process. Volatile things that
are never journaled live here too: tasker connections (last contact, wake-ups) and clients
waiting for jobs to end.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from crq.server import commands
from crq.server.events import Event, encode
from crq.server.journal import Deposed, Journal
from crq.server.marks import Marker
from crq.server.models import AttemptRef
from crq.server.observe import Observed
from crq.server.scheduler import dispatch_pass
from crq.server.state import Job, State, Tasker

from crq.wire import MODE_NORMAL, MODE_RECOVERING

log = logging.getLogger("crq.engine")


# events after which a dispatch pass may find new work
# events that can queue jobs: a hold, stop or forget too, releasing an array's next element
# or a parent's dependents (a pass costs what changed: a wake for nothing is cheap)
WAKE_DISPATCH = frozenset(
    {"submit", "finish", "recover", "rerun", "tasker", "resources", "array", "release", "hold"}
    | {"stop", "forget"}
)


@dataclass
class Link:
    """A tasker's connection, as the server sees it now."""

    name: str
    last_contact: float = field(default_factory=time.time)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    kill: set[tuple[int, int]] = field(default_factory=set)  # orders not yet delivered
    generation: int = 0  # bumped by each request, so a superseded long poll returns
    # log reads asked of this tasker (server/http/logs.py): not yet sent, and awaiting its answer
    logs: list[dict[str, Any]] = field(default_factory=list)
    log_waits: dict[str, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)


def apply_and_append(state: State, journal: Journal, events: list[Event]) -> None:
    """The ordering rule: each event is applied, then journaled under the seq it had."""
    for ev in events:
        state.apply(ev, journal.next_seq)
        journal.append(encode(ev))


class Engine:
    def __init__(self, state: State, journal: Journal) -> None:
        self.state = state
        self.journal = journal
        self.mode = MODE_NORMAL
        self.links: dict[str, Link] = {}
        self.shutting_down = False
        self.freeze = False
        self._waiters: dict[int, list[asyncio.Future[None]]] = {}
        # watchers of "any job above this id": (id, woken) (POST /api/v1/ended)
        self._newer: list[tuple[int, asyncio.Future[None]]] = []
        self._pass_scheduled = False
        self.dispatched = 0
        self.observed = Observed()  # for /metrics (server/observe.py): live events only
        self.on_wait: Callable[[float], None] | None = None  # server/samples.py
        self.fresh_within = 30.0  # seconds of silence after which no new work is sent
        self.marker: Marker | None = None  # keeps trace.db/durable.json (server/marks.py)
        # still the leader? (an etcd lease: server/election.py; None: nothing can depose us)
        self.guard: Callable[[], bool] | None = None
        state.on_final = self._job_final

    # -- writing --------------------------------------------------------------------------

    def emit(self, events: list[Event]) -> None:
        """Apply and journal, in order. Wakes dispatch and the taskers concerned; a tasker
        declared lost loses its link (it must register again)."""
        state, links, seen = self.state, self.links, self.observed
        apply_and_append(state, self.journal, events)
        wake_dispatch = False
        for ev in events:
            # compared on ev["e"] itself, so that mypy narrows the event to its kind
            if ev["e"] == "dispatch":
                self.dispatched += 1
                if ev["attempt"] == 1 and (job := state.jobs.get(ev["job"])) is not None:
                    seen.dispatch.observe(ev["t"] - job.submitted)
                if (link := links.get(ev["tasker"])) is not None:
                    link.wake.set()
            # a first attempt's wait is seen once: at its start when that names a pid, else
            # at its finish (reported ended with no start before it, or a start without pid)
            elif ev["e"] == "start":
                if ev["attempt"] == 1 and ev["pid"] is not None:
                    if (job := state.jobs.get(ev["job"])) is not None:
                        self.waited(ev["started"] - job.submitted)
            elif ev["e"] == "finish":
                wake_dispatch = True
                if ev["attempt"] == 1 and (job := state.jobs.get(ev["job"])) is not None:
                    if job.pid is None:
                        self.waited(ev["started"] - job.submitted)
            elif ev["e"] == "stop":
                job = state.jobs.get(ev["job"])
                if job is not None and job.tasker and (link := links.get(job.tasker)) is not None:
                    link.wake.set()
            elif ev["e"] == "tasker_lost":
                links.pop(ev["name"], None)
            elif ev["e"] in WAKE_DISPATCH:
                wake_dispatch = True
        if wake_dispatch:
            self.schedule_dispatch()

    def waited(self, seconds: float) -> None:
        """A first attempt's queue wait, seen as it starts: the histogram, and the hook (the
        dashboard's samples: server/samples.py)."""
        self.observed.wait.observe(seconds)
        if self.on_wait is not None:
            self.on_wait(seconds)

    def durable(self) -> Awaitable[None]:
        """Resolves once everything emitted so far is durable.

        While a new block of ids is not in durable.json yet, that too (once a block): a
        lost journal tail must never give back an acknowledged id.
        """
        barrier: Awaitable[None] = self.journal.barrier()
        marker = self.marker
        if marker is not None and self.state.id_ceiling > marker.written.ceiling:
            barrier = marker.ensure(barrier, self.state.id_ceiling)
        if self.guard is None:
            return barrier
        return self._still_leading(barrier)

    async def _still_leading(self, barrier: Awaitable[None]) -> None:
        """The lease is checked after the write, just before the answer: a leader deposed
        meanwhile (paused past its TTL) acknowledges nothing."""
        await barrier
        if self.guard is not None and not self.guard():
            raise Deposed("the election lease expired before the answer")

    async def durable_or_disk_full(self) -> bool:
        """Wait until durable (True), or until the journal waits for disk space (False).

        For the status reply only: it must answer on a full disk, to say so.
        """
        barrier = self.journal.barrier()
        while self.journal.stalled_since is None:
            try:
                await asyncio.wait_for(asyncio.shield(barrier), 0.5)
                return True
            except TimeoutError:
                continue
        return False

    # -- modes ----------------------------------------------------------------------------

    def open(self) -> None:
        """Normal service: dispatch what waits."""
        self.mode = MODE_NORMAL
        self.schedule_dispatch()

    def enter_recovery(self) -> None:
        """Crash recovery mode: nothing is dispatched, clients are refused (server/recovery.py)."""
        self.mode = MODE_RECOVERING

    def stop(self, freeze: bool, release: list[Event]) -> None:
        """The clean stop begins: no more dispatch, ``release`` (the running attempts, unless
        frozen) applied, every long poll answered now."""
        self.shutting_down, self.freeze = True, freeze
        if release:
            self.emit(release)
        self.wake_all()

    # -- dispatch -------------------------------------------------------------------------

    def schedule_dispatch(self) -> None:
        if self._pass_scheduled or self.mode != MODE_NORMAL or self.shutting_down:
            return
        self._pass_scheduled = True
        asyncio.get_running_loop().call_soon(self._dispatch_pass)

    def _dispatch_pass(self) -> None:
        self._pass_scheduled = False
        if self.mode != MODE_NORMAL or self.shutting_down:
            return
        if self.guard is not None and not self.guard():
            return  # deposed: the lease watcher stands us down
        dispatch_pass(self.state, lambda ev: self.emit([ev]), time.time(), self._eligible)

    def _eligible(self, tasker: Tasker) -> bool:
        """Only taskers heard from lately: a silent one would sit on the job till the timeout."""
        link = self.links.get(tasker.name)
        return link is not None and time.time() - link.last_contact <= self.fresh_within

    # -- tasker links ---------------------------------------------------------------------

    def touch(self, name: str, now: float) -> Link:
        """A request of tasker ``name``: its link (made at its first), heard from now; a long
        poll of it still waiting is superseded and returns."""
        link = self.links.get(name)
        if link is None:
            link = self.links[name] = Link(name)
        link.last_contact = now
        link.generation += 1
        link.wake.set()
        return link

    async def wait_orders(
        self,
        link: Link,
        session: str,
        running: Iterable[AttemptRef],
        reported: set[commands.Ref],
        out: commands.Outcome,
        deadline: float,
    ) -> tuple[list[Job], set[commands.Ref]]:
        """A sync's long poll: the dispatches and kills for ``link``'s tasker, once there
        are any, or at ``deadline``, at the stop, or when a newer request supersedes this
        one. Kills given are no longer pending on the link."""
        generation = link.generation
        tasker = self.state.taskers[link.name]
        while True:
            link.wake.clear()
            if tasker.session != session:  # taken over meanwhile: its orders are not ours
                return [], set(out.kill)
            send, kill = commands.sync_orders(self.state, link.name, running, reported)
            kill |= out.kill | link.kill
            left = deadline - time.time()
            if (
                send
                or kill
                or out.ack
                or link.logs
                or left <= 0
                or self.shutting_down
                or link.generation != generation
            ):
                link.kill -= kill
                return send, kill
            try:
                await asyncio.wait_for(link.wake.wait(), left)
            except TimeoutError:
                pass

    # -- waiting for jobs -----------------------------------------------------------------

    def _job_final(self, job: Job) -> None:
        self.observed.finished[job.state] += 1
        for fut in self._waiters.pop(job.id, ()):
            if not fut.done():
                fut.set_result(None)
        if self._newer:
            for above, fut in self._newer:
                if job.id > above and not fut.done():
                    fut.set_result(None)

    async def wait_any(self, ids: Iterable[int], newer_than: int | None, timeout: float) -> None:
        """Return when one of ``ids`` ends, or any job above ``newer_than`` does, or after
        ``timeout``: one future for the lot, so a watcher of many jobs costs one request."""
        fut = asyncio.get_running_loop().create_future()
        watched = list(ids)
        for job_id in watched:
            self._waiters.setdefault(job_id, []).append(fut)
        entry = None if newer_than is None else (newer_than, fut)
        if entry is not None:
            self._newer.append(entry)
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            pass
        finally:
            if entry is not None:
                self._newer.remove(entry)
            for job_id in watched:
                waiters = self._waiters.get(job_id)
                if waiters and fut in waiters:
                    waiters.remove(fut)
                    if not waiters:
                        del self._waiters[job_id]

    async def wait_final(self, job_id: int, timeout: float) -> None:
        fut = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(job_id, []).append(fut)
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            pass
        finally:
            waiters = self._waiters.get(job_id)
            if waiters and fut in waiters:
                waiters.remove(fut)
                if not waiters:
                    del self._waiters[job_id]

    def wake_all(self) -> None:
        """Shutting down: answer every long poll now (taskers and waiting clients)."""
        for link in self.links.values():
            link.wake.set()
        for waiters in self._waiters.values():
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)
        for _, fut in self._newer:
            if not fut.done():
                fut.set_result(None)
