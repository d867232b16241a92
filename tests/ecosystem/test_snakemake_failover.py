"""Real Snakemake (``--executor crq``) rides out a failover: the leader of a queue with a
standby is killed with -9 midway through a ~100-job DAG, the standby takes over, and the
workflow succeeds with no job run twice. The plugin is given only the queue's name: its
client finds the leader, and then the standby, through the queue's registry entry."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.client.test_client_integration import kill_servers_of
from tests.ecosystem import dag
from tests.ecosystem.test_snakemake import RESOURCES, SLEEP, WIDTH, assert_once, finished
from tests.rigs import PATIENCE, ROOT, Tasker, free_port, kill_jobs, wait_until

pytest.importorskip("snakemake")
pytest.importorskip("snakemake_executor_plugin_crq")


class FailoverQueue:
    """A leader and a standby that ``ncmgr start`` started on one swd, a tasker on it, a
    private CRQ_HOME (the registry); ``close`` kills all of it, also after a failure."""

    def __init__(self, root: Path) -> None:
        self.root, self.name = root, f"smkfo{os.getpid()}"
        self.swd = root / f"{self.name}.swd"
        env = {k: v for k, v in os.environ.items() if k not in ("CRQ_SERVER", "CRQ_TOKEN")}
        env.pop("CRQ_TASKER_TOKEN", None)
        env.update(
            CRQ_HOME=str(root / "home"),
            CRQ_QUEUE=self.name,
            PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        )
        self.env = env
        self.tasker: Tasker | None = None
        self.workflows: list[subprocess.Popen[bytes]] = []

    def ncmgr(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "crq.client.ncmgr", *args, "--queue", self.name,
             "--swd", str(self.swd)],
            env=self.env, cwd=self.root, capture_output=True, text=True, timeout=PATIENCE * 2,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr + done.stdout
        return done.stdout

    def start(self) -> str:
        """The leader, its standby (whose URL this returns) and the tasker."""
        common = ("--fsync", "never", "--recovery-grace", "60", "--heartbeat", "2")
        self.ncmgr("start", "--port", str(free_port()), *common)
        out = self.ncmgr("start", "--standby", *common)
        m = re.search(r"standby started at (http://\S+)", out)
        assert m, out
        self.tasker = Tasker(self.root / "tk.state", "--swd", str(self.swd), "--slots", "8",
                             "--resources", "RAM/64000", name="smk-tk")  # fmt: skip
        self.tasker.start(env=self.env)
        return m.group(1)

    def leader(self) -> dict[str, object]:
        return dict(json.loads((self.swd / "server.json").read_text()))

    def snakemake(self, work: Path) -> subprocess.Popen[bytes]:
        p = dag.snakemake(work, "--executor", "crq", "--jobs", "20", env=self.env)
        self.workflows.append(p)
        return p

    def close(self) -> None:
        for p in self.workflows:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        if self.tasker is not None:
            self.tasker.kill9()
            kill_jobs(self.tasker.state)
        kill_servers_of(self.swd)


@pytest.fixture
def fq(tmp_path: Path) -> Iterator[FailoverQueue]:
    q = FailoverQueue(tmp_path)
    try:
        yield q
    finally:
        q.close()


def test_dag_rides_out_a_failover_to_the_standby(tmp_path: Path, fq: FailoverQueue) -> None:
    work = tmp_path / "work"
    jobs = dag.write(work, WIDTH, SLEEP, RESOURCES)
    standby = fq.start()
    old = fq.leader()
    p = fq.snakemake(work)
    wait_until(lambda: sum(dag.runs(work).values()) >= jobs // 4 or p.poll() is not None)
    assert p.poll() is None, "the workflow ended before the kill"
    os.kill(int(old["pid"]), signal.SIGKILL)  # type: ignore[call-overload]
    wait_until(lambda: fq.leader()["url"] == standby and fq.leader()["pid"] != old["pid"])
    finished(p, work)
    assert_once(work, jobs)
    assert fq.leader()["url"] == standby  # the whole second half ran under the new leader
