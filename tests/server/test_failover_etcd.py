"""Failover with the etcd election (SPEC section 8), on a real 3-member etcd cluster.

What a lease adds to the file election: a hung (SIGSTOP) or cut-off leader is replaced
after the TTL, and when it wakes it acknowledges nothing and what it may still write does
not count (fences, server/fence.py).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.etcd import EtcdCluster
from tests.rigs import CrqServer, Tasker, wait_until
from tests.server.test_crash import SETTINGS
from tests.server.test_failover import Failover

TTL = "3"


class Watched(Failover):
    """Counts the acknowledgements of each candidate, with when they arrived."""

    def __init__(self, *a: object, **kw: object) -> None:
        self.acks: list[tuple[str, float, list[int]]] = []
        self._lock = threading.Lock()
        super().__init__(*a, **kw)  # type: ignore[arg-type]

    def submit_loop(self, sleep: float = 0.05, batch: int = 3) -> None:
        def loop(target: CrqServer) -> None:
            token = self.cands[0].admin_token
            with httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=30) as c:
                while not self._stop.is_set():
                    try:
                        r = c.post(
                            f"{target.url}/api/v1/jobs",
                            json={"jobs": [self.spec(sleep) for _ in range(batch)]},
                        )
                    except httpx.HTTPError:
                        time.sleep(0.05)
                        continue
                    if r.status_code == 201:
                        ids = r.json()["ids"]
                        with self._lock:
                            self.acked.extend(ids)
                            self.acks.append((target.url, time.monotonic(), ids))
                        time.sleep(0.2)  # a load the taskers keep up with
                    else:
                        time.sleep(0.02)

        # one client per candidate, each sticking to it: a deposed leader is asked too
        for cand in self.cands:
            th = threading.Thread(target=loop, args=(cand,), daemon=True)
            th.start()
            self._threads.append(th)

    def acks_of(self, url: str, after: float) -> list[list[int]]:
        with self._lock:
            return [ids for u, t, ids in self.acks if u == url and t > after]


@pytest.fixture
def etcd_failover(
    tmp_path: Path, crq_tasker: Callable[..., Tasker], etcd_cluster: EtcdCluster
) -> Iterator[Callable[..., Watched]]:
    made: list[Watched] = []

    def make(election: list[str] | None = None, ttl: str = TTL) -> Watched:
        """Two candidates; ``election``: each one's etcd URL (default: the cluster's)."""
        urls = election or [etcd_cluster.url, etcd_cluster.url]
        swd = tmp_path / "q.swd"
        cands = [
            CrqServer(swd, "fe", *SETTINGS, "--election", urls[0], "--election-ttl", ttl),
            CrqServer(
                swd, "fe", *SETTINGS, "--standby", "--election", urls[1], "--election-ttl", ttl
            ),
        ]
        f = Watched(tmp_path, cands, crq_tasker)
        made.append(f)
        return f

    yield make
    for f in made:
        for c in f.cands:
            if c.proc is not None and c.proc.poll() is None:
                c.proc.send_signal(signal.SIGCONT)
        f.close()


def _pid(c: CrqServer) -> int:
    assert c.proc is not None
    return c.proc.pid


def test_a_leader_stopped_past_its_ttl_is_replaced_and_acknowledges_nothing_after(
    etcd_failover: Callable[..., Watched],
) -> None:
    f = etcd_failover()
    a, b = f.cands
    assert f.leader() is a
    epoch = f.info(a)["epoch"]  # type: ignore[index]
    f.submit_loop()
    wait_until(lambda: len(f.acks_of(a.url, 0)) > 10)
    a.proc.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
    assert f.leader() is b  # after the TTL
    assert f.info(b)["epoch"] > epoch  # type: ignore[index]
    wait_until(lambda: len(f.acks_of(b.url, 0)) > 10)
    woke = time.monotonic()
    a.proc.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
    # the old leader stands down: the same process, a standby now, pointing at b
    wait_until(lambda: (i := f.info(a)) is not None and i["mode"] == "standby")
    assert a.proc.poll() is None and wait_until(lambda: f.info(a)["leader"] == b.url)  # type: ignore[union-attr,index]
    wait_until(lambda: len(f.acks_of(b.url, woke)) > 10)
    f.stop_submitting()
    assert not f.acks_of(a.url, woke), "a deposed leader acknowledged a submit"
    jobs = f.check()  # every acknowledged job, from either leader, is there once
    # what the old leader may have written after it woke does not count at replay either
    a.kill9()
    b.stop()
    f.cands = [b]
    b.extra = [x for x in b.extra if x != "--standby"]
    b.start(port=b.port)
    f.srv = b
    after = f.wait_all_done()
    assert set(after) == set(jobs)
    assert all(after[i]["state"] == jobs[i]["state"] for i in jobs)


def test_the_loss_of_one_etcd_member_changes_nothing(
    etcd_failover: Callable[..., Watched], etcd_cluster: EtcdCluster
) -> None:
    # the default TTL: etcd's own leader election after the loss of its leader member
    # takes up to ~3 s here, which a lease of 3 s did not always ride out (4 did)
    f = etcd_failover(ttl="5")
    a, _ = f.cands
    assert f.leader() is a
    epoch = f.info(a)["epoch"]  # type: ignore[index]
    f.submit_loop()
    etcd_cluster.kill(etcd_cluster.leader_index())
    killed = time.monotonic()
    wait_until(lambda: time.monotonic() - killed > 15)  # three leases long
    f.stop_submitting()
    assert f.leader() is a and f.info(a)["epoch"] == epoch  # type: ignore[index]
    assert f.acks_of(a.url, killed + 10), "the leader stopped acknowledging"
    assert not f.reports(), "no takeover, no recovery"
    f.check()


def test_a_leader_cut_off_from_etcd_stops_acknowledging_and_is_replaced(
    etcd_failover: Callable[..., Watched], etcd_cluster: EtcdCluster
) -> None:
    proxies = [etcd_cluster.proxy(i) for i in range(3)]
    cut_off = "etcd://" + ",".join(p.endpoint for p in proxies)
    f = etcd_failover([cut_off, etcd_cluster.url])
    a, b = f.cands
    assert f.leader() is a
    f.submit_loop()
    wait_until(lambda: len(f.acks_of(a.url, 0)) > 10)
    for p in proxies:
        p.cut()
    cut = time.monotonic()
    # it answers HTTP all along: it must stand down by itself, within its TTL
    wait_until(lambda: (i := f.info(a)) is not None and i["mode"] == "standby")
    assert f.leader() is b
    won = time.monotonic()
    wait_until(lambda: len(f.acks_of(b.url, won)) > 10)
    late = f.acks_of(a.url, cut + float(TTL))
    f.stop_submitting()
    assert not late, f"acknowledged {len(late)} submits more than a TTL after the cut"
    f.check()


def test_a_killed_etcd_leader_is_replaced_without_waiting_for_its_lease(
    etcd_failover: Callable[..., Watched],
) -> None:
    """server.lock is the leader's sign of life: freed by its death, the standby sees it
    and revokes the dead leader's lease instead of waiting the TTL out."""
    f = etcd_failover()
    a, b = f.cands
    assert f.leader() is a
    held = a.submit(*[f.held() for _ in range(3)])
    wait_until(lambda: all(a.request("GET", f"/jobs/{i}")["state"] == "running" for i in held))
    f.submit_loop()
    wait_until(lambda: len(f.acks_of(a.url, 0)) > 5)
    a.kill9()
    assert f.leader() is b
    log = (a.swd / "logs" / "server.log").read_text()
    assert f"leader {a.url} (epoch" in log and "is gone: revoking its lease" in log
    wait_until(lambda: len(f.acks_of(b.url, 0)) > 5)
    f.stop_submitting()
    assert _reports_jobs(f) >= len(held)
    (f.tmp / "gate").touch()
    f.check()


def _reports_jobs(f: Watched) -> int:
    return int(f.reports()[-1]["jobs"]["reattached"])
