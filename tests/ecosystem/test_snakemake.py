"""Real Snakemake (``--executor crq``) on a real crq queue: a fan-out/fan-in DAG of ~100 jobs
succeeds, also through a kill -9 of the server midway, and no job runs twice."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.ecosystem import dag
from tests.rigs import PATIENCE, CrqServer, Tasker, wait_until

pytest.importorskip("snakemake")
pytest.importorskip("snakemake_executor_plugin_crq")

WIDTH = 49  # 2 * 49 + 2 = 100 jobs
SLEEP = 0.1
RESOURCES = "mem_mb=10, runtime=5"  # RAM/10: the test tasker offers RAM


@pytest.fixture
def workflow(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Starts ``snakemake --executor crq`` against a server; its whole session is killed at
    teardown (the job processes are the taskers', killed by their fixture)."""
    started: list[subprocess.Popen[bytes]] = []

    def run(srv: CrqServer) -> subprocess.Popen[bytes]:
        env = dict(os.environ, CRQ_SERVER=srv.url, CRQ_TOKEN=srv.admin_token)
        env.pop("CRQ_QUEUE", None)
        p = dag.snakemake(tmp_path / "work", "--executor", "crq", "--jobs", "20", env=env)
        started.append(p)
        return p

    yield run
    for p in started:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def start_queue(
    crq_server: Callable[..., CrqServer], crq_tasker: Callable[..., Tasker]
) -> CrqServer:
    srv: CrqServer = crq_server("--recovery-grace", "60", "--heartbeat", "2")
    crq_tasker("tk1", "--swd", str(srv.swd), "--slots", "8", "--resources", "RAM/64000")
    return srv


def finished(p: subprocess.Popen[bytes], work: Path) -> None:
    rc = p.wait(timeout=PATIENCE * 2)
    log = (work / "snakemake.log").read_text(errors="replace")
    assert rc == 0, log[-4000:]
    assert (work / "out" / "gather.txt").exists()


def assert_once(work: Path, jobs: int) -> None:
    counts = dag.runs(work)
    twice = {line: n for line, n in counts.items() if n > 1}
    assert not twice, f"ran more than once: {twice}"
    assert len(counts) == jobs


def test_dag_succeeds(
    tmp_path: Path,
    crq_server: Callable[..., CrqServer],
    crq_tasker: Callable[..., Tasker],
    workflow: Callable[..., subprocess.Popen[bytes]],
) -> None:
    work = tmp_path / "work"
    jobs = dag.write(work, WIDTH, SLEEP, RESOURCES)
    srv = start_queue(crq_server, crq_tasker)
    finished(workflow(srv), work)
    assert_once(work, jobs)
    logs = list((work / ".snakemake" / "crq_logs").rglob("*.log"))
    assert len(logs) == jobs  # one log per job where Snakemake's aux logs point
    page = srv.request("GET", "/jobs", params={"limit": 1000})
    mids = [j for j in page["jobs"] if j["name"].startswith("smk-mid-")]
    assert mids and all("RAM/10" in j["resources"] for j in mids), mids[:1]
    # a shell rule runs its own command; run: code goes through a snakemake process
    assert not any("snakemake" in str(j["command"]) for j in mids), mids[:1]
    gather = [j for j in page["jobs"] if j["name"].startswith("smk-gather-")]
    assert len(gather) == 1 and "snakemake" in str(gather[0]["command"]), gather


def test_dag_survives_server_kill(
    tmp_path: Path,
    crq_server: Callable[..., CrqServer],
    crq_tasker: Callable[..., Tasker],
    workflow: Callable[..., subprocess.Popen[bytes]],
) -> None:
    work = tmp_path / "work"
    jobs = dag.write(work, WIDTH, SLEEP, RESOURCES)
    srv = start_queue(crq_server, crq_tasker)
    p = workflow(srv)
    wait_until(lambda: sum(dag.runs(work).values()) >= jobs // 4 or p.poll() is not None)
    assert p.poll() is None, "the workflow ended before the kill"
    srv.kill9()
    srv.start(port=srv.port)
    finished(p, work)
    assert_once(work, jobs)
