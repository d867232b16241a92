"""``crq log``, ``crq status``, the formats of ``crq list`` and the bulk ``crq stop``: what
scripts and workflow engines (Snakemake's cluster-status, a ``tail -f`` of a job) use."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from crq.client.clitools import fail
from crq.client.errors import CrqError
from crq.client.selection import confirm, describe_selection, select_jobs
from crq.client.table import cell, clock, exit_status, format_table
from crq.client.views import command_text

from crq import wire

if TYPE_CHECKING:
    from crq.client.api import Client, LogChunk

#: How long ``crq status`` rides out an outage, a recovery or an election by default.
STATUS_RETRY_FOR = 600.0
#: ``crq log -f``: polls every FOLLOW_START s while the log grows, stretching to FOLLOW_MAX.
FOLLOW_START, FOLLOW_MAX = 0.25, 2.0
#: How much one ``crq log`` request asks for.
LOG_CHUNK = 1 << 20
UNKNOWN = "unknown"

# -- crq status ---------------------------------------------------------------------------

#: Snakemake's cluster-status words: anything not ended is still ``running`` to it.
SNAKEMAKE = {
    wire.DONE: "success",
    wire.FAILED: "failed",
    wire.STOPPED: "failed",
    wire.LOST: "failed",
}


def snakemake_word(state: str) -> str:
    """running|success|failed: a job not ended yet (queued, waiting, held, running) is
    ``running``; an unknown id is ``failed`` (Snakemake would otherwise wait forever)."""
    if state == UNKNOWN:
        return "failed"
    return SNAKEMAKE.get(state, "running")


def job_state(client: Client, job_id: int) -> str:
    """The job's state; for a job the server no longer holds, the state the history
    (``GET /api/v1/history``) has for it; ``unknown`` when neither knows it."""
    try:
        return str(client.get(job_id).get("state") or UNKNOWN)
    except CrqError as e:
        if e.status != 404:
            raise
    return history_state(client, job_id) or UNKNOWN


def history_state(client: Client, job_id: int) -> str | None:
    """The state of a forgotten job in the accounting history, None if it has none (or
    the server has no history endpoint)."""
    try:
        page = client.request("GET", "history", params={"after": job_id - 1, "limit": 1})
    except CrqError as e:
        if e.status in (400, 404, 405, 422):
            return None
        raise
    rows = page.get("jobs") if isinstance(page, dict) else page
    for row in rows if isinstance(rows, list) else []:
        if isinstance(row, dict) and row.get("id") == job_id and row.get("state"):
            return str(row["state"])
    return None


def cmd_status(client: Client, ids: Sequence[int], fmt: str, retry_for: float) -> int:
    """One ``ID STATE`` line per id (``--format snakemake``: the word alone); every request
    rides out crash recovery, a failover and a server away for up to ``retry_for`` s.
    Exit 1 if any id is unknown (plain format only: Snakemake reads the word)."""
    status = 0
    for jid in ids:
        state = client._riding_out(None, job_state, client, jid, outage_for=retry_for, unseen=True)
        if fmt == "snakemake":
            print(snakemake_word(state), flush=True)
            continue
        print(f"{jid} {state}", flush=True)
        if state == UNKNOWN:
            status = 1
    return status


# -- crq log ------------------------------------------------------------------------------


def cmd_log(client: Client, job_id: int, follow: bool, out: Any = None) -> int:
    """Print the job's log; with ``follow`` go on until the job has ended and all of its
    log is printed. Rides out a server restart (the reads are safe to repeat)."""
    sink = out if out is not None else sys.stdout.buffer
    offset, pause = 0, FOLLOW_START
    while True:
        chunk = client._riding_out(None, _read_log, client, job_id, offset)
        if chunk.data:
            sink.write(chunk.data)
            sink.flush()
            offset, pause = chunk.offset, FOLLOW_START
            if offset < chunk.size:
                continue  # more is there already
        elif chunk.offset < offset:
            offset = chunk.offset  # the file shrank: go on from its end
        if chunk.missing and chunk.ended:
            return fail(f"job {job_id} {chunk.state}: no log{_log_path(client, job_id)}")
        if chunk.missing and not follow:
            return fail(f"job {job_id} is {chunk.state}: no log yet{_log_path(client, job_id)}")
        if not follow or (chunk.ended and offset >= chunk.size):
            return 0
        time.sleep(pause)
        pause = min(pause * 1.5, FOLLOW_MAX)


def _read_log(client: Client, job_id: int, offset: int) -> LogChunk:
    """One chunk; a 502 (an I/O error reading the file) is final, not an outage to ride
    out as a 503 or a tasker's 504 is."""
    try:
        return client.log(job_id, offset, LOG_CHUNK)
    except CrqError as e:
        if e.status == 502:
            raise CrqError(e.message, code=e.code) from None
        raise


