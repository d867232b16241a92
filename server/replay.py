"""Rebuild the state from trace.db: newest snapshot, then the journal after it.

A torn tail (the newest segment ends in a cut or garbled record with nothing valid after
it) is what a crash mid-write leaves: it is truncated and counted. Damage anywhere else
means acknowledged data may be gone, so loading stops and names the file, the offset and
the flag (``--accept-loss``) that accepts the loss. Nothing is skipped silently.
"""

from __future__ import annotations

import gc
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from server import snapshot
from server.events import decode
from server.journal import RecordReader, list_segments
from server.state import State

log = logging.getLogger("crq.replay")


class ReplayError(Exception):
    pass


@dataclass
class Replayed:
    state: State
    snapshot: Path | None = None
    snapshot_jobs: int = 0
    segments: int = 0
    events_replayed: int = 0
    bytes_discarded: int = 0
    losses: list[str] = field(default_factory=list)  # damage accepted with --accept-loss


def load(
    trace: Path, global_resources: dict[str, int] | None, accept_loss: bool = False
) -> Replayed:
    gc.disable()  # replay allocates millions of objects that all live: skip the GC passes
    try:
        return _load(trace, global_resources, accept_loss)
    finally:
        gc.enable()
        gc.freeze()  # what was loaded stays: keep later collections from walking it


def _load(trace: Path, global_resources: dict[str, int] | None, accept_loss: bool) -> Replayed:
    out = Replayed(State(global_resources))
    for path in reversed(snapshot.list_snapshots(trace)):
        try:
            out.state = snapshot.read(path, global_resources)
            out.snapshot, out.snapshot_jobs = path, len(out.state.jobs)
            break
        except (snapshot.SnapshotError, ValueError, KeyError, TypeError, IndexError) as e:
            msg = f"snapshot {path} is damaged ({e})"
            if not accept_loss:
                raise ReplayError(
                    f"{msg}; start with --accept-loss to fall back to the previous snapshot"
                ) from e
            out.losses.append(msg)
            log.error("%s; falling back (--accept-loss)", msg)
    state = out.state
    segments = list_segments(trace)
    for i, path in enumerate(segments):
        newest = i == len(segments) - 1
        reader = RecordReader(path)
        out.segments += 1
        for seq, payload in reader:
            if seq <= state.seq:
                continue
            if seq != state.seq + 1:
                msg = f"{path}: journal jumps from event {state.seq} to {seq}"
                if not accept_loss:
                    raise ReplayError(f"{msg}; start with --accept-loss to accept the loss")
                out.losses.append(msg)
            try:
                state.apply(decode(payload), seq)
            except (ValueError, KeyError, TypeError, IndexError) as e:
                # checksummed, yet not an event this state can take: a bug, not a torn write
                raise ReplayError(f"{path}: event {seq} cannot be applied ({e!r})") from e
            out.events_replayed += 1
        damage = reader.damage
        if damage is None:
            continue
        cut = len(reader.data) - damage.offset
        if newest and damage.tail:
            log.warning("torn journal tail truncated: %s (%d bytes)", damage, cut)
            _truncate(path, damage.offset)
            out.bytes_discarded += cut
            continue
        msg = f"journal damaged: {damage} ({cut} bytes)"
        if not accept_loss:
            raise ReplayError(f"{msg}; start with --accept-loss to drop the damaged part")
        out.losses.append(msg)
        log.error("%s: dropped (--accept-loss)", msg)
        _truncate(path, damage.offset)
        out.bytes_discarded += cut
    return out


def _truncate(path: Path, size: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)
