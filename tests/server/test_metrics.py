"""/metrics of a real server after real jobs: the histograms and counters an alert needs,
every name that deploy/prometheus/alerts.yml and deploy/grafana/crq.json use, and what
the counters say after a kill -9 (server/observe.py)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import httpx
import yaml
from crq.server.fence import Fence, Fences
from crq.server.observe import Histo
from prometheus_client.parser import text_string_to_metric_families

from tests.rigs import CrqServer, Tasker, wait_until

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "crq.json"
# series Prometheus makes itself (the scrape's own), not the server
PROMETHEUS_OWN = {"up"}
NAME = re.compile(r"\b((?:crq|process)_[a-z_]+|up)\b")


def _samples(srv: CrqServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{srv.url}/metrics", timeout=30).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def _value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
           **labels: str) -> float:  # fmt: skip
    return samples[(name, tuple(sorted(labels.items())))]


def _expressions() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    dash = json.loads(DASHBOARD.read_text())
    exprs += [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in dash["templating"]["list"] if "definition" in v]
    return exprs


def test_rules_and_dashboard_parse() -> None:
    rules = yaml.safe_load(ALERTS.read_text())
    names = [r["alert"] for g in rules["groups"] for r in g["rules"]]
    for want in ("CrqServerDown", "CrqRecoveryTooLong", "CrqQueueWaitHigh", "CrqFailedJobRate",
                 "CrqNoTaskers", "CrqJournalDiskFull"):  # fmt: skip
        assert want in names
    assert all(r["annotations"]["summary"] for g in rules["groups"] for r in g["rules"])
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and len({p["id"] for p in dash["panels"]}) == len(dash["panels"])


def test_metrics_after_real_jobs_and_a_kill9(
    crq_server: Callable[..., CrqServer], crq_tasker: Callable[..., Tasker], tmp_path: Path
) -> None:
    srv = crq_server("--heartbeat", "2", "--recovery-grace", "60")
    crq_tasker("tk1", "--swd", str(srv.swd), "--slots", "2")
    ok, bad = srv.submit(
        {"command": ["true"], "cwd": str(tmp_path)}, {"command": "exit 3", "cwd": str(tmp_path)}
    )
    assert srv.wait(ok)["state"] == "done" and srv.wait(bad)["state"] == "failed"
    got = _samples(srv)
    exposed = {name for name, _ in got}
    used = {m for e in _expressions() for m in NAME.findall(e)}
    missing = used - exposed - PROMETHEUS_OWN
    assert not missing, f"used by deploy/ but not in /metrics: {sorted(missing)}"
    assert _value(got, "crq_submit_latency_seconds_count") == 1  # one request of two jobs
    assert _value(got, "crq_dispatch_latency_seconds_count") == 2
    assert _value(got, "crq_queue_wait_seconds_count") == 2
    assert _value(got, "crq_queue_wait_seconds_bucket", le="+Inf") == 2
    assert 0 < _value(got, "crq_submit_latency_seconds_sum") < 60
    assert _value(got, "crq_jobs_finished_total", outcome="done") == 1
    assert _value(got, "crq_jobs_finished_total", outcome="failed") == 1
    assert _value(got, "crq_jobs_finished_total", outcome="lost") == 0
    assert _value(got, "crq_recoveries_total") == 0
    assert _value(got, "crq_failovers_total") == 0
    assert _value(got, "process_resident_memory_bytes") > 0

    # kill -9: the restart replays both finishes without counting them again (this server
    # did not live them: a counter reset), and the recovery is counted from its report
    srv.kill9()
    srv.start()
    wait_until(lambda: srv.request("GET", "/server")["mode"] == "normal")
    again = _samples(srv)
    assert _value(again, "crq_recoveries_total") == 1
    assert _value(again, "crq_jobs_finished_total", outcome="done") == 0
    assert _value(again, "crq_queue_wait_seconds_count") == 0
    (third,) = srv.submit({"command": ["true"], "cwd": str(tmp_path)})
    assert srv.wait(third)["state"] == "done"
    wait_until(lambda: _value(_samples(srv), "crq_jobs_finished_total", outcome="done") == 1)
    # a clean restart is no recovery: the count stays, read from the swd's reports
    srv.stop()
    srv.start()
    assert _value(_samples(srv), "crq_recoveries_total") == 1


def test_histogram_buckets_are_cumulative_le() -> None:
    h = Histo((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):
        h.observe(v)
    assert h.cumulative() == [("0.1", 2.0), ("1.0", 3.0), ("+Inf", 4.0)]
    assert h.sum == 3.65


def test_failovers_count_moves_to_another_url() -> None:
    fences = Fences([Fence(1, 0, url="http://a:1"), Fence(2, 5, url="http://a:1"),
                     Fence(3, 9, url="http://b:1"), Fence(4, 12, url="http://a:1")])  # fmt: skip
    assert fences.moves() == 2
    assert Fences([Fence(1, 0), Fence(2, 3, url="http://a:1")]).moves() == 0
