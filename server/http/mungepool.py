"""MUNGE credentials decoded beside the event loop, by a helper process.

A decode is a round trip to munged (about 90 µs wall, 50 µs of CPU in libmunge). On the
event loop it would stall every other request that long. In a worker thread the decode is
off the loop, but each return from libmunge must take the GIL back from a busy loop:
``asyncio.to_thread`` per request ran MUNGE submits at 0.41 of the admin token's rate (server
CPU 2.6 times a token's). So the server keeps one helper process (server/mungehelper.py) and
talks to it over a pipe, read by the loop like any socket: no thread, no GIL shared, and the
answers of the requests waiting come back together, so their submits share a journal
commit. With 64 connections the loop's CPU per MUNGE submit is within 4% of a token's; what
is left is munged's and libmunge's own CPU on the same two cores (bench/auth.py).
"""

from __future__ import annotations

import asyncio
import sys
from subprocess import PIPE
from typing import NamedTuple, cast

from crq.server.models import BadRequest

from crq import munge

#: what a credential may hold: munge's base64 between "MUNGE:" and ":" (no blanks, no NUL)
MAX_CREDENTIAL = munge.MAX_CREDENTIAL


class Decoded(NamedTuple):
    """munged's answer: who made the credential (``user`` None: a uid unknown here)."""

    uid: int
    gid: int
    user: str | None


class _Pipe(asyncio.SubprocessProtocol):
    """The helper's stdout, split into lines as it arrives: each answer resolves its
    request's future at once (no reader task, no stream)."""

    def __init__(self, waiting: dict[int, asyncio.Future[Decoded]]) -> None:
        self.waiting = waiting
        self.buf = b""
        self.exited: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        if fd != 1:
            return
        lines = (self.buf + data).split(b"\n")
        self.buf = lines.pop()
        for line in lines:
            ident, status, rest = line.decode("utf-8", "replace").split(" ", 2)
            fut = self.waiting.pop(int(ident), None)
            if fut is None or fut.done():
                continue  # its request went away meanwhile
            if status == "ok":
                uid, gid, user = rest.split(" ", 2)
                fut.set_result(Decoded(int(uid), int(gid), None if user == "-" else user))
            else:
                code, _, reason = rest.partition(" ")
                fut.set_exception(munge.MungeError(int(code), reason))

    def process_exited(self) -> None:
        for fut in self.waiting.values():  # asked of this helper, never answered
            if not fut.done():
                fut.set_exception(_unavailable("the MUNGE helper exited"))
        self.waiting.clear()
        if not self.exited.done():
            self.exited.set_result(None)


class Decoder:
    """One helper process per munged socket, started at the first credential and again
    after it exits."""

    def __init__(self, socket: str | None) -> None:
        self.socket = socket
        self._transport: asyncio.SubprocessTransport | None = None
        self._stdin: asyncio.WriteTransport | None = None
        self._pipe: _Pipe | None = None
        self._starting: asyncio.Lock | None = None
        self._next = 0

    async def decode(self, cred: str) -> Decoded:
        """Raises munge.MungeError (refused: replayed, expired, foreign, junk), or a 503
        BadRequest when no helper can be had."""
        if (
            not cred
            or len(cred) > MAX_CREDENTIAL
            or not cred.isascii()
            or not cred.isprintable()
            or " " in cred
        ):
            raise munge.MungeError(8, "munge: malformed credential")
        pipe, stdin = await self._helper()
        self._next += 1
        ident = self._next
        fut: asyncio.Future[Decoded] = asyncio.get_running_loop().create_future()
        pipe.waiting[ident] = fut
        try:
            stdin.write(f"{ident} {cred}\n".encode())
            return await fut
        finally:
            pipe.waiting.pop(ident, None)

    def _alive(self) -> tuple[_Pipe, asyncio.WriteTransport] | None:
        if self._pipe is None or self._stdin is None or self._pipe.exited.done():
            return None
        return self._pipe, self._stdin

    async def _helper(self) -> tuple[_Pipe, asyncio.WriteTransport]:
        alive = self._alive()
        if alive is not None:
            return alive
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            alive = self._alive()
            if alive is not None:
                return alive
            argv = [sys.executable, "-m", "crq.server.mungehelper"]
            if self.socket:
                argv += ["--socket", self.socket]
            loop = asyncio.get_running_loop()
            waiting: dict[int, asyncio.Future[Decoded]] = {}
            try:
                transport, pipe = await loop.subprocess_exec(
                    lambda: _Pipe(waiting), *argv, stdin=PIPE, stdout=PIPE, stderr=None
                )
            except OSError as e:
                raise _unavailable(f"cannot start the MUNGE helper: {e}") from None
            # uvloop's pipe transports write but do not subclass asyncio's WriteTransport
            stdin = cast(asyncio.WriteTransport, transport.get_pipe_transport(0))
            self._transport, self._pipe, self._stdin = transport, pipe, stdin
            return pipe, stdin


def _unavailable(why: str) -> BadRequest:
    err = BadRequest(503, "unavailable", why)
    err.extra = {"retry_after": 1}
    return err


_decoders: dict[tuple[str | None, int], Decoder] = {}


def decoder(socket: str | None) -> Decoder:
    """The decoder of this socket for the running loop (its helper's pipes are the loop's)."""
    key = (socket, id(asyncio.get_running_loop()))
    found = _decoders.get(key)
    if found is None:
        found = _decoders[key] = Decoder(socket)
    return found
