"""Real unix users and a group for the identity tests, made with useradd and groupadd.

``crqtalice`` and ``crqtbob`` are plain users; ``crqtcarol`` is in the group ``crqtops``
(config.toml maps ``@crqtops`` to operator in the tests); under pytest-xdist each name ends in
the worker's id (``crqtalicegw0``). Each gets a home under a directory
everyone may traverse (pytest's own tmp is root's 0700), so that a job running as the user
can enter its cwd and write its log there. Users this fixture made are removed at the end of
the session; users already there (a rerun after a crash) are reused. Root only (CI runs as
root); skipped elsewhere.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# Each pytest-xdist worker has users of its own: one worker's session end removes the users it
# made while another worker's tests still run as theirs.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
ALICE, BOB, CAROL = f"crqtalice{_WORKER}", f"crqtbob{_WORKER}", f"crqtcarol{_WORKER}"
OPS = f"crqtops{_WORKER}"


@dataclass
class Users:
    """The users made: their uid and gid by name, a home each, and a shared 0755 root."""

    root: Path
    uid: dict[str, int]
    gid: dict[str, int]

    def home(self, user: str) -> Path:
        return self.root / user


def _exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
        return True
    except KeyError:
        return False


@pytest.fixture(scope="session")
def unix_users() -> Iterator[Users]:
    if os.geteuid() != 0 or not shutil.which("useradd"):
        pytest.skip("real users need root and useradd (the identity tests run as root in CI)")
    root = Path(tempfile.mkdtemp(prefix="crq-users-", dir="/tmp"))
    os.chmod(root, 0o755)
    made_group = False
    made: list[str] = []
    try:
        try:
            grp.getgrnam(OPS)
        except KeyError:
            subprocess.run(["groupadd", OPS], check=True)
            made_group = True
        for user in (ALICE, BOB, CAROL):
            if not _exists(user):
                extra = ["-G", OPS] if user == CAROL else []
                subprocess.run(["useradd", "-M", "-s", "/bin/sh", *extra, user], check=True)
                made.append(user)
            elif user == CAROL:
                subprocess.run(["usermod", "-a", "-G", OPS, user], check=True)
        uid = {u: pwd.getpwnam(u).pw_uid for u in (ALICE, BOB, CAROL)}
        gid = {u: pwd.getpwnam(u).pw_gid for u in (ALICE, BOB, CAROL)}
        for user in (ALICE, BOB, CAROL):
            home = root / user
            home.mkdir(mode=0o700)
            os.chown(home, uid[user], gid[user])
            subprocess.run(["usermod", "-d", str(home), user], check=True)
        yield Users(root, uid, gid)
    finally:
        for user in made:
            subprocess.run(["userdel", user], check=False)
        if made_group:
            subprocess.run(["groupdel", OPS], check=False)
        shutil.rmtree(root, ignore_errors=True)
