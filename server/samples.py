"""The dashboard's time series: queue depth, running jobs, throughput and wait time.

Every ``sample_interval`` seconds (10 s) the server notes a handful of numbers it already
keeps (the state's counts, the taskers' slots) plus what two hooks counted since the last
sample: jobs ended by outcome (the job-end hook) and the queue wait of first attempts as
they start (the engine's, beside the wait histogram). Nothing runs per request or per
dispatch beyond a few additions in those hooks, so the hot path does not pay for it. The
last ``sample_keep`` seconds stay in memory; each sample is also handed to the
accounting database's writer thread (server/history.py), so a restart loads them back.

Not events: the series describe the server's life (a crash shows as a gap), not queue
state, so they need no replay.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from crq.server.state import Job, State

from crq.wire import DONE, FAILED, LOST, QUEUED, RUNNING, STOPPED, WAITING

#: the fields of a sample, in order (the JSON answer's ``fields``)
FIELDS = (
    "t",  # when (epoch seconds)
    "queued",
    "waiting",
    "running",
    "done",  # jobs that ended done since the sample before
    "failed",  # failed or lost since the sample before
    "stopped",
    "wait_mean",  # seconds from submit to start, of the jobs that started since (None: none)
    "wait_max",
    "slots",  # slots of the taskers not lost
    "busy",  # of them, in use
)
Sample = tuple[Any, ...]


class Sampler:
    """The in-memory series and the counters the job-end hook feeds."""

    def __init__(self, interval: float, keep: float) -> None:
        self.interval = interval
        self.keep = keep
        self.series: deque[Sample] = deque()
        self._ended = {DONE: 0, FAILED: 0, STOPPED: 0}
        self._wait_sum = 0.0
        self._wait_n = 0
        self._wait_max = 0.0
        self.store: Callable[[Sample], None] | None = None  # the history writer's queue

    def attach(self, state: State) -> None:
        """Count job ends, after whatever hook the state had (the engine's waiters)."""
        before = state.on_final

        def on_final(job: Job) -> None:
            if before is not None:
                before(job)
            self.ended(job)

        state.on_final = on_final

    def ended(self, job: Job) -> None:
        outcome = FAILED if job.state == LOST else job.state
        if outcome in self._ended:
            self._ended[outcome] += 1

    def waited(self, seconds: float) -> None:
        """A first attempt started after ``seconds`` in the queue (the engine's hook, where
        the queue-wait histogram is observed): counted when the wait ends, not when the
        job does, so a long job's wait is not charted hours late."""
        wait = max(0.0, seconds)
        self._wait_sum += wait
        self._wait_n += 1
        self._wait_max = max(self._wait_max, wait)

    def take(self, state: State, now: float | None = None) -> Sample:
        """One sample now; the counters start again."""
        t = time.time() if now is None else now
        counts = state.counts
        slots = busy = 0
        for tk in state.taskers.values():
            if tk.state != "lost":
                slots += tk.slots
                busy += tk.slots - tk.free_slots
        n = self._wait_n
        sample: Sample = (
            round(t, 3),
            counts[QUEUED],
            counts[WAITING],
            counts[RUNNING],
            self._ended[DONE],
            self._ended[FAILED],
            self._ended[STOPPED],
            round(self._wait_sum / n, 3) if n else None,
            round(self._wait_max, 3) if n else None,
            slots,
            busy,
        )
        self._ended = dict.fromkeys(self._ended, 0)
        self._wait_sum, self._wait_n, self._wait_max = 0.0, 0, 0.0
        self.add(sample)
        if self.store is not None:
            self.store(sample)
        return sample

    def add(self, sample: Sample) -> None:
        self.series.append(sample)
        cut = sample[0] - self.keep
        while self.series and self.series[0][0] < cut:
            self.series.popleft()

    def load(self, samples: list[Sample]) -> None:
        """The samples of before the start (oldest first), ahead of the new ones."""
        old = [s for s in samples if not self.series or s[0] < self.series[0][0]]
        self.series.extendleft(reversed(old))
        cut = time.time() - self.keep
        while self.series and self.series[0][0] < cut:
            self.series.popleft()

    def since(self, t: float) -> list[Sample]:
        at = bisect.bisect_left(self.series, t, key=lambda s: s[0])
        return list(self.series)[at:]


__all__ = ["FIELDS", "Sample", "Sampler"]
