"""The crash matrix: SIGKILL the real server at many moments and check the invariants.

Taskers run real jobs that append ``<job>:<attempt>`` to a shared file, clients submit
concurrently and keep the ids the server acknowledged. After each kill the server is
restarted on the same swd: every acknowledged job must be there and end done, each job must
have run exactly once, the recovery report must exist with a clean sanity check.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.rigs import PATIENCE, CrqServer, Tasker, kill_jobs, wait_until

SETTINGS = ("--heartbeat", "1", "--recovery-grace", "20", "--tasker-timeout", "30")


class Cluster:
    def __init__(
        self,
        tmp: Path,
        srv: CrqServer,
        new_tasker: Callable[..., Tasker],
        taskers: int = 2,
        slots: int = 4,
    ) -> None:
        self.tmp = tmp
        self.swd = srv.swd
        self.runs = tmp / "runs.txt"
        self.work = tmp / "work"
        self.work.mkdir()
        self.srv = srv  # not started yet (the crq_server fixture)
        self.taskers = [
            new_tasker(
                f"w{i}", "--swd", str(self.swd), "--slots", str(slots),
                state=tmp / f"state{i}", start=False,
            )
            for i in range(taskers)
        ]  # fmt: skip
        self.acked: list[int] = []
        self.deps: list[tuple[int, int]] = []  # (parent, child) of acknowledged chains
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        try:
            self.srv.start()
            for t in self.taskers:
                t.start()
        except BaseException:
            self.close()  # the factory never got us: leave nothing running
            raise

    def spec(self, sleep: float) -> dict[str, Any]:
        cmd = f'echo "$CRQ_JOB_ID:$CRQ_ATTEMPT" >> {self.runs}; sleep {sleep}'
        return {"command": cmd, "cwd": str(self.work)}

    def held(self) -> dict[str, Any]:
        """A job that runs until the test touches ``gate``: it outlives a restart however
        slow the machine is."""
        gate = self.tmp / "gate"
        cmd = f'echo "$CRQ_JOB_ID:$CRQ_ATTEMPT" >> {self.runs}; '
        cmd += f"while [ ! -e {gate} ]; do sleep 0.05; done"
        return {"command": cmd, "cwd": str(self.work)}

    def submit_loop(self, sleep: float = 0.05, batch: int = 3, workflow: bool = False) -> None:
        """Submit until told to stop; keep only acknowledged ids. ``workflow``: chains (each
        job of a batch after the one before) and capped arrays, turn about."""

        def body(n: int) -> dict[str, Any]:
            if not workflow:
                return {"jobs": [self.spec(sleep) for _ in range(batch)]}
            if n % 2:
                return {**self.spec(sleep), "array": {"start": 1, "stop": 4, "max_running": 2}}
            chain = [{**self.spec(sleep), "after": [{"index": i}]} for i in range(batch - 1)]
            return {"jobs": [self.spec(sleep), *chain]}

        def loop() -> None:
            token = self.srv.admin_token
            with httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=5) as c:
                n = 0
                while not self._stop.is_set():
                    sent = body(n)
                    try:
                        r = c.post(f"{self.srv.url}/api/v1/jobs", json=sent)
                    except httpx.HTTPError:
                        return  # the server died: nothing more is acknowledged
                    if r.status_code == 201:
                        ids = r.json()["ids"]
                        self.acked.extend(ids)
                        if "jobs" in sent and workflow:
                            self.deps += list(zip(ids, ids[1:], strict=False))
                    n += 1
                    time.sleep(0.01)

        for _ in range(2):
            th = threading.Thread(target=loop, daemon=True)
            th.start()
            self._threads.append(th)

    def stop_submitting(self) -> None:
        self._stop.set()
        for th in self._threads:
            th.join(10)

    def server(self) -> dict[str, Any]:
        return self.srv.request("GET", "/server")

    def restart(self) -> None:
        self.srv.start(port=self.srv.port)
        wait_until(lambda: self.server()["mode"] == "normal", step=0.1)

    def wait_all_done(self, timeout: float = PATIENCE) -> dict[int, dict[str, Any]]:
        def jobs() -> dict[int, dict[str, Any]]:
            out: dict[int, dict[str, Any]] = {}
            after = 0
            while True:
                page = self.srv.request("GET", f"/jobs?after={after}&limit=5000")
                out.update({j["id"]: j for j in page["jobs"]})
                if page["next"] is None:
                    return out
                after = page["next"]

        def settled() -> dict[int, dict[str, Any]] | None:
            js = jobs()
            ended = all(j["state"] not in ("queued", "waiting", "running") for j in js.values())
            return js if ended else None

        return wait_until(settled, timeout=timeout, step=0.2)

    def check(self) -> dict[int, dict[str, Any]]:
        """The invariants after a crash and restart."""
        jobs = self.wait_all_done()
        missing = [i for i in self.acked if i not in jobs]
        assert not missing, f"acknowledged jobs lost: {missing[:10]}"
        not_done = {i: (j["state"], j["reason"]) for i, j in jobs.items() if j["state"] != "done"}
        assert not not_done, f"jobs not done: {not_done}"
        runs = Counter(line.split(":")[0] for line in self.runs.read_text().split())
        twice = {k: v for k, v in runs.items() if v > 1}
        assert not twice, f"jobs run more than once: {twice}"
        assert set(map(int, runs)) == set(jobs), (
            "a job ran that the server does not know, or not at all"
        )
        assert len(set(jobs)) == len(jobs)
        order = {int(line.split(":")[0]): k for k, line in enumerate(self.runs.read_text().split())}
        early = [(p, c) for p, c in self.deps if order[c] < order[p]]
        assert not early, f"jobs that ran before the job they depend on: {early[:10]}"
        sanity = self.srv.request("POST", "/server/sanity")
        assert sanity["ok"] and not sanity["findings"], sanity
        return jobs

    def reports(self) -> list[dict[str, Any]]:
        return [
            json.loads(p.read_text()) for p in sorted(self.swd.glob("crash_recovery_report_*.json"))
        ]

    def close(self) -> None:
        self.stop_submitting()
        for t in self.taskers:
            t.kill9()
        self.srv.stop()
        self.srv.kill9()
        for d in self.tmp.glob("state*"):
            kill_jobs(d)


@pytest.fixture
def cluster_factory(
    tmp_path: Path, crq_server: Callable[..., CrqServer], crq_tasker: Callable[..., Tasker]
) -> Iterator[Callable[..., Cluster]]:
    made: list[Cluster] = []

    def make(*extra: str, **kw: Any) -> Cluster:
        srv = crq_server(*SETTINGS, *extra, queue="crash", start=False)
        c = Cluster(tmp_path, srv, crq_tasker, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def _check_report(c: Cluster, all_back: bool = True) -> dict[str, Any]:
    reports = c.reports()
    assert reports, "no crash_recovery_report written"
    rep = reports[-1]
    for key in (
        "started_at",
        "ended_at",
        "duration_s",
        "snapshot",
        "journal",
        "taskers",
        "jobs",
        "sanity",
    ):
        assert key in rep
    assert rep["sanity"]["ok"]
    if all_back:
        assert set(rep["taskers"]["reconnected"]) >= set(rep["taskers"]["expected"])
    text = sorted(c.swd.glob("crash_recovery_report_*[0-9]"))
    assert text and "crash recovery report" in text[-1].read_text()
    return rep


@pytest.mark.parametrize("delay", [0.3, 0.8, 1.5])
def test_kill_during_submits_and_dispatch(
    cluster_factory: Callable[..., Cluster], delay: float
) -> None:
    c = cluster_factory()
    c.submit_loop(sleep=0.1)
    wait_until(lambda: c.acked)  # submitting is under way, however busy the machine is
    time.sleep(delay)
    c.srv.kill9()
    c.stop_submitting()
    assert c.acked, "nothing was acknowledged before the kill"
    c.restart()
    rep = _check_report(c)
    c.check()
    assert rep["jobs"]["lost"] == []


@pytest.mark.parametrize("delay", [0.5, 1.2])
def test_kill_during_chains_and_arrays(
    cluster_factory: Callable[..., Cluster], delay: float
) -> None:
    """Dependencies and capped arrays through a kill -9: each job once, none before its
    parent, the waiting ones released after the restart."""
    c = cluster_factory()
    c.submit_loop(sleep=0.1, workflow=True)
    wait_until(lambda: c.deps)
    time.sleep(delay)
    c.srv.kill9()
    c.stop_submitting()
    c.restart()
    _check_report(c)
    c.check()


def test_kill_while_jobs_complete_fast(cluster_factory: Callable[..., Cluster]) -> None:
    c = cluster_factory()
    c.acked += c.srv.submit(*[c.spec(0) for _ in range(300)])
    wait_until(lambda: c.server()["counts"]["done"] > 50)
    c.srv.kill9()
    c.restart()
    _check_report(c)
    c.check()


def test_kill_during_checkpoints(cluster_factory: Callable[..., Cluster]) -> None:
    c = cluster_factory("--checkpoint-bytes", "4000")
    c.submit_loop(sleep=0.05)
    wait_until(lambda: len(list((c.swd / "trace.db").glob("snapshot.*"))) >= 2)
    time.sleep(0.3)
    c.srv.kill9()
    c.stop_submitting()
    c.restart()
    _check_report(c)
    c.check()


@pytest.mark.parametrize("delay", [0.0, 0.3, 0.6])
def test_kill_during_clean_stop(cluster_factory: Callable[..., Cluster], delay: float) -> None:
    c = cluster_factory()
    c.acked += c.srv.submit(*[c.spec(0.5) for _ in range(30)])
    time.sleep(0.3)
    try:
        c.srv.request("POST", "/server/stop", json={"freeze": True})
    except (AssertionError, httpx.HTTPError):
        pass
    time.sleep(delay)
    c.srv.kill9()
    c.restart()
    c.check()


def test_kill_during_recovery_takes_the_lock_over(cluster_factory: Callable[..., Cluster]) -> None:
    """A crash during a recovery (an OOM): the next start, same host and boot, goes on alone.

    (A lock of another host or boot still stops the start: tests/server/test_storage_damage.py.)
    """
    c = cluster_factory()
    c.acked += c.srv.submit(*[c.spec(2) for _ in range(6)])
    wait_until(lambda: c.server()["counts"]["running"] == 6)
    c.taskers[1].proc.send_signal(signal.SIGSTOP)  # one expected tasker stays away
    c.srv.kill9()
    c.srv.start(port=c.srv.port)
    wait_until(lambda: c.server()["mode"] == "recovering")
    r = httpx.get(
        f"{c.srv.url}/api/v1/jobs", headers={"Authorization": f"Bearer {c.srv.admin_token}"}
    )
    assert (
        r.status_code == 503
        and r.json()["error"] == "crash_recovery"
        and "Retry-After" in r.headers
    )
    assert httpx.get(f"{c.srv.url}/readyz").status_code == 503
    dead = c.srv.proc.pid if c.srv.proc else 0
    c.srv.kill9()  # a crash in the middle of the recovery
    held = json.loads((c.swd / "trace.db" / "recovery.lock").read_text())
    assert held["pid"] == dead
    c.taskers[1].proc.send_signal(signal.SIGCONT)
    c.restart()
    rep = _check_report(c)
    assert rep["lock_taken_over"]["pid"] == dead
    assert "took over the recovery lock" in (c.swd / "logs" / "server.log").read_text()
    c.check()


def test_queue_order_survives_kill(tmp_path: Path) -> None:
    srv = CrqServer(tmp_path / "q.swd", "order", *SETTINGS)
    srv.start()
    try:
        spec = {"command": "true", "cwd": str(tmp_path)}
        for prio in (4, 9, 1, 9, 4, 15, 4):
            srv.submit(
                {**spec, "priority": prio}, {**spec, "priority": prio, "resources": "CORES/2"}
            )
        stopped = srv.submit(spec)[0]
        srv.request("POST", f"/jobs/{stopped}/stop")
        before = srv.request("GET", "/queue")["ids"]
        srv.kill9()
        srv.start(port=srv.port)
        wait_until(lambda: srv.request("GET", "/server")["mode"] == "normal")
        assert srv.request("GET", "/queue")["ids"] == before
        new = srv.submit(spec)[0]
        assert new > max(before + [stopped]), "ids must never be reused"
    finally:
        srv.kill9()


def test_recovery_ends_as_soon_as_taskers_are_back(cluster_factory: Callable[..., Cluster]) -> None:
    c = cluster_factory("--recovery-grace", "120")
    c.acked += c.srv.submit(*[c.held() for _ in range(4)])
    wait_until(lambda: all(c.srv.request("GET", f"/jobs/{i}")["pid"] for i in c.acked))
    c.srv.kill9()
    began = time.monotonic()
    c.restart()
    assert time.monotonic() - began < 15, "recovery waited for the grace period"
    rep = _check_report(c)
    assert rep["jobs"]["reattached"] == 4
    (c.tmp / "gate").touch()
    c.check()


def test_missing_tasker_jobs_are_requeued_after_grace(
    cluster_factory: Callable[..., Cluster],
) -> None:
    c = cluster_factory("--recovery-grace", "3")
    c.acked += c.srv.submit(*[c.spec(1) for _ in range(8)])
    wait_until(lambda: c.server()["counts"]["running"] == 8)
    gone = c.taskers[1]
    gone.kill9()
    kill_jobs(gone.state)
    c.srv.kill9()
    c.restart()
    rep = _check_report(c, all_back=False)
    assert rep["taskers"]["missing"] == ["w1"]
    assert {x["action"] for x in rep["jobs"]["lost"]} == {"requeued"}
    jobs = c.wait_all_done()
    assert all(j["state"] == "done" for j in jobs.values())
    moved = [j for j in jobs.values() if j["attempt"] == 2]
    assert moved and all(j["tasker"] == "w0" for j in moved)


def test_damaged_journal_refuses_to_start(tmp_path: Path) -> None:
    srv = CrqServer(tmp_path / "q.swd", "dmg", *SETTINGS)
    try:
        srv.start()
        srv.submit(*[{"command": "true", "cwd": str(tmp_path)} for _ in range(5)])
        srv.submit({"command": "true", "cwd": str(tmp_path)})
        srv.kill9()
        seg = sorted((tmp_path / "q.swd" / "trace.db").glob("CR.*"))[-1]
        data = bytearray(seg.read_bytes())
        data[30] ^= 0xFF  # inside the first record (after the 16-byte epoch header)
        seg.write_bytes(bytes(data))
        with pytest.raises(AssertionError, match=r"CR\.\d+ at byte 16.*--accept-loss"):
            srv.start(port=srv.port)
        srv.extra.append("--accept-loss")
        srv.start(port=srv.port)
        wait_until(lambda: srv.request("GET", "/server")["mode"] == "normal")
        rep = json.loads(
            sorted((tmp_path / "q.swd").glob("crash_recovery_report_*.json"))[-1].read_text()
        )
        assert rep["journal"]["losses"] and rep["journal"]["bytes_discarded"] > 0
    finally:
        srv.kill9()