def _log_path(client: Client, job_id: int) -> str:
    try:
        path = client.get(job_id).get("log")
    except CrqError:
        return ""
    return f" ({path})" if path else ""


# -- crq list -----------------------------------------------------------------------------

Field = Callable[[dict[str, Any], float], str]
#: ``--format`` fields: the header and how the value is shown.
FIELDS: dict[str, tuple[str, Field]] = {
    "id": ("ID", lambda j, now: str(j.get("id"))),
    "state": ("STATE", lambda j, now: cell(j.get("state"))),
    "prio": ("PRIO", lambda j, now: cell(j.get("priority"))),
    "user": ("USER", lambda j, now: cell(j.get("user"))),
    "name": ("NAME", lambda j, now: cell(j.get("name"))),
    "command": ("COMMAND", lambda j, now: cell(command_text(j.get("command")))),
    "tasker": ("TASKER", lambda j, now: cell(j.get("tasker"))),
    "host": ("HOST", lambda j, now: cell(j.get("host"))),
    "exit": ("EXIT", lambda j, now: exit_status(j)),
    "reason": ("REASON", lambda j, now: cell(j.get("reason"))),
    "attempt": ("ATTEMPT", lambda j, now: cell(j.get("attempt"))),
    "resources": ("RESOURCES", lambda j, now: cell(j.get("resources"))),
    "submitted": ("SUBMITTED", lambda j, now: clock(j.get("submitted"), now)),
    "started": ("STARTED", lambda j, now: clock(j.get("started"), now)),
    "ended": ("ENDED", lambda j, now: clock(j.get("ended"), now)),
    "cwd": ("CWD", lambda j, now: cell(j.get("cwd"))),
    "log": ("LOG", lambda j, now: cell(j.get("log"))),
}
ALIASES = {"priority": "prio", "exit_code": "exit"}


def list_fields(text: str) -> list[str]:
    """The ``--format`` value as field names; an unknown one is a usage error naming them."""
    names = [ALIASES.get(n.strip().lower(), n.strip().lower()) for n in text.split(",")]
    names = [n for n in names if n]
    bad = [n for n in names if n not in FIELDS]
    if bad or not names:
        which = f"unknown field {bad[0]!r}" if bad else "no field"
        raise argparse.ArgumentTypeError(f"{which}; fields: {','.join(FIELDS)}")
    return names


def format_jobs(jobs: Iterable[dict[str, Any]], fields: Sequence[str], header: bool = True) -> str:
    now = time.time()
    rows = [[FIELDS[f][1](job, now) for f in fields] for job in jobs]
    right = [i for i, f in enumerate(fields) if f in ("id", "prio", "attempt")]
    text = format_table([FIELDS[f][0] for f in fields], rows, right=right)
    return text if header else "\n".join(text.splitlines()[1:])


def print_json(jobs: Sequence[Mapping[str, Any]]) -> None:
    """``--json``: one JSON array of the jobs (as the server sends them)."""
    print(json.dumps(jobs, sort_keys=True))


# -- crq stop (bulk) ----------------------------------------------------------------------


def active_states() -> list[str]:
    """The states a job can still be stopped in (queued, running; waiting where it exists)."""
    return [s for s in wire.JOB_STATES if s not in wire.FINAL_STATES]


#: The states a selection takes without ``--state``: those the action applies to.
DEFAULT_STATES = {
    "stop": active_states(),
    "hold": [wire.QUEUED, wire.WAITING],
    "release": [wire.WAITING],
    "rerun": [wire.FAILED, wire.STOPPED, wire.LOST],  # what did not end done
}


def bulk_ids(client: Client, args: argparse.Namespace, action: str) -> list[int] | None:
    """The ids ``--user/--state/--name/--array`` select (the states the action applies to
    without ``--state``), the count said on stderr; None when nothing is to be done (none,
    or no confirmation)."""
    states = args.state or DEFAULT_STATES[action]
    array = getattr(args, "array", None)
    jobs = select_jobs(client, user=args.user, state=states, name=args.name, array=array)
    what = describe_selection(args.user, args.state, args.name)
    if array is not None:
        what += f" of array {array}"
    if not jobs:
        print(f"crq: no {what} to {action}", file=sys.stderr)
        return None
    print(f"crq: {len(jobs)} {what} to {action}", file=sys.stderr, flush=True)
    if not confirm(action, len(jobs), what, args.yes):
        print("crq: nothing done", file=sys.stderr)
        return None
    return [int(j["id"]) for j in jobs]


def already_ended(e: CrqError) -> bool:
    """The server's 409 for a stop of a job that has ended: no error for ``crq stop``."""
    return e.status == 409 and " is already " in e.message
