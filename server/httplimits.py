"""Bounds on what HTTP clients can make the server hold: body bytes, sockets, idle time.

uvicorn alone reads a whole request body before the handler sees it, keeps a connection
that never sends a request line (or sends half of one) forever, and, once every file
descriptor is taken, drops new connections unanswered: a few hundred idle sockets could
make submits fail. Here the body limit counts bytes as they arrive (the hot routes:
server/asgi.py ``read_body``; the full app: server/http/bodylimit.py), a connection that
keeps us waiting for its request is closed after ``idle_timeout``, and the number of
connections stays below what the descriptor limit allows: past the cap, the connection
idle the longest gives way to the new one.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("crq.http")

FDS_RESERVED = 128  # descriptors kept for the rest: journal, snapshot, logs, pipes, epoll
OVER_CAP = 32  # connections past the cap that may still get a 503 instead of a hang-up


def raise_fd_limit(want: int) -> int:
    """Raise the soft RLIMIT_NOFILE towards ``want`` (within the hard limit); the soft limit.

    systemd starts services with a soft limit of 1,024 and a much higher hard one.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, e)
    return soft


def connection_cap(max_connections: int, fd_limit: int) -> int:
    """Connections served at once: the setting, or fewer if descriptors are short."""
    return max(1, min(max_connections, fd_limit - FDS_RESERVED - OVER_CAP))


class OneWrite:
    """A response's transport that sends its head with its body, in one ``send``.

    uvicorn writes the status line and headers at ``http.response.start``, then the body:
    two system calls, and two segments for the client to read. The head is held until the
    next write (the body, in the same task step) or, at the latest, the loop's next turn.
    """

    __slots__ = ("transport", "loop", "held")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.transport = transport
        self.loop = loop
        self.held: bytes | None = None

    def write(self, data: bytes) -> None:
        if self.held is None and not data.startswith(b"HTTP/1.1 100 "):
            self.held = bytes(data)
            self.loop.call_soon(self.flush)
            return
        held, self.held = self.held, None
        self.transport.write(data if held is None else held + data)

    def flush(self) -> None:
        held, self.held = self.held, None
        if held is not None and not self.transport.is_closing():
            self.transport.write(held)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


def http_protocol(idle_timeout: float, cap: int) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with an idle timeout and a connection cap."""
    warned = [0.0]

    def warn(what: str, connections: int) -> None:
        now = time.monotonic()
        if now - warned[0] >= 10.0:  # at most one line in 10 s under a flood
            warned[0] = now
            log.warning("%d connections (cap %d): %s", connections, cap, what)

    class LimitedHttp(HttpToolsProtocol):
        """Times out a connection that keeps us waiting; makes room for new ones at the cap.

        The clock runs while we wait for a request (from connect or the last response
        until its headers are in: an idle, or half-sent, request) and while a body stalls
        (no byte for ``idle_timeout``). It stops while the application works on a request:
        a long poll is not idle.
        """

        ready_since = 0.0  # when we started waiting for the next request
        last_data = 0.0  # when a byte last arrived
        timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.ready_since = self.last_data = self.loop.time()
            self._arm(idle_timeout)
            if len(self.connections) > cap:
                self._make_room()

        def connection_lost(self, exc: Exception | None) -> None:
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            self.last_data = self.loop.time()
            super().data_received(data)

        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            self.cycle.transport = OneWrite(self.transport, self.loop)  # type: ignore[assignment]

        def on_response_complete(self) -> None:
            self.ready_since = self.loop.time()
            super().on_response_complete()

        def waiting_for_request(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm(self, delay: float) -> None:
            self.timer = self.loop.call_later(max(delay, 0.05), self._check)

        def _check(self) -> None:
            self.timer = None
            if self.transport.is_closing():
                return
            now = self.loop.time()
            if self.waiting_for_request():
                due = self.ready_since + idle_timeout
            elif self.cycle.more_body:
                due = self.last_data + idle_timeout
            else:  # the application is working on the request
                due = now + idle_timeout
            if now >= due:
                self.transport.close()
            else:
                self._arm(due - now)

        def _make_room(self) -> None:
            """Over the cap: close the connection waiting longest for a request."""
            count = len(self.connections)
            oldest: LimitedHttp | None = None
            for conn in self.connections:
                if (
                    conn is not self
                    and isinstance(conn, LimitedHttp)
                    and conn.waiting_for_request()
                    and not conn.transport.is_closing()
                    and (oldest is None or conn.ready_since < oldest.ready_since)
                ):
                    oldest = conn
            if oldest is not None:
                oldest.transport.close()
                oldest.connections.discard(oldest)  # counted out now, not at the next tick
                warn("closed the connection idle longest to make room", count)
            elif count > cap + OVER_CAP:
                warn("every connection is busy: refused a new one", count)
                self.transport.close()
            else:
                warn("every connection is busy: new requests get 503", count)

    return LimitedHttp
