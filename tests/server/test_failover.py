"""Failover with the file election (SPEC section 8): a leader and standbys on one swd, real
taskers running real jobs, clients submitting; kill -9, clean hand-overs, many of both.

The invariants are crash recovery's (tests/server/test_crash.py): no acknowledged job lost,
none run twice, sanity clean, queue order kept; and the takeover is crash recovery mode,
its report naming both leaders and epochs.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.rigs import PATIENCE, CrqServer, Tasker, server_argv, wait_until
from tests.server.test_crash import SETTINGS, Cluster


class Failover(Cluster):
    """A Cluster whose server is whichever candidate leads now."""

    def __init__(self, tmp: Path, cands: list[CrqServer], new_tasker: Callable[..., Tasker]):
        self.cands = cands
        super().__init__(tmp, cands[0], new_tasker, taskers=2, slots=3)
        try:
            for c in cands[1:]:
                c.start()
        except BaseException:
            self.close()
            raise

    def info(self, c: CrqServer) -> dict[str, Any] | None:
        try:
            r = c.api("GET", "/server", timeout=5)
        except httpx.HTTPError:
            return None
        return dict(r.json()) if r.status_code == 200 else None

    def hand_over(self, src: CrqServer) -> None:
        """``ncmgr failover`` of ``src``, until it no longer leads (its stop takes a moment)."""
        r = src.api("POST", "/server/failover", json={})
        assert r.status_code == 202, r.text
        wait_until(lambda: (i := self.info(src)) is None or i["mode"] != "normal", step=0.05)

    def leader(self, mode: str = "normal") -> CrqServer:
        """The candidate that leads (in ``mode``), once there is one; it becomes ``srv``."""

        def find() -> CrqServer | None:
            for c in self.cands:
                if c.proc is not None and c.proc.poll() is None:
                    i = self.info(c)
                    if i is not None and i["mode"] == mode:
                        return c
            return None

        self.srv = wait_until(find, step=0.05)
        return self.srv

    def submit_loop(self, sleep: float = 0.05, batch: int = 3) -> None:
        """Submit through every outage, to whoever leads; keep only acknowledged ids."""

        def loop() -> None:
            token = self.cands[0].admin_token
            with httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=5) as c:
                while not self._stop.is_set():
                    try:
                        r = c.post(
                            f"{self.srv.url}/api/v1/jobs",
                            json={"jobs": [self.spec(sleep) for _ in range(batch)]},
                        )
                    except httpx.HTTPError:
                        time.sleep(0.05)
                        continue
                    if r.status_code == 201:
                        self.acked.extend(r.json()["ids"])
                        time.sleep(0.2)  # a load the taskers keep up with
                    elif r.status_code == 503 and r.json().get("error") == "standby":
                        leader = r.json().get("leader")
                        for cand in self.cands:
                            if leader and cand.url == leader:
                                self.srv = cand
                        time.sleep(0.02)
                    else:
                        time.sleep(0.05)

        for _ in range(2):
            th = threading.Thread(target=loop, daemon=True)
            th.start()
            self._threads.append(th)

    def wait_all_done(self, timeout: float = PATIENCE) -> dict[int, dict[str, Any]]:
        try:
            return super().wait_all_done(timeout)
        except AssertionError:  # say which jobs hang, and where
            jobs = self.srv.request("GET", "/jobs?limit=10000")["jobs"]
            left = [
                (j["id"], j["state"], j["tasker"], j["attempt"], j["reason"])
                for j in jobs
                if j["state"] in ("queued", "running")
            ]
            taskers = self.srv.request("GET", "/taskers")["taskers"]
            raise AssertionError(f"jobs not settled: {left[:20]}; taskers {taskers}") from None

    def close(self) -> None:
        super().close()
        for c in self.cands:
            c.stop()
            c.kill9()


@pytest.fixture
def failover(
    tmp_path: Path, crq_tasker: Callable[..., Tasker]
) -> Iterator[Callable[..., Failover]]:
    made: list[Failover] = []

    def make(n: int = 2, *extra: str) -> Failover:
        swd = tmp_path / "q.swd"
        cands = [CrqServer(swd, "fo", *SETTINGS, *extra)]
        cands += [CrqServer(swd, "fo", *SETTINGS, "--standby", *extra) for _ in range(n - 1)]
        f = Failover(tmp_path, cands, crq_tasker)
        made.append(f)
        return f

    yield make
    for f in made:
        f.close()


def _reports(f: Failover) -> list[dict[str, Any]]:
    return f.reports()


def test_a_standby_answers_who_leads_and_refuses_the_rest(
    failover: Callable[..., Failover],
) -> None:
    f = failover()
    leader, standby = f.cands
    assert f.info(leader)["mode"] == "normal"  # type: ignore[index]
    info = f.info(standby)
    assert info is not None and info["mode"] == "standby"
    assert info["leader"] == leader.url and info["epoch"] == f.info(leader)["epoch"]  # type: ignore[index]
    assert httpx.get(f"{standby.url}/healthz").json()["mode"] == "standby"
    r = standby.api("POST", "/jobs", json={"command": "true", "cwd": "/"})
    assert r.status_code == 503 and r.headers["Retry-After"] == "1"
    assert r.json()["error"] == "standby" and r.json()["leader"] == leader.url
    assert standby.url in f.info(leader)["standbys"]  # type: ignore[index]
    # a second server that is not a standby is refused, naming the leader
    p = subprocess.run(
        server_argv("fo", leader.swd, 0, *SETTINGS), capture_output=True, timeout=PATIENCE
    )
    assert p.returncode == 3
    assert f"is led by {leader.url}" in p.stderr.decode() and "--standby" in p.stderr.decode()


def test_kill9_of_the_leader_the_standby_takes_over_losing_nothing(
    failover: Callable[..., Failover],
) -> None:
    f = failover()
    old = f.leader()
    epoch = f.info(old)["epoch"]  # type: ignore[index]
    held = f.srv.submit(*[f.held() for _ in range(4)])
    wait_until(lambda: all(f.srv.request("GET", f"/jobs/{i}")["state"] == "running" for i in held))
    f.submit_loop()
    wait_until(lambda: len(f.acked) > 30)
    old.kill9()
    new = f.leader()
    assert new is f.cands[1]
    wait_until(lambda: len(f.acked) > 60)  # submits go on to the new leader
    f.stop_submitting()
    rep = _reports(f)[-1]
    assert rep["jobs"]["reattached"] >= len(held)  # the held jobs kept running
    assert rep["leaders"]["old"]["epoch"] == epoch and rep["leaders"]["old"]["url"] == old.url
    assert rep["leaders"]["new"]["epoch"] > epoch and rep["leaders"]["new"]["url"] == new.url
    (f.tmp / "gate").touch()
    f.check()


def test_a_chain_and_an_array_waiting_at_a_kill9_run_under_the_new_leader(
    failover: Callable[..., Failover],
) -> None:
    f = failover()
    old = f.leader()
    (head,) = f.srv.submit(f.held())
    chain = [{**f.spec(0), "after": [{"job": head}]}]
    chain += [{**f.spec(0), "after": [{"index": i}]} for i in range(3)]
    links = f.srv.submit(*chain)
    arr = {**f.spec(0), "after": [{"job": links[-1]}], "array": {"start": 1, "stop": 6,
                                                                  "max_running": 2}}  # fmt: skip
    elements = f.srv.request("POST", "/jobs", json=arr)["ids"]
    f.acked += [head, *links, *elements]
    f.deps += list(zip([head, *links], links, strict=False))
    f.deps += [(links[-1], e) for e in elements]
    wait_until(lambda: f.srv.request("GET", f"/jobs/{head}")["state"] == "running")
    old.kill9()
    new = f.leader()
    assert new is f.cands[1]
    assert new.request("GET", f"/jobs/{links[0]}")["state"] == "waiting"
    (f.tmp / "gate").touch()
    f.check()


def test_a_clean_freeze_stop_hands_over_without_recovery(
    failover: Callable[..., Failover],
) -> None:
    f = failover()
    old = f.leader()
    held = f.srv.submit(*[f.held() for _ in range(3)])
    wait_until(lambda: all(f.srv.request("GET", f"/jobs/{i}")["state"] == "running" for i in held))
    old.stop(freeze=True)
    new = f.leader()
    assert new is f.cands[1] and not _reports(f), "a clean hand-over needs no crash recovery"
    wait_until(lambda: len(new.request("GET", "/taskers")["taskers"]) == 2)
    (f.tmp / "gate").touch()
    f.check()


def test_failover_hands_over_and_back_the_old_leader_stands_by(
    failover: Callable[..., Failover],
) -> None:
    f = failover()
    a, b = f.cands
    f.leader()
    f.submit_loop()
    for src, dst in ((a, b), (b, a), (a, b)):
        assert f.leader() is src
        pid = src.proc.pid if src.proc else 0
        f.hand_over(src)
        assert f.leader() is dst
        # the old leader is the same process, a standby now, pointing at the new one
        info = wait_until(lambda: (i := f.info(src)) and i["mode"] == "standby" and i)  # noqa: B023
        assert src.proc is not None and src.proc.pid == pid and src.proc.poll() is None
        assert wait_until(lambda: f.info(src)["leader"] == dst.url)  # type: ignore[index]  # noqa: B023
        assert info["instance"]
    wait_until(lambda: len(f.acked) > 30)
    f.stop_submitting()
    assert not _reports(f), "a hand-over is a clean stop: no crash recovery"
    f.check()


def test_failover_without_a_standby_is_refused(tmp_path: Path) -> None:
    s = CrqServer(tmp_path / "q.swd", "fo1", *SETTINGS)
    try:
        s.start()
        r = s.api("POST", "/server/failover", json={})
        assert r.status_code == 409 and r.json()["error"] == "no_standby"
        assert s.request("GET", "/server")["mode"] == "normal"
    finally:
        s.kill9()


def test_a_stop_sent_to_a_standby_as_it_wins_is_not_lost(tmp_path: Path) -> None:
    """``stop --all`` order: the leader stops (and resigns), then the standby is told to
    stop at once, while it is winning or loading; that stop must still end it."""
    swd = tmp_path / "q.swd"
    for round_ in range(2):
        leader = CrqServer(swd, "fo", *SETTINGS)
        standby = CrqServer(swd, "fo", *SETTINGS, "--standby")

        def stopped(standby: CrqServer = standby) -> bool:
            return standby.api("POST", "/server/stop", json={}).status_code == 200

        try:
            leader.start()
            standby.start()
            leader.stop()
            # the 503 of a loading candidate says "retry shortly": retry, as ncmgr does
            wait_until(stopped, step=0.01)
            assert standby.proc is not None
            assert standby.proc.wait(timeout=PATIENCE) == 0, (round_, standby.log()[-2000:])
        finally:
            leader.kill9()
            standby.kill9()


def test_repeated_failovers_under_load_lose_nothing_and_run_nothing_twice(
    failover: Callable[..., Failover],
) -> None:
    """20 takeovers back and forth: kill -9 (the killed one restarts as a standby) and
    planned hand-overs, alternately, while clients submit and taskers run jobs."""
    f = failover()
    f.leader()
    f.submit_loop(sleep=0.02)
    epochs = []
    for round_ in range(20):
        src = f.leader()
        other = next(c for c in f.cands if c is not src)
        epochs.append(f.info(src)["epoch"])  # type: ignore[index]
        wait_until(lambda: len(f.acked) > 9 * (round_ + 1))  # noqa: B023
        if round_ % 2 == 0:
            src.kill9()
            assert f.leader() is other
            src.extra = [*SETTINGS, "--standby"]
            src.start(port=src.port)
        else:
            f.hand_over(src)
            assert f.leader() is other
    f.stop_submitting()
    assert epochs == sorted(epochs) and len(set(epochs)) == len(epochs)
    f.check()
