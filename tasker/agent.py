"""Talk to the server: register, then report and long-poll until told to stop.

Two keep-alive connections: one carries the long poll (``wait`` = heartbeat) that brings
dispatches and kills, the other sends reports at once (``wait`` = 0) even while the long
poll is out, because a finished job should free its slot now, not at the next heartbeat.
All answers are handled on the main thread, so job state changes in one place.

Every answer passes the epoch fence first (:meth:`Agent._admit`): one from a lower leader
epoch than the highest seen is a deposed leader's, and nothing in it is acted on, acks
included (what a deposed leader wrote does not survive the new leader's replay).
"""

from __future__ import annotations

import base64
import logging
import os
import queue
import random
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from crq.tasker.link import (
    BadAnswer,
    Deposed,
    Failure,
    NameInUse,
    Refused,
    RetryLater,
    ServerSource,
    SourceError,
    Standby,
    TokenRefused,
    UnknownTasker,
    Unreachable,
    open_client,
    post,
)
from crq.tasker.outbox import Kind
from crq.tasker.runner import Runner
from crq.tasker.statedir import Key, StateDir

from crq import http11, logread, wire

log = logging.getLogger("crq.tasker")

BACKOFF_START = 0.2
BACKOFF_CAP = 30.0
# A restart or a takeover answers again within about a second: for the first seconds of an
# outage a refused connection is tried again every 0.1-0.2 s (it costs the server's host
# only a reset), so the queue is back to normal as soon as it answers; then the backoff grows.
FAST_RETRY_FOR = 5.0
NAME_RETRY_CAP = 10.0  # a name in use may be freed by the operator (cleanup --dead-host)
# A report answers in milliseconds (the server holds it only for an fsync); a server that
# has not answered in this long is hung or gone (SIGSTOP, a cut link): try where the
# leader is now. Reports are fenced by attempt, so sending one again is harmless.
REPORT_TIMEOUT = 5.0
POLL_SLACK = 5.0  # past the heartbeat a long poll may last
RESEND_DELAY = 1.0
# Reports at most this often: a lone job's report goes out at once, a busy tasker's
# reports of many jobs share one request (the server's cost is per request, not per job).
REPORT_SPACING = 0.005
STARTED_WAIT = 0.002  # a start report waits this long for its job's end: one request for both
MAX_HOPS = 5  # standby pointers followed at once in a row; then at the standby's pace


@dataclass(frozen=True)
class PollRequest:
    """One long poll for the poll thread: where to, what, and under which registration."""

    gen: int
    url: str
    token: str
    body: dict[str, Any]
    timeout: float


@dataclass(frozen=True)
class PollResult:
    """A long poll's outcome for the main loop: its answer, or why there is none."""

    gen: int
    answer: dict[str, Any] | None
    failure: Failure | None


@dataclass
class TaskerInfo:
    name: str
    slots: int
    resources: str
    heartbeat: float
    boot_id: str
    rebooted: bool


