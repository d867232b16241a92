"""Choosing jobs by owner, state and name, for the bulk forms of ``crq stop`` (and
``hold``/``release``), with the count shown and a confirmation asked for many."""

from __future__ import annotations

import fnmatch
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, TextIO

from crq.client.clitools import UsageError

if TYPE_CHECKING:
    from crq.client.api import Client

#: More jobs than this are acted on only after a yes (or with --yes).
CONFIRM_OVER = 10


def select_jobs(
    client: Client,
    user: str | None = None,
    state: str | Iterable[str] | None = None,
    name: str | None = None,
    array: int | None = None,
) -> list[dict[str, Any]]:
    """Every job the server holds of ``user``, in ``state`` (one or several), whose name
    matches the glob ``name`` (shell rules, ``*`` and ``?``; a job without a name matches
    on its command), of array ``array`` if given, oldest first; the server pages, so any
    number of jobs comes back.
    """
    states: list[str | None] = [None]
    if isinstance(state, str):
        states = [state]
    elif state:
        states = list(state)
    picked: dict[int, dict[str, Any]] = {}
    for s in states:
        for job in client.list(state=s, user=user, array=array):
            if name is not None and not _named(job, name):
                continue
            picked[int(job["id"])] = job
    return [picked[i] for i in sorted(picked)]


def _named(job: dict[str, Any], pattern: str) -> bool:
    label = job.get("name")
    if not label:
        command = job.get("command")
        label = " ".join(map(str, command)) if isinstance(command, list) else str(command or "")
    return fnmatch.fnmatchcase(str(label), pattern)


def describe_selection(user: str | None, state: Any, name: str | None) -> str:
    """``jobs of alice, queued, named 'sim*'``: the selection in words, for the messages."""
    parts = []
    if user:
        parts.append(f"of {user}")
    if state:
        parts.append(state if isinstance(state, str) else "/".join(state))
    if name:
        parts.append(f"named {name!r}")
    return "jobs " + ", ".join(parts) if parts else "jobs"


def confirm(
    action: str,
    count: int,
    what: str,
    yes: bool,
    *,
    over: int = CONFIRM_OVER,
    stdin: TextIO | None = None,
    stderr: TextIO | None = None,
) -> bool:
    """May ``action`` go ahead on ``count`` jobs? Yes up to ``over`` or with ``yes``; else
    the question on a terminal, and a UsageError without one (a script must say --yes)."""
    if count <= over or yes:
        return True
    stdin = stdin or sys.stdin
    stderr = stderr or sys.stderr
    if not stdin.isatty():
        raise UsageError(
            f"{action} {count} {what}? more than {over}: give --yes to confirm "
            "(no terminal to ask on)"
        )
    stderr.write(f"crq: {action} {count} {what}? [y/N] ")
    stderr.flush()
    answer = stdin.readline().strip().lower()
    return answer in ("y", "yes")
