"""Drive the core (commands + State.apply) without HTTP, as the engine does: the `core` fixture."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx
import orjson
from crq.server import commands, snapshot
from crq.server.app import serving_app
from crq.server.engine import Engine
from crq.server.events import Event, decode, encode
from crq.server.gates import Array
from crq.server.journal import Journal, frame
from crq.server.models import Batch, JobSpec, Register, ResultReport, RunningReport
from crq.server.scheduler import dispatch_pass
from crq.server.service import Service
from crq.server.settings import load
from crq.server.state import State

T = TypeVar("T")
SORTED = orjson.OPT_SORT_KEYS
TOKEN, TASKER_TOKEN = "admin-token", "tasker-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
TASKER = {"Authorization": f"Bearer {TASKER_TOKEN}"}


class Core:
    """A live state plus the list of every event applied to it, in order."""

    def __init__(self, global_resources: dict[str, int] | None = None) -> None:
        self.state = State()
        self.events: list[Event] = []
        self.now = 1_000_000.0
        self.window = 20.0  # idempotency_window of keyed submits
        if global_resources:
            self.emit([{"e": "resources", "t": self.now, "totals": global_resources}])

    def emit(self, events: list[Event]) -> None:
        for ev in events:
            # round-trip through JSON, as the journal does, so live sees what replay sees
            ev = decode(encode(ev))
            self.state.apply(ev, self.state.seq + 1)
            self.events.append(ev)

    def tick(self) -> float:
        self.now += 1.0
        return self.now

    def submit(
        self, n: int = 1, key: str | None = None, user: str = "alice", **spec: Any
    ) -> list[int]:
        """Submit as ``user``; with ``key``, as a request with that Idempotency-Key would (the
        body's digest made of ``n`` and the spec): a repeat queues nothing."""
        spec.setdefault("command", ["true"])
        spec.setdefault("cwd", "/tmp")
        batch = Batch(jobs=[JobSpec(**spec) for _ in range(n)])
        now = self.tick()
        keyed = None
        if key is not None:
            keyed = (key, commands.body_digest(orjson.dumps([n, spec], option=SORTED)))
            ids = commands.repeated(self.state, user, *keyed, now, self.window)
            if ids is not None:
                return ids
        events, ids = commands.submit(self.state, batch, user, now, keyed)
        self.emit(events)
        return ids

    def submit_specs(self, specs: list[dict[str, Any]], user: str = "alice") -> list[int]:
        """One batch of these specs (command and cwd by default)."""
        jobs = [JobSpec(**{"command": ["true"], "cwd": "/tmp", **s}) for s in specs]
        events, ids = commands.submit(self.state, Batch(jobs=jobs), user, self.tick())
        self.emit(events)
        return ids

    def register(
        self, name: str, slots: int = 2, resources: str = "", session: str = "", **kw: Any
    ) -> commands.Outcome:
        body = Register(host=f"host-{name}", slots=slots, resources=resources, **kw)
        out = commands.register(self.state, name, body, self.tick(), session)
        self.emit(out.events)
        return out

    def dispatch(self, live: set[str] | None = None) -> int:
        return dispatch_pass(
            self.state,
            lambda ev: self.emit([ev]),
            self.tick(),
            lambda t: live is None or t.name in live,
        )

    def start(self, tasker: str, job: int, attempt: int) -> commands.Outcome:
        out = commands.reports(
            self.state,
            tasker,
            [RunningReport(job=job, attempt=attempt, pid=123, started=self.now)],
            [],
            self.tick(),
        )
        self.emit(out.events)
        return out

    def finish(self, tasker: str, job: int, attempt: int, code: int | None = 0) -> commands.Outcome:
        rep = ResultReport(
            job=job, attempt=attempt, exit_code=code, started=self.now, ended=self.now
        )
        out = commands.reports(self.state, tasker, [], [rep], self.tick())
        self.emit(out.events)
        return out


def fingerprint(state: State) -> dict[str, Any]:
    """Everything a user or the scheduler can observe, in a comparable form."""
    return {
        "jobs": {i: [*snapshot._job_row(j), j.spec] for i, j in sorted(state.jobs.items())},
        "taskers": {
            n: (snapshot._tasker_record(t), t.free_slots, sorted(t.free.items()))
            for n, t in sorted(state.taskers.items())
        },
        "envs": dict(sorted(state.envs.items())),
        "env_refs": {k: v for k, v in sorted(state.env_refs.items()) if v},
        "counts": dict(state.counts),
        "global_used": {k: v for k, v in state.global_used.items() if v},
        "global_total": state.global_total,
        "queue": list(state.queue_order()),
        "next_id": state.next_id,
        "seq": state.seq,
        "keys": list(state.keys.items()),  # in order: expiry drops the oldest first
        "epoch": (state.epoch, state.leader),
        "tokens": {i: (t.as_json(), t.hash) for i, t in sorted(state.tokens.items())},
        "by_hash": sorted((h, t.id) for h, t in state.token_by_hash.items()),
        "controls": {i: list(c) for i, c in sorted(state.controls.items()) if c},
        "waits": {i: (w.held, w.pending, w.limited) for i, w in sorted(state.waits.items())},
        "dependents": {p: sorted(c) for p, c in sorted(state.dependents.items()) if c},
        "arrays": {
            f: (a.count, a.start, a.step, a.max_running, a.active, _limited(state, a), a.left)
            for f, a in sorted(state.arrays.items())
        },
    }


def _limited(state: State, arr: Array) -> list[int]:
    """The ids waiting for the array's cap (its heap may hold stale ones: skipped lazily)."""
    return sorted({i for i in arr.limited if (w := state.waits.get(i)) and w.limited})


def write_journal(trace: Path, events: list[Event], first_seq: int = 1, segment: int = 1) -> Path:
    trace.mkdir(parents=True, exist_ok=True)
    path = trace / f"CR.{segment:06d}"
    with open(path, "ab") as f:
        for i, ev in enumerate(events):
            f.write(frame(first_seq + i, encode(ev)))
    return path


# -- the app in process (the `api` fixture) -------------------------------------------------


@contextmanager
def service(swd: Path, *args: str) -> Iterator[Service]:
    """A serving process's Service over a real journal in ``swd``, without the process: a
    clean stop asked by a handler is recorded in ``srv.stops`` instead of ending anything."""
    settings = load(["--swd", str(swd), "--fsync", "never", *args])
    settings.paths.trace.mkdir(parents=True)
    journal = Journal(settings.paths.trace, next_seq=1, fsync=False)
    engine = Engine(State(), journal)
    srv = Service(settings, engine, TOKEN.encode(), TASKER_TOKEN.encode(), "test", "http://test")
    srv.stops = []  # type: ignore[attr-defined]
    srv.request_stop = srv.stops.append  # type: ignore[method-assign,attr-defined]
    try:
        yield srv
    finally:
        engine.wake_all()
        journal.close()


@asynccontextmanager
async def serving(swd: Path, *args: str) -> AsyncIterator[tuple[httpx.AsyncClient, Service]]:
    """The real ``serving_app`` (hot routes, then FastAPI) over ``service(swd, *args)``
    through httpx's ASGI transport; the client sends the admin token unless a request says
    otherwise."""
    with service(swd, *args) as srv:
        transport = httpx.ASGITransport(app=serving_app(srv))
        async with httpx.AsyncClient(
            transport=transport, base_url="http://t", headers=ADMIN
        ) as client:
            yield client, srv


Body = Callable[[httpx.AsyncClient, Service], Awaitable[T]]


def run_app(swd: Path, body: Body[T], *args: str) -> T:
    """One scenario against a fresh app: ``body(client, srv)`` in its own event loop."""

    async def go() -> T:
        async with serving(swd, *args) as (client, srv):
            return await body(client, srv)

    return asyncio.run(go())


class InProcess:
    """The `api` fixture: each ``run`` a fresh app on a fresh swd under the test's tmp."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.runs = 0

    def run(self, body: Body[T], *args: str) -> T:
        self.runs += 1
        return run_app(self.tmp / f"api{self.runs}.swd", body, *args)
