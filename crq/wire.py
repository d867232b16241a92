"""Definitions shared by server, tasker and clients.

Imports only the standard library: the CLI and the tasker load it at start-up.

Tasker protocol (all bodies JSON, tasker token):

``POST /api/v1/taskers/{name}/register``
    request: ``{"host", "pid", "slots", "resources", "boot_id", "rebooted",
    "running": [Running], "finished": [Result]}``;
    answer: ``{"kill": [Attempt], "ack": [Attempt], "heartbeat": s, "instance": id}``,
    plus ``"session"`` when the request showed none (a secret the server made).
    409 ``tasker_name_in_use``: a live tasker of another session holds the name
    (``Retry-After``: when it may be taken over).
``POST /api/v1/taskers/{name}/sync`` (long poll up to ``wait`` seconds)
    request: ``{"started": [Running], "finished": [Result], "running": [Attempt], "wait": s}``;
    answer: ``{"dispatch": [Dispatch], "kill": [Attempt], "ack": [Attempt]}``;
    409 ``unknown_tasker`` means: register again; 409 ``wrong_session``: this request's
    session does not hold the name (register again, and be refused or take it over).

Both carry the tasker's session secret in ``X-Crq-Session`` (SESSION_HEADER): the name
belongs to the session that registered it, so a second tasker under a live tasker's name
is refused, and no one reports for attempts dispatched to another session.

``Attempt`` is ``{"job": id, "attempt": n}``. ``Running`` adds ``pid`` and ``started``.
``Result`` adds ``exit_code`` (None when killed), ``signal``, ``started``, ``ended``,
``reason``. ``Dispatch`` adds ``command``, ``cwd``, ``env``, ``log``, ``name``.
``ack`` lists the started/finished reports the server has made durable: the tasker may
forget them. A report for a superseded attempt is acked too (and its attempt is in ``kill``).
"""

from __future__ import annotations

import os
import re
import zlib
from pathlib import Path
from typing import Any

API = "/api/v1"
DEFAULT_QUEUE = "vnc"
PORT_BASE = 6200
PORT_SPAN = 256

QUEUED = "queued"
WAITING = "waiting"  # held, its dependencies not met yet, or its array at its cap
RUNNING = "running"
DONE = "done"
FAILED = "failed"
STOPPED = "stopped"
LOST = "lost"
JOB_STATES = (QUEUED, WAITING, RUNNING, DONE, FAILED, STOPPED, LOST)
FINAL_STATES = frozenset((DONE, FAILED, STOPPED, LOST))

MODE_NORMAL = "normal"
MODE_RECOVERING = "recovering"
MODE_STOPPED = "stopped"
MODE_STANDBY = "standby"  # a candidate waiting to lead (SPEC section 8)
ELECTION_KEY = "/crq/{queue}/leader"  # the etcd key a leader holds

PRIORITY_MIN, PRIORITY_MAX, PRIORITY_DEFAULT = 1, 15, 4
MAX_ATTEMPTS_DEFAULT = 3
MAX_ARRAY = 1_000_000  # elements of one array at most (config.toml's max_array may say fewer)

USER_HEADER = "X-Crq-User"
SESSION_HEADER = "X-Crq-Session"
#: A submit's key (SPEC section 8): a repeat with the same key and user gets the first answer.
IDEMPOTENCY_HEADER = "Idempotency-Key"
#: 1 to 128 printable ASCII characters, no blank: the one rule of server, client and document.
IDEMPOTENCY_KEY_PATTERN = r"^[!-~]{1,128}$"
IDEMPOTENCY_KEY_RULE = "1 to 128 printable ASCII characters without blanks"
_IDEMPOTENCY_KEY = re.compile(IDEMPOTENCY_KEY_PATTERN)

#: A tasker name: 1 to 128 of A-Z a-z 0-9 . _ @ -, and not "." or ".." (a URL path segment
#: those would be taken out of). The one rule of server, tasker and the OpenAPI document.
TASKER_NAME_PATTERN = r"^(?!\.\.?$)[A-Za-z0-9._@-]{1,128}$"
_TASKER_NAME = re.compile(TASKER_NAME_PATTERN)


def valid_tasker_name(name: str) -> bool:
    return _TASKER_NAME.fullmatch(name) is not None


def valid_idempotency_key(key: str) -> bool:
    return _IDEMPOTENCY_KEY.fullmatch(key) is not None


def default_port(queue: str) -> int:
    """The queue's name hashed into 6200-6455, so each queue has a stable home port."""
    return PORT_BASE + zlib.crc32(queue.encode()) % PORT_SPAN


def crq_home() -> Path:
    return Path(os.environ.get("CRQ_HOME") or Path.home() / ".config" / "crq")


class Swd:
    """The file layout of a server working directory (SPEC section 3)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).absolute()

    @property
    def server_json(self) -> Path:
        return self.root / "server.json"

    @property
    def server_lock(self) -> Path:
        return self.root / "server.lock"

    @property
    def trace(self) -> Path:
        return self.root / "trace.db"

    @property
    def servers(self) -> Path:
        """One ``<instance>.json`` per candidate, leader and standbys (SPEC section 8)."""
        return self.root / "servers"

    @property
    def handover(self) -> Path:
        """Written by a leader handing over (``ncmgr failover``): who may take over."""
        return self.trace / "handover.json"

    @property
    def clean_marker(self) -> Path:
        return self.trace / "clean"

    @property
    def recovery_lock(self) -> Path:
        return self.trace / "recovery.lock"

    @property
    def security(self) -> Path:
        return self.root / "security"

    @property
    def admin_token(self) -> Path:
        return self.security / "admin.token"

    @property
    def tasker_token(self) -> Path:
        return self.security / "tasker.token"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def config(self) -> Path:
        return self.root / "config.toml"


def attempt_key(report: dict[str, Any]) -> tuple[int, int]:
    return int(report["job"]), int(report["attempt"])
