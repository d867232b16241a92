"""The accounting history (sacct, condor_history): every job that left memory, in
``<swd>/accounting.db`` (SQLite, WAL), one row a job, keyed by its id.

Why no ended job is ever missing after a crash:

- ``State.on_forget`` fires for each job a ``forget`` event drops, live and in replay; it
  only queues the job (with the event's seq and epoch): no SQLite call on the event loop.
  A writer thread commits what queued in batches, and only forgets the journal already
  holds durably, so the database never has a job a crash gives back to the queue.
- Replay applies every forget after the newest snapshot again, so the hook fires again:
  rows are ``INSERT OR REPLACE`` by job id (ids are never reused), and a row written from
  the very same record (same epoch and seq) is skipped. A crash before the commit is
  repaired by the next start.
- Forgets a snapshot covers are not replayed, so a checkpoint must not cover a forget
  whose row is not committed: before it forks, every forget applied so far is committed
  (:meth:`History.settle`: the writer catches up with the journal, then the few applied
  meanwhile are written on the loop, just before the fork). The clean stop writes them all
  before its snapshot. A history that cannot commit (disk full) makes the checkpoint fail,
  so the journal keeps the forgets until it can.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
from crq.server.events import Forget
from crq.server.gates import expand_log
from crq.server.state import Job, State

log = logging.getLogger("crq.history")

DB_NAME = "accounting.db"
SCHEMA_VERSION = 1
BATCH = 5_000  # rows a transaction, at most; more queued wakes the writer early
MAX_LIMIT = 10_000
LOOKUP = 500  # ids a "which rows are there already" query asks for

COLUMNS = (
    "id", "user", "name", "state", "priority", "resources", "command", "cwd", "log",
    "submitted", "started", "ended", "wait", "run", "host", "tasker", "exit_code", "signal",
    "reason", "tries", "attempts", "controls", "forgotten", "forgotten_by", "epoch", "seq",
)  # fmt: skip
JSON_COLUMNS = ("command", "attempts", "controls")
INTERNAL = ("epoch", "seq")  # which journal record wrote the row: not shown

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY, user TEXT NOT NULL, name TEXT NOT NULL, state TEXT NOT NULL,
    priority INTEGER NOT NULL, resources TEXT NOT NULL, command TEXT NOT NULL,
    cwd TEXT NOT NULL, log TEXT NOT NULL, submitted REAL NOT NULL, started REAL, ended REAL,
    wait REAL, run REAL, host TEXT, tasker TEXT, exit_code INTEGER, signal INTEGER,
    reason TEXT, tries INTEGER NOT NULL, attempts TEXT NOT NULL, controls TEXT NOT NULL,
    forgotten REAL NOT NULL, forgotten_by TEXT, epoch INTEGER NOT NULL, seq INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_user ON jobs (user, id);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, id);
CREATE INDEX IF NOT EXISTS jobs_ended ON jobs (ended);
CREATE INDEX IF NOT EXISTS jobs_forgotten ON jobs (forgotten);
CREATE TABLE IF NOT EXISTS samples (t REAL PRIMARY KEY, data TEXT NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('schema', '{SCHEMA_VERSION}');
"""
INSERT = f"INSERT OR REPLACE INTO jobs VALUES ({', '.join('?' * len(COLUMNS))})"

# (seq, epoch, job, its controls, forget time, who forgot it, (array id, index) of an element)
Item = tuple[
    int, int, Job, list[tuple[float, str, str]] | None, float, str | None, tuple[int, int] | None
]


class HistoryError(Exception):
    """The accounting database cannot be opened (damaged, not a database, unreadable)."""


def db_path(swd: Path) -> Path:
    return swd / DB_NAME


