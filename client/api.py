"""Typed Python client for a crq server (SPEC section 4).

>>> with Client() as c:               # server and token found as SPEC section 2 says
...     job_id = c.submit(command=["make", "all"], resources="CORES/2")
...     job = c.wait(job_id)

It speaks HTTP through :mod:`crq.http11` (the standard library's socket, nothing more), so a
CLI process that submits one job starts in milliseconds. Every failure is a
:class:`CrqError` whose message is one printable line.
"""

from __future__ import annotations

import getpass
import os
import time
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import Any, NamedTuple, TypedDict, TypeVar, cast
from urllib.parse import quote, urlsplit

from crq.client import credentials, registry
from crq.client.environ import job_env
from crq.client.errors import CrashRecovery, CrqError, NotSent, Standby
from crq.client.job import Job, as_job, unknown
from crq.client.leader import Leader

from crq import __version__, http11, wire

__all__ = ["Client", "CrqError", "CrashRecovery", "Ended", "Job", "login"]

VERSION = __version__
#: Longest single long poll we ask for; the server caps it at 300 s.
LONG_POLL_MAX = 60
#: ids of one bulk control request (the server's limit, server/models.py MAX_CONTROL)
CONTROL_CHUNK = 10_000
#: After the server has answered once, how long wait()/wait_all() ride out its absence.
RECONNECT_FOR = 300.0

#: How long a submit retries through an outage (no answer, a lost connection) by default.
SUBMIT_RETRY_FOR = 120.0
#: Standbys followed in a row before their pointers are distrusted (waited on instead).
MAX_HOPS = 3

#: Failures a read-only wait retries once the server has been seen (it may be restarting).
TRANSIENT = frozenset({"unreachable", "timeout", "disconnected", "standby"})
#: Moves to another candidate within one request (standby pointers, candidates tried).
REQUEST_HOPS = 4
#: How long asking a candidate whether it leads may take.
PROBE_TIMEOUT = 3.0
#: The longest a connection may take to be made, whatever the request's timeout.
CONNECT_TIMEOUT = 5.0

#: A tasker's JSON: ``name``, ``host``, ``state``, ``slots``, ``free_slots``, ``running``…
Tasker = dict[str, Any]
#: ``GET /server``: ``mode``, ``queue``, ``pid``, ``counts``, ``recovery``, ``journal``…
ServerStatus = dict[str, Any]
Progress = Callable[[int, int, int], None]
#: Makes the connection to a URL with the given headers (tests put a fake server behind it).
Opener = Callable[[str, dict[str, str]], http11.Connection]
T = TypeVar("T")


class Ended(NamedTuple):
    """``POST /ended``: the asked jobs that have ended, the ids the server does not hold,
    and how many of the asked ones have not ended yet."""

    jobs: list[Job]
    unknown: list[int]
    pending: int


class Forgotten(TypedDict):
    id: int
    forgotten: bool


class Stopping(TypedDict):
    stopping: bool
    freeze: bool


class LogChunk(NamedTuple):
    """``GET /jobs/{id}/log``: ``data`` from the asked offset, ``offset`` to ask next, the
    file's ``size``, the job's ``state`` and whether it ``ended`` (a follower stops once it
    has read up to ``size`` of an ended job), ``missing`` (no file yet), ``source``."""

    data: bytes
    offset: int
    size: int
    state: str
    ended: bool
    missing: bool
    source: str


class SanityReport(TypedDict):
    ok: bool
    findings: list[Any]
    fixed: list[Any]


