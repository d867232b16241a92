"""The tasker's durable local state.

Everything the tasker must not forget across its own crash lives here, so a new
``vovtasker`` with the same state dir can re-adopt running jobs and report results
that finished while nobody watched::

    <state>/lock       flock: one vovtasker per state dir
    <state>/boot_id    host boot id at the last successful registration
    <state>/epoch      the highest leader epoch seen: orders of a lower one
                       come from a deposed leader and are refused
    <state>/id         made once: tells the server this is the same memory
    <state>/session    made once (mode 0600): the secret that holds the tasker
                       name on the server; shown at every register and sync
    <state>/log        the attempt log (below): what runs, what ended, what was acked
    <state>/status/g<N>  exit traces of the job wrappers, one file for many jobs
    <state>/scripts/<job>.<attempt>  the stored script an attempt runs (mode 0700, its
                       owner's), there while the attempt is

The log is append-only, one record a line: ``<crc32 of the json, 8 hex> <json>\\n``. A
line whose CRC does not match (a torn last write of a power cut) is ignored. Records::

    {"k": "run", "job", "attempt", "pid", "pgid", "started", "status", "kill_at"}
        an attempt we spawned or adopted (a later one of the same key replaces it)
    {"k": "end", <the finished report>}   a result owed to the server; it replaces the
        attempt's run record
    {"k": "drop", "keys": [[job, attempt], ...]}   attempts gone without a result
    {"k": "ack", "keys": [...]}                    results the server made durable

A batch of runs or ends is one write and one fsync (group commit); drops and acks are not
fsynced: what a power cut brings back is reported again and deduplicated by (job,
attempt) on the server. Once enough dead records pile up the log is compacted: the live
records go into ``log.new``, fsynced, renamed over ``log``; a crash leaves one of the two
whole, and a stray ``log.new`` is removed.

The wrappers (see ``procs``) append ``"<job>.<attempt> S"`` when they start and
``"<job>.<attempt> <rc>"`` when their command ended to the status file current at their
spawn (``O_APPEND``, one short ``write`` each, so the lines of many jobs never mix); the
tasker appends ``"<job>.<attempt> D"`` once the log speaks for the attempt. A trace
without ``D`` is an attempt spawned by a tasker that died before recording it. A status
file is removed once it is older than the last two and no live attempt needs it.

The older layout (``attempts/<job>.<n>.json``, ``results/<job>.<n>.json`` and one
``status/<job>.<n>`` file per attempt) is read once and moved into the log; jobs still
running under an old wrapper keep their per-attempt status file until they end.

All of it is private to the tasker's user (directories 0700, files 0600): it names the
jobs, their processes and their outcomes, and a job's own files are no one else's business.
A job run as its owner reaches its script without a path into here: the root side opens it
for the job (see ``runner``), so the state dir stays 0700 and its parents may be too.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from crq import durable

Key = tuple[int, int]
DIR_MODE = 0o700
FILE_MODE = 0o600
COMPACT_AT = 20000  # records appended since the last compaction that trigger the next
GEN_SIZE = 1000  # spawns per status file
STALL_ENV = "CRQ_TEST_STALL_RECORDS"  # fault injection for the crash tests (see write_records)


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


def encode(record: dict[str, Any]) -> bytes:
    """One log line: the CRC guards against a torn or damaged write."""
    payload = json.dumps(record, separators=(",", ":")).encode()
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


def decode(line: bytes) -> dict[str, Any] | None:
    """The record of a log line, or None for a torn or damaged one."""
    if len(line) < 10 or line[8:9] != b" ":
        return None
    payload = line[9:]
    try:
        if int(line[:8], 16) != zlib.crc32(payload):
            return None
        rec = json.loads(payload)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


def _gen_of(path: Path) -> int | None:
    name = path.name
    return int(name[1:]) if name.startswith("g") and name[1:].isdigit() else None


def read_traces(path: Path) -> dict[Key, list[str]]:
    """The lines of a shared status file, by attempt: ``S``, ``D`` and exit codes."""
    out: dict[Key, list[str]] = {}
    try:
        data = path.read_bytes()
    except OSError:
        return out
    for line in data.decode(errors="replace").split("\n"):
        words = line.split()
        if len(words) != 2:
            continue
        key = parse_name(words[0])
        if key is not None:
            out.setdefault(key, []).append(words[1])
    return out


class StateDir:
    """The state dir of one tasker; see the module docstring for the layout."""

    def __init__(
        self, root: str | os.PathLike[str], fsync: bool = True, gen_size: int = GEN_SIZE
    ) -> None:
        self.root = Path(root).absolute()
        self.fsync = fsync
        self.gen_size = gen_size
        self.status = self.root / "status"
        self.log_path = self.root / "log"
        self.attempts = self.root / "attempts"  # the older layout, read once
        self.results = self.root / "results"
        self._lock_fd: int | None = None
        self._mutex = threading.RLock()
        self._fd: int | None = None
        self._appended = 0
        self._gen = 0
        self._gen_used = gen_size  # spawns in the current status file: a new one first
        self._legacy_status = True  # per-attempt status files may exist (see compact)
        for d in (self.root, self.status, self.attempts, self.results):
            if d in (self.root, self.status):
                d.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            elif not d.is_dir():
                continue
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
        with self._mutex:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    # -- primitives ----------------------------------------------------------------------

    def write_atomic(self, path: Path, data: bytes) -> None:
        """tmp + fsync + rename + fsync(dir): after return the file survives a power cut."""
        durable.write_atomic(path, data, FILE_MODE, self.fsync)

    def _open(self) -> int:
        """The log, open for appending; a torn last line is compacted away first, or the
        next record would be glued to it (and lost with it)."""
        if self._fd is None:
            with contextlib.suppress(FileNotFoundError):
                with open(self.log_path, "rb") as f:
                    f.seek(0, os.SEEK_END)
                    if f.tell() > 0:
                        f.seek(-1, os.SEEK_END)
                        if f.read(1) != b"\n":
                            self.compact()
            if self._fd is None:
                self._fd = os.open(
                    self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, FILE_MODE
                )
        return self._fd

    def _append(self, records: list[dict[str, Any]], sync: bool) -> None:
        """One write (and one fsync if ``sync``) for the whole batch."""
        if not records:
            return
        data = b"".join(encode(r) for r in records)
        with self._mutex:
            fd = self._open()
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            if sync and self.fsync:
                os.fsync(fd)
            self._appended += len(records)
            if self._appended >= COMPACT_AT:
                self.compact()

    def _replay(self) -> tuple[dict[Key, dict[str, Any]], dict[Key, dict[str, Any]]]:
        """Attempt records and owed results as the disk has them (older layout first)."""
        records = self._load_dir(self.attempts)
        results = self._load_dir(self.results)
        try:
            data = self.log_path.read_bytes()
        except FileNotFoundError:
            data = b""
        for line in data.split(b"\n"):
            rec = decode(line)
            if rec is None:
                continue  # the torn tail (or an empty last piece)
            kind = rec.pop("k", None)
            try:
                if kind == "run":
                    key = key_of(rec)
                    if key not in results:
                        records[key] = rec
                elif kind == "end":
                    key = key_of(rec)
                    results[key] = rec
                    records.pop(key, None)
                elif kind in ("drop", "ack"):
                    gone = records if kind == "drop" else results
                    for j, a in rec.get("keys") or []:
                        gone.pop((int(j), int(a)), None)
            except (KeyError, TypeError, ValueError):
                continue
        return records, results

    def _load_dir(self, d: Path) -> dict[Key, dict[str, Any]]:
        """One json file per attempt: the older layout."""
        out: dict[Key, dict[str, Any]] = {}
        try:
            paths = list(d.iterdir())
        except FileNotFoundError:
            return out
        for p in paths:
            key = parse_name(p.name)
            if key is None or p.name.startswith("."):
                continue
            try:
                rec = json.loads(p.read_bytes())
            except (OSError, ValueError):
                continue
            if isinstance(rec, dict):
                out[key] = rec
        return out

    def compact(self) -> None:
        """Rewrite the log with its live records only; moves the older layout in, too.

        ``log.new`` is fsynced before it replaces ``log`` (then the directory is), so a
        crash at any point leaves either log whole. Status files nobody needs go as well.
        """
        with self._mutex:
            records, results = self._replay()
            lines = [encode({"k": "run", **r}) for r in records.values()]
            lines += [encode({"k": "end", **r}) for r in results.values()]
            new = self.root / "log.new"
            with contextlib.suppress(FileNotFoundError):
                new.unlink()
            fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
            try:
                data = memoryview(b"".join(lines))
                while data:
                    data = data[os.write(fd, data) :]
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(new, self.log_path)
            if self.fsync:
                durable.fsync_dir(self.root)
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            self._appended = 0
            for d in (self.attempts, self.results):  # now in the log
                if d.is_dir():
                    for p in d.iterdir():
                        with contextlib.suppress(OSError):
                            p.unlink()
                    with contextlib.suppress(OSError):
                        d.rmdir()
            self._drop_status_files({str(r.get("status")) for r in records.values()})
            # no older wrapper makes a new one: once none is left, none is looked for
            self._legacy_status = any(parse_name(p.name) for p in self.status.iterdir())

    def _drop_status_files(self, used: set[str]) -> None:
        """Remove shared status files no live attempt needs: not the current ones, none
        named by a run record, none holding a trace the log does not speak for yet."""
        for p in self.status.iterdir():
            gen = _gen_of(p)
            # the one before the current one too: a batch of spawns may straddle the switch
            # and not be recorded yet, and its wrappers may not have left their trace yet
            # (a restarted tasker has no current one: it found such wrappers through /proc)
            if gen is None or (self._gen and gen >= self._gen - 1) or str(p) in used:
                continue
            traces = read_traces(p)
            if all("D" in words for words in traces.values()):
                with contextlib.suppress(OSError):
                    p.unlink()

    # -- attempt records -----------------------------------------------------------------

    def status_path(self, key: Key) -> Path:
        """The per-attempt status file of the older layout."""
        return self.status / _name(key)

    def status_file(self) -> Path:
        """The shared status file for the next spawn (a new one every ``gen_size``)."""
        with self._mutex:
            if self._gen_used >= self.gen_size:
                gens = [g for p in self.status.iterdir() if (g := _gen_of(p)) is not None]
                self._gen = max([self._gen, *gens]) + 1
                self._gen_used = 0
                path = self.status / f"g{self._gen}"
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
                os.close(fd)
            self._gen_used += 1
            return self.status / f"g{self._gen}"

    def mark_recorded(self, keys: Iterable[tuple[Key, Path]]) -> None:
        """Tell the status files that the log speaks for these attempts now (``D``)."""
        by_path: dict[Path, list[Key]] = {}
        for key, path in keys:
            if _gen_of(path) is not None:
                by_path.setdefault(path, []).append(key)
        for path, ks in by_path.items():
            try:
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                os.write(fd, "".join(f"{_name(k)} D\n" for k in ks).encode())
            finally:
                os.close(fd)

    def write_record(self, record: dict[str, Any]) -> None:
        self.write_records([record])

    def write_records(self, records: list[dict[str, Any]]) -> None:
        """Attempt records of a batch of starts, durable on return (one fsync)."""
        stall = os.environ.get(STALL_ENV)
        if stall and os.path.exists(f"{stall}.{os.getpid()}"):
            # the crash tests hold the tasker here, between spawn and record: a FIFO of
            # that name blocks the open until a reader comes, which never happens
            with open(f"{stall}.{os.getpid()}", "wb"):
                pass
        self._append([{"k": "run", **r} for r in records], sync=True)

    def load_records(self) -> dict[Key, dict[str, Any]]:
        return self._replay()[0]

    def remove_attempt(self, key: Key) -> None:
        """Forget a finished attempt's record (its result now speaks for it)."""
        self.remove_attempts([key])

    def remove_attempts(self, keys: list[Key]) -> None:
        """Not fsynced: what a power cut brings back loses to the result, or is reported
        again ("killed while the tasker was down") and deduplicated by the server."""
        self._append([{"k": "drop", "keys": [list(k) for k in keys]}], sync=False)
        if self._legacy_status:  # a job of the older layout's wrapper
            for k in keys:
                with contextlib.suppress(FileNotFoundError):
                    self.status_path(k).unlink()

    def traces(self) -> dict[Key, tuple[Path, list[str]]]:
        """Attempts with a wrapper trace the log does not speak for (``D``), and older
        per-attempt status files: spawned by a tasker that died before recording them."""
        found: dict[Key, tuple[Path, list[str]]] = {}
        for p in sorted(self.status.iterdir()):
            if _gen_of(p) is not None:
                for key, words in read_traces(p).items():
                    if "D" not in words:
                        found[key] = (p, words)
            elif (old := parse_name(p.name)) is not None:
                found[old] = (p, [])
        return found

    def exit_status(self, key: Key) -> tuple[int | None, float] | None:
        """``read_status`` of an attempt, wherever its trace is (tests, tools)."""
        for p in sorted(self.status.iterdir(), reverse=True):
            if p.name == _name(key) or _gen_of(p) is not None:
                st = read_status(p, key)
                if st is not None:
                    return st
        return None

    def status_keys(self) -> list[Key]:
        return list(self.traces())

    # -- stored scripts --------------------------------------------------------------------

    def script_path(self, key: Key) -> Path:
        return self.root / "scripts" / _name(key)

    def scripts_dir(self) -> Path:
        d = self.root / "scripts"
        if not d.is_dir():
            d.mkdir(mode=DIR_MODE, exist_ok=True)
        return d

    def remove_scripts(self, keys: Iterable[Key]) -> None:
        for key in keys:
            with contextlib.suppress(FileNotFoundError):
                self.script_path(key).unlink()

    def script_keys(self) -> list[Key]:
        """Attempts with a stored script on disk (those still running need theirs)."""
        try:
            names = os.listdir(self.root / "scripts")
        except FileNotFoundError:
            return []
        return [k for n in names if (k := parse_name(n)) is not None]

    # -- results -------------------------------------------------------------------------

    def write_result(self, result: dict[str, Any]) -> None:
        self.write_results([result])

    def write_results(self, results: list[dict[str, Any]]) -> None:
        """Finished results, durable on return (one fsync for the batch)."""
        self._append([{"k": "end", **r} for r in results], sync=True)

    def load_results(self) -> dict[Key, dict[str, Any]]:
        return self._replay()[1]

    def remove_results(self, keys: list[Key]) -> None:
        """Drop acked results (not durably: see ``remove_attempts``)."""
        self._append([{"k": "ack", "keys": [list(k) for k in keys]}], sync=False)

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


def read_status(path: Path, key: Key | None = None) -> tuple[int | None, float] | None:
    """An attempt's exit status from its status file: ``(rc, mtime)``; rc None while it
    runs (or if its wrapper was killed); None if there is no trace of it at all.

    A shared status file (``g<N>``) is searched for the key's lines; a per-attempt file of
    the older layout is empty at start and holds ``"<rc>\\n"`` at the end.
    """
    try:
        st = path.stat()
    except OSError:
        return None
    if _gen_of(path) is not None:
        if key is None:
            return None
        words = read_traces(path).get(key)
        if words is None:
            return None
        codes = [w for w in words if w.lstrip("-").isdigit()]
        return (int(codes[-1]) if codes else None), st.st_mtime
    try:
        data = path.read_bytes()
    except OSError:
        return None
    text = data.decode(errors="replace")
    if not text.endswith("\n") or not text.strip().lstrip("-").isdigit():
        return None, st.st_mtime
    return int(text.strip()), st.st_mtime
