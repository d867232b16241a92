"""The etcd election against a real 3-member etcd cluster (tests/etcd.py): one leader at a
time, takeovers with growing epochs, a member down changes nothing, and a leader cut off from
etcd stops trusting itself before anyone else can win.

Timings are never asserted, only orders (A lost before B won); every wait is capped by
PATIENCE.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest
from crq.server.election import Busy

from tests.etcd import EtcdCluster
from tests.rigs import PATIENCE, free_port

pytest.importorskip("etcd3gw", reason="the etcd extra (etcd3gw) is not installed")

from crq.server.election_etcd import (  # noqa: E402 (after the skip)
    EtcdElection,
    Unreachable,
    parse_etcd_url,
)

T = TypeVar("T")
TTL = 5.0  # the default; etcd's own leader election (about 1-2 s) fits in it with room


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 4 * PATIENCE))


def me(name: str) -> dict[str, Any]:
    return {"url": f"http://{name}:1", "instance": name, "host": "h", "pid": 1}


async def until(pred: Any, what: str) -> None:
    deadline = time.monotonic() + PATIENCE
    while not pred():
        assert time.monotonic() < deadline, f"{what}: not within {PATIENCE} s"
        await asyncio.sleep(0.02)


def revoke_leader_lease(cluster: EtcdCluster, queue: str) -> None:
    """What an operator's `etcdctl lease revoke` does to the leader."""
    from etcd3gw.client import Etcd3Client
    from etcd3gw.lease import Lease

    host, port = cluster.endpoints[1].rsplit(":", 1)
    c = Etcd3Client(host=host, port=int(port), timeout=10)
    [(_, kv)] = c.get(f"/crq/{queue}/leader", metadata=True)
    Lease(int(kv["lease"]), c).revoke()


# -- the URL ----------------------------------------------------------------------------------


def test_etcd_urls_parse_to_endpoints() -> None:
    assert parse_etcd_url("etcd://h1:1,h2:2") == ["h1:1", "h2:2"]
    assert parse_etcd_url("etcd://10.0.0.1") == ["10.0.0.1:2379"]
    assert parse_etcd_url("etcd://[::1]:23,a.b-c:9") == ["[::1]:23", "a.b-c:9"]


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "etcd://",
        "http://h:1",
        "h1:1",
        "etcd://h:1,",
        "etcd://h:0",
        "etcd://h:65536",
        "etcd://h:x",
        "etcd://h:1/path",
        "etcd://u@h:1",
        "etcd://h:1,h:1",
        "etcd://-h:1",
        "etcd://[zz]:1",
    ],
)
def test_a_bad_etcd_url_is_one_clear_line(bad: str) -> None:
    with pytest.raises(ValueError) as e:
        parse_etcd_url(bad)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"bad etcd URL {bad!r}:")


