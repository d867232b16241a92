"""Calls at wall-clock times, for the time limits of jobs.

Wall clock rather than monotonic: a limit counts from the attempt's start as the state dir
records it (``time.time()``), and must hold for an attempt a restarted tasker re-adopts.
One thread for all of them (a heap), started on first use, so a tasker running a thousand
limited jobs keeps one sleeping thread rather than a thousand timers.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("crq.tasker")

#: The longest sleep between two looks at the clock: a clock set forward is seen this soon.
NAP = 5.0


class Alarm:
    """One call to come; ``Alarms.cancel`` drops it (a job that ended before its limit)."""

    __slots__ = ("call", "cancelled")

    def __init__(self, call: Callable[[], None]) -> None:
        self.call: Callable[[], None] | None = call
        self.cancelled = False


class Alarms:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Alarm]] = []
        self._cancelled = 0
        self._order = itertools.count()  # ties in time go first come, first served
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def at(self, when: float, call: Callable[[], None]) -> Alarm:
        """Have ``call()`` run at ``when`` (``time.time()`` seconds), or at once if past."""
        alarm = Alarm(call)
        with self._cond:
            heapq.heappush(self._heap, (when, next(self._order), alarm))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="alarms", daemon=True)
                self._thread.start()
            self._cond.notify()
        return alarm

    def cancel(self, alarm: Alarm) -> None:
        """Drop it: the heap then holds no reference to what it would have called, and a
        tasker running many short jobs with long limits does not grow with them."""
        with self._cond:
            if alarm.cancelled or alarm.call is None:
                return
            alarm.cancelled, alarm.call = True, None
            self._cancelled += 1
            if self._cancelled > 64 and self._cancelled * 2 > len(self._heap):
                self._heap = [item for item in self._heap if not item[2].cancelled]
                heapq.heapify(self._heap)
                self._cancelled = 0

    def pending(self) -> int:
        with self._cond:
            return len(self._heap) - self._cancelled

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (not self._heap or self._heap[0][0] > time.time()):
                    left = self._heap[0][0] - time.time() if self._heap else NAP
                    self._cond.wait(min(max(left, 0.0), NAP))
                if self._closed:
                    return
                _, _, alarm = heapq.heappop(self._heap)
                if alarm.cancelled:
                    self._cancelled -= 1
                    continue
                call, alarm.call = alarm.call, None
            if call is None:
                continue
            try:
                call()
            except Exception:  # one bad call must not stop the limits of the others
                log.exception("internal error in a timed action; carrying on")
