"""Start, watch, kill and re-adopt job processes.

Each job runs under the wrapper of ``procs`` (its own session, its exit status appended
to a status file in the state dir), so it survives a ``kill -9`` of the tasker. What the
runner learns goes into the state log, one fsync per batch (see ``statedir``), and into
its ``outbox`` (the reports the server has not acked yet); the agent sends them and tells
the outbox what was acked.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crq.tasker import cgroups, runas
from crq.tasker.alarms import Alarm, Alarms
from crq.tasker.cgroups import Memory
from crq.tasker.outbox import Outbox
from crq.tasker.procs import (
    SH,
    classify,
    find_orphan_wrappers,
    run_as_argv,
    wrapper_alive,
    wrapper_argv,
    wrapper_env,
)
from crq.tasker.runas import Owner, Owners
from crq.tasker.statedir import Key, StateDir, read_status

from crq import procfs

log = logging.getLogger("crq.tasker")

LOG_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
# Reset to default for the job: Python ignores SIGPIPE and SIGXFSZ, as Popen restores.
SIGDEF = tuple(
    s for s in signal.valid_signals() if s not in (signal.SIGKILL, signal.SIGSTOP) and s < 65
)
MAX_REASON = 1000  # the server takes up to 4096; a report it refuses would wedge the slot
LIMIT_ENV, GRACE_ENV = "CRQ_TIME_LIMIT", "CRQ_KILL_GRACE"  # in a limited job's environment
TIME_LIMIT = "time limit"  # the reason of an attempt ended by its time limit (SPEC 10)
LIMIT_GRACE = 30.0  # SIGTERM to SIGKILL at a time limit, unless the job says (kill_grace)
SCRIPT_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
# A script run as its owner is handed to the job open, as this fd: the owner reopens it
# through /proc (its own 0700 file) without a path into the tasker's private state dir.
SCRIPT_FD = 3


def _job_env(given: object, key: Key) -> tuple[dict[str, str], str | None]:
    """The job's environment, or why it cannot be one (execve would refuse it)."""
    if given is None:
        given = {}
    if not isinstance(given, dict):
        return {}, f"not a mapping: {type(given).__name__}"
    env: dict[str, str] = {}
    for k, v in given.items():
        name, value = str(k), str(v)
        if not name or "=" in name:
            return {}, f"variable name {name[:100]!r} is empty or holds '='"
        if "\0" in name or "\0" in value:
            return {}, f"variable {name[:100]!r} holds a NUL byte"
        env[name] = value
    env["CRQ_JOB_ID"] = str(key[0])
    env["CRQ_ATTEMPT"] = str(key[1])
    return env, None


@dataclass
class _Job:
    """One attempt this runner is responsible for (a child, or adopted from the state dir)."""

    job: int
    attempt: int
    pid: int
    pgid: int
    started: float
    status: Path
    child: bool = False  # spawned by us (reaped by us), not adopted
    kill_at: float | None = None
    sigkilled: bool = False
    done: bool = False
    lost: bool = False  # died while no tasker watched, without an exit status
    limit: float | None = None  # time limit, seconds from ``started``
    grace: float = LIMIT_GRACE
    limit_at: float | None = None  # when we enforced the limit (recorded before the SIGTERM)
    ram: int | None = None  # MB the job asked for (RAM/N)
    cgroup: str | None = None  # its memory group, when the tasker enforces memory
    script: bool = False  # runs a stored script (state.script_path): removed at the end
    oom: bool = False  # the kernel killed in its group for memory
    alarm: Alarm | None = None  # its time limit to come (cancelled when it ends first)

    @property
    def key(self) -> Key:
        return self.job, self.attempt

    def running_report(self) -> dict[str, Any]:
        return {"job": self.job, "attempt": self.attempt, "pid": self.pid, "started": self.started}

    def record(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "attempt": self.attempt,
            "pid": self.pid,
            "pgid": self.pgid,
            "started": self.started,
            "status": str(self.status),
            "kill_at": self.kill_at,
            # the rest only when set: a plain attempt's record is as long as it was
            **{k: v for k, v in self._extras().items() if v is not None and v is not False},
        }

    def _extras(self) -> dict[str, Any]:
        return {
            "time_limit": self.limit,
            "kill_grace": self.grace if self.limit is not None else None,
            "limit_at": self.limit_at,
            "ram": self.ram,
            "cgroup": self.cgroup,
            "script": self.script,
        }

    @classmethod
    def from_record(cls, key: Key, rec: dict[str, Any], now: float, status: Path) -> _Job:
        """The attempt a record describes; a damaged one keeps the key (it is settled)."""
        try:
            job = cls(
                key[0],
                key[1],
                int(rec["pid"]),
                int(rec.get("pgid") or rec["pid"]),
                float(rec.get("started") or now),
                Path(rec.get("status") or status),
                kill_at=rec.get("kill_at"),
            )
        except (KeyError, TypeError, ValueError):
            return cls(key[0], key[1], 0, 0, now, status)
        with contextlib.suppress(TypeError, ValueError):
            job.limit = float(rec["time_limit"]) if rec.get("time_limit") else None
            job.grace = float(rec.get("kill_grace", LIMIT_GRACE))
            job.limit_at = float(rec["limit_at"]) if rec.get("limit_at") else None
            job.ram = int(rec["ram"]) if rec.get("ram") else None
        cgroup = rec.get("cgroup")
        job.cgroup = cgroup if isinstance(cgroup, str) else None
        job.script = bool(rec.get("script"))
        return job


