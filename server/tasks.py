"""The loops of a serving process: checkpoints, the high-water mark, autoforget, the expiry
of idempotency keys, the monitor.

Each takes the ``Service`` and runs until cancelled at the stop (server/main.py).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sqlite3
import time
from collections.abc import Coroutine
from typing import Any

from crq.server.commands import expire_keys, lose_tasker, prune_tokens
from crq.server.monitor import silent
from crq.server.samples import Sampler
from crq.server.service import Service

from crq.wire import DONE, FINAL_STATES, MODE_NORMAL

log = logging.getLogger("crq.tasks")
monitor_log = logging.getLogger("crq.monitor")


def background(srv: Service) -> list[Coroutine[Any, Any, None]]:
    loops = [_checkpoints(srv), _marks(srv), _autoforget(srv), _expire_keys(srv), watch(srv)]
    return [*loops, _history_retention(srv), _sampling(srv)]


async def _checkpoints(srv: Service) -> None:
    journal = srv.engine.journal
    frozen_at = time.monotonic()
    while True:
        await asyncio.sleep(0.5)
        if journal.bytes_written >= srv.settings.checkpoint_bytes and not srv.engine.shutting_down:
            await srv.checkpoint()
        if time.monotonic() - frozen_at > 30:
            # Jobs live long: move them out of the collector's sight, so full collections
            # do not walk a million jobs (1 s pauses otherwise). Jobs hold no cycles.
            gc.freeze()
            frozen_at = time.monotonic()


async def _marks(srv: Service) -> None:
    """The high-water mark follows the journal about every second, off the ack path."""
    marker = srv.engine.marker
    while marker is not None:
        await asyncio.sleep(1.0)
        if marker.behind():
            await marker.write()


async def _autoforget(srv: Service) -> None:
    """Forget ended jobs after autoforget_done (done) or autoforget_other (the rest): every
    minute, or a quarter of the shorter delay when that is less (at least a second)."""
    engine = srv.engine
    s = srv.settings
    period = max(1.0, min(60.0, min(s.autoforget_done, s.autoforget_other) / 4))
    while True:
        await asyncio.sleep(period)
        if engine.mode != MODE_NORMAL or engine.shutting_down:
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
                and j.state in FINAL_STATES
                and j.ended < (old_done if j.state == DONE else old_other)
            ]
            if gone:
                engine.emit([{"e": "forget", "t": now, "jobs": gone}])
            await asyncio.sleep(0)


async def _history_retention(srv: Service, period: float = 3600.0) -> None:
    """Delete history rows past history_days, and the oldest beyond history_max_rows: in a
    thread, a batch a transaction, so neither the loop nor the writer waits long."""
    history, s = srv.history, srv.settings
    delay = 60.0  # the first a minute after the start
    while history is not None:
        await asyncio.sleep(delay)
        delay = period
        try:
            gone = await asyncio.to_thread(
                history.prune, time.time() - s.history_days * 86400, s.history_max_rows
            )
        except (sqlite3.Error, OSError) as e:
            log.error("history retention failed: %s", e)
            continue
        if gone:
            log.info("history: %d rows past retention deleted", gone)


async def _sampling(srv: Service) -> None:
    """The dashboard's samples (server/samples.py): the stored ones first, then one every
    ``sample_interval``, each handed to the history's writer thread."""
    s, history = srv.settings, srv.history
    sampler = srv.samples = Sampler(s.sample_interval, s.sample_keep)
    sampler.attach(srv.state)
    srv.engine.on_wait = sampler.waited
    if history is not None:
        history.sample_keep = max(history.sample_keep, s.sample_keep)
        try:
            sampler.load(await asyncio.to_thread(history.load_samples, time.time() - s.sample_keep))
        except (sqlite3.Error, OSError, ValueError) as e:
            log.error("dashboard samples not loaded: %s", e)
        sampler.store = history.queue_sample
    while True:
        await asyncio.sleep(s.sample_interval)
        sampler.take(srv.state)


async def _expire_keys(srv: Service) -> None:
    """Forget idempotency keys past the window, and tokens a day past their expiry, as
    journaled events (so replay agrees)."""
    engine = srv.engine
    window = srv.settings.idempotency_window
    period = max(0.5, min(60.0, window / 4))
    while True:
        await asyncio.sleep(period)
        if engine.mode != MODE_NORMAL or engine.shutting_down:
            continue
        now = time.time()
        engine.emit(expire_keys(engine.state, now, window) + prune_tokens(engine.state, now))


async def watch(srv: Service) -> None:
    """The recovery monitor (server/monitor.py): silent taskers are declared lost."""
    engine = srv.engine
    period = max(0.2, min(1.0, srv.settings.tasker_timeout / 10))
    while True:
        await asyncio.sleep(period)
        if engine.mode != MODE_NORMAL or engine.shutting_down:
            continue
        now = time.time()
        for name in silent(srv, now):
            t = srv.state.taskers[name]
            monitor_log.warning(
                "tasker %s silent for over %.0f s: lost, recovering %d jobs",
                name,
                srv.settings.tasker_timeout,
                len(t.running),
            )
            engine.emit(lose_tasker(srv.state, name, f"tasker {name} lost (silent)", now))
