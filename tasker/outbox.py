"""The reports the server has not acked yet: what the tasker still owes it.

A started report is owed until acked; a finished result too, and it lives in the state
dir meanwhile (the runner writes it, this drops it once acked). A report that went out
without an ack is held back for a moment (``sent``), so a server that cannot take it is
not asked again in a spin; a reconnection makes everything due at once (``all_due``).
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from typing import Any

from crq.tasker.statedir import Key, StateDir, key_of

log = logging.getLogger("crq.tasker")

FORGET_AFTER = 10000  # acked results remembered, so a late dispatch of them is ignored


class Kind(enum.Enum):
    """Which of the two reports about an attempt."""

    STARTED = "started"
    FINISHED = "finished"


class Outbox:
    """Started reports and finished results until the server acks them (thread-safe)."""

    def __init__(self, state: StateDir) -> None:
        self.state = state
        self._lock = threading.Lock()
        self._started: dict[Key, dict[str, Any]] = {}
        self._finished: dict[Key, dict[str, Any]] = {}
        self._retry_at: dict[tuple[Kind, Key], float] = {}
        self._forgotten: dict[Key, None] = {}

    # -- filling -------------------------------------------------------------------------

    def add_started(self, report: dict[str, Any]) -> None:
        with self._lock:
            self._started[key_of(report)] = report

    def load(self, results: dict[Key, dict[str, Any]]) -> None:
        """Results found in the state dir at a restart: owed as if just stored."""
        with self._lock:
            self._finished.update(results)

    def store_results(self, results: list[dict[str, Any]]) -> None:
        """Make results durable, then owe them (kept in memory if the disk refuses)."""
        try:
            self.state.write_results(results)
        except OSError as e:  # keep them in memory: reporting them still beats losing them
            log.error("cannot record %d results: %s", len(results), e)
        with self._lock:
            for result in results:
                key = key_of(result)
                self._finished[key] = result
                self._retry_at.pop((Kind.FINISHED, key), None)

    # -- queries -------------------------------------------------------------------------

    def has_result(self, key: Key) -> bool:
        """A result of this attempt is owed."""
        with self._lock:
            return key in self._finished

    def knows(self, key: Key) -> bool:
        """This attempt has ended here: a result is owed or was acked lately."""
        with self._lock:
            return key in self._finished or key in self._forgotten

    def pending(self) -> int:
        """Results not acked yet."""
        with self._lock:
            return len(self._finished)

    def reports(
        self, everything: bool = False, limit: int = 5000
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Started and finished reports due now (or all of them, for a registration).

        At most ``limit`` of each, so a long outage's backlog goes out in bounded requests.
        """
        now = time.time()
        with self._lock:

            def due(kind: Kind, key: Key) -> bool:
                return everything or self._retry_at.get((kind, key), 0.0) <= now

            started = [r for k, r in self._started.items() if due(Kind.STARTED, k)][:limit]
            finished = [r for k, r in self._finished.items() if due(Kind.FINISHED, k)][:limit]
        return started, finished

    def has_due(self, kind: Kind | None = None) -> bool:
        """Some report (of that kind) is due now. Asked in the agent's wait predicates, so
        it stops at the first one instead of building the lists ``reports`` sends."""
        now = time.time()
        kinds = (Kind.STARTED, Kind.FINISHED) if kind is None else (kind,)
        with self._lock:
            for k in kinds:
                held = self._finished if k is Kind.FINISHED else self._started
                if any(self._retry_at.get((k, key), 0.0) <= now for key in held):
                    return True
        return False

    def next_due_in(self) -> float | None:
        """Seconds until a report waiting for a resend becomes due; None if none waits."""
        with self._lock:
            pending = [
                t
                for (kind, k), t in self._retry_at.items()
                if k in (self._started if kind is Kind.STARTED else self._finished)
            ]
        return max(0.0, min(pending) - time.time()) if pending else None

    # -- what the server said ------------------------------------------------------------

    def sent(
        self, started: list[dict[str, Any]], finished: list[dict[str, Any]], delay: float
    ) -> None:
        """Reports went out but were not acked: resend them after ``delay``, not in a spin."""
        t = time.time() + delay
        with self._lock:
            for r in started:
                self._retry_at[(Kind.STARTED, key_of(r))] = t
            for r in finished:
                self._retry_at[(Kind.FINISHED, key_of(r))] = t

    def all_due(self) -> None:
        """After a reconnection every report is worth sending again at once."""
        with self._lock:
            self._retry_at.clear()

    def ack(
        self, acked: set[Key], started: list[dict[str, Any]], finished: list[dict[str, Any]]
    ) -> None:
        """Forget the reports the server made durable, among those sent in that request.

        Only reports that were actually in the request count: an ack of an attempt must not
        drop a finished result that was produced after the request left.
        """
        s_keys = {key_of(r) for r in started} & acked
        f_keys = {key_of(r) for r in finished} & acked
        if not (s_keys or f_keys):
            return
        if f_keys:
            try:
                self.state.remove_results(sorted(f_keys))
            except OSError as e:
                log.error("cannot remove acked results: %s", e)
        with self._lock:
            for k in s_keys | f_keys:
                self._started.pop(k, None)
                self._retry_at.pop((Kind.STARTED, k), None)
            for k in f_keys:
                self._finished.pop(k, None)
                self._retry_at.pop((Kind.FINISHED, k), None)
                self._forgotten[k] = None
            while len(self._forgotten) > FORGET_AFTER:
                self._forgotten.pop(next(iter(self._forgotten)))