def row_of(item: Item) -> tuple[Any, ...]:
    """A job's row: what sacct shows, from the job as it was when it was forgotten."""
    seq, epoch, job, controls, t, by, at = item
    spec = orjson.loads(job.spec)
    attempts = job.attempts or []
    last = attempts[-1] if attempts else None
    started, ended = job.started, job.ended
    if started is None and last is not None:
        started = last.started  # requeued after it ran, then forgotten
    wait = started - job.submitted if started is not None else None
    run = ended - started if ended is not None and started is not None else None
    acts = [{"t": c[0], "action": c[1], "by": c[2]} for c in controls or ()]
    if by is not None:
        acts.append({"t": t, "action": "forget", "by": by})
    return (
        job.id, job.user, job.name, job.state, job.priority, job.need.resources,
        orjson.dumps(spec.get("command")).decode(), spec.get("cwd") or "",
        _log_of(job.id, spec, at),
        job.submitted, started, ended, wait, run,
        last.host if last else None, last.tasker if last else job.tasker,
        job.exit_code, job.signal, job.reason, job.tries,
        orjson.dumps([a.to_dict() for a in attempts]).decode(), orjson.dumps(acts).decode(),
        t, by, epoch, seq,
    )  # fmt: skip


def _log_of(job_id: int, spec: dict[str, Any], at: tuple[int, int] | None) -> str:
    """The log as the job saw it: ``%j``, ``%A``, ``%a`` expanded (the array is gone by the
    time the row is written, so the element's place comes with the item)."""
    if not spec.get("log"):
        return os.path.join(spec.get("cwd") or "", f"crq.{job_id}.log")
    return expand_log(spec["log"], job_id, *(at or (None, None)))


def _safe_row(item: Item) -> tuple[Any, ...]:
    """row_of, or what is sure of the job if its row cannot be made (a spec of a form this
    code does not know): one such job must never hold every later row, and checkpoints, back."""
    try:
        return row_of(item)
    except Exception as e:  # noqa: BLE001 - logged; the row says so
        seq, epoch, job, _, t, by, _ = item
        log.exception("job %d: history row incomplete", job.id)
        return (
            job.id, job.user, job.name, job.state, job.priority, "", "null", "", "",
            job.submitted, None, None, None, None, None, None, None, None,
            f"history row incomplete: {e!r}", 0, "[]", "[]", t, by, epoch, seq,
        )  # fmt: skip


