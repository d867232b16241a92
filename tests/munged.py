"""Real ``munged`` daemons for the identity tests, each with its own generated key.

The Debian package ``munge`` (CI installs it) provides munged and mungekey; nothing of it is
mocked. Each daemon gets a key, socket, pid, log and seed file in its own directory under /tmp
(removed at teardown; one every user may traverse, so that the tests' unix users reach the
socket), and a packaged munged (on /run/munge) is never touched. ``munged`` is one daemon per
test module (as a site runs one per host; the leftover check runs per module);
``foreign_munged`` is a second one with another key, whose credentials the first must refuse.
Both are stopped with SIGKILL at teardown, also on failure. munged refuses to start as a user
other than root without ``--force``; the tests run as root in CI and are skipped elsewhere.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.rigs import PATIENCE, wait_until

MUNGED = shutil.which("munged") or (
    "/usr/sbin/munged" if os.path.exists("/usr/sbin/munged") else None
)
MUNGEKEY = shutil.which("mungekey") or (
    "/usr/sbin/mungekey" if os.path.exists("/usr/sbin/mungekey") else None
)
SKIP = "munged is not installed (Debian package munge; .ci/run installs it)"


@dataclass
class Munged:
    """One running munged: the socket path clients and servers pass to crq.munge."""

    socket: str
    key: Path
    proc: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


def start_munged(root: Path) -> Munged:
    """A daemon for a test: skipped where munged is missing or we are not root."""
    if MUNGED is None or MUNGEKEY is None:
        pytest.skip(SKIP)
    if os.geteuid() != 0:
        pytest.skip("munged wants root (the identity tests run as root in CI)")
    return launch_munged(root)


def launch_munged(root: Path) -> Munged:
    """A munged with its own new key, socket, log, pid and seed file under ``root`` (also
    bench/auth.py's); RuntimeError if it is missing or does not start."""
    if MUNGED is None or MUNGEKEY is None:
        raise RuntimeError(SKIP)
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)  # munged checks that its socket dir is not writable by others
    key = root / "munge.key"
    subprocess.run([MUNGEKEY, "--create", "--keyfile", str(key)], check=True)
    os.chmod(key, 0o600)
    sock = root / "munge.socket"
    log = root / "munged.log"
    proc = subprocess.Popen(
        [
            MUNGED,
            "--foreground",
            "--force",
            f"--socket={sock}",
            f"--key-file={key}",
            f"--log-file={log}",
            f"--pid-file={root / 'munged.pid'}",
            f"--seed-file={root / 'munged.seed'}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    daemon = Munged(str(sock), key, proc, log)
    try:
        wait_until(lambda: sock.exists() or proc.poll() is not None, PATIENCE)
        if proc.poll() is not None:
            text = log.read_text(errors="replace") if log.exists() else ""
            raise RuntimeError(f"munged exited {proc.returncode}: {text[-2000:]}")
    except BaseException:
        daemon.stop()
        raise
    return daemon


@contextmanager
def _daemon() -> Iterator[Munged]:
    """Under a directory every user may traverse (pytest's tmp is root's 0700): the tests'
    unix users reach the socket with the ``munge`` command."""
    where = Path(tempfile.mkdtemp(prefix="crq-munge-", dir="/tmp"))
    try:
        os.chmod(where, 0o755)
        daemon = start_munged(where / "d")
        try:
            yield daemon
        finally:
            daemon.stop()
    finally:
        shutil.rmtree(where, ignore_errors=True)


@pytest.fixture(scope="module")
def munged() -> Iterator[Munged]:
    with _daemon() as daemon:
        yield daemon


@pytest.fixture(scope="module")
def foreign_munged() -> Iterator[Munged]:
    """A munged with another key: another site, or an attacker's own daemon."""
    with _daemon() as daemon:
        yield daemon
