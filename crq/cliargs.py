"""argparse types shared by ``crq``, ``ncmgr``, ``vovproject`` and ``vovtasker`` (stdlib only).

A bad value is one argparse error line naming what was wanted, the same in every command.
Here rather than in ``client/`` so that the tasker, which installs without the client's
needs, takes them from below itself.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable


def _number(text: str, kind: Callable[[str], float], what: str) -> float:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1 (slots, attempts, limits, byte counts)."""
    value = int(_number(text, int, "a whole number"))
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def seconds(text: str) -> float:
    """argparse type: a duration in seconds, zero allowed."""
    value = _number(text, float, "a number of seconds")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, not {text}")
    return value


def positive_seconds(text: str) -> float:
    """argparse type: a duration in seconds above zero (intervals)."""
    value = _number(text, float, "a number of seconds")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {text}")
    return value


UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def duration(text: str) -> float:
    """argparse type: ``3600``, ``90s``, ``30m``, ``8h``, ``7d`` or ``2w``, above zero."""
    t = text.strip().lower()
    scale = UNITS.get(t[-1:], 0) if t else 0
    number = t[:-1] if scale else t
    try:
        value = float(number) * (scale or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a duration: {text!r} (e.g. 3600, 30m, 8h, 7d)"
        ) from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"a duration above zero, not {text!r}")
    return value


def as_typed(check: Callable[[str], object]) -> Callable[[str], str]:
    """The same check, keeping the text as typed: for flags passed on to another program."""

    def parse(text: str) -> str:
        check(text)
        return text

    parse.__name__ = getattr(check, "__name__", "value")
    return parse


def slurm_time(text: str) -> float:
    """argparse type: a time limit in seconds, written as Slurm's ``--time`` takes it.

    As in Slurm a bare number is minutes (``90``); then ``MM:SS``, ``HH:MM:SS``, ``D-HH``,
    ``D-HH:MM`` and ``D-HH:MM:SS``. A unit says it outright: ``90s``, ``30m``, ``8h``, ``2d``.
    """
    t = text.strip()
    if t[-1:].lower() in UNITS and t[:-1].replace(".", "", 1).isdigit():
        try:
            return duration(t)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(_bad_time(text)) from None
    days, hms = 0, t
    if "-" in t:
        head, hms = t.split("-", 1)
        if not head.isdigit():
            raise argparse.ArgumentTypeError(_bad_time(text))
        days = int(head)
    parts = hms.split(":")
    if not 1 <= len(parts) <= 3 or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(_bad_time(text))
    numbers = [int(p) for p in parts]
    if days:  # D-HH, D-HH:MM, D-HH:MM:SS
        scales: tuple[int, ...] = (3600, 60, 1)[: len(parts)]
    else:  # minutes, MM:SS, HH:MM:SS
        scales = ((60,), (60, 1), (3600, 60, 1))[len(parts) - 1]
    value = days * 86400 + sum(n * s for n, s in zip(numbers, scales, strict=True))
    if value <= 0:
        raise argparse.ArgumentTypeError(f"a time limit above zero, not {text!r}")
    return float(value)


def _bad_time(text: str) -> str:
    return f"not a time limit: {text!r} (minutes, MM:SS, HH:MM:SS, D-HH:MM:SS, or 90s, 30m, 8h)"
