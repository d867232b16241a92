"""Where the server is, how to talk to it, and how a request can fail.

``ServerSource`` finds the URL and the token (re-read at every connection); ``post`` sends
one request and turns every way it can go wrong into one ``Failure``. The loop that decides
what to do about a failure is the agent's; the tree says what happened::

    Failure                        a register or sync without a usable answer
     ├── Unreachable               no answer: connection or timeout, or no URL/token yet
     │                             (the next candidate server is tried)
     ├── BadAnswer                 a 200 that is not a JSON object
     ├── Deposed(epoch, seen)      an answer of an epoch lower than one seen: a deposed
     │                             leader's; its orders are ignored, the next server tried
     ├── UnknownTasker             409 unknown_tasker: the server forgot us; register again
     │    └── WrongSession         409 wrong_session: our name is held by a newer session
     └── Refused(status)           any other error answer
          ├── TokenRefused         401/403: the tasker token is not (or no longer) valid
          ├── NameInUse(after)     409 tasker_name_in_use: another live session has our name;
          │                        ``after``: when its silence would free it (or None)
          └── RetryLater(after)    an error with ``Retry-After`` (the server's recovery 503)
               └── Standby(leader) 503 standby: a candidate that does not lead; ``leader``
                                   is the leader's URL (asked at once), or None (not known)

Only the standard library: requests go through :mod:`crq.http11` (a socket, no client
library), so ``vovtasker --help`` starts fast and the tasker carries little.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from crq import http11, procfs, wire

CONNECT_TIMEOUT = 5.0
JSON_BODY = {"Content-Type": "application/json"}
#: What ServerSource gives for a token when the tasker shows MUNGE credentials instead:
#: this prefix and munged's socket (no tasker token has a colon).
MUNGE_TOKEN = "munge:"


class Failure(Exception):
    """A register/sync that did not get a usable answer (see the module docstring)."""


class Unreachable(Failure):
    """No answer at all: the server (or its address) is not there now."""


class BadAnswer(Failure):
    """The server answered 200 with something that is not a JSON object."""


class UnknownTasker(Failure):
    """The server does not know this tasker (it restarted, or recovered us): register."""


class WrongSession(UnknownTasker):
    """The server ties our name to another session now: register, and it decides."""


class Refused(Failure):
    """An error answer; ``status`` is its HTTP status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class TokenRefused(Refused):
    """401/403: the server does not take our tasker token."""


class NameInUse(Refused):
    """Another live session holds our tasker name; ``after``: seconds until it may be free."""

    def __init__(self, message: str, status: int, after: float | None) -> None:
        super().__init__(message, status)
        self.after = after


class RetryLater(Refused):
    """An error answer with ``Retry-After``: ask again no sooner than ``after`` seconds."""

    def __init__(self, message: str, status: int, after: float) -> None:
        super().__init__(message, status)
        self.after = after


class Standby(RetryLater):
    """A standby answered: nothing was applied; ``leader`` is where the leader is, if known."""

    def __init__(self, message: str, status: int, after: float, leader: str | None) -> None:
        super().__init__(message, status, after)
        self.leader = leader


class Deposed(Failure):
    """An answer from an epoch lower than the highest seen: a leader that was deposed."""

    def __init__(self, message: str, epoch: int, seen: int) -> None:
        super().__init__(message)
        self.epoch, self.seen = epoch, seen


class SourceError(Exception):
    """The server's address or the token cannot be found (yet)."""


