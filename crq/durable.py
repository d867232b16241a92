"""Files that survive a power cut, and locks held for a process's life (stdlib only).

One home for what server, tasker and clients each wrote for themselves: an atomic write is
tmp + fsync + rename + fsync of the directory, so after it returns the file exists whole
or, if the machine died before, not at all (never cut short).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterable
from pathlib import Path

PRIVATE = 0o600


class LockBusy(Exception):
    """Another process holds the lock; ``holder`` is what it wrote into the file."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"{path} is held by pid {holder}")
        self.path, self.holder = path, holder


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename or a new file in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_tmp(path: Path, data: bytes, mode: int, fsync: bool) -> Path:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # a tmp file left by an earlier process keeps its old mode
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if fsync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    return tmp


def write_atomic(
    path: str | os.PathLike[str], data: bytes, mode: int = PRIVATE, fsync: bool = True
) -> None:
    """Replace ``path`` with ``data`` all at once, durably (``fsync=False``: tests only)."""
    write_many([(Path(path), data)], mode, fsync)


def write_many(
    files: Iterable[tuple[Path, bytes]], mode: int = PRIVATE, fsync: bool = True
) -> None:
    """``write_atomic`` for several files with one directory fsync per directory.

    Each file is fsynced and renamed before the directory fsyncs, so after return each one
    survives a power cut exactly as if written alone. On an error the files before the
    failing one may be in place, each of them whole.
    """
    dirs: dict[Path, None] = {}
    for path, data in files:
        os.replace(_write_tmp(path, data, mode, fsync), path)
        dirs[path.parent] = None
    if fsync:
        for d in dirs:
            fsync_dir(d)


def lock_pidfile(
    path: str | os.PathLike[str], mode: int = PRIVATE, wait: bool = False, note: str = ""
) -> int:
    """Hold an flock on ``path`` for this process's life and write our pid into it (and
    ``note`` after it, on the same line).

    Returns the fd (close it to let go; it is not inherited by children). Raises LockBusy
    naming the holder's pid when another process has it and ``wait`` is false.
    """
    p = Path(path)
    fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, mode)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise LockBusy(p, holder) from None
    os.fchmod(fd, mode)  # a lock file an older version made readable to all
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {note}".strip().encode() + b"\n", 0)
    return fd
