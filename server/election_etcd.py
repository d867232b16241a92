"""Leadership through etcd: a lease, and a key created only if absent (SPEC section 8).

The leader holds ``/crq/<queue>/leader`` (its ``me`` as JSON), created in one transaction
only if absent and bound to a lease that a thread renews every TTL/3. The key's create
revision is the epoch: etcd's revision only grows, so every takeover has a higher one.

A leader trusts itself only until the *send* time of its last successful renew + 0.8 TTL
(``valid()``, local, no I/O). etcd counts the TTL from when it received that renew, later,
and a standby can create the key only after etcd deleted it, so the old leader has stopped
before the new one starts, whatever the network does. Once false, ``valid()`` stays false.

etcd3gw speaks etcd's HTTP/JSON gateway with blocking calls (requests): they run in threads,
never on the event loop. Each call tries the members in turn, starting from the last that
answered, so one member down costs at most one timeout.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import requests
from crq.server.election import Busy, ElectionError
from etcd3gw.client import Etcd3Client
from etcd3gw.exceptions import Etcd3Exception
from etcd3gw.lease import Lease

KEY = "/crq/{}/leader"
TRUST = 0.8  # the share of the TTL a renew is trusted for, from its send time
POLL = 0.1  # s between looks at a held key while waiting for it to go
CACHE = 0.5  # s a leader() answer is reused: a busy standby must not hammer etcd
RETRY = 0.2  # s before a failed renew is tried again (the deadline still bounds it)
DEFAULT_PORT = 2379

T = TypeVar("T")

# what a member that is down, cut off, or mid-election does to a call; ValueError: a body
# that is not JSON; LookupError, TypeError: JSON that is not the expected shape
_FAILURES = (Etcd3Exception, requests.RequestException, ValueError, LookupError, TypeError)

_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?\Z")

log = logging.getLogger("crq.election")


class Unreachable(ElectionError):
    """No member of the cluster answered the call."""


class BadEtcdUrl(ElectionError, ValueError):
    """An ``--election etcd://…`` that does not parse."""


def parse_etcd_url(text: str) -> list[str]:
    """``etcd://h1:p1,h2:p2`` -> ``["h1:p1", "h2:p2"]``; the port defaults to 2379."""
    usage = "expected etcd://HOST[:PORT][,HOST[:PORT]...]"
    if not text.startswith("etcd://"):
        raise BadEtcdUrl(f"bad etcd URL {text!r}: {usage}")
    out: list[str] = []
    for item in text[len("etcd://") :].split(","):
        ep = _endpoint(item)
        if ep is None:
            raise BadEtcdUrl(f"bad etcd URL {text!r}: bad member {item!r} ({usage})")
        if ep in out:
            raise BadEtcdUrl(f"bad etcd URL {text!r}: member {ep} listed twice")
        out.append(ep)
    return out


