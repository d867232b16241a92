"""Which credential a client shows the server (SPEC section 9), chosen once per client.

In order: an explicit token (the ``token`` argument, ``crq --token-file``, ``CRQ_TOKEN``); a
MUNGE credential when munged runs on this host (socket ``CRQ_MUNGE_SOCKET``, else
/run/munge); the registry's token; the swd's ``security/admin.token``. A token found in a
file is the queue owner's admin token, so MUNGE comes before it: who you are beats what
you can read. ``ncmgr`` (the queue owner's tool) picks its own token first, see
:meth:`crq.client.place.Place.token`.

A MUNGE credential is made fresh for every request (munged refuses one it has seen), about
0.2 ms each. A long-lived client could trade it for a short-lived personal token once, but
every such token is a journaled event and a row the server keeps until it expires, so the
client does not. libmunge (and crq.munge, ctypes and all) is loaded only when munged's
socket exists: a ``crq`` command on a host without munged pays one ``stat``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from crq.client import registry
from crq.client.errors import CrqError

from crq import wire

#: as crq.munge has them (not imported from there: it costs ctypes at start-up)
MUNGE_SOCKET_ENV = "CRQ_MUNGE_SOCKET"
DEFAULT_MUNGE_SOCKET = "/run/munge/munge.socket.2"

TOKEN = "token"
MUNGE = "munge"
NONE = "none"


class Credential(NamedTuple):
    """What a client shows: ``via`` token, munge or none; ``source`` says where it came from
    (for messages)."""

    via: str
    token: str | None
    source: str
    socket: str | None = None

    def authorization(self) -> str | None:
        """The ``Authorization`` value of one request (a fresh MUNGE credential each time)."""
        if self.via == MUNGE:
            return "Munge " + munge_encode(self.socket)
        return f"Bearer {self.token}" if self.token else None


def munge_socket() -> str:
    return os.environ.get(MUNGE_SOCKET_ENV) or DEFAULT_MUNGE_SOCKET


def munge_here(socket: str | None = None) -> str | None:
    """munged's socket when MUNGE can be used here (the socket exists and libmunge loads),
    else None. Costs a ``stat`` where munged does not run."""
    path = socket or munge_socket()
    if not os.path.exists(path):
        return None
    from crq import munge  # only now: ctypes and libmunge cost ~15 ms at start-up

    return path if munge.available(path) else None


def munge_encode(socket: str | None = None) -> str:
    """A fresh credential from munged; a CrqError with munge's reason if it cannot make one."""
    from crq import munge

    path = socket or munge_socket()
    try:
        return munge.encode(socket=path)
    except munge.MungeError as e:
        raise CrqError(f"no MUNGE credential from munged at {path}: {e}", code="munge") from None


def read_token_file(path: str | os.PathLike[str]) -> str:
    """The token in ``path`` (``--token-file``); a usage CrqError when it cannot be read."""
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except OSError as e:
        raise CrqError(f"cannot read token file {path}: {e.strerror or e}", code="usage") from None
    if not text:
        raise CrqError(f"token file {path} is empty", code="usage")
    return text.splitlines()[0].strip()


def choose(target: registry.Target, token: str | None = None, *, munge: bool = True) -> Credential:
    """The credential for ``target`` in the order of the module docstring.

    ``token``: a token to use as it is; ``""``: no token from anywhere (MUNGE, else none).
    ``munge=False`` skips MUNGE (a caller that must show a token)."""
    if token:
        return Credential(TOKEN, token.strip(), "the token given")
    env = os.environ.get("CRQ_TOKEN", "").strip()
    if env and token is None:
        return Credential(TOKEN, env, "CRQ_TOKEN")
    if munge:
        socket = munge_here()
        if socket is not None:
            return Credential(MUNGE, None, f"munged at {socket}", socket)
    if token is None:
        entry = target.entry or {}
        stored = entry.get("token")
        if isinstance(stored, str) and stored.strip():
            return Credential(TOKEN, stored.strip(), "the registry")
        swd = _swd(target)
        if swd is not None:
            path = wire.Swd(swd).admin_token
            found = registry.read_token(path)
            if found:
                return Credential(TOKEN, found, str(path))
    return Credential(NONE, None, "no credential")


def _swd(target: registry.Target) -> Path | None:
    """The swd whose admin token may be read: the registry's, else ``./<queue>.swd``."""
    entry = target.entry or {}
    if entry.get("swd"):
        return Path(str(entry["swd"]))
    if target.queue:
        return Path.cwd() / f"{target.queue}.swd"
    return None
