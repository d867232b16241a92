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
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crq.client import registry
from crq.client.clitools import as_typed, fail, positive_int, run, say, seconds
from crq.client.errors import CrqError, recovery_progress
from crq.client.table import key_values, when

from crq import procfs, wire

if TYPE_CHECKING:
    from crq.client.api import Client

START_TIMEOUT = 60.0  # give up on a server that neither opens nor works for this long
START_CAP = 1800.0  # and on one still not open after this long, however busy
STOP_TIMEOUT = 60.0
DEFAULT_GRACE = 120.0
POLL = 0.1
DEFAULT_HOST = "127.0.0.1"

#: ``ncmgr start`` settings passed through to ``python -m crq.server``: (flag, kind, help).
SETTINGS: tuple[tuple[str, str, str], ...] = (
    ("--recovery-grace", "seconds", "how long recovery waits for taskers (default 120)"),
    ("--tasker-timeout", "seconds", "silence before a tasker's jobs are recovered (default 90)"),
    ("--heartbeat", "seconds", "tasker heartbeat interval (default 10)"),
    ("--fsync", "fsync", "always (default) acks after fsync; never is for tests"),
    ("--checkpoint-bytes", "bytes", "journal size that triggers a checkpoint"),
    ("--autoforget-done", "seconds", "forget done jobs after S (default 3600)"),
    ("--autoforget-other", "seconds", "forget other finished jobs after S (default 2 days)"),
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


# -- locating a queue ---------------------------------------------------------------------


class Place:
    """A queue's name, swd, registry entry and whatever ``server.json`` says about it."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.queue: str = args.queue or os.environ.get("CRQ_QUEUE") or wire.DEFAULT_QUEUE
        self.entry = registry.lookup(self.queue)
        if args.swd:
            root = Path(os.path.expanduser(args.swd))
        elif self.entry and self.entry.get("swd"):
            root = Path(str(self.entry["swd"]))
        else:
            root = Path(f"{self.queue}.swd")
        self.swd = wire.Swd(root)
        # The registry's host/port belong to its swd; a different --swd starts afresh.
        self.same_as_registered = bool(
            self.entry and Path(str(self.entry.get("swd", ""))).absolute() == self.swd.root
        )
        self.info = read_server_json(self.swd)

    @property
    def pid(self) -> int | None:
        pid = self.info.get("pid")
        return pid if isinstance(pid, int) and pid > 0 else None

    @property
    def url(self) -> str:
        """Where to reach the server: server.json, else the registry, else the default."""
        if self.info.get("url"):
            return str(self.info["url"]).rstrip("/")
        if self.same_as_registered and self.entry and self.entry.get("url"):
            return str(self.entry["url"]).rstrip("/")
        return f"http://{DEFAULT_HOST}:{wire.default_port(self.queue)}"

    def token(self) -> str | None:
        """``CRQ_TOKEN`` > this swd's admin token (authoritative for its server) > registry."""
        env = os.environ.get("CRQ_TOKEN")
        if env:
            return env.strip()
        found = registry.read_token(self.swd.admin_token)
        if found:
            return found
        token = (self.entry or {}).get("token") if self.same_as_registered else None
        return str(token) if token else None

    def client(self, url: str | None = None, timeout: float = 10.0) -> Client:
        from crq.client.api import Client

        return Client(
            url=url or self.url, token=self.token() or "", queue=self.queue, timeout=timeout
        )


def _client(place: Place, url: str, token: str | None) -> Client:
    from crq.client.api import Client

    return Client(url=url, token=token or "", queue=place.queue, timeout=5.0)


def read_server_json(swd: wire.Swd) -> dict[str, Any]:
    try:
        data = json.loads(swd.server_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def pid_alive(pid: int | None) -> bool:
    """True if ``pid`` runs on this host and looks like a crq server (guards against reuse)."""
    if not pid or not wire.process_exists(pid):
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    try:
        text = cmdline.read_bytes().replace(b"\0", b" ")
    except FileNotFoundError:
        return not Path("/proc/self").exists()  # no procfs: trust kill(0)
    except OSError:
        return True
    if b"server" not in text:
        return False
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[:1] == ["Z"]


def port_busy(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be bound now (None when it is free). SO_REUSEADDR as the
    server sets it, so a port in TIME_WAIT is not reported busy."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            return e.strerror or str(e)
    return None


def local_url(host: str, port: int) -> str:
    """The URL this host uses to reach a server bound to ``host``."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


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


def child_env() -> dict[str, str]:
    """The server's environment: ours, with this checkout importable even when not installed."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in parts:
        env["PYTHONPATH"] = os.pathsep.join([root, *parts])
    env.pop("CRQ_SERVER", None)
    return env


def last_reason(log: Path, offset: int) -> str:
    """The server's ``crq-server: <reason>`` line written after ``offset``, else its last line."""
    try:
        with open(log, "rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return "no output"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("crq-server:"):
            return line.removeprefix("crq-server:").strip()
    return lines[-1] if lines else "no output"


def _recovery_report(swd: wire.Swd, since: float) -> Path | None:
    reports = [
        p
        for p in swd.root.glob("crash_recovery_report_*")
        if p.suffix != ".json" and p.stat().st_mtime >= since - 1
    ]
    return max(reports, key=lambda p: p.stat().st_mtime) if reports else None


def _register(place: Place, url: str, host: str | None = None, port: int | None = None) -> None:
    """Record the queue with the swd's own admin token (never $CRQ_TOKEN)."""
    token = registry.read_token(place.swd.admin_token)
    registry.register(place.queue, url, place.swd.root, token, host=host, port=port)


def _refuse_if_running(place: Place) -> int | None:
    """Exit status when a server already holds the swd, else None."""
    pid = place.pid
    if not pid_alive(pid):
        return None
    with place.client(timeout=2.0) as client:
        up = client.healthz(timeout=1.0)
    if up:
        _register(place, place.url)
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
        _register(place, url, host, port)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, cmd, child_env())
    return _spawn_and_watch(args, place, cmd, host, int(port), url)


def _give_up(proc: subprocess.Popen[bytes], message: str) -> int:
    """Fail a start in one line, killing the server it spawned: a failed ``ncmgr start``
    leaves nothing running (its session holds the server and any checkpoint child)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        proc.kill()
    proc.wait()
    return fail(f"{message}; killed it")


def _spawn_and_watch(
    args: argparse.Namespace, place: Place, cmd: list[str], host: str, port: int, url: str
) -> int:
    """Start the server and watch it until it is open for clients, or give up.

    Waits while the process lives and makes progress: until it answers, while it uses CPU
    (loading a long journal on a busy machine); then while crash recovery has time left.
    A server that hangs is not waited for.
    """
    log = place.swd.logs / "server.out"
    began = time.time()
    with open(log, "ab") as out:
        offset = out.tell()
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=place.swd.root,
            env=child_env(),
            close_fds=True,
        )
    grace = float(args.recovery_grace) if args.recovery_grace is not None else DEFAULT_GRACE
    stall = max(0.0, float(args.timeout))
    cap = time.monotonic() + START_CAP + grace
    deadline = time.monotonic() + stall + grace
    ticks = procfs.cpu_ticks(proc.pid)
    public = url
    answered = False
    registered = False
    recovered = False
    last_shown = ""
    last_shown_at = 0.0
    client: Client | None = None
    try:
        while True:
            code = proc.poll()
            if code is not None:
                reason = last_reason(log, offset)
                return fail(f"queue {place.queue} did not start: {reason} (log: {log})")
            now_ticks = None if answered else procfs.cpu_ticks(proc.pid)
            if now_ticks is not None and now_ticks != ticks:  # still loading: wait on
                ticks = now_ticks
                deadline = max(deadline, min(cap, time.monotonic() + stall))
            if time.monotonic() > deadline:
                return _give_up(
                    proc,
                    f"queue {place.queue} (pid {proc.pid}) did not open within "
                    f"{time.time() - began:.0f} s (see {log})",
                )
            # Our own server's swd token: $CRQ_TOKEN may well be another queue's.
            token = registry.read_token(place.swd.admin_token) or place.token()
            if client is None or (token and client.token != token):
                if client is not None:
                    client.close()
                client = _client(place, url, token)
            if not client.healthz(timeout=1.0):
                time.sleep(POLL)
                continue
            answered = True
            place.info = read_server_json(place.swd)
            if host in ("0.0.0.0", "::") and place.info.get("pid") == proc.pid:
                public = str(place.info.get("url") or url).rstrip("/")
            if not registered:
                _register(place, public, host, port)
                registered = True
            try:
                status = client.server()
            except CrqError as e:
                fresh = registry.read_token(place.swd.admin_token)
                if e.status in (401, 403) and fresh in (None, token):  # not a token just made
                    return _give_up(
                        proc, f"queue {place.queue} refused ncmgr start's check: {e.message}"
                    )
                time.sleep(POLL)
                continue
            mode = status.get("mode")
            if mode == wire.MODE_NORMAL:
                break
            if mode == wire.MODE_RECOVERING:
                recovered = True
                recovery = status.get("recovery") or {}
                left = recovery.get("seconds_left")
                if isinstance(left, int | float):
                    deadline = max(deadline, time.monotonic() + float(left) + stall)
                shown = recovery_progress(recovery, approx=False)
                head = shown.split(",")[0]
                now = time.monotonic()
                if head != last_shown.split(",")[0] or now - last_shown_at >= 5.0:
                    say(f"recovering: {shown or 'replaying the journal'}")
                    last_shown, last_shown_at = shown, now
            time.sleep(POLL)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return fail(f"interrupted; the server (pid {proc.pid}) keeps starting in the background")
    finally:
        if client is not None:
            client.close()
    _register(place, public, host, port)  # again: the token may be newer than the first call
    say(f"queue {place.queue} started at {public} (pid {proc.pid}, swd {place.swd.root})")
    report = _recovery_report(place.swd, began)
    if recovered or report:
        say("crash recovery finished" + (f"; report: {report}" if report else ""))
    return 0


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


def counts_text(counts: dict[str, Any]) -> str:
    """``3 queued, 2 running, 100 done`` in the canonical state order."""
    parts = [f"{counts[s]} {s}" for s in wire.JOB_STATES if counts.get(s)]
    parts += [f"{n} {s}" for s, n in counts.items() if s not in wire.JOB_STATES and n]
    return ", ".join(parts) or "none"


def recovery_text(recovery: dict[str, Any]) -> str:
    text = recovery_progress(recovery, approx=False)
    expected = recovery.get("expected") or []
    back = set(recovery.get("reconnected") or [])
    missing = [t for t in expected if t not in back]
    if missing:
        text += f" (missing: {', '.join(map(str, missing))})"
    if recovery.get("events_replayed") is not None:
        text += f", {recovery['events_replayed']} events replayed"
    return text


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
        from crq.server.cleanup import reset_lock
        from crq.server.recovery import LockError

        try:
            say(f"{reset_lock(place.swd)} ({place.swd.recovery_lock})")
        except LockError as e:
            return fail(str(e))
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
    from crq.server.cleanup import run_standalone
    from crq.server.models import BadRequest
    from crq.server.recovery import LockError
    from crq.server.replay import ReplayError

    try:
        return run_standalone(place.swd.root, action, arg)
    except (LockError, ReplayError) as e:
        fail(str(e))
    except BadRequest as e:
        fail(e.message)
    return None


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