def _endpoint(item: str) -> str | None:
    """``host[:port]`` or ``[v6]:port`` normalised to ``host:port``, or None if malformed."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d{1,5}))?|([^:\[\]]+)(?::(\d{1,5}))?", item)
    if m is None:
        return None
    v6, v6port, host, port = m.groups()
    if host is not None and not _HOST.match(host):
        return None
    p = int(v6port or port or DEFAULT_PORT)
    if not 1 <= p <= 65535:
        return None
    return f"[{v6}]:{p}" if v6 else f"{host}:{p}"


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _why(e: BaseException) -> str:
    text = getattr(e, "detail_text", None) or str(e) or type(e).__name__
    if "refused" in text:
        text = "connection refused"
    elif "timed out" in text.lower() or "timeout" in type(e).__name__.lower():
        text = "timed out"
    return " ".join(text.split())[:160]


class _Members:
    """One client per member, tried in turn from the last one that answered.

    Not shared between threads: the renew thread has its own, so a call stuck on a dead
    member elsewhere never delays a renew.
    """

    def __init__(self, endpoints: list[str], timeout: float) -> None:
        self.endpoints = endpoints
        self.timeout = timeout
        self._clients = [self._client(e) for e in endpoints]
        self._first = 0
        self._lock = threading.Lock()

    def _client(self, endpoint: str) -> Etcd3Client:
        host, port = endpoint.rsplit(":", 1)
        return Etcd3Client(host=host.strip("[]"), port=int(port), timeout=self.timeout)

    def call(self, fn: Callable[[Etcd3Client], T], budget: float | None = None) -> T:
        """fn on the first member that answers; ``budget`` caps the whole call, in seconds."""
        end = None if budget is None else time.monotonic() + budget
        errors: list[str] = []
        with self._lock:
            n = len(self._clients)
            for k in range(n):
                i = (self._first + k) % n
                left = self.timeout if end is None else min(self.timeout, end - time.monotonic())
                if left <= 0:
                    errors.append("out of time")
                    break
                client = self._clients[i]
                client.timeout = left
                try:
                    out = fn(client)
                except _FAILURES as e:
                    errors.append(f"{self.endpoints[i]}: {_why(e)}")
                    continue
                self._first = i
                return out
        raise Unreachable("etcd did not answer (" + "; ".join(errors) + ")")


@dataclass
class _Won:
    lease: int
    ttl: float
    sent: float  # monotonic send time of the grant, or of the renew that followed it
    epoch: int


def _holder(kv: dict[str, Any]) -> dict[str, Any]:
    """The leader's published value + its epoch, from the key's record."""
    try:
        value = json.loads(base64.b64decode(kv.get("value", "")))
    except ValueError:
        value = None
    out = dict(value) if isinstance(value, dict) else {}
    out["epoch"] = int(kv["create_revision"])
    out["lease"] = int(kv.get("lease", 0))
    return out


def _revoke(client: Etcd3Client, lease: int) -> None:
    try:
        Lease(lease, client).revoke()
    except Etcd3Exception as e:
        if "lease not found" not in (e.detail_text or ""):
            raise


def _refresh(client: Etcd3Client, lease: int) -> int:
    return Lease(lease, client).refresh()


class EtcdElection:
    """The etcd backend of the Election protocol (crq.server.election)."""

    name = "etcd"

    def __init__(self, endpoints: list[str], queue: str, ttl: float = 5.0) -> None:
        if not endpoints:
            raise ElectionError("the etcd election needs at least one endpoint")
        if not (ttl > 0 and math.isfinite(ttl)):
            raise ElectionError(f"bad election TTL {ttl!r}: a positive number of seconds")
        self.endpoints = list(endpoints)
        self.queue = queue
        self.key = KEY.format(queue)
        self.ttl = max(1, math.ceil(ttl))  # etcd's unit is the second; it may raise it further
        self.epoch = 0
        self.lost = asyncio.Event()
        self.why_lost = ""  # why leadership was lost, for the log
        self._last_error = ""
        self.renewals = 0  # successful renews of this term's lease, for status and tests
        renew_timeout = max(0.3, self.ttl / 5)
        self._calls = _Members(self.endpoints, max(1.0, self.ttl / 2))
        self._renews = _Members(self.endpoints, renew_timeout)
        self._lock = threading.Lock()  # _held, _deadline: valid() must never flicker back
        self._held = False
        self._deadline = -math.inf
        self._won: _Won | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cache: tuple[float, dict[str, Any] | None] = (-math.inf, None)
        self._cache_lock = asyncio.Lock()
        # the leader is known dead without waiting for its TTL (election.SignOfLife)
        self.holder_dead: Callable[[dict[str, Any]], bool] | None = None

    # -- the protocol ---------------------------------------------------------------------

    async def campaign(self, me: dict[str, Any], wait: bool) -> int:
        """Lead, or raise Busy (wait=False), or wait for the key to go and try again.

        Raises Unreachable when no member answers and wait is False; waiting, it keeps
        trying while etcd is down.
        """
        if self._held:
            raise RuntimeError("campaign() while leading")
        self._loop = asyncio.get_running_loop()
        self._stop = threading.Event()
        self.lost.clear()
        self.why_lost = ""
        value = json.dumps(me, sort_keys=True)
        pause = POLL
        while True:
            try:
                out = await self._attempt(value)
            except Unreachable:
                if not wait:
                    raise
                await asyncio.sleep(pause)
                pause = min(2 * pause, 1.0)
                continue
            pause = POLL
            if isinstance(out, _Won):
                self._hold(out)
                return self.epoch
            self._cache = (time.monotonic(), out)
            if not wait:
                raise Busy(out)
            await self._vacant()

    def valid(self) -> bool:
        with self._lock:
            return self._held and time.monotonic() < self._deadline

    async def leader(self) -> dict[str, Any] | None:
        """The leader's ``me`` + "epoch", or None (no leader, or etcd unreachable)."""
        async with self._cache_lock:
            at, value = self._cache
            if time.monotonic() - at >= CACHE:
                try:
                    value = await asyncio.to_thread(self._read)
                except Unreachable:
                    value = None
                self._cache = (time.monotonic(), value)
        return dict(value) if value is not None else None

    async def resign(self) -> None:
        """Stop leading now and revoke the lease, so a standby wins at once.

        ``lost`` is not set: the caller chose this. If etcd cannot be reached the lease
        simply runs out (TTL).
        """
        won = self._give_up()
        self._cache = (-math.inf, None)
        if won is not None:
            try:
                await asyncio.to_thread(self._calls.call, lambda c: _revoke(c, won.lease))
            except Unreachable:
                pass

    def close(self) -> None:
        """Stop the renew thread (no I/O: an unrevoked lease runs out after its TTL)."""
        self._give_up()

    # -- campaign -------------------------------------------------------------------------

    async def _attempt(self, value: str) -> _Won | dict[str, Any] | None:
        """One try, in a thread; a try cancelled midway gives back what it may have won."""
        fut = asyncio.get_running_loop().run_in_executor(None, self._try, value)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            fut.add_done_callback(self._undo)
            raise

    def _undo(self, fut: asyncio.Future[_Won | dict[str, Any] | None]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            return
        won = fut.result()
        if isinstance(won, _Won):
            lease = won.lease
            threading.Thread(target=self._revoke_quietly, args=(lease,), daemon=True).start()

    def _try(self, value: str) -> _Won | dict[str, Any] | None:
        """Grant a lease, create the key with it if absent; the holder when it was not."""
        sent = time.monotonic()
        grant = self._calls.call(
            lambda c: c.post(c.get_url("/lease/grant"), json={"TTL": self.ttl, "ID": 0})
        )
        lease = int(grant["ID"])
        ttl = float(max(int(grant.get("TTL", self.ttl)), self.ttl))
        try:
            r = self._calls.call(lambda c: c.transaction(self._txn(value, lease)))
        except Unreachable:
            self._revoke_quietly(lease)  # it may have been created: do not leave it behind
            raise
        if r.get("succeeded"):
            won = _Won(lease, ttl, sent, int(r["header"]["revision"]))
        else:
            kvs = r["responses"][0]["response_range"].get("kvs", [])
            if kvs and int(kvs[0].get("lease", 0)) == lease:  # a retry after a lost answer
                won = _Won(lease, ttl, sent, int(kvs[0]["create_revision"]))
            else:
                self._revoke_quietly(lease)
                return _holder(kvs[0]) if kvs else None
        if time.monotonic() > won.sent + ttl / 3:  # a slow win: renew before trusting it
            won.sent = time.monotonic()
            try:
                left = self._calls.call(lambda c: _refresh(c, lease))
            except Unreachable:
                left = 0
            if left <= 0:
                self._revoke_quietly(lease)
                raise Unreachable("etcd too slow: the lease ran out while campaigning")
        return won

    def _txn(self, value: str, lease: int) -> dict[str, Any]:
        key = _b64(self.key)
        return {
            "compare": [{"key": key, "result": "EQUAL", "target": "CREATE", "create_revision": 0}],
            "success": [{"request_put": {"key": key, "value": _b64(value), "lease": lease}}],
            "failure": [{"request_range": {"key": key}}],
        }

    def _read(self) -> dict[str, Any] | None:
        def get(c: Etcd3Client) -> dict[str, Any] | None:
            r = c.post(c.get_url("/kv/range"), json={"key": _b64(self.key)})
            kvs = r.get("kvs", [])
            return _holder(kvs[0]) if kvs else None

        return self._calls.call(get)

    async def _vacant(self) -> None:
        """Until the key is gone (etcd deleted it with its lease)."""
        while True:
            await asyncio.sleep(POLL)
            try:
                holder = await asyncio.to_thread(self._read)
            except Unreachable:
                continue
            self._cache = (time.monotonic(), holder)
            if holder is None:
                return
            dead = self.holder_dead
            if dead is not None and holder.get("lease") and await asyncio.to_thread(dead, holder):
                log.warning(
                    "leader %s (epoch %s) is gone: revoking its lease",
                    holder.get("url"),
                    holder.get("epoch"),
                )
                await asyncio.to_thread(self._revoke_quietly, int(holder["lease"]))

    def _revoke_quietly(self, lease: int, members: _Members | None = None) -> None:
        try:
            (members or self._calls).call(lambda c: _revoke(c, lease))
        except Unreachable:
            pass  # it runs out by itself

    # -- holding --------------------------------------------------------------------------

    def _hold(self, won: _Won) -> None:
        with self._lock:
            self._won = won
            self._held = True
            self._deadline = won.sent + won.ttl * TRUST
        self.epoch = won.epoch
        self.renewals = 0
        self._cache = (-math.inf, None)
        self._thread = threading.Thread(
            target=self._keep, args=(won, self._stop), daemon=True, name=f"etcd-lease-{won.epoch}"
        )
        self._thread.start()

    def _give_up(self) -> _Won | None:
        self._stop.set()
        with self._lock:
            won, self._won = self._won, None
            self._held = False
            self._deadline = -math.inf
        return won

    def _keep(self, won: _Won, stop: threading.Event) -> None:
        """Renew every TTL/3; when no renew got through for 0.8 TTL, or the lease is gone,
        leadership is lost (never to come back on a late answer)."""
        interval = won.ttl / 3
        due = won.sent + interval
        while True:
            with self._lock:
                deadline = self._deadline
            now = time.monotonic()
            if now >= deadline:
                self._lose(won, f"no renew got through for {won.ttl * TRUST:.1f} s", stop)
                return
            if stop.wait(max(0.0, min(due, deadline) - now)):
                return
            sent = time.monotonic()
            if sent < due or sent >= deadline:
                continue
            try:
                left = self._renews.call(lambda c: _refresh(c, won.lease), budget=deadline - sent)
            except Unreachable as e:
                self._last_error = str(e)
                due = time.monotonic() + RETRY
                continue
            if stop.is_set():
                return
            if left <= 0:
                self._lose(won, "the lease is gone (revoked or expired in etcd)", stop)
                return
            self._last_error = ""
            with self._lock:
                if self._held and time.monotonic() < self._deadline:
                    self._deadline = max(self._deadline, sent + won.ttl * TRUST)
                    self.renewals += 1
            due = sent + interval

    def _lose(self, won: _Won, why: str, stop: threading.Event) -> None:
        with self._lock:
            if not self._held or stop.is_set():
                return
            self._held = False
            self._deadline = -math.inf
            self._won = None
        detail = self._last_error
        self.why_lost = f"{why} ({detail})" if detail and "renew" in why else why
        loop = self._loop
        if loop is not None:
            try:
                loop.call_soon_threadsafe(self.lost.set)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass
        self._revoke_quietly(won.lease, self._renews)  # if etcd hears it, a standby wins now
