"""Who leads a queue: one small interface, two backends (SPEC section 8).

``file`` (the embedded default) is the flock on ``server.lock`` that has always guarded the
swd: the kernel lets go of it when the leader dies, so a standby polling it takes over at
once after a kill -9. A hung leader keeps it: safe, not available. The epoch is one more
than the highest the swd has seen. ``etcd`` (server/election_etcd.py) is a lease and a
key: a hung or cut-off leader loses both after the TTL, and its epoch is the key's
create revision.

``valid()`` is checked before every journal write and every answer, so it does no I/O.
"""

from __future__ import annotations

import asyncio
import fcntl
import importlib
import os
import time
from typing import Any, Protocol

import orjson
from crq.server import fence
from crq.server.journal import list_segments

from crq.durable import LockBusy, lock_pidfile
from crq.wire import Swd

POLL = 0.05  # a standby asks for the lock this often: the takeover's delay after a death


class Busy(Exception):
    """``campaign(wait=False)`` while another candidate leads."""

    def __init__(self, holder: dict[str, Any] | None) -> None:
        super().__init__("another server leads this queue")
        self.holder = holder


class ElectionError(Exception):
    """The election backend cannot be used (bad URL, unreachable, epoch gone backwards)."""


class Election(Protocol):
    name: str
    epoch: int
    lost: asyncio.Event

    async def campaign(self, me: dict[str, Any], wait: bool) -> int: ...

    def valid(self) -> bool: ...

    async def leader(self) -> dict[str, Any] | None: ...

    async def resign(self) -> None: ...

    def close(self) -> None: ...


def highest_epoch(paths: Swd) -> int:
    """The highest epoch the swd records: fences, segment headers, the last leader's file."""
    trace = paths.trace
    found = 0
    try:
        found = fence.read(trace).highest
    except fence.FenceError:
        pass  # replay names it; the segments still tell
    if trace.is_dir():
        for seg in list_segments(trace):
            found = max(found, fence.segment_epoch(seg))
    info = read_json(paths.server_json)
    epoch = info.get("epoch") if info else None
    return max(found, epoch if isinstance(epoch, int) else 0)


def read_json(path: os.PathLike[str] | str) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as f:
            data = orjson.loads(f.read())
    except (OSError, orjson.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


class FileElection:
    """The flock on server.lock: held for the leader's life, released by its death."""

    name = "file"

    def __init__(self, paths: Swd) -> None:
        self.paths = paths
        self.epoch = 0
        self.lost = asyncio.Event()  # never set: a flock is not lost while we live
        self._fd: int | None = None
        self._seen: tuple[float, dict[str, Any] | None] = (0.0, None)

    def _try(self) -> bool:
        try:
            self._fd = lock_pidfile(self.paths.server_lock)
        except LockBusy:
            return False
        return True

    async def campaign(self, me: dict[str, Any], wait: bool) -> int:
        self.paths.root.mkdir(parents=True, exist_ok=True)
        while not self._try():
            if not wait:
                raise Busy(await self.leader() or self._holder())
            await asyncio.sleep(POLL)
        self.epoch = highest_epoch(self.paths) + 1
        return self.epoch

    def _holder(self) -> dict[str, Any] | None:
        try:
            pid = self.paths.server_lock.read_text().strip()
        except OSError:
            return None
        return {"pid": int(pid)} if pid.isdigit() else None

    def valid(self) -> bool:
        return self._fd is not None

    async def leader(self) -> dict[str, Any] | None:
        """The leader's server.json, re-read at most every half second."""
        when, info = self._seen
        now = time.monotonic()
        if now - when > 0.5:
            info = read_json(self.paths.server_json)
            if info is not None and info.get("mode") in ("stopped", None):
                info = None
            self._seen = (now, info)
        return info

    async def resign(self) -> None:
        self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class SignOfLife:
    """server.lock as an etcd leader's sign of life, for standbys sharing its swd.

    An etcd leader killed with -9 keeps its lease until the TTL runs out. If it held the
    flock on server.lock (best effort: it leads without it), the kernel frees that at its
    death, and a standby that then finds the lock free with the leader's instance written
    in it knows the leader is gone and revokes its lease at once: a takeover in well under
    a second instead of a TTL. A live leader keeps the lock; a hung one too (the TTL
    replaces it, as before), and fencing covers the rest.
    """

    def __init__(self, paths: Swd) -> None:
        self.paths = paths
        self._fd: int | None = None

    def take(self, instance: str) -> bool:
        if self._fd is not None:
            return True
        try:
            self._fd = lock_pidfile(self.paths.server_lock, note=instance)
        except LockBusy:
            return False
        return True

    def gone(self, holder: dict[str, Any]) -> bool:
        """``holder`` (the etcd leader) took the lock, and no process holds it now."""
        try:
            fd = os.open(self.paths.server_lock, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # held: the leader lives (or another candidate is looking)
            words = os.pread(fd, 128, 0).decode(errors="replace").split()
        finally:
            os.close(fd)  # and with it our shared lock
        return len(words) >= 2 and bool(holder.get("instance")) and words[1] == holder["instance"]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def make(spec: str, paths: Swd, queue: str, ttl: float) -> Election:
    """The backend ``spec`` names: ``file``, or ``etcd://host:port[,host:port…]``."""
    if spec == "file":
        return FileElection(paths)
    if spec.startswith("etcd://"):
        try:
            # an optional extra, so imported only when configured (not at the module head,
            # where every server would pay for an HTTP client it does not use)
            election_etcd = importlib.import_module("crq.server.election_etcd")
        except ImportError as e:
            raise ElectionError(
                f"the etcd election needs the etcd extra (pip install 'crq[etcd]'): {e}"
            ) from None
        made = election_etcd.EtcdElection(election_etcd.parse_etcd_url(spec), queue, ttl)
        made.holder_dead = SignOfLife(paths).gone
        chosen: Election = made
        return chosen
    raise ElectionError(f"election must be file or etcd://host:port[,…], not {spec!r}")
