"""Where the server is, how to talk to it, and how a request can fail.

``ServerSource`` finds the URL and the token (re-read at every connection); ``post`` sends
one request and turns every way it can go wrong into one ``Failure``. The loop that decides
what to do about a failure is the agent's; the tree says what happened::

    Failure                        a register or sync without a usable answer
     ├── Unreachable               no answer: connection or timeout, or no URL/token yet
     │                             (the next ``--server`` is tried)
     ├── BadAnswer                 a 200 that is not a JSON object
     ├── UnknownTasker             409 unknown_tasker: the server forgot us; register again
     │    └── WrongSession         409 wrong_session: our name is held by a newer session
     └── Refused(status)           any other error answer
          ├── TokenRefused         401/403: the tasker token is not (or no longer) valid
          ├── NameInUse(after)     409 tasker_name_in_use: another live session has our name;
          │                        ``after``: when its silence would free it (or None)
          └── RetryLater(after)    an error with ``Retry-After`` (the server's recovery 503)

Only the standard library at import: httpx is imported by the first connection, so
``vovtasker --help`` starts fast.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crq import wire

if TYPE_CHECKING:
    import httpx

CONNECT_TIMEOUT = 5.0


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


class SourceError(Exception):
    """The server's address or the token cannot be found (yet)."""


class ServerSource:
    """Where the server is and which token to show; re-read at every (re)connection.

    With ``--swd`` the URL comes from ``server.json``, which changes when a restarted
    server picks another port; with ``--server`` URLs a connection failure moves on to
    the next one (failover).
    """

    def __init__(
        self,
        servers: list[str] | None = None,
        swd: str | os.PathLike[str] | None = None,
        token_file: str | os.PathLike[str] | None = None,
        token: str | None = None,
    ) -> None:
        self.servers = [s.rstrip("/") for s in servers or []]
        self.swd = wire.Swd(swd) if swd is not None else None
        self.token_file = Path(token_file) if token_file is not None else None
        self.token = token
        self._index = 0
        self._seen: tuple[int, int] | None = None

    def resolve(self) -> tuple[str, str]:
        self._seen = self._stamp()
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

    def _url(self) -> str:
        if self.servers:
            return self.servers[self._index % len(self.servers)]
        assert self.swd is not None
        try:
            info = json.loads(self.swd.server_json.read_text())
            url = str(info["url"]).rstrip("/")
        except FileNotFoundError:
            raise SourceError(f"no {self.swd.server_json} (server not started?)") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SourceError(f"cannot read {self.swd.server_json}: {e}") from None
        return url

    def _token(self) -> str:
        if self.token_file is not None:
            path = self.token_file
        elif self.token:
            return self.token
        elif self.swd is not None:
            path = self.swd.tasker_token
        else:
            raise SourceError("no tasker token")
        try:
            token = path.read_text().strip()
        except OSError as e:
            raise SourceError(f"cannot read token file {path}: {e.strerror or e}") from None
        if not token:
            raise SourceError(f"token file {path} is empty")
        return token

    def failed(self) -> None:
        """The current server did not answer: try the next one next time."""
        self._index += 1


def post(
    client: httpx.Client, path: str, body: dict[str, Any], read_timeout: float
) -> dict[str, Any]:
    """POST and decode; every way it can go wrong becomes one Failure."""
    import httpx

    try:
        r = client.post(
            path,
            json=body,
            timeout=httpx.Timeout(read_timeout, connect=CONNECT_TIMEOUT),
        )
    except httpx.HTTPError as e:
        text = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        raise Unreachable(text) from None
    try:
        data = r.json()
    except ValueError:
        data = None
    if r.status_code == 200:
        if not isinstance(data, dict):
            raise BadAnswer("server answered 200 without a JSON object")
        return data
    raise _refusal(r.status_code, data, r.headers.get("retry-after"))


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
    if after is not None:
        return RetryLater(text, status, after)
    return Refused(text, status)


def open_client(url: str, token: str, session: str) -> httpx.Client:
    """A keep-alive connection to ``url`` showing our token and session."""
    import httpx

    return httpx.Client(
        base_url=url,
        headers={
            "Authorization": f"Bearer {token}",
            "User-Agent": "crq-vovtasker",
            wire.SESSION_HEADER: session,
        },
        limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
        trust_env=False,
    )
