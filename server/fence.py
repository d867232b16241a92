"""Epochs and fences: what a deposed leader writes never counts.

Every leader has an epoch (server/election.py), higher than any before it. Each journal
segment it opens starts with a 16-byte header naming that epoch, so every record carries
the epoch of the leader that wrote it. A new leader, once it has read the journal up to
seq ``after``, appends ``{"epoch": E, "after": after, …}`` to ``trace.db/epochs.json``
before it writes anything: from then on a record of an older epoch with a seq past
``after`` is ignored at replay, and so is a snapshot or a high-water mark an older leader
made past it. A leader that lost its lease but did not notice yet (SIGSTOP past the TTL)
may still append a record or two; they fall behind the fence.

Segments made before epochs existed have no header: epoch 0.
"""

from __future__ import annotations

import struct
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson

from crq.durable import write_atomic

MAGIC = b"CRQE"  # as a record length it would be 1.1 GB, over MAX_RECORD: never ambiguous
HEADER = struct.Struct("<4sQI")  # magic, epoch, crc32 of both
EPOCHS = "epochs.json"


class FenceError(Exception):
    """epochs.json cannot be read: storage damage, named like any other."""


def header(epoch: int) -> bytes:
    head = MAGIC + struct.pack("<Q", epoch)
    return head + struct.pack("<I", zlib.crc32(head))


def read_header(data: bytes | memoryview) -> tuple[int, int]:
    """(epoch, size of the header) of a segment's first bytes; (0, 0) when it has none."""
    if len(data) < HEADER.size or bytes(data[:4]) != MAGIC:
        return 0, 0
    magic, epoch, crc = HEADER.unpack_from(data, 0)
    if zlib.crc32(bytes(data[:12])) != crc:
        return 0, 0  # a cut header: the segment holds nothing (a torn first write)
    return int(epoch), HEADER.size


def segment_epoch(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return read_header(f.read(HEADER.size))[0]
    except OSError:
        return 0


@dataclass(frozen=True)
class Fence:
    epoch: int  # the leader that took over ...
    after: int  # ... had read the journal up to this seq
    t: float = 0.0
    url: str = ""
    host: str = ""
    instance: str = ""
    election: str = ""


class Fences:
    """Every takeover of a queue, oldest first, and what each one cuts off."""

    def __init__(self, fences: list[Fence] | None = None) -> None:
        self.fences = sorted(fences or [], key=lambda f: f.epoch)

    @property
    def highest(self) -> int:
        return self.fences[-1].epoch if self.fences else 0

    @property
    def last(self) -> Fence | None:
        return self.fences[-1] if self.fences else None

    def cap(self, epoch: int) -> int | None:
        """The last seq a record of ``epoch`` may have and still count (None: no limit)."""
        caps = [f.after for f in self.fences if f.epoch > epoch]
        return min(caps) if caps else None

    def counts(self, epoch: int, seq: int) -> bool:
        cap = self.cap(epoch)
        return cap is None or seq <= cap

    def deposes(self, epoch: int) -> bool:
        """A newer leader has taken over from ``epoch``."""
        return self.highest > epoch

    def moves(self) -> int:
        """Takeovers by a server at another URL than the leader before (failovers; a
        restart in place is none). Fences from before URLs were kept do not count."""
        urls = [f.url for f in self.fences]
        return sum(1 for a, b in zip(urls, urls[1:], strict=False) if a and b and a != b)

    def with_fence(self, fence: Fence) -> Fences:
        return Fences([*self.fences, fence])


def read(trace: Path) -> Fences:
    path = trace / EPOCHS
    try:
        data = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return Fences()
    except (OSError, orjson.JSONDecodeError) as e:
        raise FenceError(f"{path} is damaged ({e})") from None
    try:
        return Fences([Fence(**_known(item)) for item in data["fences"]])
    except (KeyError, TypeError) as e:
        raise FenceError(f"{path} is damaged (bad field {e})") from None


def _known(item: Any) -> dict[str, Any]:
    names = Fence.__dataclass_fields__
    return {k: v for k, v in dict(item).items() if k in names}


def write(trace: Path, fences: Fences) -> None:
    """Always fsynced (also with ``fsync = never``): a fence must be there before the journal."""
    body = {"fences": [asdict(f) for f in fences.fences]}
    write_atomic(trace / EPOCHS, orjson.dumps(body, option=orjson.OPT_INDENT_2) + b"\n")


def new_fence(epoch: int, after: int, who: dict[str, Any]) -> Fence:
    """``who``: the new leader (url, host, instance, election; other keys are not kept)."""
    return Fence(epoch, after, time.time(), **{k: str(v) for k, v in _known(who).items()})
