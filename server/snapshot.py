"""Full snapshots of the state: ``trace.db/snapshot.<seq>``, framed like the journal.

The first record is a versioned header, the last a footer with the record count, so a
snapshot cut short or damaged anywhere is detected. Written to a temporary name, fsynced,
renamed, and the directory fsynced: a snapshot file either exists whole or not at all.
"""

from __future__ import annotations

import os
import struct
import sys
import time
from pathlib import Path
from typing import Any, BinaryIO

import orjson
from crq.server.events import NL, TaskerJoin
from crq.server.gates import Array, Wait
from crq.server.journal import HEADER, MAX_RECORD, RecordReader, frame
from crq.server.state import ACTIVE, Attempt, Job, State, Tasker, Token, env_digest

from crq.durable import fsync_dir
from crq.wire import QUEUED, RUNNING

# The format rule (as beanstalkd's Walver in dat.h). The journal has no version number: its
# records are the events of server/events.py, and a server reads every journal an earlier
# one wrote. So an event kind's fields only grow; a new field is NotRequired and its absence
# means what the state did before it (``state_id``, ``session``, ``charge``); a kind never
# changes meaning, and a changed one is a new kind. A reader meets an unknown kind only
# from a newer server, and refuses it (a downgrade is not supported). A record shape that
# changes anyway (the raw submit specs) is read in both shapes (events._upgrade_submit).
# A snapshot is rewritten at every checkpoint, so its layout may change: bump VERSION, keep
# reading the previous versions (a snapshot left by the older server), and say here what
# each version is.
# 5: as 4, plus records {"arrays": [[first, count, start, step, max_running], …]},
#    {"waits": [[job, held, pending, limited], …]} (why waiting jobs wait) and
#    {"dependents": [[parent, [[child, type], …]], …]} (server/gates.py); 4 (still read,
#    none of them: no job waits):
# 4: as 3, plus records {"tokens": [token, …]} (the personal tokens: id, user, role, hash,
#    expires, created, by, note) and {"controls": [[job, t, action, by], …]} (who stopped or
#    reran a job); 3 (still read, neither):
# 3: as 2, plus records {"keys": [[user, key, first id, count, time, digest], …]} (the
#    idempotency keys, oldest first, CHUNK a record); 2 (still read, no keys): jobs in chunks
#    of CHUNK, specs raw; 1 (still read): a record a job.
VERSION = 5
CHUNK = 1000
PREFIX = "snapshot."
KEEP = 2  # the newest and its predecessor, to fall back to


class SnapshotError(Exception):
    pass


def snapshot_seq(path: Path) -> int:
    return int(path.name[len(PREFIX) :])