def login() -> str:
    """The user name recorded on submitted jobs."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return os.environ.get("USER") or str(os.getuid())


PERSONAL_TOKEN_PREFIX = "crq_"  # server/identity.py's TOKEN_PREFIX


class Client:
    """One keep-alive connection to a crq server, following the leader of its queue.

    ``url``/``queue``/``token`` override the resolution of SPEC section 2
    (``--server`` > ``CRQ_SERVER`` > ``CRQ_QUEUE`` > ``vnc``); the credential is chosen as
    :mod:`crq.client.credentials` says (``token`` > ``CRQ_TOKEN`` > MUNGE > registry > swd;
    ``munge=False`` skips MUNGE). ``credential`` is the one chosen, ``token`` its token if any.
    ``opener`` makes the connection to a URL (default :class:`crq.http11.Connection`; tests
    answer from a fake server through it).

    Every request follows a standby's ``leader`` pointer at once (a standby applies
    nothing), and when the connection is refused it asks the queue's other candidates
    (:meth:`find_leader`); ``url`` is where the leader was last found. ``follow=False``
    talks to ``url`` alone (``ncmgr`` addressing one server of several).
    """

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        queue: str | None = None,
        user: str | None = None,
        timeout: float = 30.0,
        *,
        follow: bool = True,
        opener: Opener | None = None,
        munge: bool = True,
    ) -> None:
        target = registry.resolve_server(url, queue)
        self.leader = Leader(target.url, target.queue, target.entry)
        self.follow = follow
        self.queue_name: str | None = target.queue
        self.credential = credentials.choose(target, token, munge=munge)
        self.token: str | None = self.credential.token
        self.user: str = user or login()
        self.timeout = timeout
        self._reached = False
        #: Requests sent (each retry counts): what a caller can check its request load by.
        self.requests_sent = 0
        #: Called with one line when a call rides out a recovery, an outage or a standby's
        #: answer (the CLI prints it).
        self.notify: Callable[[str], None] | None = None
        headers = {"Accept": "application/json", "User-Agent": f"crq-client/{VERSION}"}
        if self.token and not self.token.startswith(PERSONAL_TOKEN_PREFIX):
            # the admin token acts for a user; MUNGE and personal tokens say who they are
            headers[wire.USER_HEADER] = self.user
        if self.token:  # the same with every request; a MUNGE credential is made per request
            headers["Authorization"] = f"Bearer {self.token}"
        self._headers = headers
        self._opener = opener
        self._conn = self._open(self.url)

    # -- plumbing -------------------------------------------------------------------------

    def close(self) -> None:
        self._conn.close()

    def _open(self, url: str) -> http11.Connection:
        """A (lazy) keep-alive connection to ``url``; no proxy, whatever HTTP_PROXY says: a
        job queue on the LAN must not be routed through one."""
        if self._opener is not None:
            return self._opener(url, self._headers)
        connect = min(self.timeout, CONNECT_TIMEOUT)
        try:
            return http11.Connection(
                url, self._headers, timeout=self.timeout, connect_timeout=connect
            )
        except ValueError as e:  # a registry or a pointer with no usable URL
            raise CrqError(f"no server URL: {e}", code="usage") from None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        """The URL in use: where the leader was last found."""
        return self.leader.url

    @url.setter
    def url(self, value: str) -> None:
        """Talk to ``value`` from now on (as a standby's pointer or a found leader does)."""
        self._move(value)

    @property
    def name(self) -> str:
        """How messages name the server: ``queue vnc`` or ``the crq server``."""
        return f"queue {self.queue_name}" if self.queue_name else "the crq server"

    def _hint(self) -> str:
        if self.queue_name == wire.DEFAULT_QUEUE:
            return "ncmgr start"
        if self.queue_name:
            return f"ncmgr start --queue {self.queue_name}"
        return "ncmgr start"

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        timeout: float | None = None,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        raw: bool = False,
    ) -> Any:
        """Send one request under ``/api/v1`` (or an absolute path); return the decoded JSON
        (``raw``: the :class:`crq.http11.Response` of a success, for a body that is no JSON).

        Follows the leader: a standby's pointer at once; on a refused connection (nothing
        was sent) or, for a read, a connection lost mid-request, the other candidates."""
        send = partial(
            self._send, method, path, json=json, params=params, timeout=timeout,
            content=content, headers=headers, raw=raw,
        )  # fmt: skip
        if not self.follow:
            return send()
        hops = 0
        while True:
            try:
                answer = send()
            except Standby as e:
                if hops >= REQUEST_HOPS:
                    raise
                hops += 1
                if e.leader and self._follow(e.leader):
                    continue  # nothing was done: ask the leader now
                if self.find_leader() is not None:
                    continue
                raise
            except CrqError as e:
                lost_read = e.code == "disconnected" and method in ("GET", "HEAD")
                if hops >= REQUEST_HOPS or not (isinstance(e, NotSent) or lost_read):
                    raise
                hops += 1
                if self.find_leader() is None:
                    raise
                continue
            self.leader.answered()
            return answer

    def find_leader(self) -> str | None:
        """Ask the queue's other candidates which one leads (a standby's pointer counts);
        move there and return its URL, or None when none of them answers as the leader.

        For the retry loops (the waits, the idempotent submits): it sends nothing but
        ``GET /api/v1/server``, so it is safe whatever the request was."""
        for url in self.leader.others():
            info = self.probe(url)
            if info is None:
                continue
            if info.get("mode") == wire.MODE_STANDBY:
                # a candidate of the queue answered: the queue exists, in an election
                # perhaps, so the retry loops ride it out as an outage, not "not started"
                self._reached = True
                pointer = info.get("leader")
                if (
                    isinstance(pointer, str)
                    and pointer.startswith(("http://", "https://"))
                    and pointer.rstrip("/") != self.url.rstrip("/")  # not the one that failed
                ):
                    self._move(pointer)
                    return self.url
                continue
            if info.get("mode") in (wire.MODE_NORMAL, wire.MODE_RECOVERING):
                self._move(url)
                return self.url
        return None

    def probe(self, url: str, timeout: float = PROBE_TIMEOUT) -> ServerStatus | None:
        """``GET /api/v1/server`` of the server at ``url`` (none other, no following): its
        status, or None when it does not answer it."""
        here = url.rstrip("/") == self._conn.url
        try:
            conn = self._conn if here else self._open(url.rstrip("/"))
        except CrqError:
            return None
        try:
            r = conn.request(
                "GET",
                f"{wire.API}/server",
                headers=self._signed(None) or None,
                timeout=timeout,
                connect_timeout=min(timeout, CONNECT_TIMEOUT),
            )
            info = r.json() if r.status == 200 else None
        except (http11.TransportError, ValueError):
            return None
        finally:
            if not here:
                conn.close()
        return info if isinstance(info, dict) else None

    def _signed(self, headers: dict[str, str] | None) -> dict[str, str]:
        """``headers`` plus this request's own MUNGE credential, when the client uses MUNGE."""
        extra = dict(headers or {})
        if self.credential.via == credentials.MUNGE:
            extra["Authorization"] = self.credential.authorization() or ""
        return extra

    def _move(self, url: str) -> None:
        self.leader.moved(url)
        if self._conn.url != self.url:
            self._conn.close()
            self._conn = self._open(self.url)

    def _send(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        timeout: float | None = None,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        raw: bool = False,
    ) -> Any:
        """One request to the URL in use."""
        target = path if path.startswith("/") else f"{wire.API}/{path}"
        body = content
        extra = self._signed(headers)
        self.requests_sent += 1
        if json is not None and content is None:
            body = http11.dumps(json)
            extra.setdefault("Content-Type", "application/json")
        try:
            response = self._conn.request(
                method,
                target,
                body=body,
                headers=extra or None,
                params=params,
                timeout=timeout,
                connect_timeout=None if timeout is None else min(timeout, CONNECT_TIMEOUT),
            )
        except http11.TransportError as e:
            raise self._transport_error(e, method, timeout) from None
        self._reached = True
        if response.status >= 400:
            raise self._error(response)
        if raw:
            return response
        if not response.body:
            return None
        try:
            return response.json()
        except ValueError:
            raise CrqError(
                f"{self.name} at {self.url} sent a reply that is not JSON (HTTP {response.status})",
                status=response.status,
                code="bad_reply",
            ) from None

    def _transport_error(
        self, e: http11.TransportError, method: str, timeout: float | None
    ) -> CrqError:
        """The CrqError of a request without an answer: not sent (another candidate may be
        asked), timed out, or a connection lost mid-request."""
        if not e.sent:
            if e.timed_out:
                return NotSent(f"cannot reach {self.name} at {self.url}: connection timed out")
            return NotSent(self._unreachable(e))
        if e.timed_out:
            used = timeout if timeout is not None else self.timeout
            return CrqError(
                f"{self.name} at {self.url} did not answer within {used:g} s", code="timeout"
            )
        # Connected, then the server went away (crash, restart) mid-request.
        self._reached = True
        maybe = (
            "; the request may or may not have been applied, check before retrying"
            if method not in ("GET", "HEAD")
            else ""
        )
        reason = " ".join(str(e).split()).rstrip(".") or type(e).__name__
        return CrqError(
            f"lost the connection to {self.name} at {self.url}: {reason}{maybe}",
            code="disconnected",
        )

    def _unreachable(self, e: Exception) -> str:
        text = str(e)
        low = text.lower()
        if "refused" in low:
            reason = "connection refused"
        elif "name or service" in low or "nodename" in low or "name resolution" in low:
            reason = "unknown host"
        elif "no route" in low or "unreachable" in low:
            reason = "host unreachable"
        else:
            reason = text or type(e).__name__
        where = f"cannot reach {self.name} at {self.url}"
        return f"{where}: {reason} — is it started? try: {self._hint()}"

    def _error(self, response: http11.Response) -> CrqError:
        status = response.status
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            body = {}
        code = str(body.get("error") or f"http_{status}")
        message = str(body.get("message") or response.reason or f"HTTP {status}")
        message = " ".join(message.split())  # always one line
        try:
            retry_after = float(response.header("Retry-After") or "5")
        except ValueError:
            retry_after = 5.0
        if status == 503 and code == "standby":
            leader = body.get("leader")
            return Standby(
                message,
                leader=leader.rstrip("/") if isinstance(leader, str) and leader else None,
                retry_after=retry_after,
            )
        if status == 503 and code == "crash_recovery":
            recovery = body.get("recovery")
            return CrashRecovery(
                message,
                retry_after=retry_after,
                recovery=recovery if isinstance(recovery, dict) else None,
                queue=self.queue_name,
            )
        if status == 401:
            message = f"{message} ({self._refused_hint()})"
        elif status == 403 and not body.get("rule"):  # a server with roles names its rule
            message = f"{message} (this needs the admin token)"
        return CrqError(message, status=status, code=code)

    def _refused_hint(self) -> str:
        cred = self.credential
        if cred.via == credentials.MUNGE:
            return (
                f"the server refused the MUNGE credential of {cred.source}; "
                "or give a token: CRQ_TOKEN or --token-file"
            )
        if cred.via == credentials.NONE:
            return f"no token: set CRQ_TOKEN, or register {self.name} with ncmgr start"
        if cred.source == "CRQ_TOKEN":
            return f"check CRQ_TOKEN: it is not a token of {self.name}"
        return f"check the token ({cred.source}) used for {self.name}, or set CRQ_TOKEN"

    def _object(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        """:meth:`request` for an endpoint that answers a JSON object."""
        answer = self.request(method, path, **kwargs)
        if not isinstance(answer, dict):
            raise CrqError(
                f"{self.name} at {self.url} sent a reply that is not a JSON object",
                code="bad_reply",
            )
        return answer

    def _riding_out(
        self,
        deadline: float | None,
        call: Callable[..., T],
        *args: Any,
        outage_for: float = RECONNECT_FOR,
        unseen: bool = False,
        waiting: str = "still waiting",
    ) -> T:
        """Run ``call``, retrying through crash recovery, through a standby's answer (at once,
        at the leader it names) and, once the server has been seen (with ``unseen``: also
        before), through an outage of up to ``outage_for`` seconds. Only for calls that are
        safe to repeat: the read-only waits, and submits under an Idempotency-Key."""
        lost_since: float | None = None
        told = ""
        hops = 0
        while True:
            try:
                return call(*args)
            except CrashRecovery as e:
                lost_since, hops = None, 0
                pause = min(max(e.retry_after, 0.5), 5.0)
                if self.notify and told != "recovery":
                    self.notify(f"{e.summary()}; {waiting}")
                    told = "recovery"
            except Standby as e:
                hops += 1
                if e.leader and hops <= MAX_HOPS and self._follow(e.leader):
                    told = ""
                    continue  # nothing was done: ask the leader now
                # no leader known yet (an election), or standbys naming each other: an outage
                now = time.monotonic()
                lost_since = lost_since or now
                if now - lost_since >= outage_for:
                    raise
                pause = min(max(e.retry_after, 0.5), 5.0)
                if self.notify and told != "standby":
                    self.notify(f"{e.message}; {waiting}")
                    told = "standby"
            except CrqError as e:
                transient = e.code in TRANSIENT or (e.status or 0) in (500, 502, 503, 504)
                if not transient or not (self._reached or unseen):
                    raise
                hops = 0
                now = time.monotonic()
                lost_since = lost_since or now
                if now - lost_since >= outage_for:
                    raise
                pause = 1.0
                if self.notify and told != "lost":
                    self.notify(f"{e.message}; retrying for up to {outage_for:.0f} s")
                    told = "lost"
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CrqError(f"timed out waiting for {self.name}", code="timeout")
                pause = min(pause, left)
            time.sleep(pause)

    def _follow(self, leader: str) -> bool:
        """Talk to ``leader`` from now on (a standby named it); False if it is no usable URL
        or the one in use."""
        url = leader.strip().rstrip("/")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or url == self.url:
            return False
        if self.notify:
            self.notify(f"{self.name} at {self.url} is a standby; following the leader at {url}")
        self._move(url)
        return True

    # -- jobs -----------------------------------------------------------------------------

    @staticmethod
    def _spec(spec: dict[str, Any] | None, fields: dict[str, Any]) -> dict[str, Any]:
        body = {**(spec or {}), **fields}
        if "command" not in body and "script" not in body:
            raise CrqError("a job needs a command (or a script)", code="usage")
        body.setdefault("cwd", os.getcwd())
        if body.get("after"):  # job ids alone mean afterok, as `crq submit --after`
            body["after"] = [
                {"type": "afterok", "job": a} if isinstance(a, int) else a for a in body["after"]
            ]
        return body

    def submit(
        self,
        spec: dict[str, Any] | None = None,
        /,
        *,
        idempotency_key: str | None = None,
        retry_for: float = SUBMIT_RETRY_FOR,
        export_env: str | bool = False,
        **fields: Any,
    ) -> int:
        """Submit one job (spec dict and/or keyword fields); return its id once durable.

        ``cwd`` defaults to this process's cwd; ``env`` is sent only if given, or with
        ``export_env``: True or ``"all"`` sends this process's environment as ``crq submit``
        does (without tokens; ``env`` entries win), ``"VAR,VAR"`` those variables.
        Retried as :meth:`submit_many` is.
        """
        body = self._spec(spec, fields)
        if export_env:
            body["env"] = self._export(export_env, body.get("env"), str(body["cwd"]))
        return self._submit(body, idempotency_key, retry_for)[0]

    @staticmethod
    def _export(mode: str | bool, given: dict[str, str] | None, cwd: str) -> dict[str, str]:
        """``export_env``'s environment: this process's (``True``/``all``), or the named
        variables, under the ``given`` entries."""
        how = "all" if mode is True else str(mode)
        return job_env(how, (given or {}).items(), cwd)

    def submit_many(
        self,
        specs: Iterable[dict[str, Any]],
        env: dict[str, str] | None = None,
        *,
        idempotency_key: str | None = None,
        retry_for: float = SUBMIT_RETRY_FOR,
        export_env: str | bool = False,
    ) -> list[int]:
        """Submit a batch in one request: all accepted or none. ``env`` is the batch's default
        environment, sent once instead of with every job; ``export_env`` adds this process's
        environment under it, as :meth:`submit` says.

        The request carries an Idempotency-Key (``idempotency_key``, else a new random one),
        so it is retried as it is, and queued once, through crash recovery, a standby's
        answer (at the leader it names) and an outage of up to ``retry_for`` seconds (no
        answer, a lost connection). A refusal (4xx) is raised at once.
        """
        jobs = [self._spec(s, {}) for s in specs]
        if not jobs:
            return []
        body: dict[str, Any] = {"jobs": jobs}
        if export_env:
            env = self._export(export_env, env, os.getcwd())
        if env is not None:
            body["env"] = env
        return self._submit(body, idempotency_key, retry_for)

    def _submit(self, body: dict[str, Any], key: str | None, retry_for: float) -> list[int]:
        key = os.urandom(16).hex() if key is None else key  # (uuid costs 2.5 ms to import)
        if not wire.valid_idempotency_key(key):
            raise CrqError(f"idempotency_key: {wire.IDEMPOTENCY_KEY_RULE}", code="usage")
        # encoded once: every retry sends the very bytes the key was first sent with
        content = http11.dumps(body)
        headers = {wire.IDEMPOTENCY_HEADER: key, "Content-Type": "application/json"}
        post = partial(self._object, "POST", "jobs", content=content, headers=headers)
        answer = self._riding_out(
            None, post, outage_for=retry_for, unseen=True, waiting="waiting to submit"
        )
        return [int(i) for i in answer["ids"]]

    def get(self, job_id: int) -> Job:
        return as_job(self._object("GET", f"jobs/{int(job_id)}"))

    def queue(self) -> list[int]:
        """Ids of the queued jobs, in dispatch order."""
        return [int(i) for i in self._object("GET", "queue")["ids"]]

    def stop(self, job_id: int) -> Job:
        return as_job(self._object("POST", f"jobs/{int(job_id)}/stop"))

    def control(self, action: str, ids: Iterable[int]) -> Iterator[dict[str, Any]]:
        """``action`` (stop, rerun, hold, release, forget) on every id, 10,000 a request: per
        id, in order, ``{"id", "status": 200, "state", ...}`` or ``{"id", "status", "error",
        "message"}`` (what that id's own route would have answered)."""
        chunk: list[int] = []
        for job_id in ids:
            chunk.append(int(job_id))
            if len(chunk) == CONTROL_CHUNK:
                yield from self._control(action, chunk)
                chunk = []
        if chunk:
            yield from self._control(action, chunk)

    def _control(self, action: str, ids: list[int]) -> list[dict[str, Any]]:
        answer = self._object("POST", "control", json={"action": action, "ids": ids})
        return list(answer.get("results") or [])

    def rerun(self, job_id: int) -> Job:
        return as_job(self._object("POST", f"jobs/{int(job_id)}/rerun"))

    def hold(self, job_id: int) -> Job:
        """Keep a queued or waiting job from dispatch, at its place in the queue."""
        return as_job(self._object("POST", f"jobs/{int(job_id)}/hold"))

    def release(self, job_id: int) -> Job:
        return as_job(self._object("POST", f"jobs/{int(job_id)}/release"))

    def forget(self, job_id: int) -> Forgotten:
        return cast(Forgotten, self._object("DELETE", f"jobs/{int(job_id)}"))

    def log(self, job_id: int, offset: int = 0, size: int | None = None) -> LogChunk:
        """A chunk of the job's log from ``offset`` (at most ``size`` bytes; the server's
        default 64 KiB, 1 MiB at most) and what a follower needs to go on (:class:`LogChunk`).
        """
        params = {"offset": int(offset), "max": None if size is None else int(size)}
        r = self.request("GET", f"jobs/{int(job_id)}/log", params=params, raw=True)

        def number(name: str, default: int) -> int:
            try:
                return int(r.header(name) or default)
            except ValueError:
                return default

        data = bytes(r.body)
        return LogChunk(
            data=data,
            offset=number("X-Crq-Log-Offset", offset + len(data)),
            size=number("X-Crq-Log-Size", offset + len(data)),
            state=r.header("X-Crq-Job-State") or "unknown",
            ended=r.header("X-Crq-Job-Ended") == "1",
            missing=r.header("X-Crq-Log-Missing") == "1",
            source=r.header("X-Crq-Log-Source") or "",
        )

    def _wait_once(self, job_id: int, seconds: float) -> Job:
        poll = round(max(0.05, min(float(LONG_POLL_MAX), seconds)), 2)
        answer = self._object(
            "GET",
            f"jobs/{int(job_id)}/wait",
            params={"timeout": poll},
            timeout=poll + max(10.0, self.timeout),
        )
        return as_job(answer)

    def ended(
        self, ids: Iterable[int], timeout: float = 0.0, newer_than: int | None = None
    ) -> Ended:
        """Which of ``ids`` have ended: at once if any has (or the server does not hold
        one), else after a long poll of up to ``timeout`` seconds (60 at most a request)
        that also returns when any job above ``newer_than`` ends. One request for any
        number of jobs: what :class:`crq.client.Executor` watches its futures with. Not
        retried: wrap it as the caller needs (:meth:`wait_all` rides out outages)."""
        poll = round(max(0.0, min(float(LONG_POLL_MAX), timeout)), 2)
        body: dict[str, Any] = {"ids": [int(i) for i in ids]}
        if newer_than is not None:
            body["newer_than"] = int(newer_than)
        answer = self._object(
            "POST",
            "ended",
            json=body,
            params={"timeout": poll},
            timeout=poll + max(10.0, self.timeout),
        )
        return Ended(
            jobs=[as_job(j) for j in answer.get("jobs") or []],
            unknown=[int(i) for i in answer.get("unknown") or []],
            pending=int(answer.get("pending") or 0),
        )

    def wait(self, job_id: int, timeout: float | None = None) -> Job:
        """Block until the job is final (done/failed/stopped/lost) or ``timeout`` passes;
        return its latest JSON either way (check ``job["state"]``). Rides out a server crash
        recovery or restart."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = LONG_POLL_MAX if deadline is None else deadline - time.monotonic()
            job = self._riding_out(deadline, self._wait_once, job_id, left)
            if job.state in wire.FINAL_STATES:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                return job

    def wait_all(
        self,
        ids: Iterable[int],
        progress: Progress | None = None,
        timeout: float | None = None,
    ) -> dict[int, Job]:
        """Wait for many jobs; return ``{id: latest job JSON}``.

        Every ``interval`` seconds (1 s, stretching to 5 s while nothing finishes) the states are
        refreshed by paging through the id range of the unfinished jobs (one request per 1000);
        in between, the newest unfinished job is long-polled, and its end triggers a refresh, so
        the end of a batch is noticed at once at the cost of a few requests a second.
        ``progress(done, failed, total)`` is called whenever the count changes (``failed``
        counts every final state but done). An id the server does not know ends as
        ``{"id": id, "state": "unknown"}``.
        """
        return _BatchWait(self, ids, progress, timeout).run()

    def _refresh(self, pending: list[int], results: dict[int, Job]) -> None:
        """Update ``results`` for every id in ``pending``: page through the id range when it is
        dense, GET each job when it is sparse."""
        lo, hi = pending[0], pending[-1]
        span = hi - lo + 1
        want = set(pending)
        seen: set[int] = set()
        if span <= 3 * len(pending) + 1000:
            after: int | None = lo - 1
            while after is not None and after < hi:
                page = self.request(
                    "GET", "jobs", params={"after": after, "limit": min(1000, hi - after)}
                )
                jobs = page.get("jobs") or []
                for job in jobs:
                    jid = int(job["id"])
                    if jid in want:
                        results[jid] = as_job(job)
                        seen.add(jid)
                nxt = page.get("next")
                if nxt is None:
                    break
                after = int(nxt)
            missing = [i for i in pending if i not in seen]
        else:
            missing = pending
        for jid in missing:
            try:
                results[jid] = self.get(jid)
            except CrqError as e:
                if e.status != 404:
                    raise
                results[jid] = unknown(jid, "not found")

    def states(self, ids: Iterable[int]) -> dict[int, str]:
        """The state of each of ``ids`` the server holds (a forgotten id is left out), in one
        ``GET /api/v1/jobs`` page over their id range while it spans at most 10,000 ids: a
        workflow engine checks all of its jobs in one request a round."""
        want = sorted({int(i) for i in ids})
        out: dict[int, str] = {}
        if not want:
            return out
        keep = set(want)
        hi = want[-1]
        after: int | None = want[0] - 1
        while after is not None and after < hi:
            page = self.request(
                "GET", "jobs", params={"after": after, "limit": min(10_000, hi - after)}
            )
            for job in page.get("jobs") or []:
                jid = int(job["id"])
                if jid in keep:
                    out[jid] = str(job.get("state"))
            nxt = page.get("next")
            after = None if nxt is None else int(nxt)
        return out

    # -- identity (SPEC section 9) --------------------------------------------------------

    def whoami(self) -> dict[str, Any]:
        """Who the server takes this client for: ``user``, ``role``, ``via`` (munge, token or
        admin_token), ``groups``, ``may`` (what the role allows)."""
        return self._object("GET", "whoami")

    def issue_token(
        self,
        user: str | None = None,
        role: str | None = None,
        expires: float | None = None,
        note: str | None = None,
    ) -> dict[str, Any]:
        """A new personal token (``user`` None: for the caller itself): ``{"id", "token",
        "user", "role", "expires"}``; the server shows the token text this once only."""
        body = {"user": user, "role": role, "expires": expires, "note": note}
        return self._object("POST", "tokens", json=body)

    def tokens(self) -> list[dict[str, Any]]:
        """The personal tokens the caller may see (an admin: all), without their secrets."""
        return list(self._object("GET", "tokens")["tokens"])

    def revoke_token(self, token_id: str) -> dict[str, Any]:
        return self._object("DELETE", f"tokens/{quote(token_id, safe='')}")

    # -- server ---------------------------------------------------------------------------

    def taskers(self) -> list[Tasker]:
        return list(self._object("GET", "taskers")["taskers"])

    def server(self) -> ServerStatus:
        """Server status; answered even during crash recovery."""
        return self._object("GET", "server")

    def stop_server(self, freeze: bool = False) -> Stopping:
        """Ask for a clean stop (``freeze``: taskers keep their jobs for the next server)."""
        answer = self._object("POST", "server/stop", json={"freeze": bool(freeze)})
        return cast(Stopping, answer)

    def sanity(self, fix: bool = False) -> SanityReport:
        """Run the global sanity check: ``{"ok", "findings", "fixed"}``."""
        answer = self._object("POST", "server/sanity", params={"fix": 1 if fix else 0})
        return cast(SanityReport, answer)

    def failover(self, to: str | None = None) -> dict[str, Any]:
        """Ask the leader to hand over to a standby (on host ``to``, if given): 202
        ``{"handing_over": true, "to": …}``; 409 ``no_standby`` when there is none."""
        return self._object("POST", "server/failover", json={"to": to})

    def health(self, timeout: float = 0.5) -> dict[str, Any] | None:
        """``/healthz``'s JSON (a standby's says ``"mode": "standby"``), or None when the
        process does not answer within ``timeout`` seconds."""
        try:
            r = self._conn.request("GET", "/healthz", timeout=timeout, connect_timeout=timeout)
            body = r.json() if r.status == 200 else None
        except (http11.TransportError, ValueError):
            return None
        return body if isinstance(body, dict) else None

    def healthz(self, timeout: float = 0.5) -> bool:
        """True when the server process answers ``/healthz`` within ``timeout`` seconds."""
        try:
            r = self._conn.request("GET", "/healthz", timeout=timeout, connect_timeout=timeout)
        except http11.TransportError:
            return False
        return r.status == 200

    def history(
        self,
        user: str | None = None,
        state: str | None = None,
        since: float | str | None = None,
        until: float | str | None = None,
        name: str | None = None,
        limit: int | None = None,
        *,
        after: int | None = None,
        page_size: int = 1000,
    ) -> Iterator[Job]:
        """Jobs that left the queue (the accounting history), oldest id first, page after
        page; ``since``/``until``: epoch seconds or ISO dates; ``name``: a glob."""
        count = 0
        while True:
            size = page_size if limit is None else min(page_size, limit - count)
            if size <= 0:
                return
            params = {"user": user, "state": state, "since": since, "until": until}
            params |= {"name": name, "limit": size, "after": after}
            page = self.request("GET", "history", params=params)
            for job in page.get("jobs") or []:
                yield as_job(job)
                count += 1
                if limit is not None and count >= limit:
                    return
            nxt = page.get("next")
            if nxt is None:
                return
            after = int(nxt)

    # Last, so that ``list`` in the annotations above still means the builtin.
    def list(
        self,
        state: str | None = None,
        user: str | None = None,
        limit: int | None = None,
        *,
        after: int | None = None,
        page_size: int = 1000,
        array: int | None = None,
        newest_first: bool = False,
    ) -> Iterator[Job]:
        """Every matching job (without env/attempts), oldest first (or ``newest_first``),
        fetching page after page; ``limit`` caps the total, so ``crq list -n 20`` costs one
        page however many jobs there are; ``array``: the elements of that array only."""
        count = 0
        before: int | None = None
        while True:
            size = page_size if limit is None else min(page_size, limit - count)
            if size <= 0:
                return
            params: dict[str, Any] = {
                "state": state,
                "user": user,
                "limit": size,
                "after": after,
                "array": array,
            }
            if newest_first:
                params.update(order="desc", before=before)
            page = self.request("GET", "jobs", params=params)
            for job in page.get("jobs") or []:
                yield as_job(job)
                count += 1
                if limit is not None and count >= limit:
                    return
            nxt = page.get("next")
            if nxt is None:  # a short or empty page with a next: the server paused its scan
                return
            if newest_first:
                before = int(nxt)
            else:
                after = int(nxt)


def _final(job: Job | None) -> bool:
    if not job:
        return False
    state = job.get("state")
    return state in wire.FINAL_STATES or state == "unknown"


class _BatchWait:
    """One :meth:`Client.wait_all`: what is known of each job, the counts, what is still
    pending and the pace of the refreshes."""

    def __init__(
        self, client: Client, ids: Iterable[int], progress: Progress | None, timeout: float | None
    ) -> None:
        self.client = client
        self.progress = progress
        self.wanted = sorted({int(i) for i in ids})
        self.total = len(self.wanted)
        self.results: dict[int, Job] = {}
        self.done = 0
        self.failed = 0  # every final state but done
        self.pending = list(self.wanted)
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.interval = 1.0
        self.next_refresh = 0.0

    def run(self) -> dict[int, Job]:
        while self.pending:
            if len(self.pending) > 1 and time.monotonic() >= self.next_refresh:
                self.refresh()
                if not self.pending:
                    break
            if self.deadline is not None and time.monotonic() >= self.deadline:
                break
            if not self.block_on_newest():
                break
        return {i: self.results.get(i) or unknown(i) for i in self.wanted}

    def record(self, job: Job) -> bool:
        """Store a job; count it the first time it is final; True if it is final."""
        jid = int(job["id"])
        was_final = _final(self.results.get(jid))
        self.results[jid] = job
        if _final(job) and not was_final:
            if job.get("state") == wire.DONE:
                self.done += 1
            else:
                self.failed += 1
            return True
        return _final(job)

    def refresh(self) -> None:
        """Fetch every pending job; refresh sooner while jobs finish, later while none do."""
        before = self.done + self.failed
        fresh: dict[int, Job] = {}
        client = self.client
        client._riding_out(self.deadline, client._refresh, self.pending, fresh)
        for job in fresh.values():
            self.record(job)
        self.pending = [i for i in self.pending if not _final(self.results.get(i))]
        grew = self.done + self.failed > before
        self.interval = 1.0 if grew else min(self.interval * 1.5, 5.0)
        self.next_refresh = time.monotonic() + self.interval
        if grew or before == 0:
            self._report()

    def block_on_newest(self) -> bool:
        """Long-poll the newest pending job until the next refresh is due: it tends to finish
        last, so when it does the batch is probably over and a refresh right away finds out.
        False when the wait is over (its deadline passed)."""
        target = self.pending[-1]
        block = float(LONG_POLL_MAX)
        if len(self.pending) > 1:
            block = max(0.05, self.next_refresh - time.monotonic())
        if self.deadline is not None:
            block = min(block, max(self.deadline - time.monotonic(), 0.05))
        client = self.client
        try:
            job = client._riding_out(self.deadline, client._wait_once, target, block)
        except CrqError as e:
            if e.status != 404:
                if e.code == "timeout" and self.deadline is not None:
                    return False
                raise
            job = unknown(target, "not found")
        if self.record(job):
            self.pending.pop()
            self.next_refresh = 0.0
            self._report()
        return True

    def _report(self) -> None:
        if self.progress:
            self.progress(self.done, self.failed, self.total)
