"""Taskers indexed by what they offer, and queued needs by their best bucket.

A dispatch pass must cost what changed since the last one, not buckets x taskers. So the
state keeps, beside the taskers and buckets themselves, derived indexes that its apply
handlers maintain (and a snapshot load rebuilds; they are never stored):

- taskers of one offer (the same capacity and attributes) form a class; each class keeps
  its ready taskers with a free slot sorted by (most free slots, first registered), so the
  best tasker for a need is found by walking the few classes that could ever run it;
- the buckets of one need form a group whose top is its highest priority bucket with
  jobs (within one need, priority alone orders buckets);
- ``Pending`` notes what grew since the last pass: taskers whose offer grew, needs that
  got a new bucket with jobs, global resources given back, taskers passed over because
  they were not eligible. Only those can make a job runnable (server/scheduler.py).
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, insort
from collections.abc import Callable, Iterable

from crq.server.resources import Need

TASKER_READY = "ready"

#: an offer: (capacity items, attributes, the one user whose jobs it runs or "" for any: a
#: tasker not running as root); taskers with the same one are interchangeable
ClassKey = tuple[tuple[tuple[str, int], ...], frozenset[str], str]
#: a tasker's place in its class: (-free slots, registration order, name)
Entry = tuple[int, int, str]


class Tasker:
    __slots__ = (
        "name",
        "host",
        "slots",
        "resources",
        "capacity",
        "attributes",
        "free",
        "free_slots",
        "running",
        "state",
        "boot_id",
        "pid",
        "registered",
        "state_id",
        "session",
        "runs_as",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.host = ""
        self.slots = 0
        self.resources = ""
        self.capacity: dict[str, int] = {}
        self.attributes: frozenset[str] = frozenset()
        self.free: dict[str, int] = {}
        self.free_slots = 0
        self.running: set[int] = set()
        self.state = TASKER_READY
        self.boot_id = ""
        self.state_id = ""
        self.session = ""  # hash of the secret of the session holding the name ("": none yet)
        self.pid = 0
        self.registered = 0.0
        self.runs_as = ""  # a tasker not running as root: the one user whose jobs it runs

    def fits(self, need: Need) -> bool:
        if self.free_slots <= 0 or not need.attributes <= self.attributes:
            return False
        if self.runs_as and self.runs_as != need.user:
            return False
        free = self.free
        return all(free.get(k, 0) >= v for k, v in need.local)

    def take(self, need: Need) -> None:
        self.free_slots -= 1
        for k, v in need.local:
            self.free[k] = self.free.get(k, 0) - v

    def give(self, need: Need) -> None:
        self.free_slots += 1
        free = self.free
        for k, v in need.local:
            left = free.get(k, 0) + v
            if left == 0 and k not in self.capacity:
                del free[k]  # held beyond a changed offer: gone, as a recount leaves it
            else:
                free[k] = left


def could_run(key: ClassKey, need: Need) -> bool:
    """Whether a tasker of this offer could run the need at all (when idle)."""
    capacity, attributes, runs_as = key
    if runs_as and runs_as != need.user:
        return False
    have = dict(capacity)
    return need.attributes <= attributes and all(have.get(k, 0) >= v for k, v in need.local)


class NeedGroup:
    """The priorities of one need's buckets that may hold jobs, highest first (a heap)."""

    __slots__ = ("need", "prios", "present", "live")

    def __init__(self, need: Need) -> None:
        self.need = need
        self.prios: list[int] = []  # negated priorities
        self.present: set[int] = set()
        self.live = 0  # buckets of the need that hold jobs

    def add(self, priority: int) -> None:
        if priority not in self.present:
            self.present.add(priority)
            heapq.heappush(self.prios, -priority)

    def top(self, alive: Callable[[int], bool]) -> int | None:
        """The highest priority whose bucket has jobs; emptied ones are dropped on the way."""
        prios = self.prios
        while prios:
            p = -prios[0]
            if alive(p):
                return p
            heapq.heappop(prios)
            self.present.discard(p)
        return None


