"""Jobs run as their owner (SPEC section 9).

A tasker running as root starts each job of another user through ``setpriv`` (util-linux,
on every Linux host) with the owner's uid, gid and supplementary groups as this host's
passwd and group databases have them, and HOME, USER and LOGNAME in its environment. The
wrapper that records the status stays root (the status file is root's); only the job side
changes identity, and it opens the log and enters the cwd itself, so a job reaches only
what its owner could. A tasker not running as root runs only its own user's jobs.

Before spawning, :func:`refusal` looks at the mode bits along the cwd and log paths to
fail an attempt the owner could not start with a reason ("cannot open log … as alice");
it never allows what the kernel would refuse: the job side's own open and cd decide, and
a path the mode bits cannot judge (an ACL) is left to them.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import time
from dataclasses import dataclass

SETPRIV = shutil.which("setpriv") or "/usr/bin/setpriv"
CACHE_TTL = 60.0  # a user added or changed on the host is seen within a minute
ACL = "system.posix_acl_access"
R, W, X = 4, 2, 1


@dataclass(frozen=True, slots=True)
class Owner:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str

    def env(self, env: dict[str, str]) -> dict[str, str]:
        """The job's environment with the owner's HOME, USER and LOGNAME."""
        return {**env, "HOME": self.home, "USER": self.name, "LOGNAME": self.name}

    def setpriv(self) -> list[str]:
        groups = ",".join(map(str, self.groups))
        return [
            SETPRIV,
            f"--reuid={self.uid}",
            f"--regid={self.gid}",
            f"--groups={groups}" if groups else "--clear-groups",
            "--",
        ]


class Owners:
    """Owners by name, looked up on this host and kept a minute (NSS may be a directory
    service: a lookup per job would cost a round trip each)."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[float, Owner | None]] = {}
        self.me = os.geteuid()
        try:
            self.my_name = pwd.getpwuid(self.me).pw_name
        except KeyError:
            self.my_name = str(self.me)

    def get(self, name: str, now: float | None = None) -> Owner | None:
        now = time.monotonic() if now is None else now
        hit = self._cache.get(name)
        if hit is not None and now - hit[0] < CACHE_TTL:
            return hit[1]
        try:
            pw = pwd.getpwnam(name)
            groups = tuple(dict.fromkeys(os.getgrouplist(name, pw.pw_gid)))
            owner: Owner | None = Owner(name, pw.pw_uid, pw.pw_gid, groups, pw.pw_dir)
        except (KeyError, OSError):
            owner = None
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[name] = (now, owner)
        return owner

    def decide(self, user: object) -> tuple[Owner | None, str | None]:
        """(the owner to switch to, or None to run as this process; the reason it cannot
        run here, or None)."""
        if not isinstance(user, str) or not user:
            return None, None  # a server that sends no owner: as before, as this tasker
        if self.me != 0:
            if user != self.my_name:
                return None, (
                    f"this tasker runs as {self.my_name}: it runs only {self.my_name}'s jobs, "
                    f"not {user}'s"
                )
            return None, None
        if user == "root":
            return None, None
        owner = self.get(user)
        if owner is None:
            return None, f"user {user} unknown on host {socket.gethostname()}"
        if owner.uid == 0:
            return None, None  # another name of root: root's jobs were let in by the server
        return owner, None


def _allows(st: os.stat_result, owner: Owner, want: int) -> bool:
    if owner.uid == st.st_uid:
        bits = st.st_mode >> 6
    elif st.st_gid in owner.groups:
        bits = st.st_mode >> 3
    else:
        bits = st.st_mode
    return bits & want == want


def _judged(path: str, owner: Owner, want: int) -> bool | None:
    """Whether the owner may ``want`` on path by its mode bits; None if they cannot say."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if _allows(st, owner, want):
        return True
    try:
        os.getxattr(path, ACL)
        return None  # an ACL may allow it: the job side's own try decides
    except OSError:
        return False


def _unsearchable(directory: str, owner: Owner) -> str | None:
    """The first directory from / to ``directory`` (both included) the owner cannot enter."""
    d = "/"
    for part in ["", *os.path.abspath(directory).split("/")[1:]]:
        d = os.path.join(d, part) if part else d
        if _judged(d, owner, X) is False:
            return d
    return None


def refusal(owner: Owner, cwd: str, log: str) -> str | None:
    """Why the owner could not start this job (cwd, log), by mode bits; None if it could
    or they cannot tell."""
    who = owner.name
    blocked = _unsearchable(cwd, owner)
    if blocked is not None:
        return f"cwd {cwd} is not reachable as {who}: {blocked} is not searchable by {who}"
    logdir = os.path.dirname(log) or "/"
    if not os.path.isdir(logdir):
        return f"cannot open log {log} as {who}: its directory does not exist"
    blocked = _unsearchable(logdir, owner)
    if blocked is not None:
        return f"cannot open log {log} as {who}: {blocked} is not searchable by {who}"
    if os.path.lexists(log):
        if _judged(log, owner, W) is False:
            return f"cannot open log {log} as {who}: permission denied"
    elif _judged(logdir, owner, W | X) is False:
        return f"cannot open log {log} as {who}: {logdir} is not writable by {who}"
    return None
