"""The CR journal: append-only segments ``trace.db/CR.<n>`` of framed records.

A record is ``length:u32 crc32:u32 seq:u64 payload``; the CRC covers seq and payload. A
segment starts with the 16-byte header of its writer's epoch (server/fence.py), unless an
older version wrote it.
Appends go to a buffer; one writer thread writes and fsyncs whatever gathered while the
previous fsync ran (group commit), and ``barrier()`` resolves once everything appended so
far is durable. Nothing may leave the server before its barrier resolves (invariant 1).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from crq.server.fence import HEADER as EPOCH_HEADER
from crq.server.fence import header as epoch_header
from crq.server.fence import read_header

from crq.durable import fsync_dir

T = TypeVar("T")
log = logging.getLogger("crq.journal")

HEADER = struct.Struct("<IIQ")
SEQ = struct.Struct("<Q")
MAX_RECORD = 256 << 20
PREFIX = "CR."


def frame(seq: int, payload: bytes) -> bytes:
    crc = zlib.crc32(payload, zlib.crc32(SEQ.pack(seq)))
    return HEADER.pack(len(payload), crc, seq) + payload


@dataclass
class Damage:
    path: Path
    offset: int
    reason: str
    tail: bool  # no valid record follows: a write cut short by the crash

    def __str__(self) -> str:
        return f"{self.path} at byte {self.offset}: {self.reason}"


def _valid_at(data: bytes | memoryview, off: int) -> tuple[int, int] | None:
    """(seq, end) of a valid record starting at ``off``, else None."""
    if off + HEADER.size > len(data):
        return None
    length, crc, seq = HEADER.unpack_from(data, off)
    end = off + HEADER.size + length
    if length > MAX_RECORD or end > len(data):
        return None
    if zlib.crc32(data[off + HEADER.size : end], zlib.crc32(SEQ.pack(seq))) != crc:
        return None
    return seq, end


class Deposed(Exception):
    """The journal's leader is no longer the leader: nothing more is written."""


class RecordReader:
    """Iterates the valid records of one file; ``damage`` tells why it stopped early."""

    def __init__(self, path: Path, data: bytes | None = None) -> None:
        self.path = path
        self.data = path.read_bytes() if data is None else data
        self.damage: Damage | None = None
        self.epoch, self.start = read_header(self.data)
        self.end = self.start  # offset just past the last valid record

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        data, off, size = self.data, self.start, len(self.data)
        view = memoryview(data)
        while off < size:
            found = _valid_at(view, off)
            if found is None:
                self.damage = Damage(self.path, off, self._why(off), not self._resyncs(off))
                return
            seq, end = found
            yield seq, data[off + HEADER.size : end]
            off = self.end = end

    def _why(self, off: int) -> str:
        left = len(self.data) - off
        if left < HEADER.size:
            return f"record header cut short ({left} of {HEADER.size} bytes)"
        length = HEADER.unpack_from(self.data, off)[0]
        if length > MAX_RECORD:
            return f"implausible record length {length}"
        if off + HEADER.size + length > len(self.data):
            return f"record cut short ({left - HEADER.size} of {length} payload bytes)"
        return "checksum mismatch"

    def _resyncs(self, off: int) -> bool:
        """Whether any valid record starts after the damage (then it is not a torn tail)."""
        view = memoryview(self.data)
        return any(_valid_at(view, o) is not None for o in range(off + 1, len(self.data)))


def salvage(data: bytes, off: int) -> list[tuple[int, bytes]]:
    """The valid records after damage at ``off``: dropped by --accept-loss, still readable."""
    view = memoryview(data)
    out: list[tuple[int, bytes]] = []
    o = off + 1
    while o < len(data):
        found = _valid_at(view, o)
        if found is None:
            o += 1
            continue
        seq, end = found
        out.append((seq, bytes(view[o + HEADER.size : end])))
        o = end
    return out


def segment_number(path: Path) -> int:
    return int(path.name[len(PREFIX) :])


def list_segments(trace: Path) -> list[Path]:
    found = [p for p in trace.glob(PREFIX + "*") if p.name[len(PREFIX) :].isdigit()]
    return sorted(found, key=segment_number)


def first_seq(path: Path) -> int | None:
    """The seq of a segment's first record, or None if it is empty or unreadable there."""
    with open(path, "rb") as f:
        f.seek(read_header(f.read(EPOCH_HEADER.size))[1])
        head = f.read(HEADER.size)
        if len(head) < HEADER.size or HEADER.unpack(head)[0] > MAX_RECORD:
            return None
        data = head + f.read(HEADER.unpack(head)[0])
    found = _valid_at(data, 0)
    return found[0] if found is not None else None