def connect(path: Path, sync_full: bool) -> sqlite3.Connection:
    """The writer's connection (schema made if new); HistoryError if it is no database."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)  # private, as all of the swd
        os.close(fd)
        con = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute(f"PRAGMA synchronous={'FULL' if sync_full else 'NORMAL'}")
        con.executescript(SCHEMA)
        (version,) = con.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
    except sqlite3.DatabaseError as e:
        raise HistoryError(f"{path}: {e}") from None
    if int(version) > SCHEMA_VERSION:
        con.close()
        raise HistoryError(f"{path}: schema {version} is newer than this server's")
    return con


class History:
    """The forget hook's queue, the writer thread and the database it writes."""

    def __init__(self, path: Path, sync_full: bool = True, interval: float = 0.2) -> None:
        self.path = path
        self.interval = interval  # seconds between the writer's batches
        self.delay = 0.0  # tests: hold each batch this long before its commit
        self._con = connect(path, sync_full)
        self._pending: deque[Item] = deque()
        self._lock = threading.Lock()  # one writer of the connection at a time
        self._done = threading.Condition()  # through moved
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._state: State | None = None
        self._durable: Callable[[], int] = lambda: 1 << 62  # replay: the journal holds all
        self.guard: Callable[[], bool] | None = None  # still the leader?
        self.through = 0  # every forget up to this seq is committed
        self.written = 0  # rows committed since the start
        self.failures = 0
        self._samples: deque[tuple[Any, ...]] = deque()  # the dashboard's (server/samples.py)
        self.sample_keep = 2 * 86400.0  # samples older than this are deleted as new ones come

    # -- the hook (the loop, or the replay's thread) ------------------------------------

    def attach(self, state: State) -> None:
        """Hook into ``state``: the replay's, before its journal is applied."""
        self._state = state
        state.on_forget = self._forgot

    def _forgot(self, job: Job, ev: Forget) -> None:
        st = self._state
        assert st is not None
        # the event's seq: apply() sets state.seq after the handler, and seqs are contiguous
        arr = st.array_of(job.id) if st.array_firsts else None
        at = (arr.first, arr.index(job.id)) if arr is not None else None
        self._pending.append(
            (st.seq + 1, st.epoch, job, st.controls.get(job.id), ev["t"], ev.get("by"), at)
        )
        if len(self._pending) == BATCH:
            self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._pending)

    # -- the writer ---------------------------------------------------------------------

    def start(self, durable: Callable[[], int], guard: Callable[[], bool] | None) -> None:
        """Write from now on, what the journal says is durable (``durable()``: its seq)."""
        self._durable, self.guard = durable, guard
        self._thread = threading.Thread(target=self._run, name="crq-history", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        backoff = self.interval
        while not self._stop:
            self._wake.wait(backoff)
            self._wake.clear()
            if self._stop:
                break
            try:
                self.flush(self._durable())
                self.write_samples()
                backoff = self.interval
            except Exception as e:  # noqa: BLE001 - the thread must live: retried, counted
                self.failures += 1
                backoff = min(10.0, backoff * 2)
                log.error("accounting history not written (retried in %.1f s): %s", backoff, e)

    def flush(self, upto: int, busy: float = 30.0) -> int:
        """Commit the queued forgets of seq ``upto`` and before; rows written. On an error
        they stay queued (and it raises). ``busy``: seconds to wait for another process's
        write lock on the file (an operator's sqlite3 shell), at most."""
        with self._lock:
            self._con.execute(f"PRAGMA busy_timeout = {int(busy * 1000)}")
            if self.guard is not None and not self.guard():
                return 0  # deposed: the new leader writes what counts
            taken: list[Item] = []
            pending = self._pending
            while pending and pending[0][0] <= upto:
                taken.append(pending.popleft())
            n = 0
            try:
                for start in range(0, len(taken), BATCH):
                    n += self._write(taken[start : start + BATCH])
            except BaseException:
                pending.extendleft(reversed(taken))  # nothing is lost: tried again later
                raise
            with self._done:
                self.through = max(self.through, upto)
                self.written += n
                self._done.notify_all()
            return n

    def _write(self, items: list[Item]) -> int:
        con = self._con
        have: dict[int, tuple[int, int]] = {}
        ids = [item[2].id for item in items]
        for start in range(0, len(ids), LOOKUP):
            part = ids[start : start + LOOKUP]
            marks = ",".join("?" * len(part))
            for jid, epoch, seq in con.execute(
                f"SELECT id, epoch, seq FROM jobs WHERE id IN ({marks})", part
            ):
                have[jid] = (epoch, seq)
        rows = [_safe_row(i) for i in items if have.get(i[2].id) != (i[1], i[0])]
        if self.delay:
            time.sleep(self.delay)
        if rows:
            con.execute("BEGIN IMMEDIATE")
            try:
                con.executemany(INSERT, rows)
                con.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    con.execute("ROLLBACK")
                raise
        return len(rows)

    def wait_through(self, seq: int, timeout: float) -> bool:
        """Block (a thread) until every forget up to ``seq`` is committed, or ``timeout``."""
        deadline = time.monotonic() + timeout
        self._wake.set()
        with self._done:
            while self.through < seq:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._done.wait(min(left, 0.05))
                self._wake.set()
        return True

    async def settle(self, state: State, durable: Callable[[], Any]) -> None:
        """Before a snapshot forks: every forget applied so far committed (raises if the
        database refuses). The last step runs on the loop, so that no forget can slip in
        between it and the fork; it writes only what was applied meanwhile."""
        target = state.seq
        await durable()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.wait_through, target, 60.0)
        self.flush(state.seq, busy=0.5)  # on the loop: the checkpoint waits, requests do not

    def close(self) -> None:
        """The clean stop: everything queued is written (the journal is durable now)."""
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self.flush(1 << 62)
            self.write_samples()
        finally:
            with self._lock:
                self._con.close()

    # -- the dashboard's samples (server/samples.py) -------------------------------------

    def queue_sample(self, sample: tuple[Any, ...]) -> None:
        """Written by the writer thread with its next batch: no SQLite on the loop."""
        self._samples.append(sample)

    def write_samples(self) -> int:
        """Commit the queued samples, and drop those past ``sample_keep``."""
        if not self._samples:
            return 0
        with self._lock:
            if self.guard is not None and not self.guard():
                self._samples.clear()  # deposed: the new leader samples
                return 0
            taken = list(self._samples)
            rows = [(s[0], orjson.dumps(s).decode()) for s in taken]
            con = self._con
            con.execute("BEGIN IMMEDIATE")
            try:
                con.executemany("INSERT OR REPLACE INTO samples VALUES (?, ?)", rows)
                con.execute("DELETE FROM samples WHERE t < ?", (taken[-1][0] - self.sample_keep,))
                con.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    con.execute("ROLLBACK")
                raise
            for _ in taken:
                self._samples.popleft()
            return len(rows)

    def load_samples(self, since: float) -> list[tuple[Any, ...]]:
        """The samples stored since ``since``, oldest first (a thread: it reads the file)."""
        with self._lock:
            cur = self._con.execute("SELECT data FROM samples WHERE t >= ? ORDER BY t", (since,))
            return [tuple(orjson.loads(d)) for (d,) in cur]

    # -- retention ------------------------------------------------------------------------

    def prune(self, before: float, max_rows: int, batch: int = 10_000) -> int:
        """Delete rows forgotten before ``before``, then the oldest beyond ``max_rows``, a
        batch a transaction (the writer gets the lock between batches); rows deleted."""
        gone = 0
        while True:
            with self._lock:
                cur = self._con.execute(
                    "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE forgotten < ? "
                    "ORDER BY forgotten LIMIT ?)",
                    (before, batch),
                )
                gone += cur.rowcount
            if cur.rowcount < batch:
                break
        while True:
            with self._lock:
                (count,) = self._con.execute("SELECT count(*) FROM jobs").fetchone()
                extra = min(batch, count - max_rows)
                if extra <= 0:
                    break
                cur = self._con.execute(
                    "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs ORDER BY forgotten, id "
                    "LIMIT ?)",
                    (extra,),
                )
                gone += cur.rowcount
        return gone


