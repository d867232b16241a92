"""Who leads a queue: the interface every election backend implements (SPEC section 8).

A minimal stand-in holding only the Protocol, Busy and ElectionError of the failover
contract, so the etcd backend can be written against them; the file backend comes with the
lead's version.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol


class Busy(Exception):
    """``campaign(wait=False)`` while another candidate leads."""

    def __init__(self, holder: dict[str, Any] | None) -> None:
        super().__init__("another server leads this queue")
        self.holder = holder


class ElectionError(Exception):
    """The election backend cannot be used (bad URL, unreachable, epoch gone backwards)."""


class Election(Protocol):
    name: str
    epoch: int
    lost: asyncio.Event

    async def campaign(self, me: dict[str, Any], wait: bool) -> int: ...

    def valid(self) -> bool: ...

    async def leader(self) -> dict[str, Any] | None: ...

    async def resign(self) -> None: ...

    def close(self) -> None: ...
