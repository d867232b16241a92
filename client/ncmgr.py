"""``ncmgr``: start, stop and inspect the server of a queue (SPEC sections 2 and 5).

``ncmgr start`` runs ``python -m crq.server …`` in its own session, output in
``<swd>/logs/server.out``, and returns once the server is open for clients (showing crash
recovery progress meanwhile). Defaults: queue ``$CRQ_QUEUE`` or ``vnc``; swd, host and port
from the registry when the queue is registered there, else ``./<queue>.swd``, ``127.0.0.1``
(only this host can connect; pass ``--host 0.0.0.0`` to serve taskers on other hosts) and the
queue's hashed default port.

A failover queue (SPEC section 8) has standbys too: ``start --standby`` adds one (on the
next free port after the queue's, which is the leader's), ``status`` lists every server,
``failover`` hands leadership over on purpose and ``stop --all`` stops the standbys as well.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from crq.client import systemd
from crq.client.clitools import as_typed, duration, fail, positive_int, run, say, seconds
from crq.client.errors import CrqError, Standby
from crq.client.place import (
    DEFAULT_HOST,
    Place,
    local_url,
    on_this_host,
    pid_alive,
    port_busy,
    read_server_json,
)
from crq.client.starter import DEFAULT_GRACE, START_TIMEOUT, Starter, child_env
from crq.client.table import key_values, when
from crq.client.views import counts_text, recovery_text

from crq import wire

if TYPE_CHECKING:
    from crq.client.api import Client

STOP_TIMEOUT = 60.0
ROLES = ("admin", "operator", "user", "readonly")
FAILOVER_TIMEOUT = 120.0
TAKEOVER_WAIT = 10.0  # after a stop, for a standby seen taking over to say it leads
POLL = 0.1
#: How many ports after the queue's a standby's start looks at for a free one.
STANDBY_PORTS = 64

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


def _election(text: str) -> str:
    if text == "file" or (text.startswith("etcd://") and len(text) > len("etcd://")):
        return text
    raise argparse.ArgumentTypeError(f"want file or etcd://host:port[,host:port…], not {text!r}")


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
        "--standby",
        action="store_true",
        help="start a standby that takes over when the leader goes (default port: the next "
        "free one after the queue's)",
    )
    p.add_argument(
        "--election",
        type=_election,
        metavar="file|etcd://H:P,…",
        help="how the leader is chosen (default file: the lock on the swd's server.lock)",
    )
    p.add_argument(
        "--election-ttl",
        type=as_typed(seconds),
        metavar="S",
        help="etcd lease: a leader silent this long is replaced (default 5)",
    )
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
    p.add_argument("--all", action="store_true", help="stop the standbys too (else one takes over)")
    p.add_argument(
        "--timeout", type=float, default=STOP_TIMEOUT, metavar="S", help=argparse.SUPPRESS
    )
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("status", help="mode, pid, URL, counts, standbys; exit 1 unless running")
    _add_target(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("failover", help="hand leadership over to a standby now")
    _add_target(p)
    p.add_argument("--to", metavar="HOST", help="only a standby on HOST may take over")
    p.add_argument(
        "--timeout", type=float, default=FAILOVER_TIMEOUT, metavar="S", help=argparse.SUPPRESS
    )
    p.set_defaults(func=cmd_failover)

    p = sub.add_parser("cleanup", help="manual recovery (SPEC section 5)")
    _add_target(p)
    p.add_argument("--list", action="store_true", help="jobs not confirmed by a live tasker")
    p.add_argument("--job", type=int, metavar="ID", help="recover this job now")
    p.add_argument("--dead-host", metavar="HOST", help="recover every job of taskers on HOST")
    p.add_argument("--standalone", action="store_true", help="no server: work on the files")
    p.add_argument("--reset-lock", action="store_true", help="remove a stale recovery lock")
    p.set_defaults(func=cmd_cleanup)

    p = sub.add_parser("token", help="personal tokens (SPEC section 9): issue, list, revoke")
    words = p.add_subparsers(dest="token_action", metavar="ACTION", required=True)
    q = words.add_parser("issue", help="a token for USER, printed once (the server keeps a hash)")
    _add_target(q)
    q.add_argument("user", metavar="USER")
    q.add_argument("--role", choices=ROLES, help="its role (default: USER's by config.toml)")
    q.add_argument("--expires", type=duration, metavar="D", help="lifetime: 3600, 8h, 30d…")
    q.add_argument("--note", metavar="N", help="shown by `ncmgr token list`")
    q = words.add_parser("list", help="the tokens: id, user, role, expiry, who issued, note")
    _add_target(q)
    q.add_argument("--json", action="store_true", help="print the server's JSON")
    q = words.add_parser("revoke", help="revoke token ID: it opens nothing from now on")
    _add_target(q)
    q.add_argument("token_id", metavar="ID")
    p.set_defaults(func=cmd_token)

    systemd.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args.func, args)


# -- start --------------------------------------------------------------------------------


def server_command(args: argparse.Namespace, place: Place, host: str, port: int) -> list[str]:
    cmd = [sys.executable, "-m", "crq.server", "--queue", place.queue, "--swd", str(place.swd.root)]
    cmd += ["--host", host, "--port", str(port)]
    if args.standby:
        cmd.append("--standby")
    if args.election is not None:
        cmd += ["--election", args.election]
    if args.election_ttl is not None:
        cmd += ["--election-ttl", str(args.election_ttl)]
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
    if args.standby:
        if not args.port:
            found = _standby_port(host, int(port))
            if found is None:
                return fail(
                    f"no free port in {int(port) + 1}-{int(port) + STANDBY_PORTS} on {host} "
                    "for the standby; choose one with --port"
                )
            port = found
    else:
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
        if args.standby:
            place.register_standby(url)
        else:
            place.register(url, host, port)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, cmd, child_env())
    grace = float(args.recovery_grace) if args.recovery_grace is not None else DEFAULT_GRACE
    starter = Starter(
        place, cmd, host, int(port), url, stall=float(args.timeout), grace=grace,
        standby=args.standby,
    )  # fmt: skip
    return starter.run()


def _standby_port(host: str, base: int) -> int | None:
    """The first free port after ``base`` (the queue's port, the leader's): a standby on
    the leader's host must not take it, and elsewhere the same rule keeps ports alike."""
    for port in range(base + 1, min(base + STANDBY_PORTS, 65535) + 1):
        if not port_busy(host, port):
            return port
    return None


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
    rc = _stop_standbys(place, args.timeout) if args.all else 0
    pid = place.pid
    alive = pid_alive(pid)
    with place.client() as client:
        try:
            client.stop_server(freeze=args.freeze)
        except Standby:  # the candidates answer, as standbys, and none knows a leader
            say(f"queue {place.queue} has no leader now" + _standbys_wait(place))
            return rc
        except CrqError as e:
            if e.code not in ("unreachable", "timeout", "disconnected"):
                raise
            if alive:
                return fail(
                    f"queue {place.queue} does not answer at {place.url} but its server "
                    f"(pid {pid}) is alive; to force it: kill {pid} (the next start recovers)"
                )
            say(f"queue {place.queue} is not running")
            return rc
        stopped = client.url
        if stopped != place.url:  # the leader was found elsewhere: its pid is not ours
            pid, alive = None, False
        if not _wait_gone(pid if alive else None, client, args.timeout):
            return fail(
                f"queue {place.queue} was asked to stop but pid {pid} is still alive after "
                f"{args.timeout:.0f} s"
            )
    clean = place.swd.clean_marker.exists()
    what = "frozen and stopped" if args.freeze else "stopped"
    extra = "; taskers keep their running jobs for the next server" if args.freeze else ""
    gone = f", pid {pid} gone" if pid else ""
    taken = _next_leader(place, stopped)
    if taken is not None:  # the marker, if any, is the next leader's to take
        how = "clean stop" if clean else "gone"
        say(f"queue {place.queue} leader at {stopped} {what} ({how}{gone}){extra}; "
            f"{taken} leads now (ncmgr stop --all stops every server)")  # fmt: skip
        return rc
    tail = "snapshot written, clean stop" if clean else "no clean marker: next start recovers"
    say(f"queue {place.queue} {what} ({tail}{gone}){extra}{_standbys_wait(place)}")
    return rc if clean else 1


