"""What every part of a serving process shares: settings, engine, tokens, its identity.

The context handlers, loops and the recovery receive (as uvicorn's protocols receive its
``ServerState``), so none of them imports ``main`` or ``app``. Start-up and stop failures
are named here too, for the same reason.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from crq.server import checkpoint, commands, sanity
from crq.server.commands import Outcome
from crq.server.engine import Engine
from crq.server.exits import StartError, StopError
from crq.server.history import History
from crq.server.models import Register
from crq.server.samples import Sampler
from crq.server.settings import Settings
from crq.server.state import State

from crq.durable import write_atomic

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger("crq.server")

__all__ = ["Recovering", "RecoveryMode", "Service", "StartError", "StopError"]

HANDOVER_HOLD = 15.0  # a leader that handed over stands back this long for another to win


class Recovering(Exception):
    """A client request during crash recovery: answered 503 with the progress."""

    def __init__(self, progress: dict[str, Any]) -> None:
        super().__init__("crash recovery")
        self.progress = progress


class RecoveryMode(Protocol):
    """What the handlers ask of a crash recovery in progress (server/recovery.py)."""

    def progress(self) -> dict[str, Any]: ...

    def on_register(self, name: str, body: Register, out: Outcome) -> None: ...


def _no_checkpoints() -> Counter[str]:
    return Counter(written=0, failed=0)


@dataclass(eq=False)
class Service:
    """The state of one serving process, shared by its handlers and loops."""

    settings: Settings
    engine: Engine
    admin_token: bytes
    tasker_token: bytes
    instance: str
    url: str
    started_at: float = field(default_factory=time.time)
    recovery: RecoveryMode | None = None  # set while in crash recovery mode
    recovery_task: asyncio.Task[None] | None = None
    checkpoints: Counter[str] = field(default_factory=_no_checkpoints)  # forked, since start
    metrics: CollectorRegistry | None = None  # made at the first scrape (server/metrics.py)
    stop_requested: asyncio.Event = field(default_factory=asyncio.Event)
    epoch: int = 0  # this leader's (server/fence.py)
    queue_id: str = ""  # the uuid in trace.db/queue.json: epochs count per queue
    previous: dict[str, Any] = field(default_factory=dict)  # the leader before: epoch, url…
    standbys: Callable[[], list[str]] = list  # the URLs of the other candidates
    step_down: Callable[[str], None] | None = None  # lost the lease: stop acting, now
    handover: dict[str, Any] | None = None  # ncmgr failover: set when the stop hands over
    history: History | None = None  # the accounting database's writer (server/history.py)
    samples: Sampler | None = None  # the dashboard's time series (server/samples.py)

    @property
    def state(self) -> State:
        return self.engine.state

    def progress(self) -> dict[str, Any] | None:
        """The recovery's progress, None outside crash recovery."""
        return self.recovery.progress() if self.recovery is not None else None

    def sanity(self, fix: bool) -> dict[str, Any]:
        engine = self.engine
        return sanity.check(engine.state, set(engine.links), fix, engine.emit).as_dict()

    def request_stop(self, freeze: bool) -> None:
        """Begin the clean stop (a signal, ``POST /server/stop``); main then ends serving."""
        engine = self.engine
        if engine.shutting_down:
            return
        log.info("stop requested (freeze=%s)", freeze)
        engine.stop(freeze, [] if freeze else commands.release_running(self.state, time.time()))
        self.stop_requested.set()

    def hand_over(self, to: str | None) -> None:
        """Stop as ``stop --freeze`` does, then stand by (main) while another takes over."""
        info = {
            "from_pid": os.getpid(),
            "from_host": os.uname().nodename,
            "from_instance": self.instance,
            "to": to,
            "until": time.time() + HANDOVER_HOLD,
        }
        write_atomic(self.settings.paths.handover, orjson.dumps(info))
        self.handover = info
        log.info("handing over to %s", to or "any standby")
        self.request_stop(True)

    async def checkpoint(self) -> Path | None:
        """A forked checkpoint, counted."""
        return await checkpoint.write_forked(
            self.engine, self.settings, self.checkpoints, self.history
        )

    def write_server_json(self, mode: str) -> None:
        """``<swd>/server.json``: where and what this server is, for ncmgr and taskers.

        Only while leading: a deposed leader must not point anyone back at itself."""
        guard = self.engine.journal.guard
        if guard is not None and not guard():
            return
        s = self.settings
        info = {
            "pid": os.getpid(),
            "host": os.uname().nodename,
            "port": s.port,
            "url": self.url,
            "queue": s.queue,
            "swd": str(s.swd),
            "instance": self.instance,
            "mode": mode,
            "started_at": self.started_at,
            "epoch": self.epoch,
        }
        write_atomic(s.paths.server_json, orjson.dumps(info, option=orjson.OPT_INDENT_2))