@dataclass(frozen=True)
class Ending:
    """How one attempt ended, as ``_finish_many`` records it.

    ``reason`` None: derived from the rest (a signal, a kill the server asked for).
    """

    job: _Job
    exit_code: int | None
    signal: int | None
    ended: float
    reason: str | None = None


def orphan_status(pid: int, key: Key, state: StateDir) -> Path:
    """The status file a running wrapper writes to: its argv names it."""
    argv = procfs.cmdline(pid)
    if argv is not None and len(argv) > 4:
        return Path(os.fsdecode(argv[4]))
    return state.status_path(key)


def _result(end: Ending) -> dict[str, Any]:
    """The finished report of an ending, with the reason a limit, a kill or a signal implies
    (the first of a time limit and a kill the server asked for says why it ended)."""
    job, reason, sig = end.job, end.reason, end.signal
    if reason is not None:
        pass
    elif job.limit_at is not None and (job.kill_at is None or job.limit_at <= job.kill_at):
        reason = TIME_LIMIT
    elif job.oom:
        reason = f"out of memory (RAM/{job.ram})"
    elif end.exit_code is None or job.kill_at is not None:
        if job.kill_at is not None:
            reason = "killed on server request" + (f" (signal {sig})" if sig else "")
        else:
            reason = f"killed by signal {sig}" if sig else "killed"
    result: dict[str, Any] = {
        "job": job.job,
        "attempt": job.attempt,
        "exit_code": end.exit_code,
        "signal": sig,
        "started": job.started,
        "ended": max(end.ended, job.started),  # file mtimes tick coarser than time()
        "reason": reason,
    }
    if job.lost:
        result["lost"] = True
    return result


def _number(value: object) -> float | None:
    """A JSON number (not a bool), finite; None for anything else."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    v = float(value)
    return v if v == v and abs(v) != float("inf") else None


def _limits(d: dict[str, Any]) -> tuple[_Job, str | None]:
    """A dispatch's limits, on a scratch ``_Job``; or why they are unusable."""
    out = _Job(0, 0, 0, 0, 0.0, Path())
    if d.get("time_limit") is not None:
        limit = _number(d["time_limit"])
        if limit is None or limit <= 0:
            return out, f"bad time_limit: {d['time_limit']!r:.100}"
        out.limit = limit
    if d.get("kill_grace") is not None:
        grace = _number(d["kill_grace"])
        if grace is None or grace < 0:
            return out, f"bad kill_grace: {d['kill_grace']!r:.100}"
        out.grace = grace
    ram = d.get("ram")
    if ram is not None:
        if isinstance(ram, bool) or not isinstance(ram, int) or ram <= 0:
            return out, f"bad ram: {ram!r:.100}"
        out.ram = ram
    return out, None