def _next_leader(place: Place, stopped: str) -> str | None:
    """While other candidates live, wait (a little) for one of them to lead after a stop:
    ``URL (epoch E)`` of the one that does, else None."""
    deadline = time.monotonic() + TAKEOVER_WAIT
    while True:
        others = [
            i
            for i in place.servers()
            if str(i["url"]).rstrip("/") != stopped.rstrip("/") and _maybe_alive(i)
        ]
        for info in others:
            if info.get("mode") in (wire.MODE_NORMAL, wire.MODE_RECOVERING):
                return f"{str(info['url']).rstrip('/')} (epoch {info.get('epoch', '?')})"
        if not others or time.monotonic() > deadline:
            return None
        time.sleep(POLL)


def _standbys_wait(place: Place) -> str:
    """``; standby URL takes over …`` while standbys live, else ``""``."""
    live = [i for i in place.servers() if i.get("mode") == wire.MODE_STANDBY and _maybe_alive(i)]
    if not live:
        return ""
    urls = ", ".join(str(i["url"]) for i in live)
    return f"; standby {urls} takes over (ncmgr stop --all stops every server)"


def _maybe_alive(info: dict[str, Any]) -> bool:
    """A server file's process lives (as far as this host can tell)."""
    pid = info.get("pid")
    return not on_this_host(info) or pid_alive(pid if isinstance(pid, int) else None)


