"""Terminal formatting for the CLIs: aligned tables, human times and durations."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

ELLIPSIS = "…"


def cell(value: Any) -> str:
    """Render one value for a table: ``None`` as ``-``, booleans as yes/no."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def clip(text: str, width: int) -> str:
    """Shorten ``text`` to ``width`` characters, marking the cut with an ellipsis."""
    if width <= 0 or len(text) <= width:
        return text
    return text[: max(0, width - 1)] + ELLIPSIS


def format_table(
    headers: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    right: Iterable[int] = (),
    gap: str = "  ",
) -> str:
    """Align ``rows`` under ``headers``; columns listed in ``right`` are right-aligned.

    The last column is not padded, so lines carry no trailing blanks.
    """
    text_rows = [[cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in text_rows:
        for i, value in enumerate(row):
            widths[i] = max(widths[i], len(value))
    right_cols = set(right)
    last = len(headers) - 1

    def line(values: Sequence[str]) -> str:
        out = []
        for i, value in enumerate(values):
            if i in right_cols:
                out.append(value.rjust(widths[i]))
            elif i == last:
                out.append(value)
            else:
                out.append(value.ljust(widths[i]))
        return gap.join(out).rstrip()

    return "\n".join([line(list(headers)), *(line(r) for r in text_rows)])


def duration(seconds: float | None) -> str:
    """``0.4s``, ``12s``, ``3m04s``, ``2h05m``, ``3d04h``: short and still precise enough."""
    if seconds is None:
        return "-"
    s = max(0.0, float(seconds))
    if s < 10:
        return f"{s:.1f}s"
    return _span(s, precise=True)


def ago(ts: float | None, now: float | None = None) -> str:
    """``3s ago``, ``5m ago``, ``2h ago``, ``4d ago`` (``in 3s`` for a clock ahead of ours)."""
    if ts is None:
        return "-"
    now = time.time() if now is None else now
    delta = now - float(ts)
    if delta < 0:
        return "in " + _span(-delta, precise=False)
    return _span(delta, precise=False) + " ago"


def _span(seconds: float, precise: bool) -> str:
    """Whole ``seconds`` in their largest unit (``3m``); ``precise`` adds the next (``3m04s``)."""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        big, unit, rest, rest_unit = s // 60, "m", s % 60, "s"
    elif s < 86400:
        big, unit, rest, rest_unit = s // 3600, "h", s % 3600 // 60, "m"
    else:
        big, unit, rest, rest_unit = s // 86400, "d", s % 86400 // 3600, "h"
    return f"{big}{unit}{rest:02d}{rest_unit}" if precise else f"{big}{unit}"


def clock(ts: float | None, now: float | None = None) -> str:
    """``12:04:05`` today, ``Nov 21 12:04:05`` this year, ``2023-11-21 12:04`` otherwise."""
    if ts is None:
        return "-"
    now = time.time() if now is None else now
    t = time.localtime(float(ts))
    n = time.localtime(now)
    if (t.tm_year, t.tm_yday) == (n.tm_year, n.tm_yday):
        return time.strftime("%H:%M:%S", t)
    if t.tm_year == n.tm_year:
        return time.strftime("%b %d %H:%M:%S", t)
    return time.strftime("%Y-%m-%d %H:%M", t)


def when(ts: float | None, now: float | None = None) -> str:
    """``12:04:05 (3m ago)``: the absolute time for logs, the relative one for people."""
    if ts is None:
        return "-"
    return f"{clock(ts, now)} ({ago(ts, now)})"


def exit_status(job: dict[str, Any]) -> str:
    """The EXIT column: exit code, ``SIG9``-style signal, or ``-`` while unknown."""
    sig = job.get("signal")
    if sig not in (None, 0, ""):
        return f"SIG{sig}" if isinstance(sig, int) else str(sig)
    code = job.get("exit_code")
    return "-" if code is None else str(code)


def key_values(pairs: Iterable[tuple[str, Any]]) -> str:
    """``key   value`` lines with the values aligned."""
    items = [(k, cell(v)) for k, v in pairs]
    width = max((len(k) for k, _ in items), default=0)
    return "\n".join(f"{k.ljust(width)}  {v}".rstrip() for k, v in items)
