"""``ncmgr``: start, stop and inspect the server of a queue (SPEC sections 2 and 5).

``ncmgr start`` runs ``python -m crq.server …`` in its own session, output in
``<swd>/logs/server.out``, and returns once the server is open for clients (showing crash
recovery progress meanwhile). Defaults: queue ``$CRQ_QUEUE`` or ``vnc``; swd, host and port
from the registry when the queue is registered there, else ``./<queue>.swd``, ``127.0.0.1``
(only this host can connect; pass ``--host 0.0.0.0`` to serve taskers on other hosts) and the
queue's hashed default port.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from crq.client.clitools import as_typed, fail, positive_int, run, say, seconds
from crq.client.errors import CrqError
from crq.client.place import (
    DEFAULT_HOST,
    Place,
    local_url,
    pid_alive,
    port_busy,
)
from crq.client.starter import DEFAULT_GRACE, START_TIMEOUT, Starter, child_env
from crq.client.table import key_values, when
from crq.client.views import counts_text, recovery_text

from crq import wire

if TYPE_CHECKING:
    from crq.client.api import Client

STOP_TIMEOUT = 60.0
POLL = 0.1

#: ``ncmgr start`` settings passed through to ``python -m crq.server``: (flag, kind, help).
SETTINGS: tuple[tuple[str, str, str], ...] = (
    ("--recovery-grace", "seconds", "how long recovery waits for taskers (default 120)"),
    ("--tasker-timeout", "seconds", "silence before a tasker's jobs are recovered (default 90)"),
    ("--heartbeat", "seconds", "tasker heartbeat interval (default 10)"),
    ("--fsync", "fsync", "always (default) acks after fsync; never is for tests"),
    ("--checkpoint-bytes", "bytes", "journal size that triggers a checkpoint"),
    ("--autoforget-done", "seconds", "forget done jobs after S (default 3600)"),
    ("--autoforget-other", "seconds", "forget other finished jobs after S (default 2 days)"),
    ("--idempotency-window", "seconds", "keep submits' Idempotency-Keys S (default 1 day)"),
    ("--accept-loss", "flag", "start despite journal damage, dropping what is damaged"),
)


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 1-65535, not {value}")
    return value


def _add_target(p: argparse.ArgumentParser) -> None:
    p.add_argument("--queue", "-q", metavar="Q", help="queue name (default $CRQ_QUEUE or vnc)")
    p.add_argument("--swd", metavar="DIR", help="server working directory")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ncmgr", description="Manage the server of a queue.")
    sub = parser.add_subparsers(dest="command_name", metavar="COMMAND", required=True)

    p = sub.add_parser("start", help="start the server (daemonized unless --foreground)")
    _add_target(p)
    p.add_argument("--host", metavar="H", help=f"address to listen on (default {DEFAULT_HOST})")
    p.add_argument("--port", type=_port, metavar="P", help="port (default: hashed from queue)")
    p.add_argument("--foreground", action="store_true", help="run the server in this process")
    p.add_argument(
        "--timeout", type=float, default=START_TIMEOUT, metavar="S", help=argparse.SUPPRESS
    )
    settings = p.add_argument_group("settings (passed to the server; see SPEC section 5)")
    for flag, kind, text in SETTINGS:
        if kind == "flag":
            settings.add_argument(flag, action="store_true", help=text)
        elif kind == "fsync":
            settings.add_argument(flag, choices=("always", "never"), help=text)
        elif kind == "bytes":
            settings.add_argument(flag, type=as_typed(positive_int), metavar="N", help=text)
        else:
            settings.add_argument(flag, type=as_typed(seconds), metavar="S", help=text)
    p.set_defaults(func=cmd_start)

    p = sub.add_parser("stop", help="clean shutdown: snapshot, clean marker, process gone")
    _add_target(p)
    p.add_argument(
        "--freeze", action="store_true", help="taskers keep their jobs for the next server"
    )
    p.add_argument(
        "--timeout", type=float, default=STOP_TIMEOUT, metavar="S", help=argparse.SUPPRESS
    )
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("status", help="mode, pid, URL, counts; exit 1 unless running")
    _add_target(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("cleanup", help="manual recovery (SPEC section 5)")
    _add_target(p)
    p.add_argument("--list", action="store_true", help="jobs not confirmed by a live tasker")
    p.add_argument("--job", type=int, metavar="ID", help="recover this job now")
    p.add_argument("--dead-host", metavar="HOST", help="recover every job of taskers on HOST")
    p.add_argument("--standalone", action="store_true", help="no server: work on the files")
    p.add_argument("--reset-lock", action="store_true", help="remove a stale recovery lock")
    p.set_defaults(func=cmd_cleanup)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args.func, args)


# -- start --------------------------------------------------------------------------------


def server_command(args: argparse.Namespace, place: Place, host: str, port: int) -> list[str]:
    cmd = [sys.executable, "-m", "crq.server", "--queue", place.queue, "--swd", str(place.swd.root)]
    cmd += ["--host", host, "--port", str(port)]
    for flag, kind, _ in SETTINGS:
        value = getattr(args, flag[2:].replace("-", "_"))
        if kind == "flag":
            if value:
                cmd.append(flag)
        elif value is not None:
            cmd += [flag, str(value)]
    return cmd


def _refuse_if_running(place: Place) -> int | None:
    """Exit status when a server already holds the swd, else None."""
    pid = place.pid
    if not pid_alive(pid):
        return None
    with place.client(timeout=2.0) as client:
        up = client.healthz(timeout=1.0)
    if up:
        place.register(place.url)
        return fail(f"queue {place.queue} already running at {place.url} (pid {pid})")
    return fail(
        f"a server (pid {pid}) holds {place.swd.root} but does not answer at {place.url}; "
        f"stop it first (ncmgr stop --queue {place.queue}, or kill {pid})"
    )


def cmd_start(args: argparse.Namespace) -> int:
    place = Place(args)
    entry = place.entry if place.same_as_registered else None
    host = args.host or (entry or {}).get("host") or DEFAULT_HOST
    if host == "localhost":
        host = DEFAULT_HOST
    port = args.port or (entry or {}).get("port") or wire.default_port(place.queue)
    refused = _refuse_if_running(place)
    if refused is not None:
        return refused
    busy = port_busy(host, int(port))
    if busy:
        return fail(f"port {port} is busy ({busy} on {host}); choose another with --port")
    url = local_url(host, int(port))
    cmd = server_command(args, place, host, int(port))
    try:
        place.swd.root.mkdir(parents=True, exist_ok=True)
        place.swd.logs.mkdir(exist_ok=True)
    except OSError as e:
        return fail(f"cannot create {place.swd.root}: {e.strerror}")
    if args.foreground:
        place.register(url, host, port)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, cmd, child_env())
    grace = float(args.recovery_grace) if args.recovery_grace is not None else DEFAULT_GRACE
    starter = Starter(place, cmd, host, int(port), url, stall=float(args.timeout), grace=grace)
    return starter.run()


# -- stop ---------------------------------------------------------------------------------


def _wait_gone(pid: int | None, client: Client, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pid is not None:
            if not pid_alive(pid):
                return True
        elif not client.healthz(timeout=0.5):
            return True
        time.sleep(POLL)
    return False


def cmd_stop(args: argparse.Namespace) -> int:
    place = Place(args)
    pid = place.pid
    alive = pid_alive(pid)
    with place.client() as client:
        try:
            client.stop_server(freeze=args.freeze)
        except CrqError as e:
            if e.code not in ("unreachable", "timeout", "disconnected"):
                raise
            if alive:
                return fail(
                    f"queue {place.queue} does not answer at {place.url} but its server "
                    f"(pid {pid}) is alive; to force it: kill {pid} (the next start recovers)"
                )
            say(f"queue {place.queue} is not running")
            return 0
        if not _wait_gone(pid if alive else None, client, args.timeout):
            return fail(
                f"queue {place.queue} was asked to stop but pid {pid} is still alive after "
                f"{args.timeout:.0f} s"
            )
    clean = place.swd.clean_marker.exists()
    what = "frozen and stopped" if args.freeze else "stopped"
    tail = "snapshot written, clean stop" if clean else "no clean marker: next start recovers"
    extra = "; taskers keep their running jobs for the next server" if args.freeze else ""
    say(f"queue {place.queue} {what} ({tail}{f', pid {pid} gone' if pid else ''}){extra}")
    return 0 if clean else 1


# -- status -------------------------------------------------------------------------------


def status_lines(place: Place, status: dict[str, Any]) -> str:
    pairs: list[tuple[str, Any]] = [
        ("queue", status.get("queue") or place.queue),
        ("mode", status.get("mode")),
        ("url", status.get("url") or place.url),
        ("pid", status.get("pid")),
        ("swd", place.swd.root),
        ("version", status.get("version")),
        ("up since", when(status.get("started_at")) if status.get("started_at") else None),
        ("taskers", status.get("taskers")),
        ("jobs", "?" if status.get("counts") is None else counts_text(status["counts"])),
    ]
    if status.get("recovery"):
        pairs.append(("recovery", recovery_text(status["recovery"])))
    full = (status.get("journal") or {}).get("disk_full_since")
    if full:
        pairs.append(("DISK FULL", f"since {when(full)}: replies held until the swd has space"))
    return key_values(pairs)


def cmd_status(args: argparse.Namespace) -> int:
    place = Place(args)
    with place.client(timeout=5.0) as client:
        try:
            status = client.server()
        except CrqError as e:
            if e.code not in ("unreachable", "timeout", "disconnected"):
                raise
            status = None
    if status is not None:
        print(status_lines(place, status))
        return 0
    pid = place.pid
    if pid_alive(pid):
        mode = f"not answering (pid {pid} alive)"
    else:
        mode = wire.MODE_STOPPED
    if place.swd.clean_marker.exists():
        last = "clean"
    elif place.swd.trace.exists():
        last = "not clean: the next start runs crash recovery"
    else:
        last = "never started"
    pairs = [
        ("queue", place.queue),
        ("mode", mode),
        ("url", place.url),
        ("swd", place.swd.root),
        ("last stop", last if mode == wire.MODE_STOPPED else None),
    ]
    print(key_values([(k, v) for k, v in pairs if v is not None]))
    return 1


# -- cleanup ------------------------------------------------------------------------------


def cmd_cleanup(args: argparse.Namespace) -> int:
    """Manual recovery, through the live server or (``--standalone``) on the swd's files."""
    place = Place(args)
    actions = [a for a in ("list", "job", "dead_host") if getattr(args, a) not in (None, False)]
    if len(actions) > 1:
        return fail("give one of --list, --job ID, --dead-host HOST")
    if args.reset_lock:
        if actions:
            return fail("--reset-lock goes alone")
        reset = _server_cleanup(place, "--reset-lock")
        if reset is None:
            return 1
        say(f"{reset['reset']} ({place.swd.recovery_lock})")
        return 0
    action = actions[0] if actions else "list"
    arg = str(args.job) if action == "job" else args.dead_host
    if args.standalone:
        result = _cleanup_standalone(place, action, arg)
        if result is None:
            return 1
    else:
        with place.client() as client:
            if action == "list":
                result = client.request("GET", "cleanup")
            elif action == "job":
                result = client.request("POST", f"cleanup/jobs/{args.job}")
            else:
                result = client.request("POST", f"cleanup/hosts/{args.dead_host}")
    if action == "list":
        _print_incomplete(result["incomplete"])
        return 0
    for item in result["recovered"]:
        if "tasker" in item and "id" not in item:
            print(f"tasker {item['tasker']}: {item['action']}")
        else:
            print(f"job {item['id']} attempt {item['attempt']}: {item['action']}")
    if not result["recovered"]:
        print("nothing to recover")
    return 0