class Agent:
    """The tasker's protocol loop (see client/wire.py for the messages)."""

    def __init__(
        self, info: TaskerInfo, source: ServerSource, runner: Runner, state: StateDir
    ) -> None:
        self.info = info
        self.source = source
        self.runner = runner
        self.outbox = runner.outbox
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
        self._client: http11.Connection | None = None
        self._instance: Any = None
        self._failures = 0
        self._hops = 0  # standby pointers followed since the last registration
        # the highest leader epoch seen, and of which queue (see _admit)
        self._epoch, self._queue_id = state.stored_epoch(), state.stored_queue()
        self._next_try = 0.0
        self._down_since: float | None = None
        self._shutdown = False
        self._polling = False
        self._poll_result: PollResult | None = None
        self._poll_q: queue.Queue[PollRequest | None] = queue.Queue()
        self._last_report = 0.0
        # log reads the server asked for (answered by the logs thread, one at a time)
        self._log_q: queue.Queue[dict[str, Any] | None] = queue.Queue()
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
        threading.Thread(target=self._log_worker, name="logs", daemon=True).start()
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
            self._log_q.put(None)
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
        if self.outbox.has_due():
            spaced = self._last_report + REPORT_SPACING
            with self._cond:
                self._cond.wait_for(
                    lambda: (
                        self._stopping
                        or (self.outbox.has_due(Kind.FINISHED) and time.monotonic() >= spaced)
                    ),
                    timeout=max(spaced - time.monotonic(), STARTED_WAIT),
                )
            started, finished = self.outbox.reports()  # what came meanwhile goes too
            self._last_report = time.monotonic()
            self._report(started, finished)
            return None
        if not self._polling:
            self._start_poll()
        with self._cond:
            due = self.outbox.next_due_in()
            self._cond.wait_for(
                lambda: self._stopping or self._poll_result is not None or self.outbox.has_due(),
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
        started, finished = self.outbox.reports(everything=True)
        if (started or finished) and self._registered and self._client is not None:
            body = {"started": started, "finished": finished, "running": [], "wait": 0}
            try:
                answer = post(self._client, f"{self._base}/sync", body, 2.0)
                if self._admit(answer) is not None:
                    return
                acked = {wire.attempt_key(a) for a in answer.get("ack") or []}
            except (Failure, TypeError, ValueError, KeyError, AttributeError):
                return
            self.outbox.ack(acked, started, finished)

    def _sleep(self, seconds: float) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._stopping, timeout=max(0.0, seconds))

    # -- registration ---------------------------------------------------------------------

    def _connect(self) -> http11.Connection:
        url, token = self.source.resolve()
        if self._client is None or (url, token) != (self._url, self._token):
            if self._client is not None:
                self._client.close()
            self._client = open_client(url, token, self._session)
            self._url, self._token = url, token
        return self._client

    def _register(self) -> int | None:
        """One registration attempt; an exit code if the tasker must give up, else None."""
        try:
            client = self._connect()
        except SourceError as e:
            self._failed(Unreachable(str(e)))
            return None
        running = self.runner.running()
        _, finished = self.outbox.reports(everything=True)
        body = {
            "host": self.host,
            "pid": os.getpid(),
            "slots": self.info.slots,
            "resources": self.info.resources,
            "boot_id": self.info.boot_id,
            "rebooted": self.info.rebooted,
            "state_id": self.state.identity(),
            "running": running,
            # not root: it runs only its own user's jobs, and the server sends it no others
            **({"user": self.runner.owners.my_name} if self.runner.owners.me != 0 else {}),
            "finished": finished,
        }
        try:
            answer = post(client, f"{self._base}/register", body, REPORT_TIMEOUT)
        except Failure as f:
            if isinstance(f, TokenRefused) and not self._ever_registered:
                log.error("server %s refused the tasker token: %s", self._url, f)
                return 1
            if isinstance(f, NameInUse):
                self._name_taken(f)
            self._failed(f)
            return None
        fenced = self._admit(answer)
        if fenced is not None:
            self._failed(fenced)
            return None
        self._hops = 0
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
        self.outbox.all_due()
        self._handle(answer, running, finished)
        return None

    def _name_taken(self, f: NameInUse) -> None:
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
        wait = min(NAME_RETRY_CAP, f.after or NAME_RETRY_CAP)
        log.error(
            "not registered: %s; retrying (next in about %.0f s)%s",
            f,
            wait,
            f" (killed {len(stale)} jobs superseded by that session)" if stale else "",
        )

    def _failed(self, f: Failure) -> None:
        """Drop the registration and schedule the next attempt with jittered backoff."""
        self._registered = False
        if isinstance(f, Unreachable | Deposed):
            self.source.failed()
        if isinstance(f, Standby):
            self._standby(f)
            return
        if isinstance(f, UnknownTasker) and self._failures == 0:
            delay = 0.0  # the server forgot us (restart): say hello again at once
        elif isinstance(f, NameInUse) and f.after is not None:
            # the server knows when the holder's silence would free the name
            delay = min(NAME_RETRY_CAP, f.after) + random.uniform(0.0, 0.5)
        else:
            base = min(BACKOFF_CAP, BACKOFF_START * 2 ** min(self._failures, 16))
            down = self._down_since
            if isinstance(f, Unreachable) and (
                down is None or time.monotonic() - down < FAST_RETRY_FOR
            ):
                base = BACKOFF_START
            delay = random.uniform(base / 2, base)
            if isinstance(f, RetryLater):
                delay = max(delay, min(f.after, BACKOFF_CAP))
        self._failures += 1
        self._next_try = time.monotonic() + delay
        if isinstance(f, UnknownTasker):
            log.info("server forgot this tasker (%s): registering again", f)
        elif isinstance(f, Deposed):
            pass  # said by _admit
        elif isinstance(f, NameInUse):
            pass  # said once by _name_taken
        elif isinstance(f, TokenRefused):
            log.error("server %s refused the tasker token: %s; retrying", self._url, f)
        elif isinstance(f, Refused) and f.status < 500:
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

    def _standby(self, f: Standby) -> None:
        """A standby answered (nothing was applied): register with its leader now, or, when
        it knows none (a takeover under way), try the next candidate at its pace."""
        here = self._url
        if f.leader is not None and f.leader != here:
            self.source.follow(f.leader)
            self._hops += 1
            # at once, unless standbys keep pointing at each other (stale pointers)
            delay = 0.0 if self._hops <= MAX_HOPS else f.after + random.uniform(0.0, 0.5)
            log.info("server %s is a standby: following the leader at %s", here, f.leader)
        else:
            self.source.failed()
            delay = min(f.after, BACKOFF_CAP) + random.uniform(0.0, 0.5)
            log.info("server %s is a standby that knows no leader yet; trying the next", here)
        self._next_try = time.monotonic() + delay

    def _admit(self, answer: dict[str, Any]) -> Failure | None:
        """The epoch fence: None when the answer's orders may be acted on, else the failure.

        A higher epoch is made durable first, so that even a restarted tasker refuses the
        leader it replaced. An answer without an epoch (an older server) is taken as is.
        """
        epoch = answer.get("epoch")
        if epoch is None:
            return None
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            log.error("server %s sent a bad epoch %.50r: ignoring its answer", self._url, epoch)
            return BadAnswer(f"bad epoch {epoch!r}")
        queue_id = answer.get("queue_id")
        if isinstance(queue_id, str) and queue_id and queue_id != self._queue_id:
            # another queue (or one made anew in the same place): its epochs count afresh
            if self._queue_id:
                log.info(
                    "queue %s: epochs count from this queue's, not %s's", queue_id, self._queue_id
                )
            try:
                self.state.store_epoch(epoch, queue_id)
            except OSError as e:
                log.error("cannot record leader epoch %d: %s; ignoring its orders", epoch, e)
                return Failure(f"cannot record epoch {epoch}: {e}")
            self._epoch, self._queue_id = epoch, queue_id
            return None
        if epoch < self._epoch:
            log.warning(
                "ignoring the orders of %s: epoch %d is a deposed leader's (epoch %d seen, "
                "recorded in %s); trying the next server",
                self._url,
                epoch,
                self._epoch,
                self.state.root / "epoch",
            )
            return Deposed(f"epoch {epoch} < {self._epoch}", epoch, self._epoch)
        if epoch > self._epoch:
            try:
                self.state.store_epoch(epoch, self._queue_id)
            except OSError as e:
                log.error("cannot record leader epoch %d: %s; ignoring its orders", epoch, e)
                return Failure(f"cannot record epoch {epoch}: {e}")
            if self._epoch:
                log.info("leader epoch %d (was %d) at %s", epoch, self._epoch, self._url)
            self._epoch = epoch
        return None

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
            answer = post(self._client, f"{self._base}/sync", body, REPORT_TIMEOUT)
        except Failure as f:
            self._failed(f)
            return
        fenced = self._admit(answer)
        if fenced is not None:
            self._failed(fenced)
            return
        self._ok()
        self.outbox.sent(started, finished, RESEND_DELAY)
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
        self._poll_q.put(
            PollRequest(self._gen, self._url, self._token, body, self.heartbeat + POLL_SLACK)
        )

    def _poll_worker(self) -> None:
        """Runs the long polls on their own connection, hands answers to the main loop."""
        client: http11.Connection | None = None
        ident: tuple[str, str] | None = None
        while True:
            req = self._poll_q.get()
            if req is None:
                break
            if client is None or ident != (req.url, req.token):
                if client is not None:
                    client.close()
                client = open_client(req.url, req.token, self._session)
                ident = (req.url, req.token)
            result = self._long_poll(client, req)
            with self._cond:
                self._poll_result = result
                self._cond.notify_all()
        if client is not None:
            client.close()

    def _long_poll(self, client: http11.Connection, req: PollRequest) -> PollResult:
        try:
            answer = post(client, f"{self._base}/sync", req.body, req.timeout)
        except Failure as f:
            return PollResult(req.gen, None, f)
        except Exception as e:  # noqa: BLE001 - the loop must learn the poll is over
            return PollResult(req.gen, None, Unreachable(f"{type(e).__name__}: {e}"))
        return PollResult(req.gen, answer, None)

    def _take_poll_result(self) -> None:
        with self._cond:
            result, self._poll_result = self._poll_result, None
        if result is None:
            return
        self._polling = False
        if result.answer is not None:
            fenced = self._admit(result.answer)
            if fenced is not None:
                if result.gen == self._gen and self._registered:
                    self._failed(fenced)
                return
            if result.gen == self._gen:
                self._ok()
            self._handle(result.answer, [], [])
        elif result.failure is not None and result.gen == self._gen and self._registered:
            self._failed(result.failure)

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
        self.outbox.ack(acked, started, finished)
        asks = answer.get("logs")
        if isinstance(asks, list):
            for ask in asks[:100]:  # more at once would time out at the server anyway
                if isinstance(ask, dict):
                    self._log_q.put(ask)
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

    # -- log reads ------------------------------------------------------------------------

    def _log_worker(self) -> None:
        """Answers the server's log reads on a connection of its own: a slow file (NFS)
        holds neither the reports nor the long poll."""
        client: http11.Connection | None = None
        ident: tuple[str, str] | None = None
        while True:
            ask = self._log_q.get()
            if ask is None:
                break
            url, token = self._url, self._token
            if url is None or token is None:
                continue
            try:
                if client is None or ident != (url, token):
                    if client is not None:
                        client.close()
                    client = open_client(url, token, self._session)
                    ident = (url, token)
                post(client, f"{self._base}/logs", log_answer(ask), REPORT_TIMEOUT)
            except (Failure, SourceError) as e:
                log.info("log of job %s not sent: %s", ask.get("job"), e)
            except Exception:  # noqa: BLE001 - the thread must go on answering
                log.exception("log of job %s not sent", ask.get("job"))
        if client is not None:
            client.close()


def log_answer(ask: dict[str, Any]) -> dict[str, Any]:
    """The chunk a log ask wants, read as its owner could (crq/logread.py), or why not."""
    out: dict[str, Any] = {"id": str(ask.get("id", ""))[:64]}
    try:
        path, user = str(ask["path"]), str(ask["user"])
        offset, size = int(ask["offset"]), int(ask["max"])
        data, total = logread.read_chunk(path, offset, size, user)
    except (KeyError, TypeError, ValueError) as e:
        return {**out, "error": "failed", "message": f"malformed log ask: {e}"}
    except logread.LogRefused as e:
        return {**out, "error": "refused", "message": str(e)[:1000]}
    except (FileNotFoundError, NotADirectoryError):
        return {**out, "error": "not_found", "message": f"no {path} here"[:1000]}
    except OSError as e:
        return {**out, "error": "failed", "message": f"{path}: {e.strerror or e}"[:1000]}
    return {**out, "data": base64.b64encode(data).decode(), "size": total}
