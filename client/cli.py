"""``crq``: submit, query and control jobs (SPEC section 2).

Start-up stays fast: a command imports what it uses, and talks HTTP through crq.http11
(the standard library's socket) rather than a client library that costs more to import
than the command takes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from crq.client import jobcmds
from crq.client.clitools import (
    ProgressLine,
    UsageError,
    duration,
    fail,
    format_ids,
    parse_ids,
    positive_int,
    run,
    seconds,
)
from crq.client.environ import job_env
from crq.client.errors import CrqError
from crq.client.selection import CONFIRM_OVER
from crq.client.table import format_table
from crq.client.views import (
    HISTORY_HEADERS,
    JOB_HEADERS,
    TASKER_HEADERS,
    describe_end,
    history_rows,
    info_text,
    job_rows,
    tasker_rows,
)

from crq import wire
from crq.cliargs import slurm_time

if TYPE_CHECKING:
    from crq.client.api import Client

#: Waiting on at least this many jobs shows a progress line on stderr.
PROGRESS_FROM = 10
#: The server's limit on a stored script (server/models.py): refused here before sending.
MAX_SCRIPT = 1 << 20


# -- argument parsing ---------------------------------------------------------------------


def _priority(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not wire.PRIORITY_MIN <= value <= wire.PRIORITY_MAX:
        raise argparse.ArgumentTypeError(
            f"priority must be {wire.PRIORITY_MIN}-{wire.PRIORITY_MAX}, not {value}"
        )
    return value


def _assignment(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or "\0" in text:
        raise argparse.ArgumentTypeError(f"expected VAR=VALUE, not {text!r}")
    return name, value


def _env_mode(text: str) -> str:
    if text in ("none", "all"):
        return text
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names or any("=" in n for n in names):
        raise argparse.ArgumentTypeError("expected none, all or VAR,VAR,…")
    return ",".join(names)


def after_ids(text: str) -> list[int]:
    try:
        ids = [int(w) for w in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: job ids, as 12,13") from None
    if any(i < 1 for i in ids):
        raise argparse.ArgumentTypeError(f"{text!r}: job ids are positive")
    return ids


def dependency(text: str) -> list[dict[str, Any]]:
    """Slurm's --dependency list: TYPE:ID[:ID…], comma separated."""
    out: list[dict[str, Any]] = []
    for part in text.split(","):
        kind, _, rest = part.partition(":")
        if kind not in ("afterok", "afterany", "afternotok") or not rest:
            raise argparse.ArgumentTypeError(
                f"{part!r}: afterok|afterany|afternotok:ID[:ID…] (as afterok:12:13,afterany:14)"
            )
        out += [{"type": kind, "job": i} for i in after_ids(rest.replace(":", ","))]
    return out


def array_range(text: str) -> dict[str, int]:
    """Slurm's --array: START-STOP[:STEP][%MAX], or one index N."""
    m = re.fullmatch(r"(\d+)(?:-(\d+)(?::(\d+))?)?(?:%(\d+))?", text)
    if m is None:
        raise argparse.ArgumentTypeError(f"{text!r}: START-STOP[:STEP][%MAX], as 1-100:2%10")
    start = int(m[1])
    out = {"start": start, "stop": int(m[2]) if m[2] else start, "step": int(m[3] or 1)}
    if out["stop"] < start or out["step"] < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: STOP below START, or a step of 0")
    if m[4]:
        if int(m[4]) < 1:
            raise argparse.ArgumentTypeError(f"{text!r}: %MAX is at least 1")
        out["max_running"] = int(m[4])
    return out


def _ids(text: str) -> list[int]:
    return parse_ids([text])


def server_url_problem(text: str) -> str | None:
    """Why ``text`` cannot be a server URL (``host:port`` is one), or None."""
    url = text.strip()
    try:
        parts = urlsplit(url if "://" in url else "http://" + url)
        parts.port  # noqa: B018 -- raises on a bad port
    except ValueError as e:
        return f"{text!r} is not a URL: {e}"
    if parts.scheme not in ("http", "https"):
        return f"{text!r} is not an http:// or https:// URL"
    if not parts.hostname:
        return f"{text!r} is not a URL: no host"
    return None