class ServerSource:
    """Where the leader is and which token to show; re-read at every (re)connection.

    The candidates, in the order they are tried: the ``--server`` URLs; with ``--swd``,
    ``server.json`` (the leader's file; changes when a restarted server picks another port)
    and then every ``servers/*.json`` (leaders first, standbys after); with ``--etcd``, the
    URL the leader published under ``/crq/<queue>/leader``. A connection failure moves on to
    the next candidate; a standby's ``leader`` pointer is followed at once (:meth:`follow`)
    without changing the list, and dropped when that leader fails in turn.
    """

    def __init__(
        self,
        servers: list[str] | None = None,
        swd: str | os.PathLike[str] | None = None,
        token_file: str | os.PathLike[str] | None = None,
        token: str | None = None,
        etcd: Callable[[], str] | None = None,
    ) -> None:
        self.servers = [s.rstrip("/") for s in servers or []]
        self.swd = wire.Swd(swd) if swd is not None else None
        self.token_file = Path(token_file) if token_file is not None else None
        self.token = token
        self.etcd = etcd
        self.host = os.uname().nodename  # as the server writes it
        self._index = 0
        self._leader: str | None = None
        self._seen: tuple[int, int] | None = None

    def resolve(self) -> tuple[str, str]:
        stamp = self._stamp()
        if stamp != self._seen:  # a new leader wrote server.json: start from it again
            self._leader, self._index = None, 0
        self._seen = stamp
        return self._url(), self._token()

    def _stamp(self) -> tuple[int, int] | None:
        if self.swd is None:
            return None
        try:
            st = self.swd.server_json.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_ino

    def changed(self) -> bool:
        """server.json was rewritten since the last resolve: a new server is worth a try now."""
        return self.swd is not None and self._stamp() != self._seen

    def follow(self, leader: str) -> None:
        """A standby named the leader: the next connection goes there."""
        self._leader = leader.rstrip("/")

    @property
    def following(self) -> str | None:
        return self._leader

    def failed(self) -> None:
        """The current server did not answer (or was deposed): try the next one next time."""
        self._leader = None
        self._index += 1

    def candidates(self) -> list[str]:
        """Every URL worth a try now, in order (see the class docstring)."""
        if self.servers:
            return list(self.servers)
        if self.etcd is not None:
            return [self.etcd()]
        assert self.swd is not None
        urls: list[str] = []
        problem = f"no {self.swd.server_json} (server not started?)"
        try:
            leader = json.loads(self.swd.server_json.read_text())
            if not isinstance(leader, dict):
                raise ValueError("not a JSON object")
            if not self._dead(leader):
                urls.append(str(leader["url"]).rstrip("/"))
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as e:
            problem = f"cannot read {self.swd.server_json}: {e}"
        for info in self._server_files():
            url = str(info["url"]).rstrip("/")
            if url not in urls:
                urls.append(url)
        if not urls:
            raise SourceError(problem)
        return urls

    def _server_files(self) -> list[dict[str, Any]]:
        """The live candidates' ``servers/*.json``: leaders (highest epoch) first."""
        assert self.swd is not None
        found: list[dict[str, Any]] = []
        try:
            paths = sorted((self.swd.root / "servers").glob("*.json"))
        except OSError:
            return []
        for path in paths:
            try:
                info = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # being written, or gone with its server
            if isinstance(info, dict) and isinstance(info.get("url"), str) and not self._dead(info):
                found.append(info)

        def rank(info: dict[str, Any]) -> tuple[int, int]:
            epoch = info.get("epoch")
            leads = info.get("mode") in (wire.MODE_NORMAL, wire.MODE_RECOVERING)
            return (0 if leads else 1, -(epoch if isinstance(epoch, int) else 0))

        return sorted(found, key=rank)

    def _dead(self, info: dict[str, Any]) -> bool:
        """A server file that names a stopped server, or a process gone from this host."""
        if info.get("mode") == wire.MODE_STOPPED:
            return True
        pid = info.get("pid")
        if info.get("host") == self.host and isinstance(pid, int) and pid > 0:
            return not procfs.process_exists(pid)
        return False

    def _url(self) -> str:
        if self._leader is not None:
            return self._leader
        urls = self.candidates()
        return urls[self._index % len(urls)]

    def _token(self) -> str:
        """``--token-file`` > ``CRQ_TASKER_TOKEN`` > the swd's tasker.token > MUNGE.

        A tasker shows MUNGE credentials only when it has no tasker token: the token works
        with every server version, and a root tasker of the queue's host can read it. One
        that cannot (another host, no swd) is known by its unix user, which the server's
        ``tasker_users`` must list."""
        if self.token_file is not None:
            return _read_token(self.token_file)
        if self.token:
            return self.token
        problem = "no tasker token (--token-file, CRQ_TASKER_TOKEN or --swd)"
        if self.swd is not None:
            try:
                return _read_token(self.swd.tasker_token)
            except SourceError as e:
                problem = str(e)
        socket = munge_here()
        if socket is not None:
            return MUNGE_TOKEN + socket
        raise SourceError(problem + "; and munged does not run here for a MUNGE credential")


