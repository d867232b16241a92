"""Finding a queue and probing its server process: swd, registry entry, ``server.json``.

What ``ncmgr`` needs to know before it acts (the commands themselves are in ``ncmgr.py``).
Stdlib only, so ``ncmgr --help`` stays fast; the client comes with :meth:`Place.client`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crq.client import registry

from crq import procfs, wire

if TYPE_CHECKING:
    from crq.client.api import Client

DEFAULT_HOST = "127.0.0.1"


class Place:
    """A queue's name, swd, registry entry and whatever ``server.json`` says about it."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.queue: str = args.queue or os.environ.get("CRQ_QUEUE") or wire.DEFAULT_QUEUE
        self.entry = registry.lookup(self.queue)
        if args.swd:
            root = Path(os.path.expanduser(args.swd))
        elif self.entry and self.entry.get("swd"):
            root = Path(str(self.entry["swd"]))
        else:
            root = Path(f"{self.queue}.swd")
        self.swd = wire.Swd(root)
        # The registry's host/port belong to its swd; a different --swd starts afresh.
        self.same_as_registered = bool(
            self.entry and Path(str(self.entry.get("swd", ""))).absolute() == self.swd.root
        )
        self.info = read_server_json(self.swd)

    @property
    def pid(self) -> int | None:
        pid = self.info.get("pid")
        return pid if isinstance(pid, int) and pid > 0 else None

    @property
    def url(self) -> str:
        """Where to reach the server: server.json, else the registry, else the default."""
        if self.info.get("url"):
            return str(self.info["url"]).rstrip("/")
        if self.same_as_registered and self.entry and self.entry.get("url"):
            return str(self.entry["url"]).rstrip("/")
        return f"http://{DEFAULT_HOST}:{wire.default_port(self.queue)}"

    def token(self) -> str | None:
        """``CRQ_TOKEN`` > this swd's admin token (authoritative for its server) > registry.

        ncmgr is the queue owner's tool, so it shows the admin token whenever it can read
        one, before MUNGE: it is the owner's identity on any server version, and ``ncmgr
        stop``/failover need admin anyway. Without one (another user's ``ncmgr status``) the
        client falls back to MUNGE when munged runs (see :meth:`client`)."""
        env = os.environ.get("CRQ_TOKEN")
        if env:
            return env.strip()
        found = registry.read_token(self.swd.admin_token)
        if found:
            return found
        token = (self.entry or {}).get("token") if self.same_as_registered else None
        return str(token) if token else None

    def client(
        self,
        url: str | None = None,
        timeout: float = 10.0,
        token: str | None = None,
        follow: bool = True,
    ) -> Client:
        """A client of this queue's server, with ``token`` else :meth:`token` (else a MUNGE
        credential, when munged runs); ``follow``: of its leader (else of the server at
        ``url`` alone)."""
        from crq.client.api import Client

        token = token if token is not None else self.token()
        return Client(
            url=url or self.url, token=token or "", queue=self.queue, timeout=timeout, follow=follow
        )

    def register(self, url: str, host: str | None = None, port: int | None = None) -> None:
        """Record the queue with the swd's own admin token (never $CRQ_TOKEN)."""
        token = registry.read_token(self.swd.admin_token)
        registry.register(self.queue, url, self.swd.root, token, host=host, port=port)

    def register_standby(self, url: str) -> None:
        """Record a standby's URL among the queue's candidates (the leader's stays ``url``)."""
        token = registry.read_token(self.swd.admin_token)
        leader = self.info.get("url") if pid_alive(self.pid) else None
        registry.add_candidate(
            self.queue, url, self.swd.root, token, leader=str(leader) if leader else None
        )

    def servers(self) -> list[dict[str, Any]]:
        """Every candidate's ``servers/<instance>.json`` (leader and standbys)."""
        return read_servers(self.swd)


def read_server_json(swd: wire.Swd) -> dict[str, Any]:
    try:
        data = json.loads(swd.server_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_servers(swd: wire.Swd) -> list[dict[str, Any]]:
    """``<swd>/servers/*.json`` of the live candidates, oldest first; a file being written
    (or gone with its server) is skipped."""
    found = []
    try:
        paths = list((swd.root / "servers").glob("*.json"))
    except OSError:
        return []
    for path in paths:
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(info, dict) and isinstance(info.get("url"), str):
            info.setdefault("instance", path.stem)
            found.append(info)
    started = [i.get("started_at") for i in found]
    if all(isinstance(t, int | float) for t in started):
        found.sort(key=lambda i: float(i["started_at"]))
    return found


def on_this_host(info: dict[str, Any]) -> bool:
    return info.get("host") in (os.uname().nodename, socket.gethostname())


def pid_alive(pid: int | None) -> bool:
    """True if ``pid`` runs on this host and looks like a crq server (guards against reuse)."""
    if not pid or not procfs.process_exists(pid):
        return False
    argv = procfs.cmdline(pid)
    if argv is None:
        return not procfs.HAVE_PROC  # no procfs: trust kill(0)
    if b"server" not in b" ".join(argv):
        return False
    return not procfs.is_zombie(pid)


def port_busy(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be bound now (None when it is free). SO_REUSEADDR as the
    server sets it, so a port in TIME_WAIT is not reported busy."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            return e.strerror or str(e)
    return None


def local_url(host: str, port: int) -> str:
    """The URL this host uses to reach a server bound to ``host``."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"
