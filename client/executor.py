"""A :class:`concurrent.futures.Executor` whose work items are shell commands run as crq jobs.

>>> from concurrent.futures import as_completed
>>> with Executor() as ex:                      # the queue found as `crq` finds it
...     futures = [ex.submit(["gzip", f], resources="CORES/1") for f in files]
...     for f in as_completed(futures):
...         print(f.result().id, "done")

What it promises, and why:

- ``submit(cmd, **fields)`` returns at once; the submits of one burst go to the server as one
  batch (:meth:`Client.submit_many`, up to ``max_batch`` a request) with one idempotency key,
  retried as it is through crash recovery, a failover and outages: a job is queued once.
- Every pending future is watched by ONE long poll (``POST /api/v1/ended``) that
  returns as soon as any of them ends, whatever their number; it rides out a server restart,
  crash recovery and failover like :meth:`Client.wait` does.
- A future's result is the ended :class:`~crq.client.job.Job`. A job that does not end
  ``done`` (failed, stopped by someone, lost, or forgotten by the server) makes ``result()``
  raise :class:`JobFailed`, carrying the job, as :class:`subprocess.CalledProcessError`
  carries the exit status. A submit the server refuses sets that :class:`CrqError`.
- ``cancel()`` works while the job has not started: before it is sent, it is never sent;
  once queued (or waiting), it is held, then stopped, and the future is cancelled. A running
  or ended job is not touched: ``cancel()`` returns False (as for a running thread). The
  executor does not follow starts, so ``running()`` stays False until the job ends.
- ``shutdown(wait=True, cancel_futures=False)``: no new submits; ``cancel_futures`` cancels
  every future whose job has not started; ``wait`` blocks until the rest have ended. With
  ``wait=False`` the watcher goes on in the background until they have.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor as BaseExecutor
from concurrent.futures import Future, InvalidStateError
from queue import Empty, SimpleQueue
from typing import Any

from crq.client.api import RECONNECT_FOR, Client
from crq.client.environ import job_env
from crq.client.errors import CrqError
from crq.client.job import UNKNOWN, Job, unknown

from crq import wire

__all__ = ["Executor", "JobFailed", "JobFuture"]

#: The longest one watching request may take; it returns sooner whenever a job ends.
POLL = 30.0
#: Pause between two watching requests, so that the ends of a busy burst come back together.
COALESCE = 0.05


class JobFailed(CrqError):
    """A job ended other than ``done``; ``job`` is its last description (``job.state``,
    ``job.exit_code``, ``job.reason``), ``returncode`` and ``cmd`` as in
    :class:`subprocess.CalledProcessError`."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.returncode = job.exit_code
        self.cmd = job.command
        if job.state == UNKNOWN:
            what = "is no longer held by the server"
        elif job.exit_code is not None and job.state == wire.FAILED:
            what = f"failed with exit status {job.exit_code}"
        elif job.signal is not None:
            what = f"ended {job.state} by signal {job.signal}"
        else:
            what = f"ended {job.state}"
        why = f" ({job.reason})" if job.reason else ""
        super().__init__(f"job {job.id} {what}{why}", code=f"job_{job.state}")


class JobFuture(Future[Job]):
    """The future of one job: ``job_id`` once the server has given one (None before)."""

    def __init__(self, executor: Executor, spec: dict[str, Any]) -> None:
        super().__init__()
        self.job_id: int | None = None
        self.spec = spec
        self._executor = executor
        self._taken = False  # the submitter has it: it is (being) sent
        self._sent = threading.Event()  # its submit is over: an id, or an exception set

    def cancel(self) -> bool:
        """Stop the job if it has not started (see the module's doc); True if cancelled."""
        if self.cancelled():
            return True
        if self.done():
            return False
        return self._executor._cancel(self)


