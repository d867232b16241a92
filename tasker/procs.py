"""Our job wrappers among this host's processes: how a job runs, and how to find it again.

Each job runs under a tiny ``/bin/sh`` wrapper in its own session, so it survives a
``kill -9`` of the tasker, and the wrapper itself appends the job's exit status to a
status file in the state dir, so the result is not lost when nobody is there to
``wait()`` for it. What the kernel says about a pid in general (argv, start time, boot
id) is ``crq.procfs``'s; this module knows what *our* wrapper looks like.
"""

from __future__ import annotations

import os
from pathlib import Path

from crq.tasker.statedir import Key, parse_name

from crq import procfs

SH = "/bin/sh"
WRAPPER_NAME = "crq-job"
# Runs the command as a child (not exec) so the shell outlives it and records its status.
# It first appends "<key> S" to the shared status file: an attempt that got that far
# leaves a trace even if it is killed with its wrapper while no tasker watches (an attempt
# without one never ran its command, and the server may send it again); at the end it
# appends "<key> <rc>". Each line is one append-mode write, so the lines of many jobs never
# mix. Traps make a group-wide SIGTERM/INT/HUP reach the command but let the wrapper write
# the status before leaving; trapped signals are reset to default for the command itself.
# The file exists (0600) before the spawn, so the job's umask is the tasker's own, as it
# was. It also goes to the job's cwd ($3: posix_spawn has no chdir), leaving OLDPWD as
# the job's env has it (cd sets it); a cwd that vanished since the tasker checked it ends
# the attempt before its command ran (exit 126, "can't cd" in the log). Only shell
# built-ins: the job's env may have no PATH at all.
WRAPPER = (
    "trap : TERM INT HUP; s=$1; k=$2; case ${OLDPWD+x} in "
    'x) o=$OLDPWD; cd -- "$3" || exit 126; OLDPWD=$o;; '
    '*) cd -- "$3" || exit 126; unset OLDPWD;; esac; shift 3; '
    'printf "%s S\\n" "$k" >> "$s"; '
    '"$@"; rc=$?; printf "%s %s\\n" "$k" "$rc" >> "$s"; exit $rc'
)
# The wrapper of a job run as its owner (tasker/runas.py): the same status lines, written
# as root; "$@" is setpriv … sh -c AS_OWNER, which opens the log (append, created with the
# tasker's umask) and enters the cwd as the owner, then execs the job. A log or cwd the
# owner cannot reach ends the attempt before the command runs (exit 126); the wrapper's own
# stdout and stderr are /dev/null, so nothing is written anywhere as root.
RUN_AS = (
    "trap : TERM INT HUP; s=$1; k=$2; shift 2; "
    'printf "%s S\\n" "$k" >> "$s"; '
    '"$@"; rc=$?; printf "%s %s\\n" "$k" "$rc" >> "$s"; exit $rc'
)
AS_OWNER = (
    'command exec >> "$1" 2>&1 || exit 126; '
    "case ${OLDPWD+x} in "
    'x) o=$OLDPWD; cd -- "$2" || exit 126; OLDPWD=$o;; '
    '*) cd -- "$2" || exit 126; unset OLDPWD;; esac; shift 2; exec "$@"'
)
# Wrappers of earlier versions, still running jobs after a tasker upgrade: the status at
# $1 is their own file (status/<job>.<attempt>); the second one's $2 is the umask.
OLD_WRAPPERS = (
    'trap : TERM INT HUP; s=$1; shift; true > "$s"; '
    '"$@"; rc=$?; printf "%s\\n" "$rc" > "$s"; exit $rc',
    'trap : TERM INT HUP; s=$1; u=$2; shift 2; umask 077; true > "$s"; umask "$u"; '
    '"$@"; rc=$?; printf "%s\\n" "$rc" > "$s"; exit $rc',
)
NSIG = 65
CURRENT = (WRAPPER.encode(), RUN_AS.encode())  # their argv[5] is the attempt's key


def wrapper_argv(status: Path, key: Key, cwd: str, argv: list[str]) -> list[str]:
    """The argv that runs ``argv`` in ``cwd`` under our wrapper, its status to ``status``."""
    return [SH, "-c", WRAPPER, WRAPPER_NAME, str(status), f"{key[0]}.{key[1]}", cwd, *argv]


def run_as_argv(
    status: Path, key: Key, setpriv: list[str], log: str, cwd: str, argv: list[str]
) -> list[str]:
    """The argv that runs ``argv`` as the owner ``setpriv`` names, its status to ``status``."""
    inner = [SH, "-c", AS_OWNER, "crq-job-as-owner", log, cwd, *argv]
    return [SH, "-c", RUN_AS, WRAPPER_NAME, str(status), f"{key[0]}.{key[1]}", *setpriv, *inner]


def classify(rc: int) -> tuple[int | None, int | None]:
    """Wrapper/Popen return code → (exit_code, signal); sh reports a signal death as 128+n."""
    if rc < 0:
        return None, -rc
    if 128 < rc < 128 + NSIG:
        return None, rc - 128
    return rc, None


def current_umask() -> int:
    """This process's umask, read without changing it (os.umask would, for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o077)
    os.umask(old)
    return old


def wrapper_alive(pid: int, status: Path, key: Key | None = None) -> bool:
    """True while *our* wrapper still runs as pid: its argv names the status file (and
    the attempt, for a shared status file).

    Checking argv (not just ``kill(pid, 0)``) guards against a recycled pid after a long
    outage, and a zombie has an empty cmdline so it counts as gone.
    """
    if pid <= 0:
        return False
    if not procfs.HAVE_PROC:
        return procfs.process_exists(pid)
    argv = procfs.cmdline(pid)
    if argv is None or os.fsencode(str(status)) not in argv:
        return False
    return key is None or len(argv) < 6 or argv[2] not in CURRENT or argv[5] == _name(key)


def wrapper_env(pid: int) -> dict[str, str]:
    """The environment a process started with (empty if it cannot be read)."""
    try:
        data = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in data.split(b"\0") if b"=" in item)
    return {os.fsdecode(k): os.fsdecode(v) for k, v in pairs}


def _name(key: Key) -> bytes:
    return f"{key[0]}.{key[1]}".encode()


def find_orphan_wrappers(status_dir: Path) -> dict[Key, int]:
    """Wrappers running with a status file in status_dir, found through /proc.

    Catches a job spawned just before a tasker crash, before its record was written.
    Only session leaders count: the wrapper's own fork shares its argv until it execs.
    """
    found: dict[Key, int] = {}
    prefix = os.fsencode(str(status_dir)) + b"/"
    wrappers = {w.encode() for w in (WRAPPER, RUN_AS, *OLD_WRAPPERS)}
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return found
    for pid in pids:
        argv = procfs.cmdline(pid)
        if not argv or len(argv) < 5 or argv[2] not in wrappers or not argv[4].startswith(prefix):
            continue
        if argv[2] in CURRENT:
            key = parse_name(os.fsdecode(argv[5])) if len(argv) > 5 else None
        else:
            key = parse_name(os.fsdecode(argv[4][len(prefix) :]))
        if key is None:
            continue
        try:
            # each wrapper leads its own session; a process of its session with the same
            # argv is the wrapper's fork in the instant before it execs the job: not ours
            if os.getsid(pid) != pid:
                continue
        except OSError:
            continue  # gone meanwhile
        found[key] = pid
    return found