def test_no_etcd_at_all_is_a_clear_error_not_busy() -> None:
    async def go() -> None:
        e = EtcdElection([f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"], "q")
        with pytest.raises(Unreachable, match="etcd did not answer .*connection refused"):
            await e.campaign(me("a"), wait=False)
        assert not e.valid()
        assert await e.leader() is None
        e.close()

    run(go())


# -- one leader at a time ---------------------------------------------------------------------


def test_one_of_two_wins_the_other_waits_and_wins_when_the_first_resigns(
    etcd_cluster: EtcdCluster,
) -> None:
    async def go() -> None:
        a = EtcdElection(etcd_cluster.endpoints, "q", ttl=TTL)
        b = EtcdElection(etcd_cluster.endpoints[::-1], "q", ttl=TTL)
        try:
            ea = await a.campaign(me("a"), wait=False)
            assert a.valid() and a.epoch == ea
            with pytest.raises(Busy) as busy:
                await b.campaign(me("b"), wait=False)
            assert _sans_lease(busy.value.holder) == {**me("a"), "epoch": ea}
            assert not b.valid()
            assert _sans_lease(await b.leader()) == {**me("a"), "epoch": ea}

            waiting = asyncio.create_task(b.campaign(me("b"), wait=True))
            await until(lambda: a.renewals >= 2, "a renews")
            assert not waiting.done() and a.valid()

            await a.resign()
            assert not a.valid() and not a.lost.is_set()  # resigning is no loss
            eb = await asyncio.wait_for(waiting, PATIENCE)
            assert eb > ea and b.valid()
            await until(lambda: b.renewals >= 1, "b renews")
            assert _sans_lease(await a.leader()) == {**me("b"), "epoch": eb}
        finally:
            a.close()
            b.close()

    run(go())


def test_the_epoch_grows_at_every_takeover_also_after_a_crash(etcd_cluster: EtcdCluster) -> None:
    async def go() -> None:
        a = EtcdElection(etcd_cluster.endpoints, "q", ttl=2)
        b = EtcdElection(etcd_cluster.endpoints, "q", ttl=2)
        try:
            epochs = [await a.campaign(me("a"), wait=False)]
            await a.resign()
            epochs.append(await b.campaign(me("b"), wait=False))
            await b.resign()
            epochs.append(await a.campaign(me("a"), wait=False))  # the same object again
            waiting = asyncio.create_task(b.campaign(me("b"), wait=True))
            a.close()  # a crash as etcd sees it: no more renews, no revoke
            epochs.append(await asyncio.wait_for(waiting, PATIENCE))  # once the lease runs out
            assert epochs == sorted(set(epochs)), epochs
            assert (await b.leader() or {}).get("epoch") == epochs[-1]
        finally:
            a.close()
            b.close()

    run(go())


def test_a_revoked_lease_is_a_loss_and_the_standby_wins_at_once(
    etcd_cluster: EtcdCluster,
) -> None:
    async def go() -> None:
        a = EtcdElection(etcd_cluster.endpoints, "q", ttl=TTL)
        b = EtcdElection(etcd_cluster.endpoints, "q", ttl=TTL)
        try:
            ea = await a.campaign(me("a"), wait=False)
            waiting = asyncio.create_task(b.campaign(me("b"), wait=True))
            await until(lambda: a.renewals >= 1, "a renews")
            revoke_leader_lease(etcd_cluster, "q")
            eb = await asyncio.wait_for(waiting, PATIENCE)
            assert eb > ea
            await asyncio.wait_for(a.lost.wait(), PATIENCE)  # its next renew finds no lease
            assert not a.valid() and "lease is gone" in a.why_lost
            assert b.valid()
        finally:
            a.close()
            b.close()

    run(go())


# -- failures ---------------------------------------------------------------------------------


def test_a_member_down_changes_nothing(etcd_cluster: EtcdCluster) -> None:
    """Kill the raft leader, which both candidates also try first: the leader keeps renewing
    through the other members, stays valid throughout, and nobody takes over."""

    async def go() -> None:
        dead = etcd_cluster.leader_index()
        first = [etcd_cluster.endpoints[dead]] + [
            e for i, e in enumerate(etcd_cluster.endpoints) if i != dead
        ]
        a = EtcdElection(first, "q", ttl=TTL)
        b = EtcdElection(first, "q", ttl=TTL)
        try:
            ea = await a.campaign(me("a"), wait=False)
            waiting = asyncio.create_task(b.campaign(me("b"), wait=True))
            await until(lambda: a.renewals >= 1, "a renews")
            etcd_cluster.kill(dead)
            seen = a.renewals
            while a.renewals < seen + 6:  # two TTLs of renews, all through the others
                assert a.valid() and not a.lost.is_set(), a.why_lost
                assert not waiting.done()
                await asyncio.sleep(0.02)
            assert (await b.leader() or {}).get("epoch") == ea
            await a.resign()
            assert await asyncio.wait_for(waiting, PATIENCE) > ea  # b works without it too
        finally:
            a.close()
            b.close()
        etcd_cluster.restart(dead)

    run(go())


def test_a_cut_off_leader_stops_before_the_other_wins(etcd_cluster: EtcdCluster) -> None:
    """A reaches etcd only through a proxy that the test cuts (a partition: requests hang);
    B reaches it directly. A's valid() turns false and lost is set before B can win."""

    async def go() -> None:
        proxy = etcd_cluster.proxy(0)
        a = EtcdElection([proxy.endpoint], "q", ttl=TTL)
        b = EtcdElection(etcd_cluster.endpoints, "q", ttl=TTL)
        order: list[str] = []
        try:
            ea = await a.campaign(me("a"), wait=False)

            async def note_lost() -> None:
                await a.lost.wait()
                order.append("a lost")

            noting = asyncio.create_task(note_lost())
            waiting = asyncio.create_task(b.campaign(me("b"), wait=True))
            await until(lambda: a.renewals >= 1, "a renews")
            proxy.cut()
            eb = await asyncio.wait_for(waiting, PATIENCE)
            assert not a.valid()  # the moment B leads, A already does not trust itself
            order.append("b won")
            await asyncio.wait_for(noting, PATIENCE)
            assert order == ["a lost", "b won"]
            assert eb > ea and b.valid()
            assert "no renew got through" in a.why_lost

            proxy.heal()  # back on the network, A is a candidate like any other
            with pytest.raises(Busy) as busy:
                await a.campaign(me("a"), wait=False)
            assert (busy.value.holder or {}).get("url") == me("b")["url"]
            assert not a.valid()
        finally:
            a.close()
            b.close()

    run(go())


def _sans_lease(holder: dict[str, Any] | None) -> dict[str, Any] | None:
    """A holder without its lease id (a number etcd picks), which must be there."""
    if holder is None:
        return None
    out = dict(holder)
    assert int(out.pop("lease")) > 0
    return out
