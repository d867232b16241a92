"""What must outlive a lost journal tail: the queue's identity and its high-water mark.

A journal whose newest segment was truncated or deleted still reads as a valid, shorter
journal: by itself it cannot tell that anything is missing. Two small files beside it can,
and replay checks both:

- ``trace.db/queue.json``: the queue's name, a uuid and when it was made, written once at
  its first start (or at the first start of a swd made by an older version). A trace.db
  that has it but neither journal nor snapshot was emptied, not made anew.
- ``trace.db/durable.json``: the high-water mark: the last durable seq, the segment and
  size the journal had then, the next id and the reserved id ceiling. A journal that ends
  before that seq lost acknowledged events. It is written off the ack path, about every
  second while the journal grows, at every checkpoint and at the clean stop; and when a
  submit reserves a new block of ids, before any id of the block is acknowledged, so ids
  lost with a journal tail are never handed out again.

Both are written atomically (tmp, fsync, rename, fsync dir).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import threading
import time
import uuid
from collections.abc import Awaitable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from crq.durable import write_atomic

if TYPE_CHECKING:
    from crq.server.journal import Journal
    from crq.server.state import State

log = logging.getLogger("crq.marks")

IDENTITY = "queue.json"
MARK = "durable.json"


class MarkError(Exception):
    """queue.json or durable.json cannot be read: storage damage, named like any other."""


@dataclass(frozen=True)
class Mark:
    seq: int  # every event up to this one was durable
    segment: int  # the journal then ended in CR.<segment> ...
    size: int  # ... at this size
    next_id: int  # ids below it had been given to jobs by then
    ceiling: int  # ids below it may have been handed out: never again
    t: float = 0.0
    epoch: int = 0  # of the leader that wrote it (server/fence.py)

    def covering(self, other: Mark) -> Mark:
        """The later of both positions with the higher ids: a mark never goes back."""
        pos = self if self.seq >= other.seq else other
        return replace(
            pos,
            next_id=max(self.next_id, other.next_id),
            ceiling=max(self.ceiling, other.ceiling),
            t=max(self.t, other.t),
        )


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, orjson.JSONDecodeError) as e:
        raise MarkError(f"{path} is damaged ({e})") from None
    if not isinstance(data, dict):
        raise MarkError(f"{path} is damaged (not a JSON object)")
    return data


def _write(path: Path, data: dict[str, Any]) -> None:
    write_atomic(path, orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n")


def read_identity(trace: Path) -> dict[str, Any] | None:
    return _read(trace / IDENTITY)


def write_identity(trace: Path, queue: str) -> dict[str, Any]:
    ident = {"queue": queue, "uuid": uuid.uuid4().hex, "created": time.time()}
    _write(trace / IDENTITY, ident)
    return ident


def read_mark(trace: Path) -> Mark | None:
    data = _read(trace / MARK)
    if data is None:
        return None
    try:
        fields = ("seq", "segment", "size", "next_id", "ceiling")
        return Mark(**{k: data[k] for k in fields}, epoch=int(data.get("epoch", 0)))
    except (KeyError, TypeError) as e:
        raise MarkError(f"{trace / MARK} is damaged (bad field {e})") from None


def write_mark(trace: Path, mark: Mark) -> None:
    _write(trace / MARK, asdict(mark))


class Marker:
    """Keeps durable.json up with the journal. Used from the event loop; writes in a thread."""

    def __init__(self, trace: Path, journal: Journal, state: State, written: Mark) -> None:
        self.trace = trace
        self.journal = journal
        self.state = state
        self.written = written  # what durable.json says now
        self._turn = asyncio.Lock()
        self._file = threading.Lock()

    def behind(self) -> bool:
        return (
            self.journal.durable_seq > self.written.seq
            or self.state.id_ceiling > self.written.ceiling
        )

    async def ensure(self, barrier: Awaitable[None], ceiling: int) -> None:
        """``barrier``, then wait until durable.json holds ``ceiling``: before an ack."""
        await barrier
        while self.written.ceiling < ceiling:
            await self.write()

    async def write(self) -> None:
        """Record the journal's durable position and the ids handed out up to it."""
        async with self._turn:
            # read before the barrier: every id below next_id is durable once it resolves
            next_id, ceiling = self.state.next_id, self.state.id_ceiling
            await self.journal.barrier()
            mark = self.current(next_id, ceiling)
            await asyncio.get_running_loop().run_in_executor(None, self._put, mark)

    def current(self, next_id: int | None = None, ceiling: int | None = None) -> Mark:
        j = self.journal
        return Mark(
            j.durable_seq,
            j.durable_pos[0],
            j.durable_pos[1],
            self.state.next_id if next_id is None else next_id,
            max(self.state.id_ceiling if ceiling is None else ceiling, self.written.ceiling),
            time.time(),
            j.epoch,
        )

    def put_now(self) -> None:
        """Write synchronously (the clean stop, nothing else running); OSError is raised."""
        with self._file:
            mark = self.current().covering(self.written)
            write_mark(self.trace, mark)
            self.written = mark

    def _put(self, mark: Mark) -> None:
        guard = self.journal.guard
        if guard is not None and not guard():  # a deposed leader's mark would be ignored
            return
        with self._file:
            mark = mark.covering(self.written)
            full_since: float | None = None
            while True:
                try:
                    write_mark(self.trace, mark)
                    break
                except OSError as e:
                    if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                        # acks wait for this file: without it they cannot be given safely
                        log.critical("cannot write %s, stopping the server: %s", MARK, e)
                        os._exit(70)
                    if full_since is None:
                        full_since = time.time()
                        log.error("disk full: cannot write %s, waiting for space", MARK)
                    time.sleep(0.5)
            self.written = mark
