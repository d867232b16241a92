"""``vovproject``: choose the queue later commands talk to, list queues, run the sanity check.

``eval "$(vovproject enable Q)"`` points ``crq``/``ncmgr`` in this shell at queue Q.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from crq.client import registry
from crq.client.clitools import fail, run
from crq.client.table import format_table

from crq import http11

UP_TIMEOUT = 0.5


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vovproject", description="Choose and inspect queues.")
    parser.add_argument("--server", metavar="URL", help="server URL for sanity")
    sub = parser.add_subparsers(dest="command_name", metavar="COMMAND", required=True)

    p = sub.add_parser("enable", help='print shell lines to eval: eval "$(vovproject enable Q)"')
    p.add_argument("queue", metavar="Q")
    p.set_defaults(func=cmd_enable)

    p = sub.add_parser("disable", help="print shell lines that undo enable")
    p.set_defaults(func=cmd_disable)

    p = sub.add_parser("list", help="registered queues: name, URL, swd, up or down")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("sanity", help="global sanity check of the enabled queue")
    p.add_argument("--fix", action="store_true", help="repair what can be repaired")
    p.set_defaults(func=cmd_sanity)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args.func, args)


def enable_lines(queue: str, entry: dict[str, Any]) -> list[str]:
    return [
        f"export CRQ_QUEUE={shlex.quote(queue)}",
        f"export CRQ_SERVER={shlex.quote(str(entry['url']))}",
    ]


def cmd_enable(args: argparse.Namespace) -> int:
    entry = registry.lookup(args.queue)
    if not entry or not entry.get("url"):
        hint = f"start it with: ncmgr start --queue {args.queue}"
        return fail(f"queue {args.queue} is not registered ({hint})")
    for line in enable_lines(args.queue, entry):
        print(line)
    return 0


def cmd_disable(args: argparse.Namespace) -> int:
    print("unset CRQ_QUEUE CRQ_SERVER")
    return 0


def is_up(url: str, timeout: float = UP_TIMEOUT) -> bool:
    """True when ``url``/healthz answers 200 within ``timeout`` seconds."""
    try:
        with http11.Connection(url, timeout=timeout, connect_timeout=timeout) as conn:
            return conn.request("GET", "/healthz").status == 200
    except (http11.TransportError, ValueError):  # ValueError: not an http(s) URL
        return False


def cmd_list(args: argparse.Namespace) -> int:
    entries = registry.entries()
    if not entries:
        print("no queues registered (ncmgr start registers one)", file=sys.stderr)
        return 0
    names = sorted(entries)
    with ThreadPoolExecutor(max_workers=min(16, len(names))) as pool:
        up = list(pool.map(lambda n: is_up(str(entries[n].get("url", ""))), names))
    enabled = os.environ.get("CRQ_QUEUE")
    rows = []
    for name, alive in zip(names, up, strict=True):
        entry = entries[name]
        mark = "*" if name == enabled else ""
        rows.append([mark + name, entry.get("url"), entry.get("swd"), "up" if alive else "down"])
    print(format_table(("QUEUE", "URL", "SWD", "STATUS"), rows))
    return 0


def cmd_sanity(args: argparse.Namespace) -> int:
    from crq.client.api import Client

    with Client(url=args.server) as client:
        result = client.sanity(fix=args.fix)
    findings = [str(f) for f in result.get("findings") or []]
    fixed = [str(f) for f in result.get("fixed") or []]
    for f in fixed:
        print(f"fixed: {f}")
    remaining = [f for f in findings if f not in fixed] if args.fix else findings
    if args.fix and result.get("ok"):
        remaining = []
    for f in remaining:
        print(f"finding: {f}")
    if not remaining:
        print(f"sanity: ok ({client.name})")
        return 0
    print(f"sanity: {len(remaining)} finding(s) remain ({client.name})", file=sys.stderr)
    if not args.fix:
        print("crq: run `vovproject sanity --fix` to repair", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