def _stop_standbys(place: Place, timeout: float) -> int:
    """Stop every standby, before the leader so that none takes over: by its admin-token
    ``POST /server/stop``, else (a standby that refuses it) by SIGTERM when on this host."""
    rc = 0
    for info in place.servers():
        if info.get("mode") != wire.MODE_STANDBY:
            continue
        url = str(info["url"])
        raw = info.get("pid")
        pid = raw if isinstance(raw, int) and on_this_host(info) and pid_alive(raw) else None
        with place.client(url=url, timeout=5.0, follow=False) as client:
            try:
                client.stop_server()
            except CrqError as e:
                if pid is not None:
                    os.kill(pid, signal.SIGTERM)
                elif e.code in ("unreachable", "timeout") and on_this_host(info):
                    continue  # gone already (its file outlived it)
                else:
                    rc = fail(f"queue {place.queue}: cannot stop the standby at {url}: {e}")
                    continue
            if not _wait_gone(pid, client, timeout):
                rc = fail(f"queue {place.queue}: the standby at {url} is still alive")
                continue
        say(f"queue {place.queue} standby at {url} stopped" + (f" (pid {pid} gone)" if pid else ""))
    return rc


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
    if status.get("epoch") is not None:
        pairs.insert(4, ("epoch", status["epoch"]))
    if status.get("recovery"):
        pairs.append(("recovery", recovery_text(status["recovery"])))
    full = (status.get("journal") or {}).get("disk_full_since")
    if full:
        pairs.append(("DISK FULL", f"since {when(full)}: replies held until the swd has space"))
    return key_values(pairs)


def leader_status(client: Client) -> dict[str, Any] | None:
    """The leader's ``GET /server`` (following the candidates and a standby's pointer), or
    None when no server answers as the leader."""
    status: dict[str, Any] | None
    try:
        status = client.server()
    except CrqError as e:
        if e.code not in ("unreachable", "timeout", "disconnected", "standby"):
            raise
        return None
    if status.get("mode") == wire.MODE_STANDBY:
        pointer = status.get("leader")
        status = client.probe(str(pointer)) if pointer else None
        if status is None or status.get("mode") == wire.MODE_STANDBY:
            return None
    return status


def cmd_status(args: argparse.Namespace) -> int:
    place = Place(args)
    with place.client(timeout=5.0) as client:
        status = leader_status(client)
        servers = server_rows(client, place.servers(), status)
    table = ("\n\nservers:\n" + servers) if servers else ""
    if status is not None:
        print(status_lines(place, status) + table)
        if place.same_as_registered and status.get("url"):
            _note_leader(place.queue, str(status["url"]))
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
    print(key_values([(k, v) for k, v in pairs if v is not None]) + table)
    return 1


def _note_leader(queue: str, url: str) -> None:
    """Keep the registry's ``url`` on the leader found (a read-only home is fine)."""
    from crq.client import registry

    try:
        registry.set_leader(queue, url)
    except (CrqError, OSError):
        pass


def server_rows(
    client: Client, servers: list[dict[str, Any]], leader: dict[str, Any] | None
) -> str:
    """The table of every candidate (its ``servers/*.json``, and what it answers now)."""
    from crq.client.views import server_table

    found = []
    for info in servers:
        url = str(info["url"]).rstrip("/")
        same = leader is not None and str(leader.get("url") or "").rstrip("/") == url
        live = leader if same else client.probe(url, timeout=2.0)
        found.append((info, live))
    return server_table(found) if found else ""


# -- failover -----------------------------------------------------------------------------


