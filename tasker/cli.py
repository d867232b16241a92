"""``vovtasker``: run a tasker in the foreground.

Expected errors are one line on stderr with exit 2 (usage) or 1 (cannot run); the jobs
of a stopped tasker keep running and the next one with the same state dir adopts them.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from typing import NoReturn

from crq.tasker import __version__

from crq import procfs, wire
from crq.cliargs import positive_int, positive_seconds

PROG = "vovtasker"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Run a crq tasker: take jobs from a queue server and run them on this host.",
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--server",
        action="append",
        metavar="URL",
        help="server URL, or URL1,URL2…; repeat for more: the candidates of a failover queue "
        "(the next is tried when one does not answer; a standby's leader is followed)",
    )
    where.add_argument(
        "--swd",
        metavar="DIR",
        help="server working dir: the leader from server.json, else servers/*.json; token "
        "from security/tasker.token",
    )
    where.add_argument(
        "--etcd",
        metavar="etcd://H:P,…",
        help="find the leader where it publishes itself in etcd (key /crq/QUEUE/leader)",
    )
    p.add_argument(
        "--queue",
        metavar="Q",
        help="queue whose leader --etcd looks up (default $CRQ_QUEUE or vnc)",
    )
    p.add_argument("--name", help="tasker name (default: short host name)")
    p.add_argument("--slots", type=positive_int, help="jobs run at once (default: CPU count)")
    p.add_argument("--resources", default="", help='resources offered, e.g. "RAM/64000 linux"')
    p.add_argument(
        "--state-dir", metavar="DIR", help="durable local state (default: $CRQ_HOME/taskers/NAME)"
    )
    p.add_argument(
        "--token-file",
        metavar="F",
        help="tasker token file (else $CRQ_TASKER_TOKEN, else the swd's tasker.token, else "
        "MUNGE credentials when munged runs here)",
    )
    p.add_argument(
        "--heartbeat",
        type=positive_seconds,
        default=10.0,
        metavar="S",
        help="long-poll seconds until the server says otherwise (default 10)",
    )
    p.add_argument(
        "--enforce-memory",
        action="store_true",
        help="hold each job asking for RAM/N to N MB with a cgroup (v2, else v1's memory "
        "controller); without one usable, says so and runs jobs unlimited",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # before the handlers are in place: still no traceback
        return 130


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    name = args.name or socket.gethostname().split(".")[0]
    if not _good_name(name):
        return _usage(f"bad tasker name {name!r} (letters, digits and ._-@, at most 128)")
    from crq.tasker.link import munge_here

    env_token = os.environ.get("CRQ_TASKER_TOKEN", "").strip() or None
    if (args.server or args.etcd) and not (args.token_file or env_token or munge_here()):
        return _usage(
            "no tasker token: give --token-file or set CRQ_TASKER_TOKEN (or run munged here "
            "and list this tasker's user in the server's tasker_users)"
        )
    if args.token_file and not os.path.isfile(args.token_file):
        return _usage(f"no such token file: {args.token_file}")
    if args.queue is not None and not args.etcd:
        return _usage("--queue goes with --etcd")
    servers = [u.strip() for arg in args.server or [] for u in arg.split(",") if u.strip()]
    if args.server and not servers:
        return _usage("--server names no URL")
    for url in servers:
        if not url.startswith(("http://", "https://")):
            return _usage(f"bad server URL (want http://host:port): {url}")
    etcd = None
    if args.etcd:
        from crq.tasker.etcdleader import EtcdLeader, parse_endpoints

        try:
            endpoints = parse_endpoints(args.etcd)
        except ValueError as e:
            return _usage(f"bad --etcd: {e}")
        queue = args.queue or os.environ.get("CRQ_QUEUE") or wire.DEFAULT_QUEUE
        etcd = EtcdLeader(endpoints, queue)
    from crq.server.resources import ResourceError, parse_capacity  # stdlib only, like wire

    try:  # the server's own rule: a bad offer would be refused at every registration
        parse_capacity(args.resources, 1)
    except ResourceError as e:
        return _usage(f"bad --resources: {e}")

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format=f"%(asctime)s.%(msecs)03d {PROG}[{name}] %(levelname)s %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        stream=sys.stderr,
    )
    log = logging.getLogger("crq.tasker")

    from crq.tasker.agent import Agent, TaskerInfo
    from crq.tasker.link import ServerSource
    from crq.tasker.runner import Runner
    from crq.tasker.statedir import StateDir, StateDirBusy

    state_root = args.state_dir or wire.crq_home() / "taskers" / name
    try:
        state = StateDir(state_root)
        state.lock()
        state.session()  # made now: a state dir that cannot keep it fails here, not later
    except StateDirBusy as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"{PROG}: cannot use state dir {state_root}: {e.strerror or e}", file=sys.stderr)
        return 1

    boot_id = procfs.boot_id()
    stored = state.stored_boot_id()
    rebooted = bool(stored and boot_id and stored != boot_id)
    slots = args.slots or os.cpu_count() or 1
    memory = None
    if args.enforce_memory:
        from crq.tasker import cgroups

        try:
            memory = cgroups.detect(state.identity())
            log.info("enforcing RAM/N with cgroup %s under %s", memory.version, memory.base)
        except cgroups.Unusable as e:
            log.warning("cannot enforce memory (RAM/N places jobs only): %s", e)
    runner = Runner(state, slots=slots, memory=memory)
    try:
        adopted, pending = runner.recover(rebooted=rebooted)
    except OSError as e:
        print(f"{PROG}: cannot read state dir {state.root}: {e.strerror or e}", file=sys.stderr)
        return 1
    info = TaskerInfo(
        name=name,
        slots=slots,
        resources=args.resources,
        heartbeat=args.heartbeat,
        boot_id=boot_id,
        rebooted=rebooted,
    )
    source = ServerSource(
        servers=servers, swd=args.swd, token_file=args.token_file, token=env_token, etcd=etcd
    )
    agent = Agent(info, source, runner, state)

    def on_signal(signum: int, _frame: object) -> None:
        agent.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info(
        "starting: %d slots, state dir %s, %d jobs re-adopted, %d results to report%s",
        info.slots,
        state.root,
        adopted,
        pending,
        " (host rebooted)" if rebooted else "",
    )
    rc = agent.run()
    running, buffered = runner.counts()
    runner.close()
    log.info("stopped; %d jobs keep running, %d results kept for the next start", running, buffered)
    state.unlock()
    return rc


def _good_name(name: str) -> bool:
    """The server's rule for tasker names; checked here so a typo fails fast, not in a loop."""
    return wire.valid_tasker_name(name)


def _usage(message: str) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
