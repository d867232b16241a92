"""crq's Python client and command-line tools.

``from crq.client import Client`` loads the client only when it is first used (a CLI that
imports this package pays for nothing it does not use); the same for :class:`Executor`, the
typed :class:`Job` and the error classes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from crq.client.api import Client, Ended
    from crq.client.errors import CrashRecovery, CrqError, NotSent, Standby
    from crq.client.executor import Executor, JobFailed, JobFuture
    from crq.client.job import Job

#: Where each public name lives, imported on first use.
_HOMES = {
    "Client": "api",
    "Ended": "api",
    "CrqError": "errors",
    "CrashRecovery": "errors",
    "NotSent": "errors",
    "Standby": "errors",
    "Executor": "executor",
    "JobFailed": "executor",
    "JobFuture": "executor",
    "Job": "job",
}

__all__ = [
    "Client",
    "CrashRecovery",
    "CrqError",
    "Ended",
    "Executor",
    "Job",
    "JobFailed",
    "JobFuture",
    "NotSent",
    "Standby",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(name)
    from importlib import import_module

    return getattr(import_module(f"crq.client.{home}"), name)
