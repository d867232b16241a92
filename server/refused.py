"""The one exception a refused request raises, light enough for the boot path.

Here rather than in models.py (pydantic) so that what settings.py and identity.py need to
check config.toml and roles does not pull pydantic into the first answer after a restart.
"""

from __future__ import annotations

from typing import Any


class BadRequest(Exception):
    """A refused request: HTTP status, error code, one readable line."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.extra: dict[str, Any] = {}  # more fields of the answer (a 403's ``rule``)