def _read_token(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except OSError as e:
        raise SourceError(f"cannot read token file {path}: {e.strerror or e}") from None
    if not token:
        raise SourceError(f"token file {path} is empty")
    return token


def munge_socket() -> str:
    """munged's socket: ``CRQ_MUNGE_SOCKET``, else /run/munge's (as crq.munge has it)."""
    return os.environ.get("CRQ_MUNGE_SOCKET") or "/run/munge/munge.socket.2"


def munge_here() -> str | None:
    """munged's socket when MUNGE can be used here, else None (a ``stat`` without munged;
    crq.munge, ctypes and libmunge are loaded only when the socket exists)."""
    path = munge_socket()
    if not os.path.exists(path):
        return None
    from crq import munge

    return path if munge.available(path) else None


class MungeConnection(http11.Connection):
    """A connection that shows a fresh MUNGE credential with every request (munged refuses
    a credential it has decoded before, so none is ever reused, not even by a retry)."""

    def __init__(self, url: str, headers: dict[str, str], socket: str) -> None:
        super().__init__(url, headers, connect_timeout=CONNECT_TIMEOUT)
        self.socket = socket

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
        from crq import munge

        try:
            cred = munge.encode(socket=self.socket)
        except munge.MungeError as e:  # munged stopped: nothing was sent
            raise http11.TransportError(f"no MUNGE credential: {e}", sent=False) from None
        signed = {**(headers or {}), "Authorization": f"Munge {cred}"}
        return super().request(
            method,
            path,
            body=body,
            headers=signed,
            params=params,
            timeout=timeout,
            connect_timeout=connect_timeout,
        )


def post(
    client: http11.Connection, path: str, body: dict[str, Any], read_timeout: float
) -> dict[str, Any]:
    """POST and decode; every way it can go wrong becomes one Failure.

    ``read_timeout`` bounds the whole exchange once connected (a long poll's answer
    included), so a server that stops answering (SIGSTOP, a cut link) is left in time."""
    try:
        r = client.request(
            "POST",
            path,
            body=http11.dumps(body),
            headers=JSON_BODY,
            timeout=read_timeout,
            connect_timeout=CONNECT_TIMEOUT,
        )
    except http11.TransportError as e:
        raise Unreachable(str(e)) from None
    try:
        data = r.json()
    except ValueError:
        data = None
    if r.status == 200:
        if not isinstance(data, dict):
            raise BadAnswer("server answered 200 without a JSON object")
        return data
    raise _refusal(r.status, data, r.header("retry-after"))


def _refusal(status: int, data: object, retry_after: str | None) -> Failure:
    """The Failure an error answer stands for."""
    code = data.get("error") if isinstance(data, dict) else None
    message = data.get("message") if isinstance(data, dict) else None
    text = f"HTTP {status}" + (f" {code}" if code else "")
    text += f": {message}" if message else ""
    if status == 409 and code == "unknown_tasker":
        return UnknownTasker(text)  # register again: it decides
    if status == 409 and code == "wrong_session":
        return WrongSession(text)
    if status in (401, 403):
        return TokenRefused(text, status)
    after = None
    if retry_after is not None:
        try:
            after = float(retry_after)
        except ValueError:
            after = None
    if status == 409 and code == "tasker_name_in_use":
        return NameInUse(text, status, after)
    if status == 503 and code == "standby":
        leader = data.get("leader") if isinstance(data, dict) else None
        if not (isinstance(leader, str) and leader.startswith(("http://", "https://"))):
            leader = None
        return Standby(text, status, after or 1.0, leader.rstrip("/") if leader else None)
    if after is not None:
        return RetryLater(text, status, after)
    return Refused(text, status)


def open_client(url: str, token: str, session: str) -> http11.Connection:
    """A keep-alive connection to ``url`` showing our token (or MUNGE credentials, see
    :data:`MUNGE_TOKEN`) and session (made by the first request; no proxy, whatever
    HTTP_PROXY says)."""
    headers = {
        "User-Agent": "crq-vovtasker",
        "Accept": "application/json",
        wire.SESSION_HEADER: session,
    }
    try:
        if token.startswith(MUNGE_TOKEN):
            return MungeConnection(url, headers, token[len(MUNGE_TOKEN) :])
        headers["Authorization"] = f"Bearer {token}"
        return http11.Connection(url, headers, connect_timeout=CONNECT_TIMEOUT)
    except ValueError as e:  # not an http(s) URL (a bad server.json, a bad --server)
        raise SourceError(str(e)) from None
