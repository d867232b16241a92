"""Talk to the server: register, then report and long-poll until told to stop.

Two keep-alive connections: one carries the long poll (``wait`` = heartbeat) that brings
dispatches and kills, the other sends reports at once (``wait`` = 0) even while the long
poll is out, because a finished job should free its slot now, not at the next heartbeat.
All answers are handled on the main thread, so job state changes in one place.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import random
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from crq.tasker.runner import Runner
from crq.tasker.statedir import Key, StateDir

from crq import wire

if TYPE_CHECKING:
    import httpx

log = logging.getLogger("crq.tasker")

BACKOFF_START = 0.2
BACKOFF_CAP = 30.0
NAME_RETRY_CAP = 10.0  # a name in use may be freed by the operator (cleanup --dead-host)
CONNECT_TIMEOUT = 5.0
REPORT_TIMEOUT = 30.0
POLL_SLACK = 15.0
RESEND_DELAY = 1.0


class Failure(Exception):
    """A register/sync that did not get a usable answer."""

    def __init__(
        self,
        message: str,
        *,
        transport: bool = False,
        unknown: bool = False,
        auth: bool = False,
        name_in_use: bool = False,
        retry_after: float | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.transport = transport
        self.unknown = unknown
        self.auth = auth
        self.name_in_use = name_in_use  # another live session holds our name
        self.retry_after = retry_after


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


@dataclass
class TaskerInfo:
    name: str
    slots: int
    resources: str
    heartbeat: float
    boot_id: str
    rebooted: bool


def _post(client: httpx.Client, path: str, body: dict[str, Any], read_timeout: float) -> dict:
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
        raise Failure(text, transport=True) from None
    try:
        data = r.json()
    except ValueError:
        data = None
    if r.status_code == 200:
        if not isinstance(data, dict):
            raise Failure("server answered 200 without a JSON object")
        return data
    code = data.get("error") if isinstance(data, dict) else None
    message = data.get("message") if isinstance(data, dict) else None
    text = f"HTTP {r.status_code}" + (f" {code}" if code else "")
    text += f": {message}" if message else ""
    if r.status_code == 409 and code in ("unknown_tasker", "wrong_session"):
        raise Failure(text, unknown=True, status=409)  # register again: it decides
    if r.status_code in (401, 403):
        raise Failure(text, auth=True, status=r.status_code)
    retry_after = None
    if "retry-after" in r.headers:
        try:
            retry_after = float(r.headers["retry-after"])
        except ValueError:
            retry_after = None
    in_use = r.status_code == 409 and code == "tasker_name_in_use"
    raise Failure(text, name_in_use=in_use, retry_after=retry_after, status=r.status_code)


def _client(url: str, token: str, session: str) -> httpx.Client:
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


class Agent:
    """The tasker's protocol loop (see client/wire.py for the messages)."""

    def __init__(
        self, info: TaskerInfo, source: ServerSource, runner: Runner, state: StateDir
    ) -> None:
        self.info = info
        self.source = source
        self.runner = runner
        self.state = state
        self.heartbeat = info.heartbeat
        self.host = socket.gethostname()
        self._base = f"{wire.API}/taskers/{quote(info.name, safe='')}"
        self._cond = threading.Condition()
        self._stopping = False
        self._registered = False
        self._ever_registered = False
        self._gen = 0
        self._url: str | None = None
        self._token: str | None = None
        self._session = state.session()  # holds our name on the server (see statedir)
        self._refused = False  # the name is another live session's: said once, retrying
        self._client: httpx.Client | None = None
        self._instance: Any = None
        self._failures = 0
        self._next_try = 0.0
        self._down_since: float | None = None
        self._shutdown = False
        self._polling = False
        self._poll_result: tuple[int, dict | None, Failure | None] | None = None
        self._poll_q: queue.Queue[tuple[int, str, str, dict[str, Any], float] | None] = (
            queue.Queue()
        )
        runner.on_event = self.wake

    # -- control from other threads -------------------------------------------------------

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def stop(self) -> None:
        """Safe from a signal handler: the notify runs on a fresh thread, never re-entering."""
        self._stopping = True
        threading.Thread(target=self.wake, daemon=True).start()

    # -- main loop ------------------------------------------------------------------------

    def run(self) -> int:
        threading.Thread(target=self._poll_worker, name="poll", daemon=True).start()
        try:
            while not self._stopping:
                try:
                    rc = self._step()
                except Exception:  # a bug must not take the tasker down: its jobs need it
                    log.exception("internal error; carrying on")
                    self._registered = False
                    self._next_try = time.monotonic() + 3.0
                    continue
                if rc is not None:
                    return rc
            return 0
        finally:
            self._poll_q.put(None)
            if self._client is not None:
                self._client.close()

    def _step(self) -> int | None:
        """One turn of the loop; an exit code when the tasker must end."""
        self._take_poll_result()
        if self._shutdown:
            self._wind_down()
            return 0
        if not self._registered:
            delay = self._next_try - time.monotonic()
            if delay > 0 and not self.source.changed():
                self._sleep(min(delay, 0.25))  # short naps: notice a new server.json
                return None
            return self._register()
        started, finished = self.runner.reports()
        if started or finished:
            self._report(started, finished)
            return None
        if not self._polling:
            self._start_poll()
        with self._cond:
            due = self.runner.next_due_in()
            self._cond.wait_for(
                lambda: self._stopping or self._poll_result is not None or self.runner.has_due(),
                timeout=min(due, 5.0) if due is not None else 5.0,
            )
        return None

    def _wind_down(self) -> None:
        """Wait (bounded) for the killed jobs to end, and report them if the server still
        listens; what it misses stays on disk for the next start."""
        deadline = time.monotonic() + self.runner.kill_grace + 2.0
        while not self._stopping and time.monotonic() < deadline:
            if self.runner.counts()[0] == 0:
                break
            self._sleep(0.05)
        started, finished = self.runner.reports(everything=True)
        if (started or finished) and self._registered and self._client is not None:
            body = {"started": started, "finished": finished, "running": [], "wait": 0}
            try:
                answer = _post(self._client, f"{self._base}/sync", body, 2.0)
                acked = {wire.attempt_key(a) for a in answer.get("ack") or []}
            except (Failure, TypeError, ValueError, KeyError, AttributeError):
                return
            self.runner.ack(acked, started, finished)

    def _sleep(self, seconds: float) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._stopping, timeout=max(0.0, seconds))

    # -- registration ---------------------------------------------------------------------

    def _connect(self) -> httpx.Client:
        url, token = self.source.resolve()
        if self._client is None or (url, token) != (self._url, self._token):
            if self._client is not None:
                self._client.close()
            self._client = _client(url, token, self._session)
            self._url, self._token = url, token
        return self._client

    def _register(self) -> int | None:
        """One registration attempt; an exit code if the tasker must give up, else None."""
        try:
            client = self._connect()
        except SourceError as e:
            self._failed(Failure(str(e), transport=True))
            return None
        running = self.runner.running()
        _, finished = self.runner.reports(everything=True)
        body = {
            "host": self.host,
            "pid": os.getpid(),
            "slots": self.info.slots,
            "resources": self.info.resources,
            "boot_id": self.info.boot_id,
            "rebooted": self.info.rebooted,
            "state_id": self.state.identity(),
            "running": running,
            "finished": finished,
        }
        try:
            answer = _post(client, f"{self._base}/register", body, REPORT_TIMEOUT)
        except Failure as f:
            if f.auth and not self._ever_registered:
                log.error("server %s refused the tasker token: %s", self._url, f)
                return 1
            if f.name_in_use:
                self._name_taken(f)
            self._failed(f)
            return None
        if self._refused:
            log.info("tasker name %s is ours now", self.info.name)
            self._refused = False
        self._gen += 1
        self._registered = True
        self._ever_registered = True
        hb = answer.get("heartbeat")
        if isinstance(hb, int | float) and hb > 0:
            self.heartbeat = float(hb)
        instance = answer.get("instance")
        if self._down_since is not None:
            log.info(
                "reconnected to %s after %.1f s", self._url, time.monotonic() - self._down_since
            )
            self._down_since = None
        if instance != self._instance:
            log.info(
                "registered with %s (instance %s): %d running, %d results to report",
                self._url,
                instance,
                len(running),
                len(finished),
            )
            self._instance = instance
        if self.info.boot_id and self.state.stored_boot_id() != self.info.boot_id:
            try:
                self.state.store_boot_id(self.info.boot_id)
                self.info.rebooted = False
            except OSError as e:
                log.error("cannot record boot id: %s", e)
        self.runner.all_due()
        self._handle(answer, running, finished)
        return None

    def _name_taken(self, f: Failure) -> None:
        """Another live session holds our name: say so once, and kill what we still run.

        Whatever we run under the name was dispatched to our session (the attempts and the
        secret share the state dir), so the other session took the name over, and that
        takeover recovered every one of our attempts: they are superseded.
        """
        stale = [wire.attempt_key(a) for a in self.runner.running_attempts()]
        for key in stale:
            self.runner.kill(key)
        if self._refused:
            log.debug("tasker name still in use: %s", f)
            return
        self._refused = True
        wait = min(NAME_RETRY_CAP, f.retry_after or NAME_RETRY_CAP)
        log.error(
            "not registered: %s; retrying (next in about %.0f s)%s",
            f,
            wait,
            f" (killed {len(stale)} jobs superseded by that session)" if stale else "",
        )

    def _failed(self, f: Failure) -> None:
        """Drop the registration and schedule the next attempt with jittered backoff."""
        self._registered = False
        if f.transport:
            self.source.failed()
        if f.unknown and self._failures == 0:
            delay = 0.0  # the server forgot us (restart): say hello again at once
        elif f.name_in_use and f.retry_after is not None:
            # the server knows when the holder's silence would free the name
            delay = min(NAME_RETRY_CAP, f.retry_after) + random.uniform(0.0, 0.5)
        else:
            base = min(BACKOFF_CAP, BACKOFF_START * 2 ** min(self._failures, 16))
            delay = random.uniform(base / 2, base)
            if f.retry_after is not None:
                delay = max(delay, min(f.retry_after, BACKOFF_CAP))
        self._failures += 1
        self._next_try = time.monotonic() + delay
        if f.unknown:
            log.info("server forgot this tasker (%s): registering again", f)
        elif f.name_in_use:
            pass  # said once by _name_taken
        elif f.auth:
            log.error("server %s refused the tasker token: %s; retrying", self._url, f)
        elif f.status is not None and f.status < 500:
            log.error("server %s refused our request: %s; retrying", self._url, f)
        elif self._down_since is None:
            self._down_since = time.monotonic()
            n, m = self.runner.counts()
            log.warning(
                "server %s: %s; %d jobs keep running, %d results buffered, retrying",
                self._url or "?",
                f,
                n,
                m,
            )
        else:
            log.debug("still no server (%s); next try in %.1f s", f, delay)

    def _ok(self) -> None:
        self._failures = 0

    # -- sync -----------------------------------------------------------------------------

    def _report(self, started: list[dict[str, Any]], finished: list[dict[str, Any]]) -> None:
        """Send due reports now (wait=0), whether or not a long poll is out."""
        assert self._client is not None
        body = {
            "started": started,
            "finished": finished,
            "running": self.runner.running_attempts(),
            "wait": 0,
        }
        try:
            answer = _post(self._client, f"{self._base}/sync", body, REPORT_TIMEOUT)
        except Failure as f:
            self._failed(f)
            return
        self._ok()
        self.runner.sent(started, finished, RESEND_DELAY)
        self._handle(answer, started, finished)

    def _start_poll(self) -> None:
        assert self._url is not None and self._token is not None
        body = {
            "started": [],
            "finished": [],
            "running": self.runner.running_attempts(),
            "wait": self.heartbeat,
        }
        self._polling = True
        self._poll_q.put((self._gen, self._url, self._token, body, self.heartbeat + POLL_SLACK))

    def _poll_worker(self) -> None:
        """Runs the long polls on their own connection, hands answers to the main loop."""
        client: httpx.Client | None = None
        ident: tuple[str, str] | None = None
        while True:
            item = self._poll_q.get()
            if item is None:
                break
            gen, url, token, body, timeout = item
            if client is None or ident != (url, token):
                if client is not None:
                    client.close()
                client, ident = _client(url, token, self._session), (url, token)
            result: tuple[int, dict | None, Failure | None]
            try:
                result = (gen, _post(client, f"{self._base}/sync", body, timeout), None)
            except Failure as f:
                result = (gen, None, f)
            except Exception as e:  # noqa: BLE001 - the loop must learn the poll is over
                result = (gen, None, Failure(f"{type(e).__name__}: {e}", transport=True))
            with self._cond:
                self._poll_result = result
                self._cond.notify_all()
        if client is not None:
            client.close()

    def _take_poll_result(self) -> None:
        with self._cond:
            result, self._poll_result = self._poll_result, None
        if result is None:
            return
        self._polling = False
        gen, answer, failure = result
        if answer is not None:
            if gen == self._gen:
                self._ok()
            self._handle(answer, [], [])
        elif failure is not None and gen == self._gen and self._registered:
            self._failed(failure)

    def _handle(
        self, answer: dict[str, Any], started: list[dict[str, Any]], finished: list[dict[str, Any]]
    ) -> None:
        """Apply acks (of what this request carried), then kills, then dispatches."""
        try:
            acked: set[Key] = {wire.attempt_key(a) for a in answer.get("ack") or []}
            kills = [wire.attempt_key(a) for a in answer.get("kill") or []]
            dispatch = list(answer.get("dispatch") or [])
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            log.error("malformed answer from server (%s): %.200s", e, answer)
            return
        self.runner.ack(acked, started, finished)
        if answer.get("shutdown") is True and not self._shutdown:
            # a clean stop without --freeze: the server requeued our jobs (the kills
            # follow) and will not come back on its own; like Accelerator's taskers, leave
            log.info("server is shutting down without --freeze: stopping our jobs and exiting")
            self._shutdown = True
        for key in kills:
            if not self.runner.kill(key):
                log.debug("kill of %d.%d: not running here", *key)
        if dispatch:
            # one batch: the attempt records become durable together, before any report
            self.runner.start_many(dispatch)
