"""``ncmgr systemd``: the systemd units of this install, naming its own console scripts by
absolute path (a venv's ``bin/`` or ``/usr/local/bin``), so that the units find the commands
wherever pip put them. deploy/systemd/ holds what it writes for the default paths;
tests/deploy/test_systemd.py checks that the two agree."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import sys
import sysconfig
from pathlib import Path

from crq.client.clitools import UsageError, fail

SERVER_UNIT = "crq-server@.service"
TASKER_UNIT = "crq-tasker@.service"
COMMANDS = ("ncmgr", "vovtasker")
DEFAULT_BIN = Path("/usr/local/bin")
DEFAULT_DATA = Path("/var/lib/crq")
DEFAULT_ENV_DIR = Path("/etc/crq")
DEFAULT_UNIT_DIR = Path("/etc/systemd/system")
DEFAULT_USER = "crq"
DEFAULT_HOST = "0.0.0.0"

# What a path or a value may hold to go into a unit line unquoted: systemd would expand
# % and $, split at whitespace and unquote quotes and backslashes.
_SAFE = re.compile(r"[A-Za-z0-9._/+@:,=-]+")
_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}")

SERVER = """\
# One crq queue server per queue: systemctl enable --now crq-server@vnc
# Written by `ncmgr systemd` for the commands in {bin}.
# The swd lives in {data}/<queue>.swd; settings go in its config.toml.
[Unit]
Description=crq queue server for queue %i
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
User={user}
Group={group}
Environment=CRQ_HOME={data}/.config
WorkingDirectory={data}
ExecStart={bin}/ncmgr start --queue %i --swd {data}/%i.swd --host {host} --foreground
# SIGTERM (systemctl stop) is the clean stop of `ncmgr stop`: snapshot and clean marker
# written, running jobs requeued uncharged; the taskers kill them and exit.
# To keep running jobs across a restart, `ncmgr stop --freeze --queue %i` first.
# A crash (kill -9, OOM) is survived: the next start enters crash recovery mode.
KillMode=mixed
Restart=on-failure
RestartSec=2
TimeoutStopSec=120
LimitNOFILE=65536

[Install]
WantedBy=multi-user.target
"""

TASKER = """\
# A tasker for queue %i on this host: systemctl enable --now crq-tasker@vnc
# Written by `ncmgr systemd` for the commands in {bin}.
# It needs no access to the server's swd: {env_dir}/tasker-%i.env (mode 0600) names the
# server and holds the tasker token (the server's <swd>/security/tasker.token):
#   CRQ_SERVER=http://queue-host:6259    (its URL; a failover queue's: URL1,URL2)
#   CRQ_TASKER_TOKEN=<the token>
#   CRQ_TASKER_ARGS=--slots 16 --resources "RAM/64000 linux"    (optional)
# Jobs run in their own sessions: restarting this unit does not kill them
# (KillMode=process), the new tasker re-adopts them from its state dir.
# It runs as root so that each job runs as its owner (uid, gid, groups of this host's
# passwd/group, through setpriv); the status wrapper stays root, the job and its log are the
# owner's. A tasker run as another user runs only that user's jobs.
[Unit]
Description=crq tasker for queue %i
After=network-online.target munge.service
Wants=network-online.target

[Service]
Type=simple
User=root
Environment=CRQ_TASKER_ARGS=
EnvironmentFile={env_dir}/tasker-%i.env
ExecStart={bin}/vovtasker --server ${{CRQ_SERVER}} --state-dir {data}/taskers/%i $CRQ_TASKER_ARGS
KillMode=process
Restart=always
RestartSec=2

[Install]
WantedBy=multi-user.target
"""


def render(
    bin_dir: Path = DEFAULT_BIN,
    user: str = DEFAULT_USER,
    group: str | None = None,
    data: Path = DEFAULT_DATA,
    host: str = DEFAULT_HOST,
    env_dir: Path = DEFAULT_ENV_DIR,
) -> dict[str, str]:
    """The two units' text by file name; refuses values a unit line would mangle."""
    for what, value in (("--bin", bin_dir), ("--data", data), ("--env-dir", env_dir)):
        check_path(what, value)
    for what, name in (("--user", user), ("--group", group or user)):
        if not _USER.fullmatch(name):
            raise UsageError(f"bad {what} {name!r} (a system user or group name, e.g. crq)")
    if not _SAFE.fullmatch(host):
        raise UsageError(f"bad --host {host!r} (an address or host name)")
    values = {
        "bin": bin_dir,
        "user": user,
        "group": group or user,
        "data": data,
        "host": host,
        "env_dir": env_dir,
    }
    return {SERVER_UNIT: SERVER.format(**values), TASKER_UNIT: TASKER.format(**values)}


