"""What the hot paths observe for /metrics: latency histograms and event counters.

prometheus_client's ``Histogram.observe`` takes a lock per call; the server's loop is one
thread, so these are plain lists and ints bumped in place (a bisect and two adds per
observation, nothing allocated but the float observed), turned into metric families only at
scrape time (server/metrics.py).

What a counter means across a restart: these count what **this process** lived since it
began leading. Replay does not count again what the process before already counted (the
engine that counts is made after replay), so a restart is a counter reset, which
Prometheus's ``rate``/``increase`` handle. Results that taskers buffered while the server
was down are counted by the server they are reported to. Counts of the queue's whole life
(recoveries, failovers) come from the swd's files instead (server/metrics.py).
"""

from __future__ import annotations

from bisect import bisect_left

from crq.wire import DONE, FAILED, LOST, STOPPED

#: seconds: a durable submit answers in about a millisecond with fsync, later under load
SUBMIT_BOUNDS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
#: seconds: from a few milliseconds on an idle queue to a day behind a busy one
WAIT_BOUNDS = (
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0,
    3600.0, 7200.0, 14400.0, 43200.0, 86400.0,
)  # fmt: skip
OUTCOMES = (DONE, FAILED, STOPPED, LOST)


class Histo:
    """Counts per bucket (not cumulative; the last one is +Inf) and the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        """Prometheus's ``le`` buckets: each counts every observation at or below it."""
        out, total = [], 0
        for bound, n in zip((*map(repr, self.bounds), "+Inf"), self.counts, strict=True):
            total += n
            out.append((bound, float(total)))
        return out


class Observed:
    """The process's histograms and counters, bumped by the engine and the submit routes."""

    __slots__ = ("submit", "dispatch", "wait", "finished", "recoveries", "failovers")

    def __init__(self) -> None:
        self.submit = Histo(SUBMIT_BOUNDS)  # request start → the durable 201
        self.dispatch = Histo(WAIT_BOUNDS)  # submitted → dispatched, first attempts
        self.wait = Histo(WAIT_BOUNDS)  # submitted → started, first attempts
        self.finished = dict.fromkeys(OUTCOMES, 0)  # jobs that reached a final state
        # of the queue's whole life, from its swd (server/leading.py, server/recovery.py)
        self.recoveries = 0  # crash recoveries that ended (their reports)
        self.failovers = 0  # leaderships that moved to another server URL (epochs.json)
