"""A candidate server: its file in ``<swd>/servers/``, its election, and what it answers
while it does not lead (SPEC section 8).

A standby answers ``/healthz`` and ``GET /api/v1/server`` (who leads, at which epoch) and
refuses everything else with 503, ``Retry-After`` and the leader's URL, so clients and
taskers can follow. It applies nothing, so a request it refused is safe to send again
anywhere. Once it wins, ``main`` swaps the full app in behind the same socket (``Switch``).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Any, NoReturn

import orjson
from crq.server.asgi import ASGIApp, Receive, Scope, Send, encode_headers, headers_of, send_json
from crq.server.election import Busy, Election, read_json
from crq.server.pages import recovery_page, standby_page, wants_html
from crq.server.settings import Settings

from crq.durable import write_atomic
from crq.wire import API, MODE_STANDBY

log = logging.getLogger("crq.standby")

STALE = 10.0  # a candidate's file not rewritten for this long is a dead candidate's
STAND_BY = -1  # a leader's run ends so: this process goes on as a standby (deposed, handed over)

TASKERS = API + "/taskers/"
WAIT_FOR_LEADER = frozenset({API + "/server", "/metrics"})  # held while loading, not refused


async def _unset(scope: Scope, receive: Receive, send: Send) -> None:
    raise RuntimeError("no app behind the switch yet")


class Switch:
    """The ASGI app uvicorn serves: the standby's (or the loading one's) until the takeover,
    then the leader's. ``swapped`` is set once the leader's is in."""

    def __init__(self) -> None:
        self.app: ASGIApp = _unset
        self.swapped = asyncio.Event()

    def swap(self, app: ASGIApp) -> None:
        self.app = app
        self.swapped.set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


class Candidate:
    """One server process of a queue, leading or not."""

    def __init__(
        self, settings: Settings, election: Election, url: str, instance: str, argv: list[str]
    ) -> None:
        self.settings = settings
        self.election = election
        self.url = url
        self.instance = instance
        self.argv = argv  # to start again as a standby (a deposed or handing-over leader)
        self.mode = MODE_STANDBY
        self.epoch = 0
        self.started_at = time.time()
        self.stop_requested = asyncio.Event()
        self.loading = False  # won, reading the state: "come back in a moment"

    @property
    def file(self) -> os.PathLike[str]:
        return self.settings.paths.servers / f"{self.instance}.json"

    def me(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "instance": self.instance,
            "host": os.uname().nodename,
            "pid": os.getpid(),
        }

    def write(self, mode: str | None = None) -> None:
        """``servers/<instance>.json``: where this candidate is and what it does now."""
        if mode is not None:
            self.mode = mode
        s = self.settings
        info = {
            **self.me(),
            "port": s.port,
            "queue": s.queue,
            "mode": self.mode,
            "epoch": self.epoch or None,
            "election": self.election.name,
            "started_at": self.started_at,
        }
        s.paths.servers.mkdir(mode=0o700, exist_ok=True)
        write_atomic(self.file, orjson.dumps(info, option=orjson.OPT_INDENT_2))

    def remove(self) -> None:
        try:
            os.unlink(self.file)
        except OSError:
            pass

    async def campaign(self) -> int | None:
        """Lead: at once (not a standby; raises Busy), or once the leader is gone. None when
        asked to stop first."""
        me = self.me()
        if not self.settings.standby:
            self.epoch = await self.election.campaign(me, wait=False)
            return self.epoch
        while not self.stop_requested.is_set():
            if await self._holding_back():
                await _sleep_or(self.stop_requested, 0.2)
                continue
            run = asyncio.ensure_future(self.election.campaign(me, wait=True))
            stop = asyncio.ensure_future(self.stop_requested.wait())
            done, _ = await asyncio.wait({run, stop}, return_when=asyncio.FIRST_COMPLETED)
            if run in done:
                stop.cancel()
                self.epoch = run.result()
                if await self._holding_back():  # a handover to someone else began meanwhile
                    await self.election.resign()
                    continue
                return self.epoch
            run.cancel()
        return None

    async def _holding_back(self) -> bool:
        """During a handover (``ncmgr failover``) the old leader, and candidates on other
        hosts than the one named, let the others win."""
        ho = read_json(self.settings.paths.handover)
        if not ho or float(ho.get("until") or 0) < time.time():
            return False
        leader = await self.election.leader()
        if leader and leader.get("instance") not in (None, ho.get("from_instance")):
            return False  # someone else leads: the handover is over
        if ho.get("from_pid") == os.getpid() and ho.get("from_host") == os.uname().nodename:
            return True
        to = str(ho.get("to") or "")
        return bool(to) and to not in (os.uname().nodename, socket.getfqdn(), _short(to))

    def request_stop(self) -> None:
        self.stop_requested.set()


def _short(host: str) -> str:
    return os.uname().nodename if host.split(".")[0] == os.uname().nodename.split(".")[0] else ""


async def _sleep_or(event: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except TimeoutError:
        pass


async def _answer(send: Send, data: dict[str, Any], status: int = 200, **headers: str) -> None:
    await send_json(send, status, orjson.dumps(data), encode_headers(headers))


async def _html(send: Send, body: bytes) -> None:
    """A page for a browser (server/pages.py): a 503, as the JSON answer would be."""
    headers = [
        (b"content-length", b"%d" % len(body)),
        (b"content-type", b"text/html; charset=utf-8"),
        (b"retry-after", b"1"),
        (b"cache-control", b"no-store"),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def app(cand: Candidate, admin_token: Callable[[], bytes | None], switch: Switch) -> ASGIApp:
    """What a standby serves, and a leader while it loads the state (``cand.loading``).
    ``admin_token`` reads the swd's token (made by the leader)."""

    async def leader() -> dict[str, Any] | None:
        try:
            return await cand.election.leader()
        except Exception as e:  # noqa: BLE001 (etcd away: say so, keep answering)
            log.warning("cannot ask who leads: %s", e)
            return None

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        queue = cand.settings.queue
        if cand.loading:
            await loading(scope, receive, send)
            return
        ld = await leader()
        url = ld.get("url") if ld else None
        if path == "/healthz":
            await _answer(send, {"ok": True, "mode": MODE_STANDBY})
        elif path == API + "/server" and method == "GET":
            info = {
                "queue": queue,
                "mode": MODE_STANDBY,
                "leader": url,
                "epoch": ld.get("epoch") if ld else None,
                "url": cand.url,
                "instance": cand.instance,
                "pid": os.getpid(),
                "host": os.uname().nodename,
                "election": cand.election.name,
                "started_at": cand.started_at,
            }
            await _answer(send, info)
        elif (
            path == API + "/server/stop"
            and method == "POST"
            and _is_admin(headers_of(scope), admin_token)
        ):
            cand.request_stop()
            await _answer(send, {"stopping": True, "freeze": False})
        elif path == "/" and method == "GET" and wants_html(headers_of(scope).get("accept", "")):
            await _html(send, standby_page(queue, url))
        else:
            where = f"the leader is at {url}" if url else "no leader is serving yet"
            refusal = {
                "error": "standby",
                "message": f"this server is a standby of queue {queue}; {where}",
                "leader": url,
            }
            await _answer(send, refusal, 503, **{"Retry-After": "1"})

    async def loading(scope: Scope, receive: Receive, send: Send) -> None:
        """Won, reading the state: alive, not ready; clients come back in a moment. A
        tasker's request waits for the leader instead (a 503 would send it away for a
        second or more, and its return is what ends a crash recovery), and so do the
        status and the metrics, which a crash recovery does not refuse either."""
        path, method = scope["path"], scope["method"]
        if path == "/healthz" and method == "GET":
            await _answer(send, {"ok": True, "loading": True})
        elif (method == "POST" and path.startswith(TASKERS)) or (
            method == "GET" and path in WAIT_FOR_LEADER
        ):
            await switch.swapped.wait()
            await switch.app(scope, receive, send)
        elif path == "/" and method == "GET" and wants_html(headers_of(scope).get("accept", "")):
            await _html(send, recovery_page(cand.settings.queue, {"phase": "loading"}))
        else:
            await _answer(send, loading_reply(cand.settings.queue), 503, **{"Retry-After": "1"})

    return asgi