def cmd_failover(args: argparse.Namespace) -> int:
    """Hand over to a standby, then follow until another server leads in normal mode."""
    place = Place(args)
    queue = place.queue
    with place.client() as client:
        before = leader_status(client)
        if before is None:
            return fail(f"queue {queue} has no leader to hand over (see ncmgr status)")
        where = str(before.get("url") or client.url)
        if args.to:
            standbys = [i for i in place.servers() if i.get("mode") == wire.MODE_STANDBY]
            hosts = {str(i.get("host")) for i in standbys}
            if hosts and not any(_same_host(args.to, h) for h in hosts):
                return fail(
                    f"queue {queue} has no standby on {args.to} (standbys on: "
                    f"{', '.join(sorted(hosts))}); nothing was handed over"
                )
        try:
            client.failover(args.to)
        except CrqError as e:
            if e.code == "no_standby":
                on = f" on {args.to}" if args.to else ""
                return fail(
                    f"queue {queue} has no standby{on} to take over; start one with "
                    f"ncmgr start --standby --queue {queue}{f' (on {args.to})' if args.to else ''}"
                )
            raise
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            now = _new_leader(place, client, before)
            if now is not None:
                url = str(now.get("url") or "?").rstrip("/")
                if now.get("pid") == before.get("pid") and now.get("host") == before.get("host"):
                    return fail(
                        f"queue {queue}: no standby took over; the old leader leads again at "
                        f"{url} (epoch {now.get('epoch', '?')})"
                    )
                _note_leader(queue, url)
                print(f"queue {queue}: leader now {url} (epoch {now.get('epoch', '?')})")
                return 0
            time.sleep(0.2)
    return fail(
        f"queue {queue}: {where} handed over, but no other server leads after "
        f"{args.timeout:.0f} s (see ncmgr status)"
    )


def _same_host(a: str, b: str) -> bool:
    """``node`` and ``node.example.com`` name the same host."""
    return a == b or a.split(".")[0] == b.split(".")[0]


def _new_leader(place: Place, client: Client, before: dict[str, Any]) -> dict[str, Any] | None:
    """The status of a server that leads in normal mode and is not ``before``'s instance
    (at a higher epoch, when epochs are known), or None."""
    from crq.client import registry

    place.info = read_server_json(place.swd)
    urls = registry.merge(
        *([str(place.info["url"])] if place.info.get("url") else []),
        *(str(i["url"]) for i in place.servers()),
        *client.leader.candidates(),
    )
    old_epoch = before.get("epoch")
    for url in urls:
        status = client.probe(url, timeout=2.0)
        if status is None or status.get("mode") != wire.MODE_NORMAL:
            continue
        if status.get("instance") == before.get("instance"):
            continue
        epoch = status.get("epoch")
        if isinstance(old_epoch, int) and isinstance(epoch, int) and epoch <= old_epoch:
            continue
        return status
    return None


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


# -- token --------------------------------------------------------------------------------


def cmd_token(args: argparse.Namespace) -> int:
    """Personal tokens, as the admin (ncmgr shows the admin token first) or as oneself."""
    place = Place(args)
    with place.client() as client:
        if args.token_action == "issue":
            out = client.issue_token(args.user, args.role, args.expires, args.note)
            print(out["token"])
            expires = out.get("expires")
            until = f"expires {_stamp(expires)}" if expires else "never expires"
            print(  # stdout holds the token alone: TOKEN=$(ncmgr token issue …)
                f"ncmgr: token {out['id']} for {out['user']} (role {out['role']}), {until}; "
                "shown this once only",
                file=sys.stderr,
            )
            return 0
        if args.token_action == "revoke":
            client.revoke_token(args.token_id)
            say(f"token {args.token_id} revoked")
            return 0
        rows = client.tokens()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    _print_tokens(rows)
    return 0


def _stamp(t: object) -> str:
    if not isinstance(t, int | float):
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _print_tokens(rows: list[dict[str, Any]]) -> None:
    from crq.client.table import format_table

    if not rows:
        print("no personal tokens")
        return
    print(
        format_table(
            ["ID", "USER", "ROLE", "EXPIRES", "ISSUED", "BY", "NOTE"],
            [
                [
                    r["id"],
                    r["user"],
                    r.get("role") or "(by config)",
                    _stamp(r.get("expires")) or "never",
                    _stamp(r.get("created")),
                    r.get("by") or "",
                    r.get("note") or "",
                ]
                for r in rows
            ],
        )
    )


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