def _cleanup_standalone(place: Place, action: str, arg: str | None) -> dict[str, Any] | None:
    if not place.swd.trace.is_dir():
        fail(f"{place.swd.root} has no trace.db: not a server working directory (use --swd)")
        return None
    words = {"list": ["--list"], "job": ["--job", str(arg)], "dead_host": ["--dead-host", str(arg)]}
    return _server_cleanup(place, *words[action])


def _server_cleanup(place: Place, *words: str) -> dict[str, Any] | None:
    """Run ``python -m crq.server cleanup`` on the swd's files, as ``start`` runs the server
    (the client imports nothing of the server's); its JSON answer, or None once its refusal
    is printed. Its stderr (replay warnings) passes through."""
    cmd = [sys.executable, "-m", "crq.server", "cleanup", "--swd", str(place.swd.root), *words]
    done = subprocess.run(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, env=child_env(), check=False
    )
    try:
        answer = json.loads(done.stdout.decode("utf-8", "replace").strip().splitlines()[-1])
    except (IndexError, ValueError):
        answer = None
    if not isinstance(answer, dict):
        fail(f"python -m crq.server cleanup failed (exit status {done.returncode})")
        return None
    if done.returncode != 0 or "error" in answer:
        fail(str(answer.get("error") or f"exit status {done.returncode}"))
        return None
    return answer


def _print_incomplete(rows: list[dict[str, Any]]) -> None:
    from crq.client.table import ago, format_table

    if not rows:
        print("every running attempt is confirmed by a live tasker")
        return
    print(
        format_table(
            ["ID", "ATTEMPT", "TASKER", "HOST", "TASKER STATE", "LAST CONTACT", "NAME"],
            [
                [
                    r["id"],
                    r["attempt"],
                    r["tasker"],
                    r["host"],
                    r["tasker_state"],
                    ago(r["last_contact"]) if r["last_contact"] else "never",
                    r["name"],
                ]
                for r in rows
            ],
            right=(0, 1),
        )
    )


if __name__ == "__main__":
    sys.exit(main())