def loading_reply(queue: str) -> dict[str, Any]:
    """The 503 of a leader still loading: a crash recovery's first phase, to clients."""
    return {
        "error": "crash_recovery",
        "message": f"queue {queue}: taking over, loading the state; retry shortly",
        "recovery": {"phase": "loading"},
    }


def _is_admin(headers: dict[str, str], admin_token: Callable[[], bytes | None]) -> bool:
    scheme, _, tok = headers.get("authorization", "").strip().partition(" ")
    want = admin_token()
    return (
        scheme.lower() == "bearer"
        and want is not None
        and hmac.compare_digest(tok.strip().encode(), want)
    )


def stand_by_now(cand: Candidate, why: str) -> NoReturn:
    """A deposed leader stops acting at once: no answer, no write, no dispatch more. The
    same process starts again as a standby (the journal's pending writes die with it)."""
    log.critical("no longer the leader of queue %s (%s): standing by", cand.settings.queue, why)
    cand.remove()
    logging.shutdown()
    os.execv(sys.executable, [sys.executable, "-m", "crq.server", *standby_argv(cand.argv)])


def standby_argv(argv: list[str]) -> list[str]:
    return [a for a in argv if a != "--standby"] + ["--standby"]


__all__ = ["Busy", "Candidate", "Switch", "app"]
