"""The server's MUNGE decoder process: ``python -m crq.server.mungehelper [--socket S]``.

Started by server/http/mungepool.py at the first MUNGE credential, it reads one request a
line on stdin (``<id> <credential>``) and answers one line each on stdout, in order, all the
requests that were waiting at once:
``<id> ok <uid> <gid> <user or ->`` or ``<id> err <munge error code> <reason>``. Its own
process, so that libmunge's round trips to munged (about 90 µs wall and 50 µs of CPU each)
run beside the server's event loop instead of on it, and no worker thread competes for the
server's GIL (with one, MUNGE submits ran at 0.67 of a token's rate). It exits at end of
input: when the server goes, also by kill -9, so does it. Standard library and crq.munge only.
"""

from __future__ import annotations

import argparse
import os
import pwd
import sys
import time

from crq import munge

NAME_TTL = 60.0  # a uid renamed or added on the host is seen within a minute


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m crq.server.mungehelper")
    p.add_argument("--socket", default=None, help="munged's socket (default: munge's own)")
    args = p.parse_args(argv)
    names: dict[int, tuple[float, str]] = {}

    def name(uid: int) -> str:
        now = time.monotonic()
        hit = names.get(uid)
        if hit is not None and now - hit[0] < NAME_TTL:
            return hit[1]
        try:
            found = pwd.getpwuid(uid).pw_name
        except KeyError:
            found = "-"
        if len(names) > 10_000:
            names.clear()
        names[uid] = (now, found)
        return found

    def answer(line: bytes) -> str:
        ident, _, cred = line.decode("ascii", "replace").partition(" ")
        try:
            got = munge.decode(cred, socket=args.socket)
            return f"{ident} ok {got.uid} {got.gid} {name(got.uid)}\n"
        except munge.MungeError as e:
            return f"{ident} err {e.code} {' '.join(str(e).split())}\n"
        except Exception as e:  # noqa: BLE001 - the server must hear of it, and go on
            why = " ".join(str(e).split())
            return f"{ident} err -1 munge: {type(e).__name__}: {why}\n"

    buf = b""
    while chunk := os.read(0, 1 << 16):
        # every request waiting is decoded before any answer goes: the answers reach the
        # server together, so their submits share one journal commit as token ones do (a
        # pool of decoding threads measured no faster: munged and this share the same cores)
        lines = (buf + chunk).split(b"\n")
        buf = lines.pop()
        data = "".join(map(answer, lines)).encode()
        while data:
            data = data[os.write(1, data) :]
    return 0


if __name__ == "__main__":
    sys.exit(main())
