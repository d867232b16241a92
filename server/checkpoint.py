"""Checkpoints: snapshot the state and drop the journal the snapshot covers.

While serving, a checkpoint forks: the child writes the snapshot of its copy-on-write view
of the state and exits, the parent keeps serving (as Redis's BGSAVE does), so a snapshot of
a million jobs never stalls requests. Replay after a crash then reads at most about one
``checkpoint_bytes`` of journal. The newest two snapshots are kept, with the journal since
the older one, so a damaged newest snapshot can fall back without losing events.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import os
import signal
import sqlite3
import time
from collections import Counter
from pathlib import Path

from crq.server import fence, snapshot
from crq.server.engine import Engine
from crq.server.fence import HEADER as EPOCH_HEADER
from crq.server.fence import segment_epoch
from crq.server.history import History
from crq.server.journal import first_seq, list_segments
from crq.server.settings import Settings

from crq.durable import fsync_dir, write_atomic

log = logging.getLogger("crq.checkpoint")


def prune(trace: Path, epoch: int = 0) -> None:
    """Keep the newest two snapshots and the journal segments after the older one.

    An old segment goes once the next readable segment starts within what the snapshot
    covers; an empty one (a server killed before its first event) holds nothing and goes
    too, and one whose start is unreadable is judged by the segments after it. Neither may
    stop pruning for good. The newest segment, the one being written, always stays.

    A leader of ``epoch`` prunes nothing once a newer leader has fenced it off (it is
    deposed and does not know yet), and never a segment of a newer epoch.
    """
    try:
        fences = fence.read(trace)
    except fence.FenceError:
        return  # replay will name it; pruning can wait
    if fences.deposes(epoch):
        log.warning("a newer leader (epoch %d) took over: not pruning", fences.highest)
        return
    snaps = []
    for snap in snapshot.list_snapshots(trace):
        if fences.counts(snapshot.epoch_of(snap), snapshot.snapshot_seq(snap)):
            snaps.append(snap)
        else:  # a deposed leader's, past its fence: never read, never kept
            snap.unlink(missing_ok=True)
    keep = snaps[-snapshot.KEEP :]
    for old in snaps[: -snapshot.KEEP]:
        old.unlink(missing_ok=True)
    if not keep:
        return
    covered = snapshot.snapshot_seq(keep[0])
    segments = list_segments(trace)
    epochs = [segment_epoch(seg) for seg in segments]
    # the first record that counts: a segment a deposed leader wrote past its fence
    # holds none, like an empty one, and must not pass for where the next one starts
    firsts: list[int | None] = []
    for seg, e in zip(segments, epochs, strict=True):
        first, cap = first_seq(seg), fences.cap(e)
        firsts.append(None if first is None or (cap is not None and first > cap) else first)
    for i, seg in enumerate(segments[:-1]):
        if epochs[i] > epoch:
            break
        if firsts[i] is None and (
            seg.stat().st_size <= EPOCH_HEADER.size or fences.cap(epochs[i]) is not None
        ):
            seg.unlink(missing_ok=True)
            continue
        later = next((f for f in firsts[i + 1 :] if f is not None), None)
        if later is None or later - 1 > covered:
            break
        seg.unlink(missing_ok=True)
    for tmp in trace.glob(".snapshot.*.tmp"):
        tmp.unlink(missing_ok=True)
    fsync_dir(trace)


async def write_forked(
    engine: Engine, settings: Settings, counts: Counter[str], history: History | None = None
) -> Path | None:
    """Snapshot in a forked child; returns its path, or None if it failed (both counted).

    The history first: a snapshot must not cover a forget whose row is not committed,
    since replay would not apply that forget again (server/history.py)."""
    if history is not None:
        try:
            await history.settle(engine.state, engine.durable)
        except (sqlite3.Error, OSError) as e:
            counts["failed"] += 1
            log.error("checkpoint skipped: the accounting history is not written (%s)", e)
            return None
    # no await from here to the fork: the history holds every forget the snapshot covers
    engine.journal.rotate()
    trace, fsync = settings.paths.trace, settings.fsync == "always"
    started = time.time()
    pid = os.fork()
    if pid == 0:  # the child: write and leave, touching nothing shared
        code = 1
        try:
            # a collection would write to every object's header: page copies of the whole
            # heap, shared with the parent until then, for garbage that lives a moment
            gc.disable()
            _detach_child()
            snapshot.write(engine.state, trace, fsync=fsync)
            code = 0
        finally:
            os._exit(code)
    _, status = await asyncio.get_running_loop().run_in_executor(None, os.waitpid, pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        counts["failed"] += 1
        log.error("checkpoint child %d failed (status %d)", pid, status)
        return None
    counts["written"] += 1
    await engine.durable()
    prune(trace, engine.journal.epoch)
    if engine.marker is not None:
        await engine.marker.write()
    path = snapshot.list_snapshots(trace)[-1]
    log.info("checkpoint %s written in %.2f s", path.name, time.time() - started)
    return path


def _detach_child() -> None:
    """Drop inherited fds (server.lock's flock, the listening socket) and die with the parent.

    Otherwise a kill -9 of the server mid-checkpoint leaves the child holding the swd lock
    and the port, and the restart is refused until the snapshot is written.
    """
    os.closerange(3, 1 << 16)
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


async def final(engine: Engine, settings: Settings, history: History | None = None) -> None:
    """The clean stop: the history written, snapshot inline (nothing else runs), prune,
    mark clean."""
    paths = settings.paths
    await engine.durable()
    if history is not None:
        try:
            history.close()
        except sqlite3.Error as e:  # no snapshot then: the next start writes them
            raise OSError(f"the accounting history is not written: {e}") from None
    engine.journal.close()
    snapshot.write(engine.state, paths.trace, fsync=settings.fsync == "always")
    prune(paths.trace, engine.journal.epoch)
    if engine.marker is not None:
        engine.marker.put_now()
    write_atomic(paths.clean_marker, f"{time.time()}\n".encode())
