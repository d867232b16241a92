"""Reading a chunk of a job's log on behalf of its owner (server and tasker share it).

The server (or a root tasker) may be able to open files the job's owner could not: a user
who names ``-l /etc/shadow`` or another user's file as the log must not get it back through
``crq log``. So whenever this process is not the owner, the file is read only if the owner's
uid, gid and groups may read it by its mode bits, and search every directory above it (the
path checked is the one really opened, from ``/proc/self/fd``, so symlinks cannot mislead
the check). ACLs are not consulted: a file readable only through an ACL is refused here.

Only the standard library: ``vovtasker`` imports this.
"""

from __future__ import annotations

import os
import pwd
import stat

#: Bytes one request gets by default, and at most.
DEFAULT_CHUNK = 64 << 10
MAX_CHUNK = 1 << 20
R, X = 4, 1


class LogRefused(Exception):
    """The job's owner could not read this file (or it is no regular file): not served."""


def log_file(job_id: int, cwd: str, log: str | None) -> str:
    """Where a job's log is: ``log`` (relative to ``cwd``), else ``<cwd>/crq.<id>.log``, as
    the tasker opens it."""
    return os.path.join(cwd, log or f"crq.{job_id}.log")


def _may(st: os.stat_result, uid: int, groups: frozenset[int], bit: int) -> bool:
    """POSIX mode-bit access of ``uid``/``groups`` to ``st`` (root reads and searches all)."""
    if uid == 0:
        return True
    if st.st_uid == uid:
        return bool((st.st_mode >> 6) & bit)
    if st.st_gid in groups:
        return bool((st.st_mode >> 3) & bit)
    return bool(st.st_mode & bit)


def owner_ids(user: str) -> tuple[int, frozenset[int]]:
    """The uid and every gid of ``user`` on this host; LogRefused when it is unknown here."""
    try:
        pw = pwd.getpwnam(user)
        groups = frozenset(os.getgrouplist(user, pw.pw_gid))
    except (KeyError, OSError):
        raise LogRefused(f"user {user} is unknown on this host") from None
    return pw.pw_uid, groups | {pw.pw_gid}


def read_chunk(path: str, offset: int, size: int, owner: str | None) -> tuple[bytes, int]:
    """Up to ``size`` bytes of ``path`` from ``offset``, and the file's size now.

    ``owner``: the job's user; None skips the check (a test, or nobody else to protect).
    Raises FileNotFoundError (and other OSErrors) when the file cannot be opened here,
    LogRefused when the owner could not read it. Blocking: call it from a thread."""
    if not stat.S_ISREG(os.stat(path).st_mode):  # no open of a fifo or a device
        raise LogRefused(f"{path} is not a regular file")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise LogRefused(f"{path} is not a regular file")
        if owner is not None:
            uid, groups = owner_ids(owner)
            if uid != os.geteuid():
                _check_owner(fd, st, path, owner, uid, groups)
        data = os.pread(fd, max(0, min(size, MAX_CHUNK)), max(0, offset)) if size > 0 else b""
        return data, max(st.st_size, offset + len(data) if data else 0)
    finally:
        os.close(fd)


def _check_owner(
    fd: int, st: os.stat_result, path: str, owner: str, uid: int, groups: frozenset[int]
) -> None:
    if not _may(st, uid, groups, R):
        raise LogRefused(f"{owner} may not read {path}")
    try:
        real = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        real = os.path.realpath(path)
    parent = os.path.dirname(real)
    while True:
        if not _may(os.stat(parent), uid, groups, X):
            raise LogRefused(f"{owner} may not reach {path} (directory {parent})")
        if parent == "/" or not parent:
            return
        parent = os.path.dirname(parent)