class Executor(BaseExecutor):
    """Runs commands as crq jobs; ``url``/``token``/``queue`` and ``client_options`` are
    :class:`Client`'s (two clients are made: one submits and cancels, one watches).

    ``export_env``: send the submitting process's environment with each job, as ``crq
    submit`` does (True or ``"all"``, minus tokens; ``"VAR,VAR"``: those; a job's ``env``
    entries win). ``max_batch`` caps the jobs of one submit request.
    """

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        queue: str | None = None,
        *,
        export_env: bool | str = False,
        max_batch: int = 1000,
        notify: Callable[[str], None] | None = None,
        **client_options: Any,
    ) -> None:
        self.client = Client(url, token, queue, **client_options)
        self.watcher = Client(url, token, queue, **client_options)
        self.client.notify = self.watcher.notify = notify
        self.export_env = export_env
        self.max_batch = max(1, int(max_batch))
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._client_lock = threading.Lock()  # self.client: the submitter's and cancel()'s
        self._inbox: SimpleQueue[JobFuture | None] = SimpleQueue()
        self._pending: dict[int, JobFuture] = {}  # sent, not ended
        self._live: set[JobFuture] = set()  # not done
        self._max_id = 0
        self._polling_since: float | None = None
        self._closing = False
        self._submitter_done = False
        self._submitter = threading.Thread(target=self._submit_loop, name="crq-submit", daemon=True)
        self._watcher = threading.Thread(target=self._watch_loop, name="crq-watch", daemon=True)
        self._submitter.start()
        self._watcher.start()

    # -- the Executor interface -------------------------------------------------------------

    def submit(self, cmd: Any, /, *args: Any, **fields: Any) -> JobFuture:  # type: ignore[override]
        """Queue ``cmd`` (a list of words, or a line for ``/bin/sh -c``) as a job with the
        spec ``fields`` (``name``, ``resources``, ``priority``, ``cwd``, ``env``, ``log``,
        ``time_limit``…); the cwd and environment are taken now, in the caller."""
        if args:
            raise TypeError("Executor.submit takes one command; give its words as a list")
        if not isinstance(cmd, str | list | tuple) or not cmd:
            raise TypeError("a command is a non-empty list of words or a shell line")
        spec: dict[str, Any] = {"command": cmd if isinstance(cmd, str) else list(cmd), **fields}
        spec.setdefault("cwd", os.getcwd())
        if self.export_env:
            how = "all" if self.export_env is True else str(self.export_env)
            spec["env"] = job_env(how, (spec.get("env") or {}).items(), str(spec["cwd"]))
        future = JobFuture(self, spec)
        with self._lock:
            if self._closing:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._live.add(future)
        future.add_done_callback(self._forget)
        self._inbox.put(future)
        return future

    def map(  # type: ignore[override]
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[Job]:
        """``fn(*args)`` gives each job's command (or a spec dict with ``command``); all are
        submitted at once, the ended jobs come back in their order. A job that fails raises
        :class:`JobFailed` there; the jobs after it are cancelled if the iteration stops."""
        deadline = None if timeout is None else time.monotonic() + timeout
        futures = [self._submit_made(fn(*args)) for args in zip(*iterables, strict=False)]

        def results() -> Iterator[Job]:
            try:
                futures.reverse()
                while futures:
                    left = None if deadline is None else deadline - time.monotonic()
                    yield futures.pop().result(left)
            finally:
                for f in futures:
                    f.cancel()

        return results()

    def _submit_made(self, made: Any) -> JobFuture:
        if isinstance(made, dict):
            fields = dict(made)
            return self.submit(fields.pop("command"), **fields)
        return self.submit(made)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._closing = True
            live = list(self._live)
        if cancel_futures:
            for f in live:
                f.cancel()
        self._inbox.put(None)
        with self._wake:
            self._wake.notify_all()
        if wait:
            self._submitter.join()
            self._watcher.join()

    # -- submitting -------------------------------------------------------------------------

    def _forget(self, future: Future[Job]) -> None:
        with self._lock:
            self._live.discard(future)

    def _submit_loop(self) -> None:
        """Send what came in since the last request as one batch, until shutdown."""
        stop = False
        while not stop:
            first = self._inbox.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    more = self._inbox.get_nowait()
                except Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
            self._send(batch)
        with self._wake:
            self._submitter_done = True
            self._wake.notify_all()

    def _send(self, batch: list[JobFuture]) -> None:
        with self._lock:
            todo = [f for f in batch if not f._taken]
            for f in todo:
                f._taken = True
        if not todo:
            return
        sent_at = time.monotonic()
        try:
            with self._client_lock:
                ids = self.client.submit_many([f.spec for f in todo])
        except CrqError as e:
            if len(todo) > 1 and e.status is not None and 400 <= e.status < 500:
                # refused as a whole, so nothing was queued: send them one by one, so that
                # only the futures of the bad specs fail
                for f in todo:
                    f._taken = False
                    self._send([f])
                return
            for f in todo:
                _settle(f, error=e)
                f._sent.set()
            return
        with self._wake:
            for f, job_id in zip(todo, ids, strict=True):
                f.job_id = job_id
                self._pending[job_id] = f
                self._max_id = max(self._max_id, job_id)
                f._sent.set()
            since = self._polling_since
            self._wake.notify_all()
        if since is not None and since > sent_at:
            # the watcher's current request began after this submit left, so a job of it
            # that ended before that request began would not wake it: ask once now
            with self._client_lock:
                try:
                    answer = self.client.ended(ids)
                except CrqError:
                    return  # the watcher's next request will see them
            self._resolve(answer.jobs, answer.unknown)

    def _cancel(self, future: JobFuture) -> bool:
        with self._lock:
            if not future._taken:  # never sent, and now never will be
                future._taken = True
                cancelled = True
            else:
                cancelled = False
        if cancelled:
            return _cancel_future(future)
        future._sent.wait()
        job_id = future.job_id
        if future.done() or job_id is None:
            return False
        try:
            with self._client_lock:
                self.client.hold(job_id)  # refused (409) once it runs: the atomic check
        except CrqError:
            return False
        with self._lock:
            if self._pending.pop(job_id, None) is None:
                return False  # ended meanwhile (stopped by someone else)
        try:
            with self._client_lock:
                self.client.stop(job_id)
        except CrqError as e:
            if e.status not in (404, 409):  # gone or ended already: nothing left to stop
                with self._lock:
                    self._pending[job_id] = future
                raise
        return _cancel_future(future)

    # -- watching ---------------------------------------------------------------------------

    def _watch_loop(self) -> None:
        """One request at a time for every pending job, until shut down and all settled."""
        try:
            while True:
                with self._wake:
                    while not self._pending and not (self._closing and self._submitter_done):
                        self._wake.wait()
                    if not self._pending:
                        return
                    ids = list(self._pending)
                    newer = self._max_id
                    began = self._polling_since = time.monotonic()
                try:
                    answer = self.watcher._riding_out(
                        None, self.watcher.ended, ids, POLL, newer, outage_for=RECONNECT_FOR
                    )
                except CrqError as e:
                    self._fail_pending(ids, e)
                    continue
                finally:
                    with self._lock:
                        self._polling_since = None
                self._resolve(answer.jobs, answer.unknown)
                if time.monotonic() - began < POLL:
                    time.sleep(COALESCE)
        finally:
            self.watcher.close()
            with self._client_lock:
                self.client.close()

    def _resolve(self, jobs: list[Job], gone: list[int]) -> None:
        ended = [*jobs, *(unknown(i, "not held by the server") for i in gone)]
        settle: list[tuple[JobFuture, Job]] = []
        with self._lock:
            for job in ended:
                f = self._pending.pop(job.id, None)
                if f is not None:
                    settle.append((f, job))
        for f, job in settle:
            if job.state == wire.DONE:
                _settle(f, result=job)
            else:
                _settle(f, error=JobFailed(job))

    def _fail_pending(self, ids: list[int], error: CrqError) -> None:
        """The server stayed out of reach past the outage allowance: these futures fail."""
        with self._lock:
            lost = [f for i in ids if (f := self._pending.pop(i, None)) is not None]
        for f in lost:
            _settle(f, error=error)


def _settle(
    future: JobFuture, *, result: Job | None = None, error: BaseException | None = None
) -> None:
    """Set a future's outcome unless it was cancelled meanwhile."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]
    except InvalidStateError:
        pass


def _cancel_future(future: JobFuture) -> bool:
    """Cancel the future itself and tell its waiters (as_completed, wait)."""
    if not Future.cancel(future):
        return False
    future._sent.set()
    future.set_running_or_notify_cancel()
    return True
