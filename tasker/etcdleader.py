"""Where the leader is, read from etcd: the value of ``/crq/<queue>/leader``.

The leader publishes ``{"url", "instance", "host", "pid"}`` under that key (crq.server's
etcd election). A tasker only reads it, once per (re)connection, so this is one request to
etcd's JSON gateway (``POST /v3/kv/range``, etcd 3.4 and later) over httpx, which the tasker
has anyway: no gRPC stack in the tasker, and the ``etcd`` extra is for the servers.
"""

from __future__ import annotations

import base64
import json
from urllib.parse import urlsplit

from crq.tasker.link import SourceError

from crq import wire

SCHEME = "etcd://"
TIMEOUT = 3.0


def parse_endpoints(text: str) -> list[str]:
    """``etcd://h1:p1,h2:p2`` (the scheme may be left out) → ``["http://h1:p1", …]``."""
    body = text.strip()
    if body.startswith(SCHEME):
        body = body[len(SCHEME) :]
    elif "://" in body:
        raise ValueError(f"want etcd://host:port[,host:port…], not {text!r}")
    out = []
    for part in body.split(","):
        part = part.strip().rstrip("/")
        if not part:
            continue
        split = urlsplit(f"//{part}")
        try:
            port = split.port
        except ValueError:
            port = None
        if not split.hostname or port is None or split.path:
            raise ValueError(f"bad etcd endpoint {part!r} (want host:port)")
        out.append(f"http://{part}")
    if not out:
        raise ValueError(f"no etcd endpoint in {text!r}")
    return out


def leader_key(queue: str) -> str:
    return wire.ELECTION_KEY.format(queue=queue)


class EtcdLeader:
    """A callable for ``ServerSource(etcd=…)``: the leader's URL, or SourceError."""

    def __init__(self, endpoints: list[str], queue: str) -> None:
        self.endpoints = endpoints
        self.key = leader_key(queue)
        self._next = 0

    def __call__(self) -> str:
        import httpx

        body = {"key": base64.b64encode(self.key.encode()).decode()}
        problems = []
        for i in range(len(self.endpoints)):
            endpoint = self.endpoints[(self._next + i) % len(self.endpoints)]
            try:
                r = httpx.post(f"{endpoint}/v3/kv/range", json=body, timeout=TIMEOUT)
                r.raise_for_status()
                kvs = r.json().get("kvs") or []
            except (httpx.HTTPError, ValueError, AttributeError) as e:
                problems.append(f"{endpoint}: {type(e).__name__}")
                continue
            self._next = (self._next + i) % len(self.endpoints)  # stick with one that answers
            if not kvs:
                raise SourceError(f"no leader in etcd yet (key {self.key})")
            try:
                value = json.loads(base64.b64decode(kvs[0]["value"]))
                url = str(value["url"]).rstrip("/")
            except (KeyError, TypeError, ValueError) as e:
                raise SourceError(f"etcd key {self.key} holds no leader URL: {e}") from None
            if not url.startswith(("http://", "https://")):
                raise SourceError(f"etcd key {self.key} holds a bad URL {url!r}")
            return url
        raise SourceError(f"no etcd endpoint answers ({', '.join(problems)})")
