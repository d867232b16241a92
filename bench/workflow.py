"""Workflow features at scale (SPEC 10): arrays, dependency chains, waiting jobs.

Through a real server (fsync always): one request submitting a 100,000-element array,
beside one submitting 100,000 plain jobs (the floor: what the same jobs cost without an
array), and one submitting a 100,000-job chain (each job after the one before, in one
batch). End to end with real taskers: a 10,000-element array with ``%max`` (default 10)
beside 10,000 plain jobs (floor). In process (the ``State`` alone, as replay builds it):
the release of a chain's next link (the finish of one, the dispatch pass that hands out
the next), the dispatch pass with and without 1,000,000 waiting jobs, and the memory of
an array element beside that of a plain queued job.
"""

from __future__ import annotations

import gc
import json
import os
import time

from benchlib import (
    API,
    Figure,
    Floor,
    Server,
    Target,
    Tasker,
    info,
    log,
    parser,
    pct,
    report,
    running,
    vs_floor,
    wait_taskers,
    workdir,
)
from crq.server.events import Event, spec_bytes
from crq.server.scheduler import dispatch_pass
from crq.server.state import State

BENCH = "workflow"
SPEC = spec_bytes({"command": ["sim", "-seed", "1"], "cwd": "/work/proj", "log": None})


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def post(srv: Server, body: dict[str, object]) -> tuple[float, list[int]]:
    with srv.client(timeout=900.0) as c:
        raw = json.dumps(body).encode()
        t0 = time.perf_counter()
        r = c.post(API + "/jobs", content=raw, headers={"Content-Type": "application/json"})
        took = time.perf_counter() - t0
    if r.status_code != 201:
        raise RuntimeError(f"submit failed: {r.status_code} {r.text[:300]}")
    return took, r.json()["ids"]


def submits(n: int) -> list[Figure]:
    root = workdir()
    srv = Server(root / "w.swd").start()
    figures: list[Figure] = []
    with running(srv):
        srv.wait_normal()
        job = {"command": ["sim", "-seed", "1"], "cwd": "/work/proj", "hold": True}
        plain_s, _ = post(srv, {"jobs": [job] * n})
        array_s, ids = post(srv, {**job, "array": {"start": 1, "stop": n}})
        assert len(ids) == n
        chain = [{**job, "hold": False, "after": [{"index": i}]} for i in range(n - 1)]
        chain_s, _ = post(srv, {"jobs": [{**job, "hold": True}, *chain]})
    floor = Floor(n / plain_s, "jobs/s", "plain batch", f"{n:,} plain jobs, one request")
    log(
        f"{n:,}: plain {plain_s:.2f} s, array {array_s:.2f} s ({n / array_s:,.0f}/s), "
        f"chain {chain_s:.2f} s ({n / chain_s:,.0f}/s)"
    )
    figures += [
        vs_floor(
            BENCH,
            f"array submit, {n:,} elements",
            n / array_s,
            "elements/s",
            floor,
            Target(">=", 500_000, on="value", unit="elements/s"),
        ),  # fmt: skip
        vs_floor(BENCH, f"chain submit, {n:,} links", n / chain_s, "jobs/s", floor),
    ]
    return figures


def end_to_end(n: int, cap: int, taskers: int, slots: int) -> list[Figure]:
    root = workdir()
    srv = Server(root / "e.swd").start()
    ts: list[Tasker] = []
    with running(srv):
        srv.wait_normal()
        for i in range(taskers):
            (root / f"t{i}").mkdir()
            ts.append(Tasker(srv.swd, f"t{i}", slots, root / f"t{i}" / "state").start())
        try:
            wait_taskers(srv, [t.name for t in ts])
            t0 = time.time()
            post(srv, {"jobs": [{"command": ["true"], "cwd": "/tmp"}] * n})
            plain = wait_ended(srv, n, t0)
            t0 = time.time()
            arr_spec = {"start": 1, "stop": n, "max_running": cap}
            post(srv, {"command": ["true"], "cwd": "/tmp", "array": arr_spec})
            arr = wait_ended(srv, 2 * n, t0)
        finally:
            for t in ts:
                t.stop()
    floor = Floor(n / plain, "jobs/s", "plain jobs", f"{n:,} plain jobs, same taskers")
    note = f"{taskers} taskers x {slots} slots, %max {cap}"
    log(f"end to end: plain {n / plain:,.0f} jobs/s, array %{cap} {n / arr:,.0f} jobs/s")
    return [vs_floor(BENCH, f"array of {n:,} with %max end to end", n / arr, "jobs/s",
                     floor, note=note)]  # fmt: skip


def wait_ended(srv: Server, total: int, t0: float) -> float:
    with srv.client() as c:
        while True:
            counts = c.get(API + "/server").json().get("counts", {})
            ended = sum(counts.get(s, 0) for s in ("done", "failed", "stopped", "lost"))
            if ended >= total:
                return time.time() - t0
            time.sleep(0.05)


def tasker_ev(now: float, slots: int) -> Event:
    return {"e": "tasker", "t": now, "name": "t1", "host": "h1", "pid": 1, "slots": slots,
            "resources": "", "boot_id": "b"}  # fmt: skip


def finish_ev(job_id: int, attempt: int, now: float) -> Event:
    return {"e": "finish", "t": now, "job": job_id, "attempt": attempt, "exit_code": 0,
            "signal": None, "reason": None, "started": now, "ended": now}  # fmt: skip


