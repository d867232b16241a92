"""Where the leader is, read from etcd: the value of ``/crq/<queue>/leader``.

The leader publishes ``{"url", "instance", "host", "pid"}`` under that key (crq.server's
etcd election). A tasker only reads it, once per (re)connection, so this is one request to
etcd's JSON gateway (``POST /v3/kv/range``, etcd 3.4 and later) over :mod:`crq.http11`, as
the tasker's other requests: no gRPC stack in the tasker, and the ``etcd`` extra is for the
servers.
"""

from __future__ import annotations

import base64
import json
import re

from crq.tasker.link import SourceError

from crq import http11, wire

SCHEME = "etcd://"
DEFAULT_PORT = 2379
TIMEOUT = 3.0
JSON_BODY = {"Content-Type": "application/json"}
_ENDPOINT = re.compile(
    r"\[(?P<v6>[0-9A-Fa-f:.]+)\](?::(?P<v6port>\d{1,5}))?"
    r"|(?P<host>[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)(?::(?P<port>\d{1,5}))?"
)


def parse_endpoints(text: str) -> list[str]:
    """``etcd://h1:p1,h2`` → ``["http://h1:p1", "http://h2:2379"]``: the syntax of the
    servers' ``--election etcd://…`` (crq.server.election_etcd.parse_etcd_url, which
    imports the etcd client; this one is stdlib only)."""
    usage = "want etcd://HOST[:PORT][,HOST[:PORT]…]"
    if not text.startswith(SCHEME):
        raise ValueError(f"{usage}, not {text!r}")
    out: list[str] = []
    for item in text[len(SCHEME) :].split(","):
        m = _ENDPOINT.fullmatch(item.strip())
        port = int(m["port"] or m["v6port"] or DEFAULT_PORT) if m else 0
        if m is None or not 1 <= port <= 65535:
            raise ValueError(f"bad etcd member {item!r} ({usage})")
        host = f"[{m['v6']}]" if m["v6"] else m["host"]
        url = f"http://{host}:{port}"
        if url not in out:
            out.append(url)
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
        body = http11.dumps({"key": base64.b64encode(self.key.encode()).decode()})
        problems = []
        for i in range(len(self.endpoints)):
            endpoint = self.endpoints[(self._next + i) % len(self.endpoints)]
            try:
                with http11.Connection(endpoint, timeout=TIMEOUT, connect_timeout=TIMEOUT) as c:
                    r = c.request("POST", "/v3/kv/range", body=body, headers=JSON_BODY)
                if r.status != 200:
                    problems.append(f"{endpoint}: HTTP {r.status}")
                    continue
                kvs = r.json().get("kvs") or []
            except http11.TransportError as e:
                problems.append(f"{endpoint}: {e}")
                continue
            except (ValueError, AttributeError) as e:
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