def epoch_of(path: Path) -> int:
    """The epoch of the leader that wrote a snapshot, from its first record alone (0 when
    it has none or cannot be read: the whole read then judges it)."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER.size)
            length = HEADER.unpack(head)[0]
            if length > MAX_RECORD:
                return 0
            rec = orjson.loads(f.read(length))
        return int(rec.get("epoch", 0)) if isinstance(rec, dict) else 0
    except (OSError, ValueError, TypeError, struct.error):
        return 0


def list_snapshots(trace: Path) -> list[Path]:
    found = [p for p in trace.glob(PREFIX + "*") if p.name[len(PREFIX) :].isdigit()]
    return sorted(found, key=snapshot_seq)


def _head_row(j: Job) -> list[Any]:
    """The fields set at submit."""
    return [j.id, j.state, j.priority, j.user, j.name, j.need.resources, j.env, j.rerunnable,
            j.max_attempts, j.submitted]  # fmt: skip


def _job_row(j: Job) -> list[Any]:
    """A job without its spec (the spec bytes follow the rows of a chunk raw, see events).

    The first ten fields are set at submit; the rest only once a job has run or was
    stopped, so a snapshot leaves them out while they still hold FRESH.
    """
    if j.run is None:  # never dispatched nor stopped: all FRESH (most of a big queue)
        return [*_head_row(j), *FRESH]
    return [
        *_head_row(j),
        j.attempt,
        j.tries,
        j.tasker,
        j.pid,
        j.started,
        j.ended,
        j.exit_code,
        j.signal,
        j.reason,
        j.stop_requested,
        [a.to_dict() for a in j.attempts] if j.attempts else None,
    ]


FRESH = [0, 0, None, None, None, None, None, None, None, False, None]  # as Job() sets them


def _add_chunk(state: State, rows: list[list[Any]], specs: list[bytes]) -> None:
    """Jobs of one chunk, queued ones into their buckets (replay's hot loop, so inlined)."""
    if len(rows) != len(specs):
        raise SnapshotError(f"job chunk has {len(specs)} specs for {len(rows)} jobs")
    intern, need_of, jobs, counts = sys.intern, state.needs.get, state.jobs, state.counts
    env_refs = state.env_refs
    queued = []
    top = 0
    for r, spec in zip(rows, specs, strict=True):
        job_id = r[0]
        if job_id in jobs:
            raise SnapshotError(f"job {job_id} appears twice")
        job = Job(
            job_id,
            r[2],
            intern(r[3]),
            intern(r[4]),
            need_of(r[5], r[3]),
            spec,
            r[6],
            r[7],
            r[8],
            r[9],
        )
        if len(r) > 10:
            job.attempt, job.tries, job.pid, job.started = r[10], r[11], r[13], r[14]
            job.tasker = intern(r[12]) if r[12] is not None else None
            job.ended, job.exit_code, job.signal, job.reason = r[15], r[16], r[17], r[18]
            job.stop_requested = r[19]
            job.attempts = [Attempt.from_dict(a) for a in r[20]] if r[20] else None
        job.state = st = intern(r[1])
        jobs[job_id] = job
        counts[st] += 1
        if r[6] is not None:
            env_refs[r[6]] = env_refs.get(r[6], 0) + 1
        if st == QUEUED:
            queued.append(job)
        top = job_id if job_id > top else top
    state.enqueue_all(queued)
    state.next_id = max(state.next_id, top + 1)


def _job_v1(r: list[Any], state: State) -> Job:
    """A job record of a version 1 snapshot: one record a job, its spec as a string."""
    intern = sys.intern
    job = Job(
        r[0],
        r[2],
        intern(r[3]),
        r[4],
        state.needs.get(r[5], r[3]),
        r[6].encode(),
        r[7],
        r[8],
        r[9],
        r[14],
    )
    job.state = intern(r[1])
    job.attempt, job.tries = r[10], r[11]
    job.tasker = intern(r[12]) if r[12] is not None else None
    job.pid, job.started, job.ended = r[13], r[15], r[16]
    job.exit_code, job.signal, job.reason, job.stop_requested = r[17], r[18], r[19], r[20]
    job.attempts = [Attempt.from_dict(a) for a in r[21]] if r[21] else None
    return job


def _tasker_record(t: Tasker) -> dict[str, Any]:
    return {
        "name": t.name,
        "host": t.host,
        "slots": t.slots,
        "resources": t.resources,
        "running": sorted(t.running),
        "state": t.state,
        "boot_id": t.boot_id,
        "pid": t.pid,
        "registered": t.registered,
        "state_id": t.state_id,
        "session": t.session,
        "user": t.runs_as,
    }


def write(state: State, trace: Path, *, fsync: bool = True, chunk: int = CHUNK) -> Path:
    """Write a snapshot of ``state`` at ``state.seq``; returns its path."""
    final = trace / f"{PREFIX}{state.seq:012d}"
    tmp = trace / f".{final.name}.tmp"
    header = {
        "kind": "crq-snapshot",
        "version": VERSION,
        "seq": state.seq,
        "next_id": state.next_id,
        "id_ceiling": state.id_ceiling,
        "next_env": state.next_env,
        "created": time.time(),
        "global_total": state.global_total,
        "jobs": len(state.jobs),
        "epoch": state.epoch,
        "leader": state.leader,
    }
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # job envs: private
        with open(fd, "wb", buffering=1 << 20) as f:
            _put_all(state, f, header, chunk)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not keep what was written
        raise
    os.replace(tmp, final)
    if fsync:
        fsync_dir(trace)
    return final


def _put_all(state: State, f: BinaryIO, header: dict[str, Any], chunk: int) -> None:
    n = 0
    dumps = orjson.dumps

    def put_raw(payload: bytes) -> None:
        nonlocal n
        n += 1
        f.write(frame(n, payload))

    def put(obj: Any) -> None:
        put_raw(dumps(obj))

    put(header)
    for env_id, env in state.envs.items():
        put({"env": env_id, "vars": env})
    for t in state.taskers.values():
        put({"tasker": _tasker_record(t)})
    rows: list[list[Any]] = []
    specs: list[bytes] = []
    for job in state.jobs.values():
        if job.run is None:
            row = _head_row(job)
        else:
            row = _job_row(job)
            if row[10:] == FRESH:
                del row[10:]
        rows.append(row)
        specs.append(job.spec)
        if len(rows) == chunk:
            put_raw(NL.join([dumps(rows), *specs]))
            rows, specs = [], []
    if rows:
        put_raw(NL.join([dumps(rows), *specs]))
    keys = [[user, key, *entry] for (user, key), entry in state.keys.items()]
    for at in range(0, len(keys), chunk):
        put({"keys": keys[at : at + chunk]})
    tokens = [
        [t.id, t.user, t.role, t.hash, t.expires, t.created, t.by, t.note]
        for t in state.tokens.values()
    ]
    for at in range(0, len(tokens), chunk):
        put({"tokens": tokens[at : at + chunk]})
    controls = [[job, *c] for job, cs in state.controls.items() for c in cs]
    for at in range(0, len(controls), chunk):
        put({"controls": controls[at : at + chunk]})
    arrays = [[a.first, a.count, a.start, a.step, a.max_running] for a in state.arrays.values()]
    for at in range(0, len(arrays), chunk):
        put({"arrays": arrays[at : at + chunk]})
    waits = [[j, w.held, w.pending, w.limited] for j, w in state.waits.items()]
    for at in range(0, len(waits), chunk):
        put({"waits": waits[at : at + chunk]})
    deps = [[p, [list(c) for c in cs]] for p, cs in state.dependents.items()]
    for at in range(0, len(deps), chunk):
        put({"dependents": deps[at : at + chunk]})
    put({"end": n + 1})


def read(path: Path, global_resources: dict[str, int] | None = None) -> State:
    """Load a snapshot whole, or raise SnapshotError naming the file and offset."""
    reader = RecordReader(path)
    state = State(global_resources)
    header: dict[str, Any] | None = None
    ended = False
    expect = 1
    for seq, payload in reader:
        if ended:
            raise SnapshotError(f"{path}: data after the end record")
        if seq != expect:
            raise SnapshotError(f"{path} at byte {reader.end}: record {seq}, expected {expect}")
        expect += 1
        if header is None:
            rec = orjson.loads(payload)
            if not isinstance(rec, dict) or rec.get("kind") != "crq-snapshot":
                raise SnapshotError(f"{path}: not a crq snapshot")
            if rec["version"] not in (1, 2, 3, 4, VERSION):
                raise SnapshotError(f"{path}: snapshot version {rec['version']} unsupported")
            header = rec
            continue
        if header["version"] >= 2 and payload[:1] == b"[":
            lines = payload.split(NL)
            _add_chunk(state, orjson.loads(lines[0]), lines[1:])
            continue
        rec = orjson.loads(payload)
        if isinstance(rec, list):
            job = _job_v1(rec, state)
            state.add_job(job)
            if job.state == QUEUED:
                state.enqueue(job)
        elif "env" in rec:
            state.envs[rec["env"]] = rec["vars"]
        elif "tasker" in rec:
            _load_tasker(state, rec["tasker"])
        elif "keys" in rec:
            for user, key, first, count, t, kd in rec["keys"]:
                state.remember_key(user, key, (first, count, t, kd))
        elif "tokens" in rec:
            for row in rec["tokens"]:
                state.add_token(Token(*row))
        elif "controls" in rec:
            for job_id, t, action, by in rec["controls"]:
                state.controls.setdefault(job_id, []).append((t, action, by))
        elif "arrays" in rec:
            for first, count, start, step, cap in rec["arrays"]:
                state.add_array(Array(first, count, start, step, cap))
        elif "waits" in rec:
            for job_id, held, pending, limited in rec["waits"]:
                w = state.waits[job_id] = Wait(held, pending)
                w.limited = limited
        elif "dependents" in rec:
            for parent, children in rec["dependents"]:
                state.dependents[parent] = [(c, kind) for c, kind in children]
        elif "end" in rec:
            if rec["end"] != seq:
                raise SnapshotError(f"{path}: end record says {rec['end']} records, found {seq}")
            ended = True
    if reader.damage is not None:
        raise SnapshotError(f"snapshot damaged: {reader.damage}")
    if header is None or not ended:
        raise SnapshotError(f"{path}: snapshot incomplete (no end record)")
    state.seq = header["seq"]
    state.next_id = max(state.next_id, header["next_id"])
    state.id_ceiling = header.get("id_ceiling", 1)  # absent before id blocks
    state.next_env = header["next_env"]
    state.epoch, state.leader = (
        header.get("epoch", 0),
        header.get("leader", {}),
    )  # absent before epochs
    if global_resources is None:
        state.global_total = header["global_total"]
    _rebuild_derived(state)
    return state


def _load_tasker(state: State, r: dict[str, Any]) -> None:
    ev: TaskerJoin = {
        "e": "tasker",
        "t": r["registered"],
        "name": r["name"],
        "host": r["host"],
        "pid": r["pid"],
        "slots": r["slots"],
        "resources": r["resources"],
        "boot_id": r["boot_id"],
    }
    if "state_id" in r:
        ev["state_id"] = r["state_id"]
    if "session" in r:
        ev["session"] = r["session"]
    if r.get("user"):
        ev["user"] = r["user"]
    t = state.load_tasker(ev)
    t.state = r["state"]
    t.running = set(r["running"])


def _rebuild_derived(state: State) -> None:
    """Env index, resource use, the scheduler's indexes: derived, never stored (queue
    buckets: as jobs are read)."""
    for env_id, env in state.envs.items():
        state.env_by_digest[env_digest(env)] = env_id
        state.env_refs.setdefault(env_id, 0)
    for job in state.jobs.values():
        if job.state == RUNNING:
            for k, v in job.need.globals:
                state.global_used[k] = state.global_used.get(k, 0) + v
    for t in state.taskers.values():
        state.recount_tasker(t)
    _recount_arrays(state)
    state.reindex()


def _recount_arrays(state: State) -> None:
    """An array's elements left, those queued or running, those waiting for its cap."""
    jobs, waits = state.jobs, state.waits
    for arr in state.arrays.values():
        arr.left = arr.active = 0
        for job_id in range(arr.first, arr.first + arr.count):
            job = jobs.get(job_id)
            if job is None:
                continue
            arr.left += 1
            if job.state in ACTIVE:
                arr.active += arr.max_running is not None  # counted only under a cap
            elif (w := waits.get(job_id)) is not None and w.limited:
                arr.limited.append(job_id)  # ascending: a heap already
