"""A small HTTP/1.1 client on a bare socket: one keep-alive connection, one error type.

The CLIs start as a fresh process per command and the tasker sends short JSON requests,
so what matters is what the import costs: httpx with httpcore is about 160 ms of imports,
``http.client`` pulls in ``email.parser`` and ``ssl`` (about 17 ms here), this module only
``socket`` (2 ms); ``ssl`` is imported by the first ``https://`` connection. It speaks what
crq's server and etcd's JSON gateway answer: a status line, headers, and a body framed by
``Content-Length``, chunks or the end of the connection. No proxies (a job queue on the LAN
must not be routed through ``HTTP_PROXY``), no redirects, no compression.

>>> with Connection("http://127.0.0.1:8080") as c:
...     r = c.request("POST", "/api/v1/jobs", body=dumps({"command": ["true"]}))
...     r.status, r.json()

Every way a request can fail to get an answer is a :class:`TransportError`; its ``sent``
says whether the request may have reached the server (False: the connection was never
made, so it may be sent anywhere again, whatever it was).
"""

from __future__ import annotations

import json
import select
import socket
import time
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import quote, urlsplit

if TYPE_CHECKING:
    import ssl

__all__ = ["Connection", "Response", "TransportError", "dumps", "query"]

#: Longest status or header line, and most header lines, taken from a server.
MAX_LINE = 65536
MAX_HEADERS = 100
CHUNK = 65536


