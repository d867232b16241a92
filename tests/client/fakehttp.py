"""A fake server behind the Client's connection: each request goes to a handler that
answers as a server would (an ``httpx.Response``) or fails as a network would (an httpx
transport error: ConnectError = nothing sent, RemoteProtocolError = lost mid-request).

Everything above the socket is the real Client (its URL handling, query strings, bodies,
headers, errors and retries); the socket itself is tested against real servers in
tests/test_http11.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
from crq.client.api import Opener

from crq import http11

Handler = Callable[[httpx.Request], httpx.Response]


class FakeConnection(http11.Connection):
    """A :class:`crq.http11.Connection` whose requests are answered by ``handler``."""

    def __init__(self, url: str, headers: dict[str, str], handler: Handler) -> None:
        super().__init__(url, headers)
        self.handler = handler

    def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        params: dict[str, Any] | None = None,
        timeout: float | None = None,
        connect_timeout: float | None = None,
    ) -> http11.Response:
        fields = {**self.headers, **(headers or {})}
        url = self.url + path + http11.query(params)
        request = httpx.Request(method, url, headers=fields, content=body or b"")
        try:
            r = self.handler(request)
        except (httpx.ConnectError, httpx.ConnectTimeout) as e:
            timed_out = isinstance(e, httpx.ConnectTimeout)
            raise http11.TransportError(str(e), sent=False, timed_out=timed_out) from None
        except httpx.TimeoutException as e:
            raise http11.TransportError(str(e), sent=True, timed_out=True) from None
        except httpx.TransportError as e:
            raise http11.TransportError(str(e), sent=True) from None
        lower = {k.lower(): v for k, v in r.headers.items()}
        return http11.Response(r.status_code, r.reason_phrase, lower, r.read())


def opener(handler: Handler) -> Opener:
    return lambda url, headers: FakeConnection(url, headers, handler)
