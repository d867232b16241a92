"""Prometheus metrics, computed from the state at scrape time (nothing to keep in step);
the latencies and event counts come from what the engine observed (server/observe.py).
Names and meanings: README "Metrics and alerts"; deploy/prometheus and deploy/grafana use
them (tests/server/test_metrics.py holds them to it)."""

from __future__ import annotations

from crq.server.observe import Histo
from crq.server.service import Service
from prometheus_client import CONTENT_TYPE_LATEST, ProcessCollector, generate_latest
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

from crq.wire import MODE_RECOVERING


class _Queue(Collector):
    def __init__(self, srv: Service) -> None:
        self.srv = srv

    def collect(self):  # type: ignore[no-untyped-def]
        st, engine = self.srv.state, self.srv.engine
        jobs = GaugeMetricFamily("crq_jobs", "Jobs by state", labels=["state"])
        for state, n in st.counts.items():
            jobs.add_metric([state], n)
        yield jobs
        taskers = GaugeMetricFamily("crq_taskers", "Taskers by state", labels=["state"])
        by_state: dict[str, int] = {}
        for t in st.taskers.values():
            by_state[t.state] = by_state.get(t.state, 0) + 1
        for state, n in by_state.items():
            taskers.add_metric([state], n)
        yield taskers
        yield GaugeMetricFamily(
            "crq_taskers_connected", "Taskers with a live link", value=len(engine.links)
        )
        yield CounterMetricFamily(
            "crq_dispatches", "Dispatches since start", value=engine.dispatched
        )
        yield GaugeMetricFamily("crq_journal_seq", "Last journaled event", value=st.seq)
        yield GaugeMetricFamily(
            "crq_journal_durable_seq", "Last durable event", value=engine.journal.durable_seq
        )
        checkpoints = CounterMetricFamily(
            "crq_checkpoints", "Forked checkpoints since start", labels=["result"]
        )
        for result, n in self.srv.checkpoints.items():
            checkpoints.add_metric([result], n)
        yield checkpoints
        yield GaugeMetricFamily(
            "crq_journal_disk_full",
            "1 while the journal waits for disk space (replies are held)",
            value=0 if engine.journal.stalled_since is None else 1,
        )
        history = self.srv.history
        if history is not None:
            yield CounterMetricFamily(
                "crq_history_rows", "Rows written to accounting.db since start",
                value=history.written,
            )  # fmt: skip
            yield GaugeMetricFamily(
                "crq_history_pending", "Forgotten jobs not in accounting.db yet",
                value=history.pending,
            )  # fmt: skip
            yield CounterMetricFamily(
                "crq_history_failures", "Failed accounting.db commits since start (retried)",
                value=history.failures,
            )  # fmt: skip
        yield GaugeMetricFamily(
            "crq_recovering",
            "1 while in crash recovery mode",
            value=1 if engine.mode == MODE_RECOVERING else 0,
        )
        yield from _observed(self.srv)


def _histogram(name: str, doc: str, h: Histo) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, doc, buckets=h.cumulative(), sum_value=h.sum)


def _observed(srv: Service):  # type: ignore[no-untyped-def]
    seen = srv.engine.observed
    yield _histogram(
        "crq_submit_latency_seconds",
        "Submit requests (one job or a batch): received to the durable 201",
        seen.submit,
    )
    yield _histogram(
        "crq_dispatch_latency_seconds",
        "Jobs' first attempts: submitted to dispatched to a tasker",
        seen.dispatch,
    )
    yield _histogram(
        "crq_queue_wait_seconds", "Jobs' first attempts: submitted to started", seen.wait
    )
    finished = CounterMetricFamily(
        "crq_jobs_finished",
        "Jobs that reached a final state (done, failed, stopped, lost) since this server "
        "began leading; replay is not counted again",
        labels=["outcome"],
    )
    for outcome, n in seen.finished.items():
        finished.add_metric([outcome], n)
    yield finished
    yield CounterMetricFamily(
        "crq_recoveries",
        "Crash recoveries this queue's swd has completed (its crash_recovery_report files)",
        value=seen.recoveries,
    )
    yield CounterMetricFamily(
        "crq_failovers",
        "Takeovers of this queue by a server at another URL (trace.db/epochs.json)",
        value=seen.failovers,
    )
    yield GaugeMetricFamily(
        "crq_leader_epoch", "This leader's epoch (fencing); it changes at each takeover",
        value=srv.epoch,
    )  # fmt: skip


def render(srv: Service) -> tuple[bytes, str]:
    registry = srv.metrics
    if registry is None:
        registry = srv.metrics = CollectorRegistry()
        registry.register(_Queue(srv))
        ProcessCollector(registry=registry)  # process_cpu_seconds_total, RSS, open fds…
    return generate_latest(registry), CONTENT_TYPE_LATEST