class Journal:
    """The writing end. ``append`` is called from the event loop only."""

    def __init__(
        self,
        trace: Path,
        *,
        next_seq: int,
        fsync: bool = True,
        epoch: int = 0,
        guard: Callable[[], bool] | None = None,
    ) -> None:
        self.trace = trace
        self.fsync = fsync
        self.epoch = epoch
        self.guard = guard  # checked before each write: still the leader? (server/election.py)
        self.on_deposed: Callable[[], None] | None = None  # called on the loop when it is not
        self.next_seq = next_seq
        self.durable_seq = next_seq - 1
        self.bytes_written = 0
        self.stalled_since: float | None = None
        self._buf = bytearray()
        self._pending: asyncio.Future[None] | None = None
        self._inflight: asyncio.Future[None] | None = None
        self._kick_scheduled = False
        self._rotate: tuple[int, int] | None = None  # (buffer offset, last seq) to rotate after
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="crq-journal")
        self._loop: asyncio.AbstractEventLoop | None = None
        self.segment = 0
        self._size = 0  # of the current segment, as the writer thread left it
        self._fd = self._open_segment()
        self.durable_pos = (self.segment, self._size)  # (segment, size) at durable_seq

    def _open_segment(self) -> int:
        """A new segment past every one there, ours alone (O_EXCL: a deposed leader that
        rotates at the same moment gets another number), headed by our epoch."""
        segs = list_segments(self.trace)
        number = max(self.segment, segment_number(segs[-1]) if segs else 0) + 1
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
        while True:
            path = self.trace / f"{PREFIX}{number:06d}"
            try:
                fd = os.open(path, flags, 0o600)
                break
            except FileExistsError:
                number += 1
        size = 0
        if self.epoch:
            try:
                os.write(fd, epoch_header(self.epoch))
                if self.fsync:
                    os.fsync(fd)
            except OSError:
                os.close(fd)
                os.unlink(path)
                raise
            size = EPOCH_HEADER.size
        fsync_dir(self.trace)
        self.segment, self._size = number, size
        return fd

    # -- loop side ------------------------------------------------------------------------

    def append(self, payload: bytes) -> int:
        seq = self.next_seq
        self.next_seq += 1
        self._buf += frame(seq, payload)
        self._schedule()
        return seq

    def barrier(self) -> asyncio.Future[None]:
        """Resolves once every record appended so far is durable."""
        if self._buf or self._rotate is not None:
            if self._pending is None:
                self._pending = self._get_loop().create_future()
            return self._pending
        if self._inflight is not None:
            return self._inflight
        done = self._get_loop().create_future()
        done.set_result(None)
        return done

    def rotate(self) -> None:
        """Close the current segment after the records appended so far; start a new one."""
        if self._rotate is None:
            self._rotate = (len(self._buf), self.next_seq - 1)
        self._schedule()

    def _get_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def _schedule(self) -> None:
        if not self._kick_scheduled:
            self._kick_scheduled = True
            try:
                self._get_loop().call_soon(self._kick)
            except RuntimeError:  # no loop: offline use (standalone cleanup, tests)
                self._kick_scheduled = False

    def _kick(self) -> None:
        self._kick_scheduled = False
        if self._inflight is not None or not (self._buf or self._rotate is not None):
            return
        rotate = self._rotate is not None
        if self._rotate is not None:  # write up to the rotation point only
            cut, last = self._rotate
            self._rotate = None
        else:
            cut, last = len(self._buf), self.next_seq - 1
        data = bytes(self._buf[:cut])
        del self._buf[:cut]
        if self._buf:  # records after a rotation point stay pending, with their waiters
            fut = self._get_loop().create_future()
        else:
            fut = self._pending or self._get_loop().create_future()
            self._pending = None
        self._inflight = fut
        work = self._get_loop().run_in_executor(self._executor, self._write, data, rotate)
        work.add_done_callback(lambda w: self._written(w, fut, last))

    def _written(self, work: asyncio.Future[None], fut: asyncio.Future[None], last: int) -> None:
        self._inflight = None
        exc = work.exception()
        if isinstance(exc, Deposed):
            log.critical("not the leader any more: the journal writes nothing more")
            if self.on_deposed is not None:
                self.on_deposed()
            return  # the waiters never resolve: nothing written is acknowledged
        if exc is not None:
            log.critical("journal write failed, stopping the server: %s", exc)
            os._exit(70)  # after a failed fsync the page cache cannot be trusted (fsyncgate)
        self.durable_seq = last
        self.durable_pos = (self.segment, self._size)
        if not fut.done():
            fut.set_result(None)
        self._kick()

    # -- writer thread --------------------------------------------------------------------

    def _write(self, data: bytes, rotate: bool) -> None:
        if self.guard is not None and not self.guard():
            raise Deposed()
        if data:
            self._until_space(lambda: self._write_once(data))
        if rotate:
            old = self._fd
            if self.fsync:
                os.fsync(old)
            self._fd = self._until_space(self._open_segment)
            os.close(old)
            self.bytes_written = 0

    def _write_once(self, data: bytes) -> None:
        """Append and fsync all of ``data``, or none of it (a failed write is cut off)."""
        start = os.lseek(self._fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
            if self.fsync:
                os.fsync(self._fd)
        except OSError:
            os.ftruncate(self._fd, start)
            raise
        self.bytes_written += len(data)
        self._size = start + len(data)

    def _until_space(self, attempt: Callable[[], T]) -> T:
        """Run ``attempt`` until the disk has room for it: replies wait with us meanwhile."""
        while True:
            try:
                result = attempt()
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                if self.stalled_since is None:
                    self.stalled_since = time.time()
                    log.error("journal disk full: holding replies until space returns")
                time.sleep(0.5)
                continue
            if self.stalled_since is not None:
                log.warning("journal writable again after %.1f s", time.time() - self.stalled_since)
                self.stalled_since = None
            return result

    # -- offline use ----------------------------------------------------------------------

    def flush_now(self) -> None:
        """Write the buffer synchronously (no loop running: shutdown, standalone tools)."""
        if self._buf:
            data = bytes(self._buf)
            self._buf.clear()
            self._executor.submit(self._write, data, False).result()
            self.durable_seq = self.next_seq - 1
            self.durable_pos = (self.segment, self._size)

    def close(self) -> None:
        self.flush_now()
        self._executor.shutdown(wait=True)
        os.close(self._fd)
