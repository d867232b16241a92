"""The failures that end a server process: at start-up (exit 3) and at the clean stop.

Apart from the rest so that server/main.py, which imports only what its first answer
needs, can name them.
"""

from __future__ import annotations


class StartError(Exception):
    pass


class StopError(Exception):
    """The clean stop could not finish: the stop is left unclean, the journal intact."""
