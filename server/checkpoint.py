"""Checkpoints: snapshot the state and drop the journal the snapshot covers.

While serving, a checkpoint forks: the child writes the snapshot of its copy-on-write view
of the state and exits, the parent keeps serving (as Redis's BGSAVE does), so a snapshot of
a million jobs never stalls requests. Replay after a crash then reads at most about one
``checkpoint_bytes`` of journal. The newest two snapshots are kept, with the journal since
the older one, so a damaged newest snapshot can fall back without losing events.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from crq.server import snapshot
from crq.server.journal import first_seq, fsync_dir, list_segments
from crq.server.state import Event, State

from crq.wire import DONE, RUNNING

if TYPE_CHECKING:
    from collections.abc import Coroutine
    from typing import Any

    from crq.server.app import Server

log = logging.getLogger("crq.checkpoint")


def release_running(state: State, now: float) -> list[Event]:
    """A clean stop without --freeze: taskers kill their jobs; requeue them, uncharged."""
    return [
        {
            "e": "recover",
            "t": now,
            "job": j.id,
            "attempt": j.attempt,
            "reason": "server stopped",
            "charge": False,
        }
        for j in state.jobs.values()
        if j.state == RUNNING
    ]


def prune(trace: Path) -> None:
    """Keep the newest two snapshots and the journal segments after the older one.

    An old segment goes once the next readable segment starts within what the snapshot
    covers; an empty one (a server killed before its first event) holds nothing and goes
    too, and one whose start is unreadable is judged by the segments after it. Neither may
    stop pruning for good. The newest segment, the one being written, always stays.
    """
    snaps = snapshot.list_snapshots(trace)
    keep = snaps[-snapshot.KEEP :]
    for old in snaps[: -snapshot.KEEP]:
        old.unlink(missing_ok=True)
    if not keep:
        return
    covered = snapshot.snapshot_seq(keep[0])
    segments = list_segments(trace)
    firsts = [first_seq(seg) for seg in segments]
    for i, seg in enumerate(segments[:-1]):
        if seg.stat().st_size == 0:
            seg.unlink(missing_ok=True)
            continue
        later = next((f for f in firsts[i + 1 :] if f is not None), None)
        if later is None or later - 1 > covered:
            break
        seg.unlink(missing_ok=True)
    for tmp in trace.glob(".snapshot.*.tmp"):
        tmp.unlink(missing_ok=True)
    fsync_dir(trace)


async def write_forked(srv: Server) -> Path | None:
    """Snapshot in a forked child; returns its path, or None if it failed."""
    engine = srv.engine
    engine.journal.rotate()
    trace, fsync = srv.settings.paths.trace, srv.settings.fsync == "always"
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
        srv.checkpoints["failed"] += 1
        log.error("checkpoint child %d failed (status %d)", pid, status)
        return None
    srv.checkpoints["written"] += 1
    await engine.durable()
    prune(trace)
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
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


async def final(srv: Server) -> None:
    """The clean stop: snapshot inline (nothing else runs), prune, mark clean."""
    engine, paths = srv.engine, srv.settings.paths
    await engine.durable()
    engine.journal.close()
    snapshot.write(engine.state, paths.trace, fsync=srv.settings.fsync == "always")
    prune(paths.trace)
    if engine.marker is not None:
        engine.marker.put_now()
    from crq.server.main import write_atomic

    write_atomic(paths.clean_marker, f"{time.time()}\n".encode())


async def _checkpoints(srv: Server) -> None:
    journal = srv.engine.journal
    frozen_at = time.monotonic()
    while True:
        await asyncio.sleep(0.5)
        if journal.bytes_written >= srv.settings.checkpoint_bytes and not srv.engine.shutting_down:
            await write_forked(srv)
        if time.monotonic() - frozen_at > 30:
            # Jobs live long: move them out of the collector's sight, so full collections
            # do not walk a million jobs (1 s pauses otherwise). Jobs hold no cycles.
            gc.freeze()
            frozen_at = time.monotonic()


async def _marks(srv: Server) -> None:
    """The high-water mark follows the journal about every second, off the ack path."""
    marker = srv.engine.marker
    while marker is not None:
        await asyncio.sleep(1.0)
        if marker.behind():
            await marker.write()


async def _autoforget(srv: Server) -> None:
    """Forget ended jobs after autoforget_done (done) or autoforget_other (the rest)."""
    engine = srv.engine
    while True:
        await asyncio.sleep(60)
        if engine.mode != "normal" or engine.shutting_down:
            continue
        now = time.time()
        old_done, old_other = (
            now - srv.settings.autoforget_done,
            now - srv.settings.autoforget_other,
        )
        ids = list(engine.state.jobs)
        for start in range(0, len(ids), 20_000):
            jobs = engine.state.jobs
            gone = [
                i
                for i in ids[start : start + 20_000]
                if (j := jobs.get(i)) is not None
                and j.ended is not None
                and j.state not in ("queued", "running")
                and j.ended < (old_done if j.state == DONE else old_other)
            ]
            if gone:
                engine.emit([{"e": "forget", "t": now, "jobs": gone}])
            await asyncio.sleep(0)


def background(srv: Server) -> list[Coroutine[Any, Any, None]]:
    from crq.server import monitor

    return [_checkpoints(srv), _marks(srv), _autoforget(srv), monitor.watch(srv)]