def _server_url(text: str) -> str:
    problem = server_url_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


#: ``--expires`` units
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crq",
        description="Submit, query and control jobs of a crq queue.",
        epilog="The server is --server, else $CRQ_SERVER, else $CRQ_QUEUE (or vnc) looked up "
        "in the registry written by `ncmgr start`.",
    )
    parser.add_argument(
        "--server", type=_server_url, metavar="URL", help="server URL (overrides CRQ_SERVER)"
    )
    parser.add_argument("--queue", "-q", metavar="Q", help="queue name (overrides CRQ_QUEUE)")
    parser.add_argument(
        "--token-file",
        metavar="F",
        help="show the token in F (else $CRQ_TOKEN, else MUNGE when munged runs, else the "
        "registry's token)",
    )
    sub = parser.add_subparsers(dest="command_name", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "submit",
        help="submit a job (or a file of jobs); prints the id",
        usage="crq submit [options] -- CMD ARGS…\n       crq submit [options] --file F",
    )
    p.add_argument("-r", "--resources", metavar="RES", help='e.g. "CORES/2 RAM/4000 linux"')
    p.add_argument("-P", "--priority", type=_priority, metavar="PRIO", help="1-15 (default 4)")
    p.add_argument("-J", "--name", metavar="NAME", help="job name")
    p.add_argument("-d", "--dir", metavar="DIR", help="working directory (default: here)")
    p.add_argument(
        "-e",
        dest="setenv",
        action="append",
        type=_assignment,
        default=[],
        metavar="VAR=VAL",
        help="set a variable in the job's environment (repeatable)",
    )
    p.add_argument("-l", "--log", metavar="LOG", help="log file (default <dir>/crq.<id>.log)")
    p.add_argument("--no-rerun", action="store_true", help="never rerun after a lost attempt")
    p.add_argument("--max-attempts", type=positive_int, metavar="N", help="attempts (default 3)")
    p.add_argument(
        "--env",
        type=_env_mode,
        default="all",
        metavar="none|all|VAR,…",
        help="environment to export (default all, like sbatch --export=ALL)",
    )
    p.add_argument("--file", "-f", metavar="F", help="one shell command per line ('-' = stdin)")
    p.add_argument(
        "--after",
        type=after_ids,
        action="append",
        default=[],
        metavar="ID,…",
        help="run after these jobs ended done (afterok)",
    )
    p.add_argument(
        "--dependency",
        type=dependency,
        action="append",
        default=[],
        metavar="DEP",
        help="Slurm's form: afterok:12:13,afterany:14,afternotok:15",
    )
    p.add_argument(
        "--array", type=array_range, metavar="A-B[:S][%M]", help="an array: 1-100, 0-98:2%%10"
    )
    p.add_argument("--hold", action="store_true", help="submit held (crq release starts it)")
    p.add_argument(
        "--time",
        "-t",
        type=slurm_time,
        metavar="T",
        help="time limit from the start: minutes, MM:SS, HH:MM:SS, D-HH:MM:SS (as Slurm), "
        "or 90s, 30m, 8h; SIGTERM then, SIGKILL after --kill-grace",
    )
    p.add_argument(
        "--kill-grace",
        type=seconds,
        metavar="S",
        help="seconds from the SIGTERM of the time limit to the SIGKILL (default 30)",
    )
    p.add_argument(
        "--script",
        metavar="FILE",
        help="keep FILE's content with the job and run it, with the remaining words as its "
        "arguments (read now: the job runs even if FILE is gone by then)",
    )
    p.add_argument(
        "--wait",
        action="store_true",
        help="wait for the job(s) and exit like `crq wait`",
    )
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command and its arguments")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("list", help="list jobs, newest first")
    p.add_argument("--state", "-s", choices=wire.JOB_STATES)
    p.add_argument("--user", "-u", metavar="U")
    p.add_argument("--array", type=int, metavar="ID", help="the elements of array ID")
    p.add_argument("--queue-order", action="store_true", help="queued jobs in dispatch order")
    p.add_argument("--oldest", action="store_true", help="oldest first")
    p.add_argument("--limit", "-n", type=positive_int, metavar="N", help="show at most N jobs")
    p.add_argument(
        "--format",
        "-o",
        type=jobcmds.list_fields,
        metavar="F,F…",
        help=f"columns to show, of: {','.join(jobcmds.FIELDS)}",
    )
    p.add_argument("--no-header", action="store_true", help="no header line (with --format)")
    p.add_argument("--json", action="store_true", help="one JSON array of the jobs")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("history", help="jobs that left the queue (accounting, like sacct)")
    p.add_argument("--user", "-u", metavar="U")
    p.add_argument("--state", "-s", choices=wire.JOB_STATES)
    p.add_argument("--since", "-S", type=_since, metavar="T", help="ended at or after T")
    p.add_argument("--until", "-E", type=_since, metavar="T", help="ended at or before T")
    p.add_argument("--name", metavar="GLOB", help="job names matching GLOB (* ? [...])")
    p.add_argument("--limit", "-n", type=positive_int, metavar="N", help="show at most N jobs")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_history)

    p = sub.add_parser("log", help="print a job's output (-f: follow it until the job ends)")
    p.add_argument("id", type=positive_int, metavar="ID")
    p.add_argument("--follow", "-f", action="store_true", help="follow until the job ends")
    p.set_defaults(func=cmd_log)

    p = sub.add_parser(
        "status",
        help="one 'ID STATE' line per job, for scripts; rides out recovery and failover",
    )
    p.add_argument("ids", nargs="+", type=_ids, metavar="ID")
    p.add_argument(
        "--format",
        choices=("plain", "snakemake"),
        default="plain",
        help="snakemake: running|success|failed alone (Snakemake's cluster-status)",
    )
    p.add_argument(
        "--retry-for",
        type=seconds,
        default=jobcmds.STATUS_RETRY_FOR,
        metavar="S",
        help=f"ride out an unreachable server this long (default {jobcmds.STATUS_RETRY_FOR:g})",
    )
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("info", help="everything about a job, with its attempts")
    p.add_argument("ids", nargs="+", type=_ids, metavar="ID")
    p.add_argument("--env", action="store_true", help="also print the job's environment")
    p.add_argument("--json", action="store_true", help="print the job JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("wait", help="wait for jobs; exit 1 if any did not end done")
    p.add_argument("ids", nargs="+", type=_ids, metavar="ID", help="ids or ranges (1..100)")
    p.add_argument("--timeout", "-t", type=seconds, metavar="S", help="give up after S s")
    p.set_defaults(func=cmd_wait)

    for name, helptext in (
        ("stop", "stop (kill or dequeue) jobs"),
        ("rerun", "queue finished jobs again"),
        ("forget", "remove finished jobs from the server"),
        ("hold", "keep queued or waiting jobs from starting"),
        ("release", "let held jobs start"),
    ):
        p = sub.add_parser(name, help=helptext)
        nargs = "+" if name == "forget" else "*"
        p.add_argument("ids", nargs=nargs, type=_ids, metavar="ID", help="ids or ranges (1..100)")
        if name != "forget":
            add_selectors(p, name)
        p.set_defaults(func=cmd_control, action=name)

    p = sub.add_parser("taskers", help="list taskers")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_taskers)

    p = sub.add_parser("whoami", help="who the server takes you for, your role, and how")
    p.add_argument("--json", action="store_true", help="print the server's JSON")
    p.set_defaults(func=cmd_whoami)

    p = sub.add_parser(
        "token",
        help="get yourself a personal token (for the browser UI and scripts); printed once",
    )
    p.add_argument("--expires", type=duration, metavar="D", help="lifetime: 3600, 8h, 30d…")
    p.add_argument("--note", metavar="N", help="a note shown by `ncmgr token list`")
    p.set_defaults(func=cmd_token)
    return parser


