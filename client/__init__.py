"""crq's Python client and command-line tools.

``from crq.client import Client`` loads the client only when it is first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from crq.client.api import Client, CrqError

__all__ = ["Client", "CrqError"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from crq.client import api

        return getattr(api, name)
    raise AttributeError(name)