def check_path(what: str, path: Path) -> None:
    """A path systemd takes verbatim: absolute, nothing it would expand, split or unquote."""
    if not path.is_absolute():
        raise UsageError(f"{what} {str(path)!r} is not an absolute path")
    if not _SAFE.fullmatch(str(path)):
        raise UsageError(
            f"{what} {str(path)!r} cannot go in a unit: want an absolute path of "
            "letters, digits and ._+@:,=- (no spaces, %, $ or quotes)"
        )


def scripts_dir() -> Path:
    """Where this install's console scripts are: beside the running ``ncmgr``, else the
    interpreter's scripts directory, else on PATH."""
    candidates = [Path(sys.argv[0]).absolute().parent, Path(sysconfig.get_path("scripts"))]
    found = shutil.which("ncmgr")
    if found:
        candidates.append(Path(found).absolute().parent)
    for folder in candidates:
        if all(_runnable(folder / c) for c in COMMANDS):
            return folder
    raise UsageError("cannot find this install's ncmgr and vovtasker; give --bin DIR")


def _runnable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "systemd", help="write systemd units that run this install's commands (absolute paths)"
    )
    p.add_argument("--dir", type=Path, default=DEFAULT_UNIT_DIR,
                   help=f"where to write them (default {DEFAULT_UNIT_DIR})")  # fmt: skip
    p.add_argument("--user", default=DEFAULT_USER, help="the server's user (default crq)")
    p.add_argument("--group", help="the server's group (default: the user's name)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA,
                   help=f"swds and tasker state dirs (default {DEFAULT_DATA})")  # fmt: skip
    p.add_argument("--host", default=DEFAULT_HOST, help="the address the server listens on")
    envs = f"the taskers' tasker-<queue>.env files (default {DEFAULT_ENV_DIR})"
    p.add_argument("--env-dir", type=Path, default=DEFAULT_ENV_DIR, help=envs)
    p.add_argument("--bin", type=Path, help="the commands' directory (default: this install's)")
    p.add_argument("--print", action="store_true", help="print the units instead of writing")
    p.set_defaults(func=cmd_systemd)


def cmd_systemd(args: argparse.Namespace) -> int:
    bin_dir: Path = args.bin or scripts_dir()
    check_path("--bin", bin_dir)
    for c in COMMANDS:
        if not _runnable(bin_dir / c):
            raise UsageError(f"no executable {bin_dir / c}")
    units = render(bin_dir, args.user, args.group, args.data, args.host, args.env_dir)
    if args.print:
        for name, text in units.items():
            print(f"# --- {name}\n{text}", end="")
        return 0
    folder: Path = args.dir
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in units.items():
            (folder / name).write_text(text)
            print(f"wrote {folder / name}")
    except OSError as e:
        return fail(f"cannot write the units in {folder}: {e.strerror or e}")
    if folder.absolute() != DEFAULT_UNIT_DIR:
        print(f"copy them to {DEFAULT_UNIT_DIR} (or another unit directory of systemd)")
    print("\n".join(next_steps(args.user, args.group or args.user, args.data, args.env_dir)))
    return 0


def next_steps(user: str, group: str, data: Path, env_dir: Path) -> list[str]:
    """What root runs next, for the server and for each tasker host."""
    u, g, d = shlex.quote(user), shlex.quote(group), shlex.quote(str(data))
    env = shlex.quote(str(env_dir / "tasker-vnc.env"))
    return [
        "then, as root, on the server host:",
        f"  id {u} >/dev/null 2>&1 || useradd --system --home-dir {d} {u}",
        f"  install -d -o {u} -g {g} {d}",
        "  systemctl daemon-reload",
        "  systemctl enable --now crq-server@vnc       # the server of queue vnc",
        f"  cat {d}/vnc.swd/security/tasker.token       # the taskers' token",
        "and on each tasker host (these units there too):",
        f"  install -d -m 700 {shlex.quote(str(env_dir))}",
        f"  install -m 600 /dev/null {env}",
        f"  # in {env}: CRQ_SERVER=http://SERVER-HOST:PORT  CRQ_TASKER_TOKEN=…  (one a line)",
        "  systemctl daemon-reload",
        "  systemctl enable --now crq-tasker@vnc",
    ]