def add_selectors(p: argparse.ArgumentParser, action: str) -> None:
    """``--user/--state/--name/--yes``: act on the jobs they select (see selection.py)."""
    p.add_argument("--user", "-u", metavar="U", help=f"{action} the jobs of user U")
    p.add_argument(
        "--state",
        "-s",
        action="append",
        choices=wire.JOB_STATES,
        help="… in this state (repeatable; default: the states the action applies to)",
    )
    p.add_argument("--name", metavar="GLOB", help="… whose name matches GLOB")
    p.add_argument("--array", type=int, metavar="ID", help="… elements of array ID")
    p.add_argument(
        "--yes",
        "-y",
        action="store_true",
        help=f"no question for more than {CONFIRM_OVER} jobs",
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    action = getattr(args, "action", None)
    if action in ("stop", "rerun", "hold", "release"):
        chosen = args.user or args.state or args.name or args.array is not None
        if args.ids and chosen:
            parser.error(f"{action}: give job ids or --user/--state/--name/--array, not both")
        if not args.ids and not chosen:
            parser.error(
                f"{action}: give job ids, or select jobs with --user/--state/--name/--array"
            )
    if args.func is cmd_list and (args.no_header and not args.format):
        parser.error("list: --no-header goes with --format")
    if args.func is cmd_submit:
        command = list(args.command)
        if command[:1] == ["--"]:
            command = command[1:]
        args.command = command
        if args.file and (command or args.script):
            parser.error("submit: give either --file or a command (or --script), not both")
        if not args.file and not command and not args.script:
            parser.error("submit: missing command (crq submit [options] -- CMD ARGS…)")
        if args.file and args.log:
            parser.error("submit: -l cannot be used with --file (each job logs to crq.<id>.log)")
    return run(args.func, args)


def _client(args: argparse.Namespace) -> Client:
    from crq.client.api import Client
    from crq.client.credentials import read_token_file

    env_url = os.environ.get("CRQ_SERVER")
    if not args.server and env_url and (problem := server_url_problem(env_url)):
        raise UsageError(f"CRQ_SERVER: {problem}")

    token = read_token_file(args.token_file) if args.token_file else None
    client = Client(url=args.server, queue=args.queue, token=token)
    client.notify = lambda line: print(f"crq: {line}", file=sys.stderr, flush=True)
    return client


# -- submit -------------------------------------------------------------------------------


def command_of(words: Sequence[str]) -> str | list[str]:
    """A single word with blanks or shell characters is a shell command line (run by
    ``/bin/sh -c``); anything else is an argv list, passed through untouched."""
    if len(words) == 1 and shlex.quote(words[0]) != words[0]:
        return words[0]
    return list(words)


def read_commands(path: str) -> list[str]:
    """Non-blank, non-comment lines of ``path`` (``-`` = stdin). A file that cannot be read,
    is not UTF-8 or has a NUL byte is a usage error: nothing is sent."""
    where = "stdin" if path == "-" else path
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
    except UnicodeDecodeError as e:
        raise UsageError(f"--file {where}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise UsageError(f"--file {where}: {e.strerror or e}") from None
    commands = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if "\0" in line:
            raise UsageError(f"--file {where}: line {number} has a NUL byte")
        if line and not line.startswith("#"):
            commands.append(line)
    return commands


def read_script(path: str) -> str:
    """A script's content for ``--script``, read at submit (as sbatch does); one that cannot
    be read, is not UTF-8 or is over 1 MiB is a usage error: nothing is sent."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SCRIPT + 1)
    except OSError as e:
        raise UsageError(f"--script {path}: {e.strerror or e}") from None
    if len(data) > MAX_SCRIPT:
        raise UsageError(f"--script {path}: larger than {MAX_SCRIPT} bytes (1 MiB)")
    try:
        return data.decode()
    except UnicodeDecodeError as e:
        raise UsageError(f"--script {path}: not UTF-8 text (byte {e.start})") from None


def submit_specs(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The job specs and the batch environment that ``crq submit`` sends."""
    cwd = os.path.abspath(os.path.expanduser(args.dir)) if args.dir else os.getcwd()
    common: dict[str, Any] = {"cwd": cwd}
    if args.name:
        common["name"] = args.name
    if args.priority is not None:
        common["priority"] = args.priority
    if args.resources:
        common["resources"] = args.resources
    if args.no_rerun:
        common["rerunnable"] = False
    if args.max_attempts is not None:
        common["max_attempts"] = args.max_attempts
    if args.time is not None:
        common["time_limit"] = args.time
    if args.kill_grace is not None:
        common["kill_grace"] = args.kill_grace
    if args.script:
        common["script"] = read_script(args.script)
        common.setdefault("name", os.path.basename(args.script)[:256] or "script")
    env = job_env(args.env, args.setenv, cwd)
    after = [{"type": "afterok", "job": i} for ids in args.after for i in ids]
    after += [dep for deps in args.dependency for dep in deps]
    if after:
        common["after"] = after
    if args.hold:
        common["hold"] = True
    if args.array is not None:
        if args.file:
            raise UsageError("--array: one command, not --file")
        common["array"] = args.array
    if args.script:
        commands: list[str | list[str]] = [list(args.command)]
    elif args.file:
        commands = list(read_commands(args.file))
        if not commands:
            raise UsageError(f"{args.file}: no commands (blank and # lines are skipped)")
    else:
        commands = [command_of(args.command)]
    specs = []
    for command in commands:
        spec = {**common, "command": command}
        if args.log:
            spec["log"] = os.path.join(cwd, os.path.expanduser(args.log))
        specs.append(spec)
    return specs, env


def cmd_submit(args: argparse.Namespace) -> int:
    specs, env = submit_specs(args)
    with _client(args) as client:
        # the client retries under one Idempotency-Key through recovery, failover and outages
        # (saying so through notify), so the jobs are queued once
        if args.file or args.array is not None:
            ids = client.submit_many(specs, env=env)
            if args.array is not None:  # the array's id: its first element's
                print(ids[0], flush=True)
                return wait_and_report(client, ids, None) if args.wait else 0
        else:
            ids = [client.submit({**specs[0], "env": env})]
        for line in format_ids(ids):
            print(line, flush=True)
        if args.wait:
            return wait_and_report(client, ids, None)
    return 0


# -- wait ---------------------------------------------------------------------------------


def wait_and_report(client: Client, ids: list[int], timeout: float | None) -> int:
    """Wait for ``ids``; report every job that did not end done; 0 only if all are done."""
    if len(ids) == 1:
        jobs = {ids[0]: client.wait(ids[0], timeout=timeout)}
    else:
        progress = ProgressLine() if len(ids) >= PROGRESS_FROM else None
        try:
            jobs = client.wait_all(ids, progress=progress, timeout=timeout)
        finally:
            if progress:
                progress.close()
    bad = [job for job in jobs.values() if job.get("state") != wire.DONE]
    unfinished = [j for j in bad if j.get("state") in (wire.QUEUED, wire.RUNNING)]
    ended = [j for j in bad if j.get("state") not in (wire.QUEUED, wire.RUNNING)]
    for job in ended[:20]:
        print(f"crq: {describe_end(job)}", file=sys.stderr)
    if len(ended) > 20:
        print(f"crq: … and {len(ended) - 20} more did not end done", file=sys.stderr)
    if len(unfinished) == 1 and len(ids) == 1:
        job = unfinished[0]
        print(f"crq: timed out: job {job.get('id')} is still {job.get('state')}", file=sys.stderr)
    elif unfinished:
        print(f"crq: timed out: {len(unfinished)} of {len(ids)} jobs not finished", file=sys.stderr)
    if len(ids) >= PROGRESS_FROM and bad:
        done = len(ids) - len(bad)
        print(f"crq: {done}/{len(ids)} jobs done, {len(ended)} did not", file=sys.stderr)
    return 1 if bad else 0


def cmd_wait(args: argparse.Namespace) -> int:
    ids = _flatten(args.ids)
    with _client(args) as client:
        return wait_and_report(client, ids, args.timeout)


def _flatten(groups: Iterable[list[int]]) -> list[int]:
    seen: set[int] = set()
    out: list[int] = []
    for group in groups:
        for i in group:
            if i not in seen:
                seen.add(i)
                out.append(i)
    return out


# -- list / info / taskers ----------------------------------------------------------------


def cmd_log(args: argparse.Namespace) -> int:
    with _client(args) as client:
        return jobcmds.cmd_log(client, args.id, args.follow)


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        return jobcmds.cmd_status(client, _flatten(args.ids), args.format, args.retry_for)


def cmd_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.queue_order:
            order = client.queue()
            if args.limit:
                order = order[: args.limit]
            known = {int(j["id"]): j for j in client.list(state=wire.QUEUED, user=args.user)}
            jobs = []
            for jid in order:
                job = known.get(jid)
                if job is None and not args.user:
                    try:
                        job = client.get(jid)
                    except CrqError as e:
                        if e.status != 404:
                            raise
                if job is not None:
                    jobs.append(job)
        elif args.oldest:
            jobs = list(
                client.list(state=args.state, user=args.user, limit=args.limit, array=args.array)
            )
        else:
            jobs = list(
                client.list(
                    state=args.state,
                    user=args.user,
                    limit=args.limit,
                    array=args.array,
                    newest_first=True,
                )
            )
    if args.json:
        jobcmds.print_json(jobs)
        return 0
    if args.format:
        print(jobcmds.format_jobs(jobs, args.format, header=not args.no_header))
        return 0
    print(format_table(JOB_HEADERS, job_rows(jobs), right=(0, 2)))
    return 0


def _since(text: str) -> str:
    """argparse type of --since/--until: 30m, 8h, 7d ago (made epoch seconds here), else
    epoch seconds or an ISO date, as the server reads them."""
    if text[-1:] in ("s", "m", "h", "d"):
        return repr(time.time() - duration(text))
    return text


def cmd_history(args: argparse.Namespace) -> int:
    with _client(args) as client:
        jobs = list(
            client.history(
                user=args.user,
                state=args.state,
                since=args.since,
                until=args.until,
                name=args.name,
                limit=args.limit,
            )  # fmt: skip
        )
    if args.json:
        for job in jobs:
            print(json.dumps(job, sort_keys=True))
        return 0
    print(format_table(HISTORY_HEADERS, history_rows(jobs), right=(0, 4, 7, 8, 9)))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    ids = _flatten(args.ids)
    status = 0
    with _client(args) as client:
        for n, jid in enumerate(ids):
            try:
                job = client.get(jid)
            except CrqError as e:
                if e.status != 404:
                    raise
                status = fail(_job_error(jid, e))
                continue
            if args.json:
                print(json.dumps(job, sort_keys=True))
                continue
            if n:
                print()
            print(info_text(job, show_env=args.env))
    return status


def cmd_taskers(args: argparse.Namespace) -> int:
    with _client(args) as client:
        taskers = client.taskers()
    if args.json:
        for t in taskers:
            print(json.dumps(t, sort_keys=True))
        return 0
    print(format_table(TASKER_HEADERS, tasker_rows(taskers), right=(3,)))
    return 0


# -- identity -----------------------------------------------------------------------------


def cmd_whoami(args: argparse.Namespace) -> int:
    with _client(args) as client:
        me = client.whoami()
        shown = client.credential
    if args.json:
        print(json.dumps(me, sort_keys=True))
        return 0
    via = {
        "munge": "a MUNGE credential",
        "token": "a personal token",
        "admin_token": "the admin token",
    }
    how = via.get(str(me.get("via")), str(me.get("via")))
    groups = me.get("groups") or []
    print(f"user   {me.get('user')}")
    print(f"role   {me.get('role')}")
    print(f"via    {how} (from {shown.source})")
    if groups:
        print(f"groups {' '.join(str(g) for g in groups)}")
    may = me.get("may")
    if isinstance(may, dict):
        print("may    " + (" ".join(k for k, v in may.items() if v) or "nothing"))
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    with _client(args) as client:
        out = client.issue_token(expires=args.expires, note=args.note)
        url = client.url
    token = str(out.get("token"))
    expires = out.get("expires")
    until = "never expires" if expires is None else f"expires {_when(float(expires))}"
    print(token)
    print(
        f"crq: token {out.get('id')} for {out.get('user')} (role {out.get('role')}), {until}; "
        "it is shown this once only.",
        file=sys.stderr,
    )
    print(
        f"crq: in the browser: open {url}/ and paste it as the token; "
        "for scripts: CRQ_TOKEN=<token> or --token-file FILE",
        file=sys.stderr,
    )
    return 0


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


# -- stop / rerun / forget ----------------------------------------------------------------


def cmd_control(args: argparse.Namespace) -> int:
    ids = _flatten(args.ids)
    status = 0
    with _client(args) as client:
        action = {
            "stop": client.stop,
            "rerun": client.rerun,
            "forget": client.forget,
            "hold": client.hold,
            "release": client.release,
        }[args.action]
        if not ids:  # crq stop --user/--state/--name
            ids = jobcmds.bulk_ids(client, args, args.action) or []
        if len(ids) > 1:  # one request per 10,000 jobs, not one per job
            return _control_many(client, args.action, ids)
        for jid in ids:
            try:
                answer = action(jid)
            except CrqError as e:
                if e.status is None or e.code == "crash_recovery" or e.status in (401, 403):
                    raise  # the server is away or refuses us: every other id would fail too
                if args.action == "stop" and jobcmds.already_ended(e):
                    # what was asked is so: no error (the API keeps its 409)
                    print(f"crq: {_job_error(jid, e).replace(' is already ', ' already ')}",
                          file=sys.stderr)  # fmt: skip
                    continue
                status = fail(_job_error(jid, e))
                continue
            print(_control_line(args.action, jid, answer), flush=True)
    return status


def _control_many(client: Client, action: str, ids: list[int]) -> int:
    """What the loop above prints, from the bulk route's answer per id."""
    status = 0
    for r in client.control(action, ids):
        jid = int(r["id"])
        if r.get("status") == 200:
            print(_control_line(action, jid, r), flush=True)
            continue
        e = CrqError(str(r.get("message")), status=r.get("status"), code=str(r.get("error")))
        if action == "stop" and jobcmds.already_ended(e):
            print(f"crq: {_job_error(jid, e).replace(' is already ', ' already ')}",
                  file=sys.stderr)  # fmt: skip
            continue
        status = fail(_job_error(jid, e))
    return status


def _job_error(jid: int, e: CrqError) -> str:
    if e.status == 404:
        return f"job {jid} not found"
    if str(jid) in e.message:
        return e.message
    return f"job {jid}: {e.message}"


def _control_line(action: str, jid: int, answer: Any) -> str:
    if action == "forget":
        return f"job {jid} forgotten"
    state = answer.get("state") if isinstance(answer, dict) else None
    if action == "rerun":
        return f"job {jid} requeued" + (f", now {state}" if state and state != "queued" else "")
    if action in ("hold", "release"):
        reason = answer.get("reason") if isinstance(answer, dict) else None
        held = "held" if action == "hold" else "released"
        return f"job {jid} {held}, now {state}" + (f" ({reason})" if reason else "")
    if state == wire.RUNNING:
        tasker = answer.get("tasker") if isinstance(answer, dict) else None
        return f"job {jid} stopping (kill sent to tasker {tasker or '?'})"
    return f"job {jid} {state or 'stopped'}"


if __name__ == "__main__":
    sys.exit(main())
