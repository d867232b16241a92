"""Typed job objects: what ``GET /api/v1/jobs/{id}`` answers, with attributes.

A :class:`Job` is still the JSON object it was read from (a ``dict`` subclass), so code that
indexes it (``job["state"]``) keeps working and fields a newer server adds pass through;
the attributes are the documented, typed view of the fields SPEC section 4 names.
"""

from __future__ import annotations

from typing import Any, cast

from crq import wire

#: What a job that the server no longer holds (forgotten) is reported as.
UNKNOWN = "unknown"


class Job(dict[str, Any]):
    """One job as the server last described it.

    ``state`` is one of queued, waiting, running, done, failed, stopped, lost (or
    ``unknown``: the server does not hold it). ``command`` is a list of words or a shell
    line; times are epoch seconds (None until they happen). ``env``, ``attempts`` and
    ``history`` are only in the answer of :meth:`crq.client.Client.get` and the control
    calls; a list page leaves them out (their attributes are then empty).
    """

    __slots__ = ()

    def _opt_int(self, key: str) -> int | None:
        value = self.get(key)
        return None if value is None else int(value)

    def _opt_float(self, key: str) -> float | None:
        value = self.get(key)
        return None if value is None else float(value)

    def _opt_str(self, key: str) -> str | None:
        value = self.get(key)
        return None if value is None else str(value)

    @property
    def id(self) -> int:
        return int(self["id"])

    @property
    def state(self) -> str:
        return str(self.get("state", UNKNOWN))

    @property
    def name(self) -> str:
        return str(self.get("name") or "")

    @property
    def user(self) -> str:
        return str(self.get("user") or "")

    @property
    def command(self) -> list[str] | str:
        """The words run (a list), or a line for ``/bin/sh -c`` (a string)."""
        return cast("list[str] | str", self.get("command", []))

    @property
    def cwd(self) -> str:
        return str(self.get("cwd") or "")

    @property
    def log(self) -> str:
        """The log file's path (``%j`` and array patterns expanded)."""
        return str(self.get("log") or "")

    @property
    def priority(self) -> int:
        return int(self.get("priority", wire.PRIORITY_DEFAULT))

    @property
    def resources(self) -> str:
        return str(self.get("resources") or "")

    @property
    def rerunnable(self) -> bool:
        return bool(self.get("rerunnable", True))

    @property
    def max_attempts(self) -> int:
        return int(self.get("max_attempts", 0))

    @property
    def attempt(self) -> int:
        """The number of the latest attempt (0 before the first dispatch)."""
        return int(self.get("attempt", 0))

    @property
    def tasker(self) -> str | None:
        return self._opt_str("tasker")

    @property
    def host(self) -> str | None:
        return self._opt_str("host")

    @property
    def pid(self) -> int | None:
        return self._opt_int("pid")

    @property
    def submitted(self) -> float | None:
        return self._opt_float("submitted")

    @property
    def started(self) -> float | None:
        return self._opt_float("started")

    @property
    def ended(self) -> float | None:
        return self._opt_float("ended")

    @property
    def exit_code(self) -> int | None:
        """The command's exit status (None: it has not ended, or a signal ended it)."""
        return self._opt_int("exit_code")

    @property
    def signal(self) -> int | None:
        """The signal that ended the command, if one did."""
        return self._opt_int("signal")

    @property
    def reason(self) -> str | None:
        """Why the job is waiting, or why it failed, was stopped or lost."""
        return self._opt_str("reason")

    @property
    def held(self) -> bool:
        return bool(self.get("held", False))

    @property
    def after(self) -> list[Any]:
        """Its dependencies, as the server keeps them."""
        return list(self.get("after") or [])

    @property
    def array(self) -> int | None:
        """The first id of the array this job is an element of."""
        return self._opt_int("array")

    @property
    def index(self) -> int | None:
        """Its index in that array."""
        return self._opt_int("index")

    @property
    def time_limit(self) -> float | None:
        return self._opt_float("time_limit")

    @property
    def env(self) -> dict[str, str]:
        return dict(self.get("env") or {})

    @property
    def attempts(self) -> list[dict[str, Any]]:
        return list(self.get("attempts") or [])

    @property
    def history(self) -> list[dict[str, Any]]:
        """Control actions on it: ``{"t", "action", "by"}``."""
        return list(self.get("history") or [])

    @property
    def final(self) -> bool:
        """It has ended (done, failed, stopped, lost), or the server no longer holds it."""
        return self.state in wire.FINAL_STATES or self.state == UNKNOWN

    @property
    def ok(self) -> bool:
        """It ended done (exit 0)."""
        return self.state == wire.DONE

    def __repr__(self) -> str:
        return f"Job(id={self.get('id')!r}, state={self.state!r}, name={self.name!r})"


def as_job(data: Any) -> Job:
    """The answer of a job route as a :class:`Job` (a Job stays itself)."""
    if isinstance(data, Job):
        return data
    return Job(data)


def unknown(job_id: int, reason: str | None = None) -> Job:
    """A job the server does not hold (forgotten, or never made)."""
    job = Job(id=job_id, state=UNKNOWN)
    if reason is not None:
        job["reason"] = reason
    return job