# -- the query (any thread: a read-only connection of its own) ------------------------------


@dataclass
class Query:
    """What ``GET /history`` asks: each field a filter, None for any."""

    user: str | None = None
    state: str | None = None
    since: float | None = None
    until: float | None = None
    name: str | None = None  # a glob: * ? [...]
    limit: int = 100
    after: int = 0  # the last id of the previous page


def query(path: Path, q: Query) -> tuple[list[dict[str, Any]], int | None]:
    """A page of rows in id order, and the cursor of the next (None: the last page).

    since/until select by when the job ended (one forgotten before it ended: when it was
    forgotten)."""
    if not path.exists():
        return [], None
    where, args = ["id > ?"], list[Any]([q.after])
    if q.user is not None:
        where.append("user = ?")
        args.append(q.user)
    if q.state is not None:
        where.append("state = ?")
        args.append(q.state)
    if q.since is not None:
        where.append("coalesce(ended, forgotten) >= ?")
        args.append(q.since)
    if q.until is not None:
        where.append("coalesce(ended, forgotten) <= ?")
        args.append(q.until)
    if q.name is not None:
        where.append("name GLOB ?")  # the shell's * ? [...], case-sensitive
        args.append(q.name)
    shown = [c for c in COLUMNS if c not in INTERNAL]
    sql = f"SELECT {', '.join(shown)} FROM jobs WHERE {' AND '.join(where)} ORDER BY id LIMIT ?"
    args.append(q.limit + 1)
    con = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, timeout=30)
    try:
        got = con.execute(sql, args).fetchall()
    finally:
        con.close()
    rows = [_shown(shown, r) for r in got[: q.limit]]
    nxt = rows[-1]["id"] if len(got) > q.limit else None
    return rows, nxt


def _shown(names: Iterable[str], values: Iterable[Any]) -> dict[str, Any]:
    out = dict(zip(names, values, strict=True))
    for name in JSON_COLUMNS:
        out[name] = orjson.loads(out[name])
    return out


def parse_time(text: str) -> float:
    """Epoch seconds, or an ISO date or date-time (local time unless it says its zone)."""
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(value):
            raise ValueError(f"{text!r} is not a time")
        return value
    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except (ValueError, OverflowError, OSError):
        raise ValueError(
            f"{text!r} is neither epoch seconds nor an ISO date (2026-12-03, 2026-12-03T14:00)"
        ) from None