class TransportError(Exception):
    """No answer: the connection failed, broke or timed out. ``str()`` is one line.

    ``sent`` is False when nothing left this host (the connection was not made: refused,
    unknown host, connect timeout); ``timed_out`` when a deadline passed."""

    def __init__(self, message: str, *, sent: bool, timed_out: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.sent = sent
        self.timed_out = timed_out

    def __str__(self) -> str:
        return self.message


class Response:
    """A complete answer: ``status``, ``reason``, ``headers`` (lower-case names), ``body``."""

    __slots__ = ("status", "reason", "headers", "body")

    def __init__(self, status: int, reason: str, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body

    def header(self, name: str, default: str | None = None) -> str | None:
        return self.headers.get(name.lower(), default)

    def json(self) -> Any:
        """The body decoded as JSON; ValueError when it is not JSON (or not UTF-8)."""
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.reason}, {len(self.body)} bytes>"


def dumps(value: Any) -> bytes:
    """A JSON request body: compact UTF-8, NaN refused (no JSON reader takes it)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def query(params: dict[str, Any] | None) -> str:
    """``?a=1&b=x`` of the parameters that are not None (``""`` when none are)."""
    if not params:
        return ""
    pairs = [
        f"{quote(str(k), safe='')}={quote(_param(v), safe='')}"
        for k, v in params.items()
        if v is not None
    ]
    return "?" + "&".join(pairs) if pairs else ""


def _param(value: Any) -> str:
    if value is True or value is False:
        return "true" if value else "false"
    return str(value)


_ssl_context: ssl.SSLContext | None = None


def _tls(sock: socket.socket, host: str) -> socket.socket:
    """Wrap ``sock`` for ``https://``: ssl (and its context, about 40 ms) only here."""
    global _ssl_context
    import ssl

    if _ssl_context is None:
        _ssl_context = ssl.create_default_context()
    return _ssl_context.wrap_socket(sock, server_hostname=host)


def _connect_reason(e: OSError) -> str:
    """The few words a person needs: refused, unknown host, unreachable…"""
    if isinstance(e, socket.gaierror):
        return "unknown host"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    text = e.strerror or str(e) or type(e).__name__
    low = text.lower()
    if "no route" in low or "unreachable" in low:
        return "host unreachable"
    return " ".join(text.split())


class Connection:
    """One keep-alive HTTP/1.1 connection to the origin of ``url``, made when first needed.

    ``headers`` go with every request. ``timeout`` bounds a whole exchange once connected
    (sending the request and reading all of the answer), ``connect_timeout`` the connection
    itself; both can be set per request. One request at a time (one thread).
    """

    def __init__(
        self,
        url: str,
        headers: dict[str, str] | None = None,
        *,
        timeout: float = 30.0,
        connect_timeout: float = 5.0,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http:// or https:// URL: {url!r}")
        self.url = url.rstrip("/")
        self.tls = parts.scheme == "https"
        self.host = parts.hostname
        self.port = parts.port or (443 if self.tls else 80)
        self.prefix = parts.path.rstrip("/")  # a server mounted under a path
        name = f"[{self.host}]" if ":" in self.host else self.host
        default = self.port == (443 if self.tls else 80)
        self.headers = {"Host": name if default else f"{name}:{self.port}", **(headers or {})}
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._sock: socket.socket | None = None
        self._buf = bytearray()

    # -- public ---------------------------------------------------------------------------

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
    ) -> Response:
        """Send one request (``path`` below the URL's own path, ``params`` as its query)
        and read the whole answer, whatever its status."""
        head = self._head(method, path + query(params), body, headers)
        if self._sock is None or not self._reusable():
            self.close()
            self._open(self.connect_timeout if connect_timeout is None else connect_timeout)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        try:
            self._send(head + body if body else head, deadline)
            response = self._read(method, deadline)
        except TransportError:
            self.close()
            raise
        except OSError as e:  # reset, broken pipe, aborted
            self.close()
            raise TransportError(self._broke(e), sent=True) from None
        return response

    def close(self) -> None:
        sock, self._sock = self._sock, None
        self._buf.clear()
        if sock is not None:
            sock.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- connecting -----------------------------------------------------------------------

    def _open(self, timeout: float) -> None:
        # An ASCII name goes as bytes (getaddrinfo takes them; typeshed says str): a str
        # would import the idna codec, a millisecond, to encode it.
        host = cast(str, self.host.encode()) if self.host.isascii() else self.host
        try:
            sock = socket.create_connection((host, self.port), timeout=timeout)
        except TimeoutError:
            raise TransportError("connection timed out", sent=False, timed_out=True) from None
        except OSError as e:
            raise TransportError(_connect_reason(e), sent=False) from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls:
                sock = _tls(sock, self.host)
        except TimeoutError:
            sock.close()
            raise TransportError("TLS handshake timed out", sent=False, timed_out=True) from None
        except OSError as e:  # ssl.SSLError is one
            sock.close()
            raise TransportError(f"TLS: {_connect_reason(e)}", sent=False) from None
        self._sock = sock

    def _reusable(self) -> bool:
        """Whether the idle connection still stands: a server that closed it (its keep-alive
        timeout) has made it readable, and a request sent there would be lost."""
        sock = self._sock
        assert sock is not None
        if self._buf:
            return False  # bytes nobody asked for
        try:  # poll, not select: a process with more than 1024 files open is fine too
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            readable = poller.poll(0)
        except (OSError, ValueError):
            return False
        if not readable:
            return True
        try:
            sock.setblocking(False)
            sock.recv(1)  # b"" at the end of the stream
        except (BlockingIOError, InterruptedError):
            return True
        except OSError as e:  # a TLS record without data (a session ticket) is no answer
            return type(e).__name__ == "SSLWantReadError"
        finally:
            sock.setblocking(True)
        return False  # the end of the stream, or bytes nobody asked for

    # -- sending --------------------------------------------------------------------------

    def _head(
        self, method: str, target: str, body: bytes | None, headers: dict[str, str] | None
    ) -> bytes:
        fields = {**self.headers, **headers} if headers else self.headers
        lines = [f"{method} {self.prefix}{target} HTTP/1.1"]
        lines += [f"{k}: {v}" for k, v in fields.items()]
        if any("\n" in x or "\r" in x for x in lines):
            raise TransportError("a header or the path holds a line break: not sent", sent=False)
        if body or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(body or b'')}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _send(self, data: bytes, deadline: float) -> None:
        sock = self._sock
        assert sock is not None
        sock.settimeout(self._left(deadline))
        try:
            sock.sendall(data)
        except TimeoutError:
            raise TransportError(self._late(), sent=True, timed_out=True) from None

    # -- reading --------------------------------------------------------------------------

    def _read(self, method: str, deadline: float) -> Response:
        while True:
            status, reason, version = self._status_line(deadline)
            headers = self._headers(deadline)
            if not 100 <= status < 200:  # 1xx: an interim answer, the real one follows
                break
        if method == "HEAD" or status in (204, 304):
            body = b""
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            body = self._chunked(deadline)
        elif "content-length" in headers:
            try:
                length = int(headers["content-length"])
            except ValueError:
                raise self._bad("a bad Content-Length") from None
            if length < 0:
                raise self._bad("a bad Content-Length")
            body = self._exactly(length, deadline)
        else:
            body = self._until_closed(deadline)
            headers["connection"] = "close"
        closing = headers.get("connection", "").lower()
        if "close" in closing or (version == "HTTP/1.0" and "keep-alive" not in closing):
            self.close()
        return Response(status, reason, headers, body)

    def _status_line(self, deadline: float) -> tuple[int, str, str]:
        line = self._line(deadline, first=True)
        version, _, rest = line.partition(" ")
        code, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/1.") or len(code) != 3 or not code.isdigit():
            raise self._bad(f"not an HTTP/1 status line: {line[:60]!r}")
        return int(code), reason.strip(), version

    def _headers(self, deadline: float) -> dict[str, str]:
        headers: dict[str, str] = {}
        for _ in range(MAX_HEADERS + 1):
            line = self._line(deadline)
            if not line:
                return headers
            name, sep, value = line.partition(":")
            if not sep:
                raise self._bad(f"a bad header line {line[:60]!r}")
            key = name.strip().lower()
            value = value.strip()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        raise self._bad(f"more than {MAX_HEADERS} header lines")

    def _chunked(self, deadline: float) -> bytes:
        out = bytearray()
        while True:
            size_line = self._line(deadline).partition(";")[0].strip()
            try:
                size = int(size_line, 16)
            except ValueError:
                raise self._bad(f"a bad chunk size {size_line[:20]!r}") from None
            if size == 0:
                while self._line(deadline):  # trailers, up to the blank line
                    pass
                return bytes(out)
            out += self._exactly(size, deadline)
            if self._line(deadline):
                raise self._bad("a chunk longer than its size")

    def _line(self, deadline: float, first: bool = False) -> str:
        while True:
            end = self._buf.find(b"\n")
            if end >= 0:
                raw = bytes(self._buf[:end])
                del self._buf[: end + 1]
                return raw.rstrip(b"\r").decode("latin-1")
            if len(self._buf) > MAX_LINE:
                raise self._bad("a line longer than 64 KiB")
            if not self._fill(deadline):
                what = "before answering" if first and not self._buf else "mid-answer"
                raise TransportError(f"the server closed the connection {what}", sent=True)

    def _exactly(self, n: int, deadline: float) -> bytes:
        while len(self._buf) < n:
            if not self._fill(deadline):
                raise TransportError("the server closed the connection mid-answer", sent=True)
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    def _until_closed(self, deadline: float) -> bytes:
        while self._fill(deadline):
            pass
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def _fill(self, deadline: float) -> bool:
        """Read what the server sent next into the buffer; False at the end of the stream."""
        sock = self._sock
        if sock is None:
            raise TransportError("the connection was closed", sent=True)
        sock.settimeout(self._left(deadline))
        try:
            data = sock.recv(CHUNK)
        except TimeoutError:
            raise TransportError(self._late(), sent=True, timed_out=True) from None
        self._buf += data
        return bool(data)

    # -- failures -------------------------------------------------------------------------

    def _left(self, deadline: float) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TransportError(self._late(), sent=True, timed_out=True)
        return left

    def _late(self) -> str:
        return f"no answer from {self.url} in time"

    def _bad(self, what: str) -> TransportError:
        self.close()
        return TransportError(f"{self.url} answered with {what}", sent=True)

    def _broke(self, e: OSError) -> str:
        reason = e.strerror or str(e) or type(e).__name__
        return f"the connection to {self.url} broke: {' '.join(reason.split())}"