def release_times(state: State, links: int) -> list[float]:
    """Seconds each: the finish of job k and the dispatch pass after it (one slot, so the
    pass hands out job k+1); every job must have been dispatched."""
    sent: list[int] = []

    def emit(ev: Event) -> None:
        state.apply(ev)
        sent.append(1)

    dispatch_pass(state, emit, 1.0, lambda t: True)
    times = []
    for job_id in range(1, links):
        t0 = time.perf_counter()
        state.apply(finish_ev(job_id, state.jobs[job_id].attempt, 1.0))
        dispatch_pass(state, emit, 1.0, lambda t: True)
        times.append(time.perf_counter() - t0)
    assert len(sent) == links, (len(sent), links)
    return times


def chain_state(links: int, chained: bool) -> State:
    """One tasker of one slot and ``links`` jobs, each after the one before if ``chained``."""
    state = State()
    state.apply(tasker_ev(1.0, 1))
    rows = [[i, 4, "", "sim", None, True, 3] for i in range(1, links + 1)]
    ev: Event = {"e": "submit", "t": 1.0, "user": "u", "jobs": rows, "specs": [SPEC] * links}
    if chained:
        ev["after"] = [[i, [["afterok", i]]] for i in range(1, links)]
    state.apply(ev)
    return state


def chain_release(links: int) -> tuple[list[float], float]:
    """Seconds per link of a chain, and the median of the same for jobs that wait for
    nothing (the floor)."""
    times = release_times(chain_state(links, True), links)
    base = release_times(chain_state(min(links, 5000), False), min(links, 5000))
    return times, pct(base, 50)


def memory_and_pass(n: int) -> list[Figure]:
    gc.collect()
    gc.disable()
    before = rss_bytes()
    plain = State()
    rows = [[i, 4, "", "sim", None, True, 3] for i in range(1, n + 1)]
    plain.apply({"e": "submit", "t": 1.0, "user": "u", "jobs": rows, "specs": [SPEC] * n})
    del rows
    gc.collect()
    per_plain = (rss_bytes() - before) / n
    del plain
    gc.collect()
    before = rss_bytes()
    state = State()
    state.apply(tasker_ev(1.0, 4))
    t0 = time.perf_counter()
    state.apply({"e": "array", "t": 1.0, "user": "u", "first": 1, "count": n, "start": 1,
                 "step": 1, "max_running": None, "job": [4, "", "sim", None, True, 3],
                 "spec": SPEC.decode(), "held": True})  # fmt: skip
    apply_s = time.perf_counter() - t0
    gc.collect()
    per_element = (rss_bytes() - before) / n
    # passes with n waiting jobs beside the same passes without them
    loaded = time_passes(state, n + 1)
    empty = State()
    empty.apply(tasker_ev(1.0, 4))
    bare = time_passes(empty, n + 1)
    gc.enable()
    log(
        f"{n:,} held elements: {per_element:.0f} B each (plain job {per_plain:.0f} B), "
        f"applied in {apply_s:.2f} s; pass {loaded * 1e6:.0f} us vs {bare * 1e6:.0f} us"
    )
    fl = Floor(per_plain, "B", "plain job", f"RSS of a queued plain job, {n:,} of them")
    pf = Floor(bare * 1e6, "us", "no waiting", "the same pass without the waiting jobs")
    return [
        vs_floor(
            BENCH,
            f"RSS per array element at {n:,}",
            per_element,
            "B",
            fl,
            Target("<=", 100, on="value", unit="B"),
        ),  # fmt: skip
        vs_floor(
            BENCH, f"dispatch pass with {n:,} waiting", loaded * 1e6, "us", pf, Target("<=", 2.0)
        ),  # fmt: skip
        info(BENCH, f"array apply, {n:,} elements", n / apply_s, "elements/s", "in process"),
    ]


def time_passes(state: State, first: int, rounds: int = 200) -> float:
    """Median seconds of a dispatch pass that hands out 4 new jobs to the 4 free slots
    (then they finish, so the next round starts alike)."""
    times = []
    now = 2.0
    for r in range(rounds):
        ids = range(first + 4 * r, first + 4 * r + 4)
        rows = [[i, 4, "", "sim", None, True, 3] for i in ids]
        state.apply({"e": "submit", "t": now, "user": "u", "jobs": rows, "specs": [SPEC] * 4})
        t0 = time.perf_counter()
        dispatch_pass(state, state.apply, now, lambda t: True)
        times.append(time.perf_counter() - t0)
        for i in ids:
            state.apply(finish_ev(i, state.jobs[i].attempt, now))
    return pct(times, 50)


def main() -> None:
    p = parser(__doc__ or "")
    p.add_argument("--jobs", type=int, default=100_000, help="array / chain size (submit)")
    p.add_argument("--links", type=int, default=20_000, help="chain links released in process")
    p.add_argument("--elements", type=int, default=1_000_000, help="held elements (memory)")
    p.add_argument("--e2e", type=int, default=10_000, help="array elements run end to end")
    p.add_argument(
        "--max", type=int, default=20, help="%%max of the end-to-end array (default: the slots)"
    )
    p.add_argument("--taskers", type=int, default=2)
    p.add_argument("--slots", type=int, default=10)
    args = p.parse_args()
    figures: list[Figure] = []
    times, base = chain_release(args.links)
    p50 = pct(times, 50)
    fl = Floor(base * 1e3, "ms", "no dependency", "the same finish + pass, jobs without after")
    figures.append(
        vs_floor(
            BENCH,
            "chain release per link p50",
            p50 * 1e3,
            "ms",
            fl,
            Target("<=", 1.0, on="value", unit="ms"),
            f"{args.links:,} links",
        )  # fmt: skip
    )
    figures.append(info(BENCH, "chain release per link p99", pct(times, 99) * 1e3, "ms"))
    figures += memory_and_pass(args.elements)
    figures += submits(args.jobs)
    if args.e2e:
        figures += end_to_end(args.e2e, args.max, args.taskers, args.slots)
    report(figures, args.json)


if __name__ == "__main__":
    main()
