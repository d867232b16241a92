"""Where the leader of a queue is, for one :class:`~crq.client.api.Client`.

A failover queue has candidates (SPEC section 8): the leader and its standbys, every URL a
server of the queue was started at, kept in its registry entry. A standby's 503 names the
leader; when the URL in use stops answering, the other candidates are asked. What is found
is noted in the registry, so the next command goes straight to the leader.

Stdlib only (the probing itself is the Client's, over its connection).
"""

from __future__ import annotations

from crq.client import registry
from crq.client.errors import CrqError


class Leader:
    """The URL in use and the candidates to try when it goes."""

    def __init__(self, url: str, queue: str | None, entry: registry.Entry | None) -> None:
        self.url = url.rstrip("/")
        self.queue = queue
        self.entry = entry
        self._learnt: list[str] = []  # leaders named by standbys, not (yet) in the registry
        self._moved = False  # moved since the registry last heard of it

    def candidates(self) -> list[str]:
        """Every URL worth a try, the one in use first.

        The registry entry is read again: a standby started since this client was made
        counts, and so does a leader that another client found."""
        if self.queue and self.entry is not None:
            try:
                fresh = registry.lookup(self.queue)
            except CrqError:
                fresh = None
            if fresh is not None and fresh.get("swd") == self.entry.get("swd"):
                self.entry = fresh
        return registry.merge(self.url, *self._learnt, *registry.candidates(self.entry))

    def others(self) -> list[str]:
        """:meth:`candidates` but the one in use."""
        return [u for u in self.candidates() if not _same(u, self.url)]

    def moved(self, url: str) -> None:
        """Talk to ``url`` from now on (a standby named it, or it answered as the leader)."""
        url = url.rstrip("/")
        if _same(url, self.url):
            return
        self.url = url
        self._moved = True
        if not any(_same(url, u) for u in self._learnt):
            self._learnt.append(url)

    def answered(self) -> None:
        """The URL in use answered as the leader: after a move, note it in the registry
        entry (if the queue has one). Never fails the request: a read-only home is fine."""
        if not self._moved:
            return
        self._moved = False
        if self.queue and self.entry is not None:
            try:
                registry.set_leader(self.queue, self.url)
            except (CrqError, OSError):
                pass


def _same(a: str, b: str) -> bool:
    return a.rstrip("/").lower() == b.rstrip("/").lower()
