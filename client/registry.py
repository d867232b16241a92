"""The per-user queue registry and how a command finds its server and token (SPEC section 2).

``$CRQ_HOME/registry.json`` maps a queue name to ``{"url", "swd", "host", "port", "token",
"candidates"}``: ``url`` is the last known leader, ``candidates`` every URL a server of the
queue was started at (leader and standbys), where a client looks when the leader goes.
``ncmgr start`` writes it; every client reads it, and notes where it found the leader. It
holds admin tokens, so the directory is 0700 and the file 0600, and it is replaced
atomically (under a lock, so two ``ncmgr start`` for different queues do not lose each
other's entry).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from crq.client.errors import CrqError

from crq import durable, wire

REGISTRY_FILE = "registry.json"

Entry = dict[str, Any]


class Target(NamedTuple):
    """Where a command talks to: the server URL, the queue name if known, its registry entry."""

    url: str
    queue: str | None
    entry: Entry | None


def path() -> Path:
    return wire.crq_home() / REGISTRY_FILE


def entries() -> dict[str, Entry]:
    """Every registered queue, by name."""
    p = path()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise CrqError(f"cannot read the registry {p}: {e.strerror}", code="registry") from None
    try:
        data = json.loads(text) if text.strip() else {}
    except ValueError:
        raise CrqError(
            f"the registry {p} is not valid JSON; repair or remove it", code="registry"
        ) from None
    if not isinstance(data, dict):
        raise CrqError(f"the registry {p} is not a JSON object; repair or remove it")
    return {str(k): v for k, v in data.items() if isinstance(v, dict)}


def lookup(queue: str) -> Entry | None:
    """The registry entry of ``queue``, or None."""
    return entries().get(queue)


def register(
    queue: str,
    url: str,
    swd: str | os.PathLike[str],
    token: str | None,
    *,
    host: str | None = None,
    port: int | None = None,
) -> Entry:
    """Record (or refresh) where ``queue``'s leader lives; returns the stored entry.

    The candidates of an entry for the same swd are kept, with ``url`` among them."""
    parts = urlsplit(url)
    entry: Entry = {
        "url": url.rstrip("/"),
        "swd": str(Path(swd).absolute()),
        "host": host if host is not None else parts.hostname,
        "port": port if port is not None else parts.port,
        "token": token,
    }
    with _locked():
        data = entries()
        old = data.get(queue)
        kept = candidates(old) if old and old.get("swd") == entry["swd"] else []
        entry["candidates"] = merge(*kept, entry["url"])
        data[queue] = entry
        _write(data)
    return entry


def add_candidate(
    queue: str,
    url: str,
    swd: str | os.PathLike[str],
    token: str | None,
    *,
    leader: str | None = None,
) -> Entry:
    """Record a standby of ``queue`` at ``url``: a candidate, not the leader.

    An entry for another swd (or none) is made afresh, its ``url`` the ``leader`` when known
    (else the standby's own: it points at the leader once there is one)."""
    root = str(Path(swd).absolute())
    with _locked():
        data = entries()
        entry = data.get(queue)
        if not entry or entry.get("swd") != root:
            first = (leader or url).rstrip("/")
            parts = urlsplit(first)
            entry = {"url": first, "swd": root, "host": parts.hostname, "port": parts.port}
        if token or "token" not in entry:
            entry["token"] = token
        entry["candidates"] = merge(*candidates(entry), url)
        data[queue] = entry
        _write(data)
    return entry


def set_leader(queue: str, url: str) -> bool:
    """A client found ``queue``'s leader at ``url``: make it the entry's ``url`` (and a
    candidate). ``host``/``port`` stay: they are where ``ncmgr start`` binds a leader of the
    queue (a standby takes the next free port). True if the entry changed; an unregistered
    queue is left alone."""
    url = url.rstrip("/")
    with _locked():
        data = entries()
        entry = data.get(queue)
        if entry is None:
            return False
        listed = merge(*_listed(entry), url)
        if _same_url(str(entry.get("url") or ""), url) and listed == entry.get("candidates"):
            return False
        entry.update(url=url, candidates=listed)  # host/port stay where ncmgr start binds
        _write(data)
    return True


def candidates(entry: Entry | None) -> list[str]:
    """Every URL a server of the entry's queue was started at, the leader's first."""
    if not entry:
        return []
    return merge(*([str(entry["url"])] if entry.get("url") else []), *_listed(entry))


def _listed(entry: Entry) -> list[str]:
    """The entry's ``candidates`` as stored (an entry of an older ncmgr has none)."""
    listed = entry.get("candidates")
    return [u for u in listed if isinstance(u, str)] if isinstance(listed, list) else []


def merge(*urls: str) -> list[str]:
    """``urls`` without a trailing slash, each once (compared without case), in order."""
    out: list[str] = []
    for url in urls:
        url = url.strip().rstrip("/")
        if url and not any(_same_url(url, u) for u in out):
            out.append(url)
    return out


def unregister(queue: str) -> bool:
    """Drop ``queue`` from the registry; True if it was there."""
    with _locked():
        data = entries()
        if data.pop(queue, None) is None:
            return False
        _write(data)
    return True


def _home() -> Path:
    home = wire.crq_home()
    try:
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise CrqError(f"cannot create {home}: {e.strerror}", code="registry") from None
    return home


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    fd = durable.lock_pidfile(_home() / (REGISTRY_FILE + ".lock"), wait=True)
    try:
        yield
    finally:
        os.close(fd)


def _write(data: dict[str, Entry]) -> None:
    home = _home()
    final = home / REGISTRY_FILE
    body = json.dumps(data, indent=2, sort_keys=True).encode() + b"\n"
    try:
        durable.write_atomic(final, body, 0o600)
    except OSError as e:
        message = f"cannot write the registry {final}: {e.strerror}"
        raise CrqError(message, code="registry") from None


def _same_url(a: str, b: str) -> bool:
    return a.rstrip("/").lower() == b.rstrip("/").lower()


def resolve_server(flag_url: str | None = None, queue: str | None = None) -> Target:
    """Find the server: ``--server`` > ``CRQ_SERVER`` > queue (argument, else ``CRQ_QUEUE``,
    else ``vnc``) in the registry > ``http://127.0.0.1:<default port of that queue>``.

    When the URL comes from a flag or ``CRQ_SERVER`` the registry entry with that URL (if any)
    still supplies the queue name and token, so error messages can name the queue.
    """
    name = queue or os.environ.get("CRQ_QUEUE") or None
    url = flag_url or os.environ.get("CRQ_SERVER") or None
    if url:
        url = _normalize(url)
        registered = entries()
        if name and name in registered and _same_url(str(registered[name].get("url", "")), url):
            return Target(url, name, registered[name])
        for qname, entry in registered.items():
            if _same_url(str(entry.get("url", "")), url):
                return Target(url, qname, entry)
        for qname, entry in registered.items():  # a standby's URL names its queue too
            if any(_same_url(u, url) for u in candidates(entry)):
                return Target(url, qname, entry)
        return Target(url, name, None)
    name = name or wire.DEFAULT_QUEUE
    found = lookup(name)
    if found and found.get("url"):
        return Target(str(found["url"]).rstrip("/"), name, found)
    return Target(f"http://127.0.0.1:{wire.default_port(name)}", name, found)


def _normalize(url: str) -> str:
    """Accept ``host:port`` as a URL too."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    return url


def resolve_token(target: Target) -> str | None:
    """``CRQ_TOKEN`` > the registry's token > ``<swd>/security/admin.token`` when readable.

    With no registry entry the default swd ``./<queue>.swd`` is tried last.
    """
    env = os.environ.get("CRQ_TOKEN")
    if env:
        return env.strip()
    entry = target.entry or {}
    token = entry.get("token")
    if isinstance(token, str) and token.strip():
        return token.strip()
    candidates: list[Path] = []
    if entry.get("swd"):
        candidates.append(Path(str(entry["swd"])))
    elif target.queue:
        candidates.append(Path.cwd() / f"{target.queue}.swd")
    for swd in candidates:
        found = read_token(wire.Swd(swd).admin_token)
        if found:
            return found
    return None


def read_token(file: Path) -> str | None:
    """The first line of a token file, or None when it is missing or unreadable."""
    try:
        text = file.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return text.splitlines()[0].strip() if text else None
