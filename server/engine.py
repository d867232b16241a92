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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from crq.server.events import encode
from crq.server.journal import Journal
from crq.server.scheduler import dispatch_pass
from crq.server.state import Event, Job, State, Tasker

from crq.wire import MODE_NORMAL

if TYPE_CHECKING:
    from crq.server.marks import Marker

log = logging.getLogger("crq.engine")


@dataclass
class Link:
    """A tasker's connection, as the server sees it now."""

    name: str
    last_contact: float = field(default_factory=time.time)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    kill: set[tuple[int, int]] = field(default_factory=set)  # orders not yet delivered
    generation: int = 0  # bumped by each request, so a superseded long poll returns


class Engine:
    def __init__(self, state: State, journal: Journal) -> None:
        self.state = state
        self.journal = journal
        self.mode = MODE_NORMAL
        self.links: dict[str, Link] = {}
        self.shutting_down = False
        self.freeze = False
        self._waiters: dict[int, list[asyncio.Future[None]]] = {}
        self._pass_scheduled = False
        self.dispatched = 0
        self.after_emit: list[Callable[[], None]] = []
        self.fresh_within = 30.0  # seconds of silence after which no new work is sent
        self.marker: Marker | None = None  # keeps trace.db/durable.json (server/marks.py)
        state.on_final = self._job_final

    # -- writing --------------------------------------------------------------------------

    def emit(self, events: list[Event]) -> None:
        """Apply and journal, in order. Wakes dispatch and the taskers concerned."""
        state, journal = self.state, self.journal
        wake_dispatch = False
        for ev in events:
            state.apply(ev, journal.next_seq)
            journal.append(encode(ev))
            kind = ev["e"]
            if kind == "dispatch":
                self.dispatched += 1
                if (link := self.links.get(ev["tasker"])) is not None:
                    link.wake.set()
            elif kind == "stop":
                job = state.jobs[ev["job"]]
                if job.tasker and (link := self.links.get(job.tasker)) is not None:
                    link.wake.set()
            elif kind in ("submit", "finish", "recover", "rerun", "tasker", "resources"):
                wake_dispatch = True
        if wake_dispatch:
            self.schedule_dispatch()
        for hook in self.after_emit:
            hook()

    def durable(self) -> Awaitable[None]:
        """Resolves once everything emitted so far is durable.

        While a new block of ids is not in durable.json yet, that too (once a block): a
        lost journal tail must never give back an acknowledged id.
        """
        barrier = self.journal.barrier()
        marker = self.marker
        if marker is None or self.state.id_ceiling <= marker.written.ceiling:
            return barrier
        return marker.ensure(barrier, self.state.id_ceiling)

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
        dispatch_pass(self.state, lambda ev: self.emit([ev]), time.time(), self._eligible)

    def _eligible(self, tasker: Tasker) -> bool:
        """Only taskers heard from lately: a silent one would sit on the job till the timeout."""
        link = self.links.get(tasker.name)
        return link is not None and time.time() - link.last_contact <= self.fresh_within

    # -- waiting for jobs -----------------------------------------------------------------

    def _job_final(self, job: Job) -> None:
        for fut in self._waiters.pop(job.id, ()):
            if not fut.done():
                fut.set_result(None)

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