class Pending:
    """What grew since the last pass (see the module's docstring); the scheduler clears it."""

    __slots__ = ("taskers", "needs", "globals", "full", "passed")

    def __init__(self) -> None:
        self.taskers: set[str] = set()
        self.needs: set[str] = set()
        self.globals: set[str] = set()
        self.full = True  # a fresh index: nothing is known to be settled
        self.passed: set[str] = set()  # ready, with a free slot, found not eligible

    def settled(self) -> None:
        self.taskers.clear()
        self.needs.clear()
        self.globals.clear()
        self.full = False


class Offers:
    """The derived indexes; ``place`` and ``group`` are called from State's handlers."""

    def __init__(self) -> None:
        self.order: dict[str, int] = {}  # registration order (state.taskers' order)
        self.classes: dict[ClassKey, list[Entry]] = {}
        self.placed: dict[str, tuple[ClassKey, Entry]] = {}
        self.groups: dict[str, NeedGroup] = {}
        self.class_needs: dict[ClassKey, dict[str, Need]] = {}  # queued needs it could run
        self.need_classes: dict[str, list[ClassKey]] = {}  # classes that could run a need
        self.global_needs: dict[str, set[str]] = {}  # global resource -> needs using it
        self.pending = Pending()

    def _class(self, key: ClassKey) -> list[Entry]:
        entries = self.classes.get(key)
        if entries is None:
            entries = self.classes[key] = []
            fit = self.class_needs[key] = {}
            for text, g in self.groups.items():
                if could_run(key, g.need):
                    self.need_classes[text].append(key)
                    if g.live > 0:
                        fit[text] = g.need
        return entries

    def place(self, t: Tasker) -> None:
        """Put a tasker where its state says: in its class while ready with a free slot."""
        old = self.placed.pop(t.name, None)
        if old is not None:
            entries = self.classes[old[0]]
            del entries[bisect_left(entries, old[1])]
        order = self.order.setdefault(t.name, len(self.order))
        if t.state == TASKER_READY and t.free_slots > 0:
            key: ClassKey = (tuple(sorted(t.capacity.items())), t.attributes, t.runs_as)
            entry = (-t.free_slots, order, t.name)
            insort(self._class(key), entry)
            self.placed[t.name] = (key, entry)

    def class_of(self, t: Tasker) -> ClassKey | None:
        where = self.placed.get(t.name)
        return where[0] if where is not None else None

    def filled(self, need: Need, priority: int) -> None:
        """A bucket of the need got jobs (it had none)."""
        g = self.groups.get(need.text)
        if g is None:
            g = self.groups[need.text] = NeedGroup(need)
            self.need_classes[need.text] = [k for k in self.class_needs if could_run(k, need)]
            for k, _ in need.globals:
                self.global_needs.setdefault(k, set()).add(need.text)
        g.add(priority)
        g.live += 1
        if g.live == 1:  # queued again: the classes that could run it look at it again
            for key in self.need_classes[need.text]:
                self.class_needs[key][need.text] = need

    def emptied(self, need: Need) -> None:
        """A bucket of the need lost its last job."""
        g = self.groups[need.text]
        g.live -= 1
        if g.live == 0:  # a need nothing waits for costs a grown tasker nothing
            for key in self.need_classes[need.text]:
                self.class_needs[key].pop(need.text, None)

    def describe(self, alive: Callable[[int, str], bool]) -> dict[str, object]:
        """A comparable view (tests and the sanity check: rebuilt equals maintained)."""
        return {
            "classes": {k: list(v) for k, v in self.classes.items() if v},
            "placed": dict(sorted(self.placed.items())),
            "order": dict(self.order),
            "groups": {
                text: (sorted(p for p in g.present if alive(p, text)), g.live)
                for text, g in sorted(self.groups.items())
                if g.live or any(alive(p, text) for p in g.present)
            },
            "queued": {k: sorted(v) for k, v in self.class_needs.items() if v and self.classes[k]},
        }


def build(taskers: Iterable[Tasker], queued: Iterable[tuple[int, Need]]) -> Offers:
    """The indexes of a state from scratch (snapshot load, sanity repair)."""
    offers = Offers()
    for t in taskers:
        offers.place(t)
    for priority, need in queued:
        offers.filled(need, priority)
    return offers
