"""What keeps a job ``waiting`` (SPEC section 10): a hold, dependencies not met yet, or its
array at its ``max_running`` cap. Plain data and pure rules; ``State`` applies them.

A waiting job is not in any dispatch bucket, so a million of them cost the scheduler
nothing. It gets a ``Wait`` while it waits; its parents know it through
``State.dependents`` (parent id → ``(child id, type)``), looked at once, when the parent
ends (or is forgotten before it ended). When nothing holds it back any more it is queued at
the place its id gives it (buckets are heaps of ids).
"""

from __future__ import annotations

from crq.wire import DONE, FAILED, FINAL_STATES, LOST, STOPPED

AFTEROK, AFTERANY, AFTERNOTOK = "afterok", "afterany", "afternotok"
AFTER_TYPES = (AFTEROK, AFTERANY, AFTERNOTOK)
#: The outcome of a parent dropped from the state before it ended.
FORGOTTEN = "forgotten"
NOT_OK = frozenset((FAILED, STOPPED, LOST))


class Wait:
    """Why a waiting job waits: ``held``, ``pending`` parents, or ``limited`` by its array."""

    __slots__ = ("held", "pending", "limited")

    def __init__(self, held: bool = False, pending: int = 0) -> None:
        self.held = held
        self.pending = pending
        self.limited = False

    def reason(self) -> str:
        if self.held:
            return "held"
        if self.pending:
            return f"waiting for {self.pending} dependenc{'y' if self.pending == 1 else 'ies'}"
        return "waiting for a slot of its array (max_running)"


class Array:
    """Elements ``first`` .. ``first + count - 1``, element k's index ``start + k * step``;
    with ``max_running``, ``active`` counts those queued or running and ``limited`` is a
    heap of the ids waiting for the cap alone."""

    __slots__ = ("first", "count", "start", "step", "max_running", "active", "limited", "left")

    def __init__(self, first: int, count: int, start: int, step: int, cap: int | None) -> None:
        self.first, self.count, self.start, self.step = first, count, start, step
        self.max_running = cap
        self.active = 0
        self.limited: list[int] = []
        self.left = count  # elements still in the state; the array goes with the last

    def index(self, job_id: int) -> int:
        return self.start + (job_id - self.first) * self.step

    def has(self, job_id: int) -> bool:
        return self.first <= job_id < self.first + self.count


def array_size(start: int, stop: int, step: int) -> int:
    return len(range(start, stop + 1, step))


def met(kind: str, outcome: str) -> bool | None:
    """True: the dependency is met; False: it never can be; None: the parent still runs."""
    if outcome == FORGOTTEN:
        return kind == AFTERANY
    if outcome not in FINAL_STATES:
        return None
    if kind == AFTEROK:
        return outcome == DONE
    if kind == AFTERNOTOK:
        return outcome in NOT_OK
    return True


def broken_reason(kind: str, parent: int, outcome: str) -> str:
    return f"dependency {kind}:{parent} can never be met (job {parent} {outcome})"


def expand_log(path: str, job_id: int, array: int | None, index: int | None) -> str:
    """Slurm's ``%j`` (job id), ``%A`` (array id), ``%a`` (array index) and ``%%``; for a
    job of no array ``%A`` is its id and ``%a`` is ``0``."""
    if "%" not in path:
        return path
    values = {
        "j": str(job_id),
        "A": str(array if array is not None else job_id),
        "a": str(index if index is not None else 0),
        "%": "%",
    }
    out: list[str] = []
    i, n = 0, len(path)
    while i < n:
        c = path[i]
        if c == "%" and i + 1 < n and path[i + 1] in values:
            out.append(values[path[i + 1]])
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)
