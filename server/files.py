"""The recovery lock: one recovery (or standalone cleanup) of a swd at a time.

Below every user of it (main, recovery, cleanup), so none of them imports another for it.
Atomic writes and pid-file locks are crq/durable.py's; process questions crq/procfs.py's.
"""

from __future__ import annotations

import os
import socket
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from crq.durable import write_atomic
from crq.procfs import boot_id, process_exists


class LockError(Exception):
    pass


def read_lock(path: Path) -> dict[str, Any] | None:
    try:
        data = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (orjson.JSONDecodeError, OSError):
        return {"pid": 0, "host": "?", "time": 0}
    return data if isinstance(data, dict) else {"pid": 0, "host": "?", "time": 0}


def take_lock(path: Path, take_over: bool = False, epoch: int = 0) -> dict[str, Any] | None:
    """One recovery at a time per swd; a stale lock is named, not silently taken over.

    With ``take_over`` (a server starting, under server.lock, so no rival can be starting
    too), a lock left by a process of this very boot of this host that is gone now is
    replaced, and returned so the caller can say so. Any other holder is refused: a live
    pid, another host (its process may live), or another or unknown boot (the pid may be
    some other process now) — unless the holder led an older epoch: elected after it, we
    know it deposed (server/election.py), wherever it ran.
    """
    held = read_lock(path)
    me: dict[str, Any] = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "boot": boot_id(),
        "time": 0.0,
        "epoch": epoch,
    }
    if held is not None and take_over and epoch and 0 < int(held.get("epoch") or 0) < epoch:
        me["time"] = time.time()
        write_atomic(path, orjson.dumps(me))
        return held
    if held is not None:
        when = datetime.fromtimestamp(held.get("time") or 0).strftime("%Y-%m-%d %H:%M:%S")
        who = f"pid {held.get('pid')} on {held.get('host')} since {when}"
        pid = int(held.get("pid") or 0)
        if held.get("host") == me["host"] and (pid == me["pid"] or not process_exists(pid)):
            if take_over and me["boot"] and held.get("boot") == me["boot"]:
                me["time"] = time.time()
                write_atomic(path, orjson.dumps(me))
                return held
            raise LockError(
                f"stale recovery lock {path} ({who}, process gone): "
                "check the swd, then run `ncmgr cleanup --reset-lock`"
            )
        raise LockError(f"a recovery of this swd is already running ({who})")
    me["time"] = time.time()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, orjson.dumps(me))
        os.fsync(fd)
    finally:
        os.close(fd)
    return None
