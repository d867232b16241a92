"""The tasker's durable local state.

Everything the tasker must not forget across its own crash lives here, so a new
``vovtasker`` with the same state dir can re-adopt running jobs and report results
that finished while nobody watched::

    <state>/lock                     flock: one vovtasker per state dir
    <state>/boot_id                  host boot id at the last successful registration
    <state>/epoch                    the highest leader epoch seen: orders of a lower one
                                     come from a deposed leader and are refused
    <state>/id                       made once: tells the server this is the same memory
    <state>/session                  made once (mode 0600): the secret that holds the tasker
                                     name on the server; shown at every register and sync
    <state>/attempts/<job>.<n>.json  one record per started attempt (pid, pgid, status path)
    <state>/status/<job>.<n>         made empty by the job's own shell wrapper at start;
                                     the exit status goes into it when the job exits
    <state>/results/<job>.<n>.json   a finished result not yet acked by the server

A result file is the source of truth once written: the attempt record and status file
are removed after it, and the result file only after the server acked it.

All of it is private to the tasker's user (directories 0700, files 0600): it names the
jobs, their processes and their outcomes, and a job's own files are no one else's business.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from crq import durable

Key = tuple[int, int]
DIR_MODE = 0o700
FILE_MODE = 0o600


class StateDirBusy(Exception):
    """Another live vovtasker holds the state dir: two would fight over the same jobs."""


def key_of(record: dict[str, Any]) -> Key:
    return int(record["job"]), int(record["attempt"])


def _name(key: Key) -> str:
    return f"{key[0]}.{key[1]}"


def parse_name(name: str) -> Key | None:
    """``"12.3"`` or ``"12.3.json"`` → ``(12, 3)``; None for anything else (stray files)."""
    parts = name.removesuffix(".json").split(".")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        return None
    return int(parts[0]), int(parts[1])


class StateDir:
    """Atomic, fsynced files under one directory; see the module docstring for the layout."""

    def __init__(self, root: str | os.PathLike[str], fsync: bool = True) -> None:
        self.root = Path(root).absolute()
        self.fsync = fsync
        self.attempts = self.root / "attempts"
        self.status = self.root / "status"
        self.results = self.root / "results"
        self._lock_fd: int | None = None
        for d in (self.root, self.attempts, self.status, self.results):
            d.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            if d.stat().st_mode & 0o777 != DIR_MODE:  # made by an older tasker, or by hand
                d.chmod(DIR_MODE)

    # -- locking -------------------------------------------------------------------------

    def lock(self) -> None:
        """Take the state dir for this process; raise StateDirBusy naming the holder."""
        try:
            self._lock_fd = durable.lock_pidfile(self.root / "lock", FILE_MODE)
        except durable.LockBusy as e:
            raise StateDirBusy(
                f"state dir {self.root} is in use by another vovtasker (pid {e.holder})"
            ) from None

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- primitives ----------------------------------------------------------------------

    def write_atomic(self, path: Path, data: bytes) -> None:
        """tmp + fsync + rename + fsync(dir): after return the file survives a power cut."""
        durable.write_atomic(path, data, FILE_MODE, self.fsync)

    def write_many(self, files: list[tuple[Path, bytes]]) -> None:
        """``write_atomic`` for several files, with one fsync per directory for all of them."""
        durable.write_many(files, FILE_MODE, self.fsync)

    def _load_dir(self, d: Path) -> dict[Key, dict[str, Any]]:
        out: dict[Key, dict[str, Any]] = {}
        for p in d.iterdir():
            if p.name.startswith("."):
                # a tmp file left by a crash mid-write: the rename never happened
                with contextlib.suppress(OSError):
                    p.unlink()
                continue
            key = parse_name(p.name)
            if key is None:
                continue
            try:
                rec = json.loads(p.read_bytes())
            except (OSError, ValueError):
                continue
            if isinstance(rec, dict):
                out[key] = rec
        return out

    def _remove(self, paths: list[Path]) -> None:
        """Unlink without a directory fsync: removals need no durability here.

        Gone at once for every later reader, the tasker's kill -9 included; only a power
        cut (or OS crash) can bring a file back. What it brings back is harmless: an
        attempt record or status file loses to the (durable) result file at recovery, and
        whatever is reported again for an attempt the server already closed (the result
        itself, or "killed while the tasker was down" for a record whose status and result
        files stayed gone) is deduplicated by (job, attempt) on the server.
        """
        for p in paths:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    # -- attempt records -----------------------------------------------------------------

    def record_path(self, key: Key) -> Path:
        return self.attempts / f"{_name(key)}.json"

    def status_path(self, key: Key) -> Path:
        return self.status / _name(key)

    def write_record(self, record: dict[str, Any]) -> None:
        self.write_records([record])

    def write_records(self, records: list[dict[str, Any]]) -> None:
        """Attempt records of a batch of starts, durable on return (one directory fsync)."""
        self.write_many([(self.record_path(key_of(r)), json.dumps(r).encode()) for r in records])

    def load_records(self) -> dict[Key, dict[str, Any]]:
        return self._load_dir(self.attempts)

    def remove_attempt(self, key: Key) -> None:
        """Forget a finished attempt's record and status (its result file now speaks for it)."""
        self.remove_attempts([key])

    def remove_attempts(self, keys: list[Key]) -> None:
        self._remove([p for k in keys for p in (self.record_path(k), self.status_path(k))])

    def status_keys(self) -> list[Key]:
        keys = []
        for p in self.status.iterdir():
            k = parse_name(p.name)
            if k is not None:
                keys.append(k)
        return keys

    # -- results -------------------------------------------------------------------------

    def result_path(self, key: Key) -> Path:
        return self.results / f"{_name(key)}.json"

    def write_result(self, result: dict[str, Any]) -> None:
        self.write_results([result])

    def write_results(self, results: list[dict[str, Any]]) -> None:
        """Finished results, durable on return (one directory fsync for the batch)."""
        self.write_many([(self.result_path(key_of(r)), json.dumps(r).encode()) for r in results])

    def load_results(self) -> dict[Key, dict[str, Any]]:
        return self._load_dir(self.results)

    def remove_results(self, keys: list[Key]) -> None:
        """Drop acked results (not durably: see ``_remove``)."""
        self._remove([self.result_path(k) for k in keys])

    # -- boot id -------------------------------------------------------------------------

    def stored_boot_id(self) -> str | None:
        try:
            return (self.root / "boot_id").read_text().strip() or None
        except OSError:
            return None

    def store_boot_id(self, boot_id: str) -> None:
        self.write_atomic(self.root / "boot_id", f"{boot_id}\n".encode())

    # -- leader epoch ----------------------------------------------------------------------

    def stored_epoch(self) -> int:
        """The highest leader epoch this tasker acted on (0: none yet, or unreadable)."""
        words = self._epoch_words()
        return int(words[0]) if words and words[0].isdigit() else 0

    def stored_queue(self) -> str:
        """The queue that epoch is of ("" when unknown: written by an older version)."""
        words = self._epoch_words()
        return words[1] if len(words) > 1 and words[0].isdigit() else ""

    def _epoch_words(self) -> list[str]:
        try:
            return (self.root / "epoch").read_text().split()
        except OSError:
            return []

    def store_epoch(self, epoch: int, queue_id: str = "") -> None:
        """Durable before any order of that epoch is acted on, so a restarted tasker still
        refuses the deposed leader. Epochs count per queue: ``queue_id`` says whose."""
        self.write_atomic(self.root / "epoch", f"{epoch} {queue_id}".strip().encode() + b"\n")

    def identity(self) -> str:
        """This state dir's id. The same id tells the server we remember every attempt we
        ever spawned, so one we do not list was never started and may be sent again."""
        path = self.root / "id"
        try:
            found = path.read_text().strip()
        except OSError:
            found = ""
        if not found:
            import secrets

            found = secrets.token_hex(8)
            self.write_atomic(path, f"{found}\n".encode())
        return found

    def session(self) -> str:
        """The session secret, made (and durable) before the server ever sees it.

        The server ties the tasker name to it: a restarted tasker with this state dir is
        the same session and takes its name back at once; one with another state dir must
        wait until this one is silent past the tasker timeout. Made here rather than by the
        server so that a register whose answer was lost cannot lock its own tasker out.
        """
        path = self.root / "session"
        try:
            found = path.read_text().strip()
        except FileNotFoundError:
            found = ""
        if not found:
            import secrets

            found = secrets.token_urlsafe(32)
            self.write_atomic(path, f"{found}\n".encode())  # 0600, as every file here
        return found


def read_status(path: Path) -> tuple[int | None, float] | None:
    """Read a wrapper status file: ``(rc, mtime)``; rc None if cut short; None if absent.

    The wrapper makes the file empty when it starts and writes ``"<rc>\\n"`` into it with
    one ``write``; an empty file means the job runs or was killed (with its wrapper), and
    one without the newline that the wrapper died while writing it (only a SIGKILL can).
    """
    try:
        st = path.stat()
        data = path.read_bytes()
    except OSError:
        return None
    text = data.decode(errors="replace")
    if not text.endswith("\n") or not text.strip().lstrip("-").isdigit():
        return None, st.st_mtime
    return int(text.strip()), st.st_mtime
