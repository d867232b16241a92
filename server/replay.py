"""Rebuild the state from trace.db: newest snapshot, then the journal after it.

A torn tail (the newest segment ends in a cut or garbled record with nothing valid after
it) is what a crash mid-write leaves: it is truncated and counted. Damage anywhere else
means acknowledged data may be gone, so loading stops and names the file, the offset and
the flag (``--accept-loss``) that accepts the loss. So does a journal that ends before
the high-water mark (server/marks.py: a segment cut, emptied or deleted), and a trace.db
whose queue.json says it held a queue but has no journal or snapshot left: a tail torn
within what was durable is no torn write. Nothing is skipped silently: with the flag, the
dropped bytes are put aside (``damaged.*``) and the lost events and jobs are listed.
Empty segments (a server killed before its first event) are simply nothing.

Fences (server/fence.py): a record, snapshot or high-water mark of an older leader past
the point where a newer one took over does not count, and damage past that point is a
deposed leader's last write, not a loss.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from crq.server import fence, marks, snapshot
from crq.server.events import decode
from crq.server.journal import PREFIX, RecordReader, list_segments, salvage
from crq.server.state import State

from crq.durable import write_atomic

T = TypeVar("T")

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
    lost_seq: list[list[int]] = field(default_factory=list)  # [first, last] events lost
    lost_jobs: list[int] = field(default_factory=list)  # ids read from lost submit records
    lost_ids: list[int] | None = None  # [first, last] ids the high-water mark says were given
    kept: list[str] = field(default_factory=list)  # where dropped bytes were put aside
    mark: marks.Mark | None = None  # trace.db/durable.json as found
    identity: dict[str, Any] | None = None  # trace.db/queue.json as found
    fences: fence.Fences = field(default_factory=fence.Fences)  # trace.db/epochs.json
    fenced: int = 0  # records a deposed leader wrote past its fence: ignored
    highest_epoch: int = 0  # of any segment, snapshot or fence seen


def load(
    trace: Path,
    global_resources: dict[str, int] | None,
    accept_loss: bool = False,
    attach: Callable[[State], None] | None = None,
) -> Replayed:
    """``attach`` gets the state once its snapshot is read, before its journal is applied
    (the history hooks in there: server/history.py)."""
    gc.disable()  # replay allocates millions of objects that all live: skip the GC passes
    try:
        return _load(trace, global_resources, accept_loss, attach)
    finally:
        gc.enable()
        gc.freeze()  # what was loaded stays: keep later collections from walking it


def _load(
    trace: Path,
    global_resources: dict[str, int] | None,
    accept_loss: bool,
    attach: Callable[[State], None] | None,
) -> Replayed:
    out = Replayed(State(global_resources))
    out.identity = _read_mark_file(out, marks.read_identity, trace, accept_loss)
    out.mark = _read_mark_file(out, marks.read_mark, trace, accept_loss)
    out.fences = _read_mark_file(out, fence.read, trace, accept_loss) or fence.Fences()
    fences = out.fences
    out.highest_epoch = fences.highest
    segments = list_segments(trace)
    if out.identity is not None and not segments and not snapshot.list_snapshots(trace):
        _emptied(out, trace, accept_loss)
    for path in reversed(snapshot.list_snapshots(trace)):
        try:
            read = snapshot.read(path, global_resources)
            out.highest_epoch = max(out.highest_epoch, read.epoch)
            if not fences.counts(read.epoch, read.seq):
                log.warning("%s was written by a deposed leader past its fence: skipped", path)
                continue
            out.state = read
            out.snapshot, out.snapshot_jobs = path, len(out.state.jobs)
            break
        except (snapshot.SnapshotError, ValueError, KeyError, TypeError, IndexError) as e:
            msg = f"snapshot {path} is damaged ({e})"
            if not accept_loss:
                raise ReplayError(
                    f"{msg}; start with --accept-loss to fall back to the previous snapshot"
                ) from e
            aside = path.with_name(f"damaged.{path.name}")  # else it stays the newest
            os.replace(path, aside)
            out.kept.append(str(aside))
            out.losses.append(f"{msg}; moved to {aside}")
            log.error("%s; falling back (--accept-loss)", msg)
    state = out.state
    if attach is not None:
        attach(state)
    torn: tuple[Path, bytes, int] | None = None  # cut once the high-water mark agrees
    end: tuple[Path, int] | None = None  # where the last valid record ends
    for i, path in enumerate(segments):
        newest = i == len(segments) - 1
        reader = RecordReader(path)
        out.segments += 1
        out.highest_epoch = max(out.highest_epoch, reader.epoch)
        cap = fences.cap(reader.epoch)
        for seq, payload in reader:
            if cap is not None and seq > cap:
                out.fenced += 1
                continue
            if seq <= state.seq:
                continue
            if seq != state.seq + 1:
                msg = f"{path}: journal jumps from event {state.seq} to {seq}"
                if not accept_loss:
                    raise ReplayError(f"{msg}; start with --accept-loss to accept the loss")
                out.losses.append(msg)
                out.lost_seq.append([state.seq + 1, seq - 1])
            try:
                state.apply(decode(payload), seq)
            except KeyError as e:
                if not out.lost_seq:  # a bug, not a torn write: see below
                    raise ReplayError(f"{path}: event {seq} cannot be applied ({e!r})") from e
                # after an accepted gap: it names a job or tasker that was lost with it
                state.seq = seq
                out.losses.append(f"{path}: event {seq} skipped, it needs what was lost ({e!r})")
                continue
            except (ValueError, TypeError, IndexError) as e:
                # checksummed, yet not an event this state can take: a bug, not a torn write
                raise ReplayError(f"{path}: event {seq} cannot be applied ({e!r})") from e
            out.events_replayed += 1
        end = (path, reader.end)
        damage = reader.damage
        if damage is None:
            continue
        if cap is not None and state.seq >= cap:
            log.warning("ignored past the fence of epoch %d: %s", reader.epoch, damage)
            continue
        if newest and damage.tail:
            torn = (path, reader.data, damage.offset)
            continue
        msg = f"journal damaged: {damage} ({len(reader.data) - damage.offset} bytes)"
        if not accept_loss:
            raise ReplayError(f"{msg}; start with --accept-loss to drop the damaged part")
        _drop(out, path, reader.data, damage.offset, msg)
    if out.mark is not None and (cap := fences.cap(out.mark.epoch)) is not None:
        out.mark = dataclasses.replace(out.mark, seq=min(out.mark.seq, cap))  # a deposed one's
    short = out.mark is not None and state.seq < out.mark.seq
    if short:
        _ends_early(out, trace, end, accept_loss)
    if torn is not None:
        path, data, offset = torn
        if short:  # a loss, not a write the crash cut short: keep what is there
            _drop(out, path, data, offset, f"torn record at {path} byte {offset}")
        else:
            log.warning(
                "torn journal tail truncated: %s at byte %d (%d bytes)",
                path,
                offset,
                len(data) - offset,
            )
            _truncate(path, offset)
            out.bytes_discarded += len(data) - offset
    out.lost_seq = _merged(out.lost_seq)
    out.lost_jobs = sorted(set(out.lost_jobs))
    return out


def _read_mark_file(
    out: Replayed, read: Callable[[Path], T], trace: Path, accept_loss: bool
) -> T | None:
    try:
        return read(trace)
    except marks.MarkError as e:
        if not accept_loss:
            raise ReplayError(f"{e}; start with --accept-loss to go on without it") from None
        out.losses.append(str(e))
        return None


def _emptied(out: Replayed, trace: Path, accept_loss: bool) -> None:
    """queue.json says this swd held a queue, yet no journal or snapshot is left."""
    ident = out.identity or {}
    made = datetime.fromtimestamp(float(ident.get("created") or 0)).strftime("%Y-%m-%d %H:%M")
    msg = (
        f"{trace / marks.IDENTITY}: this swd holds queue {ident.get('queue')!r} (made {made}), "
        f"but {trace} has no journal segment and no snapshot left"
    )
    if not accept_loss:
        raise ReplayError(f"{msg}; start with --accept-loss to start it again, empty")
    out.losses.append(msg)


def _ends_early(
    out: Replayed, trace: Path, end: tuple[Path, int] | None, accept_loss: bool
) -> None:
    """The journal stops before the high-water mark: acknowledged events are gone."""
    mark, state = out.mark, out.state
    assert mark is not None
    named = trace / f"{PREFIX}{mark.segment:06d}"
    now = f"now {named.stat().st_size}" if named.exists() else "now missing"
    where = f"{end[0]} at byte {end[1]}" if end else f"{trace} (no journal segment)"
    msg = (
        f"journal ends early: {where}, after event {state.seq}, but events up to {mark.seq} "
        f"were durable ({named.name} had {mark.size} bytes then, {now})"
    )
    if not accept_loss:
        raise ReplayError(f"{msg}; start with --accept-loss to accept the loss")
    out.losses.append(msg)
    log.error("%s (--accept-loss)", msg)
    out.lost_seq.append([state.seq + 1, mark.seq])
    if mark.next_id > state.next_id:
        out.lost_ids = [state.next_id, mark.next_id - 1]


def _drop(out: Replayed, path: Path, data: bytes, offset: int, msg: str) -> None:
    """Accept the loss of ``data[offset:]``: put it aside, note what it held, cut it off."""
    state = out.state
    aside = path.with_name(f"damaged.{path.name}.at-{offset}")
    write_atomic(aside, data[offset:])
    out.kept.append(str(aside))
    seqs = []
    for seq, payload in salvage(data, offset):
        if seq <= state.seq:
            continue
        seqs.append(seq)
        with contextlib.suppress(ValueError, KeyError, TypeError, IndexError):
            ev = decode(payload)
            if ev["e"] == "submit":
                out.lost_jobs += [row[0] for row in ev["jobs"]]
    if seqs:
        out.lost_seq.append([state.seq + 1, max(seqs)])
    out.losses.append(f"{msg}; dropped, kept in {aside}")
    log.error("%s: dropped, kept in %s (--accept-loss)", msg, aside)
    _truncate(path, offset)
    out.bytes_discarded += len(data) - offset


def _merged(ranges: list[list[int]]) -> list[list[int]]:
    out: list[list[int]] = []
    for lo, hi in sorted(r for r in ranges if r[0] <= r[1]):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return out


def _truncate(path: Path, size: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)