class Runner:
    """Owns the job processes; what it learns of them goes into ``outbox``."""

    def __init__(
        self,
        state: StateDir,
        on_event: Callable[[], None] = lambda: None,
        kill_grace: float = 5.0,
        poll_interval: float = 0.5,
        slots: int | None = None,
        memory: Memory | None = None,
    ) -> None:
        self.state = state
        self.slots = slots  # None: no limit of our own (the server's accounting only)
        self.kill_grace = kill_grace
        self.poll_interval = poll_interval
        self.on_event = on_event
        self._lock = threading.Lock()
        self._jobs: dict[Key, _Job] = {}
        self.outbox = Outbox(state)
        self._held: dict[Key, dict[str, Any]] = {}  # dispatched, waiting for a free slot
        self._unusable_seen: dict[str, None] = {}
        self._starting = threading.Lock()  # one spawner at a time: room is counted once
        self._closed = threading.Event()
        self._poller: threading.Thread | None = None
        self._to_watch: list[tuple[int, _Job]] = []
        self._wake_r: int | None = None
        self._wake_w: int | None = None
        self.owners = Owners()
        self.memory = memory  # None: RAM/N is not enforced (no --enforce-memory, no cgroup)
        self.alarms = Alarms()

    # -- queries for the agent ------------------------------------------------------------

    def running(self) -> list[dict[str, Any]]:
        """``Running`` reports of every attempt we hold (register sends them all).

        An attempt that just ended stays listed until its result is in the outbox: register
        reads this list, then the outbox, and an attempt in neither would be recovered by
        the server, and run again, while its result is on its way to the disk.
        """
        with self._lock:
            return [j.running_report() for j in self._jobs.values()]

    def running_attempts(self) -> list[dict[str, int]]:
        """What we have of each attempt sent to us: live ones, and those held for a slot
        (listed, so the server neither sends them again nor forgets to kill them)."""
        with self._lock:
            live = [(j.job, j.attempt) for j in self._jobs.values() if not j.done]
            return [{"job": k[0], "attempt": k[1]} for k in [*live, *self._held]]

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return sum(not j.done for j in self._jobs.values()), self.outbox.pending()

    # -- starting ------------------------------------------------------------------------

    def start(self, d: dict[str, Any]) -> None:
        """Run one dispatch item; any failure to start becomes a finished report."""
        self.start_many([d])

    def start_many(self, items: list[dict[str, Any]]) -> None:
        """Run the dispatch items of one answer, as far as our slots allow; hold the rest.

        Slots can be short although the server counts them free: attempts it superseded
        (we were cut off, it requeued our jobs) die within the kill grace, and until then
        a new job would run beyond our slots. Held items start as running jobs end.
        """
        unusable: list[tuple[object, Exception]] = []
        with self._lock:
            for d in items:
                try:
                    key = int(d["job"]), int(d["attempt"])
                except (TypeError, ValueError, KeyError) as e:
                    unusable.append((d, e))
                    continue
                if key in self._jobs or self.outbox.knows(key):
                    log.info("job %d.%d: dispatched again, ignored", *key)
                    continue
                self._held.setdefault(key, d)
        for item, error in unusable:
            self._unusable(item, error)
        self._start_held()

    def _start_held(self) -> None:
        with self._starting:
            while True:
                with self._lock:
                    busy = sum(not j.done for j in self._jobs.values())
                    room = len(self._held) if self.slots is None else self.slots - busy
                    if room <= 0 or not self._held:
                        if self._held:
                            log.info("%d dispatched jobs wait for a free slot", len(self._held))
                        return
                    batch = [self._held.pop(k) for k in list(self._held)[:room]]
                if self._spawn_batch(batch) == len(batch):
                    return  # every slot taken is held by a job: its end starts the next
                # some did not start (reported failed): their slots are free at once

    def _spawn_batch(self, items: list[dict[str, Any]]) -> int:
        """Spawn them all, then record them all; returns how many run.

        The attempt records are made durable together (one log fsync) before any of
        the jobs is reported started or watched for its end. A crash between the spawn and
        the record leaves a job that ``recover`` finds through /proc while it runs, or
        through the trace its wrapper left at start once it has ended or been killed.
        """
        jobs: list[_Job] = []
        names: list[str] = []
        seen: set[Key] = set()
        for d in items:
            try:
                spawned = self._spawn(d, seen)
            except Exception as e:  # noqa: BLE001 - no (job, attempt): nothing to report on
                self._unusable(d, e)
                continue
            if spawned is not None:
                jobs.append(spawned[0])
                names.append(spawned[1])
        if not jobs:
            return 0
        try:
            self.state.write_records([j.record() for j in jobs])  # one fsync
            self.state.mark_recorded((j.key, j.status) for j in jobs)
        except OSError as e:  # the jobs run anyway; a restart finds them through /proc
            log.error("cannot record %d started attempts: %s", len(jobs), e)
        with self._lock:
            for job in jobs:
                self._jobs[job.key] = job
                self.outbox.add_started(job.running_report())
        for job, name in zip(jobs, names, strict=True):
            log.debug("job %d.%d started, pid %d: %s", *job.key, job.pid, name)
            self._arm(job)  # before the watch: an end cancels the alarm it finds
            self._watch(job)
        self.on_event()
        return len(jobs)

    def _spawn(self, d: dict[str, Any], seen: set[Key]) -> tuple[_Job, str] | None:
        """Spawn one dispatch item's wrapper: the job and its name, or None (not started)."""
        key = int(d["job"]), int(d["attempt"])
        with self._lock:
            again = key in self._jobs or self.outbox.knows(key)
        if again or key in seen:
            log.info("job %d.%d: dispatched again, ignored", *key)
            return None
        seen.add(key)
        now = time.time()
        try:
            return self._launch(key, d, now)
        except Exception as e:  # noqa: BLE001 - whatever went wrong, the server must hear it
            log.exception("job %d.%d: unexpected error while starting it", *key)
            self._fail(key, now, f"cannot start: {type(e).__name__}: {e}")
            return None

    def _launch(self, key: Key, d: dict[str, Any], now: float) -> tuple[_Job, str] | None:
        """_spawn's work; a dispatch it cannot run is reported failed with the reason."""
        cwd = d.get("cwd")
        script = d.get("script")
        argv = self._argv(key, d.get("command"), script, now)
        if argv is None:
            return None
        if isinstance(cwd, str) and "\0" in cwd:
            self._fail(key, now, "bad cwd: it holds a NUL byte")
            return None
        if not isinstance(cwd, str) or not os.path.isdir(cwd):
            self._fail(key, now, f"cwd does not exist: {cwd}")
            return None
        env, bad = _job_env(d.get("env"), key)
        if bad:
            self._fail(key, now, f"bad env: {bad}")
            return None
        logpath = os.path.join(cwd, str(d.get("log") or f"crq.{key[0]}.log"))
        if "\0" in logpath:
            self._fail(key, now, "bad log path: it holds a NUL byte")
            return None
        limits, bad = _limits(d)
        if bad:
            self._fail(key, now, bad)
            return None
        if limits.limit is not None:
            # for the job, and for a restarted tasker that finds it running unrecorded
            env[LIMIT_ENV], env[GRACE_ENV] = f"{limits.limit:g}", f"{limits.grace:g}"
        owner, why = self.owners.decide(d.get("user"))
        if owner is not None:
            why = runas.refusal(owner, cwd, logpath)
        if why is not None:
            self._fail(key, now, why)
            return None
        name = str(d.get("name") or (argv[0] if script is None else "script"))
        if isinstance(script, str):
            try:
                argv = self._store_script(key, script, argv, owner)
            except OSError as e:
                self._fail(key, now, f"cannot store the script: {e.strerror or e}")
                return None
            limits.script = True
        job = self._contained(key, d, now, argv, cwd, env, logpath, owner, limits)
        if job is None and limits.script:
            self.state.remove_scripts([key])
        return None if job is None else (job, name)

    def _argv(self, key: Key, command: object, script: object, now: float) -> list[str] | None:
        """The argv of a command line, a command list or a stored script's arguments."""
        if script is not None:
            if not isinstance(script, str):
                self._fail(key, now, f"bad script: not a string but {type(script).__name__}")
                return None
            command = [] if command is None else command
        if isinstance(command, str) and command and script is None:
            argv = [SH, "-c", command]
        elif (
            isinstance(command, list)
            and (command or script is not None)
            and all(isinstance(a, str) for a in command)
        ):
            argv = list(command)
        else:
            self._fail(key, now, f"bad command: {command!r}")
            return None
        if any("\0" in a for a in argv):
            self._fail(key, now, "bad command: it holds a NUL byte")
            return None
        return argv

    def _store_script(
        self, key: Key, script: str, args: list[str], owner: Owner | None
    ) -> list[str]:
        """Write the attempt's script (0700, its owner's) and return the argv that runs it:
        itself when it starts with ``#!``, else ``/bin/sh`` on it (as sbatch's default).
        Run as its owner, it is ``/dev/fd/3`` (SCRIPT_FD), opened by the spawn."""
        self.state.scripts_dir()
        path = self.state.script_path(key)
        fd = os.open(path, SCRIPT_FLAGS, 0o700)
        try:
            os.fchmod(fd, 0o700)  # whatever the umask: the owner runs it, nobody writes it
            if owner is not None:
                os.fchown(fd, owner.uid, owner.gid)
            data = memoryview(script.encode(errors="surrogatepass"))
            while data:
                data = data[os.write(fd, data) :]
        finally:
            os.close(fd)
        where = f"/dev/fd/{SCRIPT_FD}" if owner is not None else str(path)
        return [where, *args] if script.startswith("#!") else [SH, where, *args]

    def _contained(
        self,
        key: Key,
        d: dict[str, Any],
        now: float,
        argv: list[str],
        cwd: str,
        env: dict[str, str],
        logpath: str,
        owner: Owner | None,
        limits: _Job,
    ) -> _Job | None:
        """Spawn it, in a memory group of its own when it asks for RAM and we enforce it."""
        pre: list[str] = []
        group = None
        if self.memory is not None and limits.ram:
            try:
                group = self.memory.prepare(f"{key[0]}.{key[1]}", limits.ram)
            except OSError as e:
                self._fail(key, now, f"cannot enforce RAM/{limits.ram}: {e.strerror or e}")
                return None
            pre = self.memory.join_argv(group)
            limits.cgroup = str(group)
        if owner is None:
            job = self._spawn_here(key, now, [*pre, *argv], cwd, env, logpath)
        else:
            script = self.state.script_path(key) if limits.script else None
            job = self._spawn_as(key, now, owner, pre, argv, cwd, env, logpath, script)
        if job is None:
            if group is not None:
                cgroups.remove(group)
            return None
        job.limit, job.grace, job.ram = limits.limit, limits.grace, limits.ram
        job.cgroup, job.script = limits.cgroup, limits.script
        return job

    def _spawn_as(
        self,
        key: Key,
        now: float,
        owner: Owner,
        pre: list[str],
        argv: list[str],
        cwd: str,
        env: dict[str, str],
        logpath: str,
        script: Path | None = None,
    ) -> _Job | None:
        """A job run as its owner: the log is the owner's to open (AS_OWNER), nothing of
        the job's as root; ``pre`` (joining a group) runs as root, before the switch."""
        actions: list[tuple[Any, ...]] = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
            (os.POSIX_SPAWN_DUP2, 1, 2),
        ]
        if script is not None:
            actions.append((os.POSIX_SPAWN_OPEN, SCRIPT_FD, str(script), os.O_RDONLY, 0))
        return self._spawn_wrapped(
            key,
            now,
            cwd,
            lambda status: run_as_argv(
                status, key, [*pre, *owner.setpriv()], logpath, os.path.abspath(cwd), argv
            ),
            owner.env(env),
            actions,
        )

    def _spawn_here(
        self,
        key: Key,
        now: float,
        argv: list[str],
        cwd: str,
        env: dict[str, str],
        logpath: str,
    ) -> _Job | None:
        """A job run as this tasker's own user: the log opened here, handed to the job."""
        try:
            logdir = os.path.dirname(logpath) or "."
            if not os.path.isdir(logdir):  # mkdir of an existing dir costs more than a stat
                os.makedirs(logdir, exist_ok=True)
            logfd = os.open(logpath, LOG_FLAGS, 0o666)  # handed to the child, closed below
        except OSError as e:
            self._fail(key, now, f"cannot open log {logpath}: {e.strerror or e}")
            return None
        try:
            return self._spawn_wrapped(
                key,
                now,
                cwd,
                lambda status: wrapper_argv(status, key, os.path.abspath(cwd), argv),
                env,
                [
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_DUP2, logfd, 1),
                    (os.POSIX_SPAWN_DUP2, logfd, 2),
                ],
            )
        finally:
            os.close(logfd)

    def _spawn_wrapped(
        self,
        key: Key,
        now: float,
        cwd: str,
        wrapped: Callable[[Path], list[str]],
        env: dict[str, str],
        actions: list[tuple[Any, ...]],
    ) -> _Job | None:
        """posix_spawn a wrapper (``wrapped(status file)``) in a session of its own.

        posix_spawn (vfork + exec) costs a third of Popen's fork_exec here. Only fds made
        inheritable reach the child: Python opens everything close-on-exec.
        """
        try:
            status = self.state.status_file()
        except OSError as e:
            self._fail(key, now, f"cannot start: state dir: {e.strerror or e}")
            return None
        spawned = time.time()
        try:
            pid = os.posix_spawn(
                SH,
                wrapped(status),
                env,
                file_actions=actions,
                setsid=True,
                setsigmask=(),
                setsigdef=SIGDEF,
            )
        except OSError as e:
            reason = (
                f"cwd does not exist: {cwd}"
                if not os.path.isdir(cwd)
                else f"cannot start: {e.strerror or e}"
            )
            self._fail(key, now, reason)
            return None
        return _Job(key[0], key[1], pid, pid, spawned, status, child=True)

    def _unusable(self, d: object, e: Exception) -> None:
        """A dispatch item without a usable (job, attempt) cannot be reported on: say so
        once (the server sends it again until reported; the log must not grow with it)."""
        text = f"{d!r:.200}"
        with self._lock:
            if text in self._unusable_seen:
                return
            self._unusable_seen[text] = None
            while len(self._unusable_seen) > 1000:
                self._unusable_seen.pop(next(iter(self._unusable_seen)))
        log.error("malformed dispatch %s: %s: %s", text, type(e).__name__, e)

    def _fail(self, key: Key, now: float, reason: str) -> None:
        """An attempt that cannot start is reported failed, with the reason: never dropped."""
        if len(reason) > MAX_REASON:  # the server refuses longer ones, with the whole report
            reason = reason[: MAX_REASON - 1] + "\u2026"
        log.warning("job %d.%d not started: %s", *key, reason)
        result = {
            "job": key[0],
            "attempt": key[1],
            "exit_code": None,
            "signal": None,
            "started": now,
            "ended": now,
            "reason": reason,
        }
        self.outbox.store_results([result])
        self.on_event()

    # -- finishing -----------------------------------------------------------------------

    def _watch(self, job: _Job) -> None:
        """Have the end of our child noticed: by the one reaper thread, through a pidfd."""
        assert job.child
        try:
            pidfd = os.pidfd_open(job.pid)
        except (AttributeError, OSError):  # no pidfd here: one waiting thread for this job
            threading.Thread(
                target=self._wait_child,
                args=(job,),
                name=f"wait-{job.job}.{job.attempt}",
                daemon=True,
            ).start()
            return
        with self._lock:
            self._to_watch.append((pidfd, job))
            if self._wake_w is None:
                self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
                threading.Thread(
                    target=self._reap_loop, args=(self._wake_r,), name="reaper", daemon=True
                ).start()
            else:
                with contextlib.suppress(BlockingIOError):  # a full pipe wakes it anyway
                    os.write(self._wake_w, b"x")

    def _reap_loop(self, wake_r: int) -> None:
        """Wait for any of our children to end and finish those that did, in batches.

        Each child's pidfd becomes readable when it exits; the children are reaped one by
        one (never ``waitpid(-1)``, which would take other code's children). Quits after a
        while with nothing to watch, so an idle tasker keeps no thread.
        """
        poller = select.poll()
        poller.register(wake_r, select.POLLIN)
        watched: dict[int, _Job] = {}
        idle = False
        while True:
            with self._lock:
                new, self._to_watch = self._to_watch, []
                if not new and not watched and idle:
                    os.close(wake_r)
                    assert self._wake_w is not None
                    os.close(self._wake_w)
                    self._wake_r = self._wake_w = None
                    return
            for pidfd, job in new:
                watched[pidfd] = job
                poller.register(pidfd, select.POLLIN)
            ended: list[_Job] = []
            try:
                events = poller.poll(None if watched else 2000)
                idle = not events and not watched
                for fd, _ in events:
                    if fd == wake_r:
                        with contextlib.suppress(BlockingIOError):
                            os.read(wake_r, 4096)
                        continue
                    poller.unregister(fd)
                    os.close(fd)
                    ended.append(watched.pop(fd))
                if ended:
                    self._finish_many([self._ended(job) for job in ended])
            except Exception:  # the reaper must outlive a bug: every job depends on it
                log.exception("internal error while reaping jobs; carrying on")
                for job in ended:  # not lost: watched (and finished) by a thread each
                    if not job.done:
                        threading.Thread(target=self._wait_child, args=(job,), daemon=True).start()
                time.sleep(0.1)

    def _ended(self, job: _Job) -> Ending:
        """Reap one ended child: its exit code, signal and end time."""
        assert job.child
        rc = os.waitstatus_to_exitcode(os.waitpid(job.pid, 0)[1])
        return Ending(job, *classify(rc), time.time())

    def _wait_child(self, job: _Job) -> None:
        self._finish_many([self._ended(job)])

    def _finish(
        self,
        job: _Job,
        exit_code: int | None,
        sig: int | None,
        ended: float,
        reason: str | None = None,
    ) -> None:
        self._finish_many([Ending(job, exit_code, sig, ended, reason)])

    def _finish_many(self, ends: list[Ending]) -> None:
        """Record the results durably, then drop the attempt records; report them at once."""
        with self._lock:
            todo = [end for end in ends if not end.job.done]
            for end in todo:
                end.job.done = True
        if not todo:
            return
        for end in todo:
            if end.job.cgroup is not None:  # read before it goes: the verdict is in it
                end.job.oom = cgroups.oom_killed(Path(end.job.cgroup), end.signal)
        results = [_result(end) for end in todo]
        self.outbox.store_results(results)
        try:
            self.state.remove_attempts([end.job.key for end in todo])
        except OSError as e:
            log.error("cannot remove attempt records: %s", e)
        self._clean_up([end.job for end in todo])
        with self._lock:
            for end in todo:
                self._jobs.pop(end.job.key, None)
            held = bool(self._held)
        if held:
            self._start_held()
        if log.isEnabledFor(logging.DEBUG):
            for r in results:
                log.debug(
                    "job %d.%d finished: exit %s, %s",
                    r["job"],
                    r["attempt"],
                    r["exit_code"],
                    r["reason"],
                )
        self.on_event()

    def _clean_up(self, jobs: list[_Job]) -> None:
        """What an ended attempt leaves: its time limit to come, its stored script, its
        memory group."""
        for job in jobs:
            if job.alarm is not None:
                self.alarms.cancel(job.alarm)
        self.state.remove_scripts(j.key for j in jobs if j.script)
        for job in jobs:
            if job.cgroup is not None and not cgroups.remove(Path(job.cgroup)):
                log.warning("job %d.%d: cannot remove cgroup %s", *job.key, job.cgroup)

    # -- time limits ---------------------------------------------------------------------

    def _arm(self, job: _Job) -> None:
        """Have the time limit enforced at ``started + limit``: the attempt's own start, as
        recorded, so an attempt re-adopted after a restart keeps the deadline it had."""
        if job.limit is None:
            return
        if job.limit_at is not None:
            # enforced before a restart: see it through. No second SIGTERM (one that traps it
            # may be cleaning up); if the crash came between the record and the SIGTERM, the
            # SIGKILL at the end of the grace still ends it
            self._schedule_sigkill(job, job.limit_at + job.grace - time.time())
            return
        job.alarm = self.alarms.at(job.started + job.limit, lambda: self._time_limit(job))

    def _time_limit(self, job: _Job) -> None:
        """SIGTERM at the limit, SIGKILL after the grace. Recorded first (fsynced), so a
        tasker that dies before reporting still reports it as a time limit."""
        with self._lock:
            if job.done or job.limit_at is not None:
                return
            job.limit_at = time.time()
        log.info(
            "job %d.%d: time limit of %g s reached, pid %d: SIGTERM, SIGKILL in %g s",
            *job.key,
            job.limit,
            job.pid,
            job.grace,
        )
        try:
            self.state.write_record(job.record())
        except OSError as e:
            log.error("job %d.%d: cannot record the time limit: %s", *job.key, e)
        self._schedule_sigkill(job, job.grace)
        self._signal(job, signal.SIGTERM)

    # -- killing -------------------------------------------------------------------------

    def kill(self, key: Key) -> bool:
        """SIGTERM the attempt's process group, SIGKILL after the grace; False if unknown."""
        with self._lock:
            held = self._held.pop(key, None)
            job = self._jobs.get(key)
            if held is None and (job is None or job.done):
                return False
        if held is not None:
            self._fail(key, time.time(), "killed on server request before it started")
            return True
        assert job is not None
        with self._lock:
            first = job.kill_at is None
            if first:
                job.kill_at = time.time()
        if first:
            log.info("job %d.%d: kill requested, pid %d", *key, job.pid)
            with contextlib.suppress(OSError):  # a restart then escalates on its own
                self.state.write_record(job.record())
            self._schedule_sigkill(job, self.kill_grace)
        self._signal(job, signal.SIGTERM)
        return True

    def _schedule_sigkill(self, job: _Job, delay: float) -> None:
        t = threading.Timer(max(0.0, delay), self._sigkill, args=(job,))
        t.daemon = True
        t.start()

    def _sigkill(self, job: _Job) -> None:
        if not job.done:
            job.sigkilled = True
            self._signal(job, signal.SIGKILL)

    def _signal(self, job: _Job, sig: int) -> None:
        if job.done or (not job.child and not wrapper_alive(job.pid, job.status, job.key)):
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(job.pgid, sig)

    # -- re-adoption ---------------------------------------------------------------------

    def recover(self, rebooted: bool = False) -> tuple[int, int]:
        """Rebuild from the state dir after a tasker restart: (adopted, results pending).

        A logged result wins over everything; then an exit status (the job ended
        while we were away); then a live wrapper is adopted; anything else was killed
        (reported lost, for the rerun policy), or vanished with a reboot (left to the
        server: see ``_settle``).
        Attempts spawned but never recorded (the tasker died in between) are found too,
        through /proc while they run and through their wrapper's trace after: every attempt
        this state dir ever spawned is listed, or the server would send it again.
        """
        results = self.state.load_results()
        self.outbox.load(results)
        records = self.state.load_records()
        traces = self.state.traces()
        orphans = find_orphan_wrappers(self.state.status)
        now = time.time()
        for key, rec in records.items():
            if key in results:
                self.state.remove_attempt(key)
                continue
            job = _Job.from_record(key, rec, now, self.state.status_path(key))
            self._settle(job, rebooted)
        found = [
            self._orphan(key, pid)
            for key, pid in orphans.items()
            if key not in records and key not in results
        ]
        if found:
            # Recorded before they are adopted (and watched, and maybe finished): the next
            # restart then knows them, with their start time, even if they die meanwhile.
            try:
                self.state.write_records([job.record() for job in found])
            except OSError as e:
                log.error("cannot record %d adopted attempts: %s", len(found), e)
        for job in found:
            log.info("job %d.%d: found running without a record, adopting", *job.key)
            self._settle(job, rebooted)
        for key, (status, _) in traces.items():
            with self._lock:
                known = key in self._jobs or self.outbox.has_result(key)
            if key in results:  # its result was recorded just before a crash
                self.state.remove_attempt(key)
            elif not known and key not in records:
                # Spawned, never recorded, not running: ended or killed while we were away.
                # The file's mtime is the best start time left: the start while it holds
                # no exit status, the end (or later) once it does.
                st = read_status(status, key)
                started = min(st[1], now) if st is not None else now
                log.info("job %d.%d: spawned without a record, no longer running", *key)
                self._settle(_Job(key[0], key[1], 0, 0, started, status), rebooted)
        # every trace is spoken for by the log now; the older layout moves into it
        self.state.mark_recorded((key, status) for key, (status, _) in traces.items())
        self.state.compact()
        self._sweep()
        adopted, pending = self.counts()
        return adopted, pending

    def _orphan(self, key: Key, pid: int) -> _Job:
        """An attempt found running without a record (spawned just before a crash): its
        limits from its wrapper's environment, its script and group where they would be."""
        job = _Job(*key, pid, pid, procfs.start_time(pid), orphan_status(pid, key, self.state))
        env = wrapper_env(pid)
        with contextlib.suppress(KeyError, ValueError):
            job.limit = float(env[LIMIT_ENV])
            job.grace = float(env[GRACE_ENV])
        job.script = self.state.script_path(key).exists()
        if self.memory is not None:
            group = self.memory.group(f"{key[0]}.{key[1]}")
            if group.is_dir():
                job.cgroup = str(group)
                with contextlib.suppress(OSError, ValueError):
                    job.ram = cgroups.limit_mb(group)
        return job

    def _sweep(self) -> None:
        """Remove the scripts and memory groups of attempts no longer here (a crash left)."""
        with self._lock:
            live = {k: j for k, j in self._jobs.items() if not j.done}
        self.state.remove_scripts(k for k in self.state.script_keys() if k not in live)
        if self.memory is not None:
            self.memory.sweep({j.cgroup for j in live.values() if j.cgroup})

    def _settle(self, job: _Job, rebooted: bool) -> None:
        """Decide what became of one recorded attempt: finished, still running, or gone."""
        st = read_status(job.status, job.key)
        if st is not None and st[0] is not None:
            self._finish(job, *classify(st[0]), st[1])
            return
        if rebooted:
            # Not reported as a result (that would read as a job failure): the
            # registration says ``rebooted`` and the server recovers every attempt we
            # do not list, requeueing the rerunnable ones.
            log.info("job %d.%d: gone with the host reboot; the server recovers it", *job.key)
            self.state.remove_attempt(job.key)
            self._clean_up([job])
            return
        if wrapper_alive(job.pid, job.status, job.key):
            with self._lock:
                self._jobs[job.key] = job
                self.outbox.add_started(job.running_report())
            log.info("job %d.%d: re-adopted, pid %d", *job.key, job.pid)
            if job.kill_at is not None:
                self._schedule_sigkill(job, job.kill_at + self.kill_grace - time.time())
            self._arm(job)
            self._ensure_poller()
            return
        st = read_status(job.status, job.key)  # it may have ended between the two looks
        if st is not None and st[0] is not None:
            self._finish(job, *classify(st[0]), st[1])
        elif job.limit_at is not None:
            # killed for its time limit (the SIGKILL takes the wrapper too) while no tasker
            # watched: a result of the job, as if we had seen it end
            late = time.time() >= job.limit_at + job.grace
            self._finish(job, None, int(signal.SIGKILL) if late else None, time.time())
        else:
            # No status: it died with its wrapper while no tasker watched, most likely
            # killed together with the tasker. Not a result of the job: reported lost, so
            # the server applies the rerun policy, as its monitor does for a silent tasker.
            job.lost = True
            self._finish(job, None, None, time.time(), "killed while the tasker was down")

    def _ensure_poller(self) -> None:
        if self._poller is None or not self._poller.is_alive():
            self._poller = threading.Thread(target=self._poll_adopted, name="adopted", daemon=True)
            self._poller.start()

    def _poll_adopted(self) -> None:
        """Adopted jobs are not our children: watch their status file and pid instead."""
        while not self._closed.wait(self.poll_interval):
            with self._lock:
                adopted = [j for j in self._jobs.values() if not j.child and not j.done]
            if not adopted:
                return
            for job in adopted:
                st = read_status(job.status, job.key)
                if st is not None and st[0] is not None:
                    self._finish(job, *classify(st[0]), st[1])
                elif not wrapper_alive(job.pid, job.status, job.key):
                    st = read_status(job.status, job.key)
                    if st is not None and st[0] is not None:
                        self._finish(job, *classify(st[0]), st[1])
                    else:
                        sig = int(signal.SIGKILL) if job.sigkilled else None
                        self._finish(job, None, sig, time.time())

    def close(self) -> None:
        """Stop watching; the jobs keep running and the next tasker re-adopts them."""
        self._closed.set()
        self.alarms.close()
