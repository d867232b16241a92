"""Client-side errors, kept free of any HTTP code so the registry and the CLIs can raise them
cheaply."""

from __future__ import annotations

from typing import Any


class CrqError(Exception):
    """One failed request or local problem, carrying a message fit to print on one line.

    ``status`` is the HTTP status (None when the server was never reached), ``code`` the
    server's machine-readable error code (``unreachable``, ``timeout`` ... for local failures).
    """

    def __init__(self, message: str, *, status: int | None = None, code: str = "error") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code

    def __str__(self) -> str:
        return self.message


class CrashRecovery(CrqError):
    """The server is in crash recovery (HTTP 503): nothing was done, the request may be retried."""

    def __init__(
        self,
        message: str,
        *,
        retry_after: float,
        recovery: dict[str, Any] | None = None,
        queue: str | None = None,
    ) -> None:
        super().__init__(message, status=503, code="crash_recovery")
        self.retry_after = retry_after
        self.recovery: dict[str, Any] = recovery or {}
        self.queue = queue

    def progress(self) -> str:
        """``2/3 taskers back, ~87 s left``."""
        return recovery_progress(self.recovery)

    def summary(self) -> str:
        """``queue vnc is in crash recovery (2/3 taskers back, ~87 s left)``."""
        who = f"queue {self.queue}" if self.queue else "the server"
        progress = self.progress()
        return f"{who} is in crash recovery" + (f" ({progress})" if progress else "")


class NotSent(CrqError):
    """The connection was never made (refused, unknown host, connect timeout): the request
    did not leave, so it may be sent to another candidate whatever it was."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="unreachable")


class Standby(CrqError):
    """A standby answered (HTTP 503): nothing was done; ``leader`` is where to ask instead
    (None while no leader is known, e.g. during an election)."""

    def __init__(self, message: str, *, leader: str | None, retry_after: float) -> None:
        super().__init__(message, status=503, code="standby")
        self.leader = leader
        self.retry_after = retry_after


def recovery_progress(recovery: dict[str, Any] | None, *, approx: bool = True) -> str:
    """Summarise a recovery progress object as ``2/3 taskers back, ~87 s left``."""
    if not recovery:
        return ""
    parts: list[str] = []
    expected = recovery.get("expected")
    back = recovery.get("reconnected")
    if isinstance(expected, list):
        n_back = len(back) if isinstance(back, list) else 0
        parts.append(f"{n_back}/{len(expected)} taskers back")
    left = recovery.get("seconds_left")
    if isinstance(left, int | float):
        parts.append(f"{'~' if approx else ''}{max(0, round(left))} s left")
    return ", ".join(parts)
