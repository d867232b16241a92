"""Scheduler scale: the dispatch work one event triggers, with 1,000 taskers and 1,000,000
queued jobs in 1,000 buckets.

The state is built in process (events applied to a ``State``, as replay does; no HTTP, no
journal), with taskers of several capacity classes (slots, cores, RAM, a gpu or not) and
jobs of 100 needs x 10 priorities. A first pass fills every tasker; after it, two kinds of
event are timed, interleaved at random: a running job finishes (its slot frees) and a new
job is submitted (every fifth of those, by default, to a need never seen: a new bucket). Each is
applied, then the figure is the wall time of the dispatch pass the engine would run after
it (``scheduler.dispatch_pass``, including applying the dispatch events it emits). A few
taskers are silent (not eligible), as the engine's freshness check would find them.

The floor: one ``heapq`` push and pop on a heap of 1,000,000 ints, measured in the same
run. A scheduler holding 1,000,000 queued jobs cannot hand one out for less than one
priority-queue step over them; the ratio says how many such steps a pass costs.
"""

from __future__ import annotations

import gc
import heapq
import random
import time

from benchlib import at_most, info, log, parser, pct, report
from crq.server.events import Event
from crq.server.resources import parse_need
from crq.server.scheduler import dispatch_pass
from crq.server.state import State, Tasker

BENCH = "scale"
SPEC = b'{"command":["sim","-seed","1"],"cwd":"/work/proj","log":null}'


def needs(n: int) -> list[str]:
    """``n`` distinct needs (canonical texts): cores, RAM, sometimes gpu or a licence."""
    out: list[str] = []
    for cores in (1, 2, 4, 8):
        for ram in (250, 500, 1000, 2000, 4000, 8000, 16000):
            for extra in ("", "gpu", "License:vcs", "linux"):
                out.append(parse_need(f"CORES/{cores} RAM/{ram} {extra}").text)
    random.Random(1).shuffle(out)
    return out[:n]


def tasker_event(i: int, now: float) -> Event:
    slots = (4, 8, 16, 32)[i % 4]
    ram = slots * (1000, 2000, 4000)[i % 3]
    attrs = " gpu" if i % 10 == 0 else ""
    attrs += " linux" if i % 2 == 0 else ""
    return {
        "e": "tasker",
        "t": now,
        "name": f"t{i:04d}",
        "host": f"h{i:04d}",
        "pid": 1000 + i,
        "slots": slots,
        "resources": f"RAM/{ram}{attrs}",
        "boot_id": "b",
    }


def submit_event(state: State, rows: list[tuple[int, str]], now: float) -> Event:
    """One submit event queuing ``rows`` (priority, need text), ids from the state."""
    first = state.next_id
    jobs = [[first + k, p, text, "sim", None, True, 3] for k, (p, text) in enumerate(rows)]
    return {"e": "submit", "t": now, "user": "alice", "jobs": jobs, "specs": [SPEC] * len(rows)}


def heap_floor(size: int, rounds: int) -> float:
    """Seconds of one heappush + heappop on a heap of ``size`` ints (median of rounds)."""
    heap = list(range(0, 2 * size, 2))
    rng = random.Random(2)
    times = []
    for _ in range(rounds):
        x = rng.randrange(2 * size) | 1
        t0 = time.perf_counter_ns()
        heapq.heappush(heap, x)
        heapq.heappop(heap)
        times.append(time.perf_counter_ns() - t0)
    return pct(times, 50) / 1e9


def main() -> None:
    p = parser("Dispatch cost per event with many taskers and a big queue.")
    p.add_argument("--taskers", type=int, default=1000)
    p.add_argument("--jobs", type=int, default=1_000_000)
    p.add_argument("--needs", type=int, default=100)
    p.add_argument("--priorities", type=int, default=10)
    p.add_argument("--events", type=int, default=4000)
    p.add_argument("--new-every", type=int, default=5, help="every Nth submit: a new need")
    p.add_argument("--silent", type=float, default=0.02, help="share of silent taskers")
    args = p.parse_args()
    rng = random.Random(3)
    gc.disable()
    state = State({"License:vcs": 40})
    now = 1_000_000.0
    for i in range(args.taskers):
        state.apply(tasker_event(i, now))
    silent = {f"t{i:04d}" for i in rng.sample(range(args.taskers), int(args.silent * args.taskers))}

    def eligible(t: Tasker) -> bool:
        return t.name not in silent

    texts = needs(args.needs)
    keys = [(p, text) for p in range(args.priorities) for text in texts]
    t0 = time.perf_counter()
    batch = 10_000
    for at in range(0, args.jobs, batch):
        rows = [keys[(at + k) % len(keys)] for k in range(min(batch, args.jobs - at))]
        state.apply(submit_event(state, rows, now))
    gc.freeze()
    log(
        f"{args.taskers:,} taskers, {args.jobs:,} jobs in {len(state.buckets):,} buckets "
        f"built in {time.perf_counter() - t0:.1f} s"
    )
    sent: list[int] = []

    def emit(ev: Event) -> None:
        state.apply(ev)
        sent.append(1)

    t0 = time.perf_counter()
    first = dispatch_pass(state, emit, now, eligible)
    first_s = time.perf_counter() - t0
    log(f"first pass: {first:,} dispatches in {first_s:.2f} s")

    busy = [t for t in state.taskers.values() if t.running]
    on_finish: list[float] = []
    on_submit: list[float] = []
    on_new: list[float] = []
    for n in range(args.events):
        now += 0.001
        if n % 2 == 0:
            t = rng.choice(busy)
            job = state.jobs[rng.choice(sorted(t.running))]
            ev: Event = {
                "e": "finish",
                "t": now,
                "job": job.id,
                "attempt": job.attempt,
                "exit_code": 0,
                "signal": None,
                "reason": None,
                "started": now,
                "ended": now,
            }
            times = on_finish
        elif (
            args.new_every and n % (2 * args.new_every) == 1
        ):  # a need never seen: a new bucket, looked at against all taskers
            fresh = parse_need(f"CORES/1 RAM/{100 + n}").text
            ev = submit_event(state, [(rng.randrange(args.priorities), fresh)], now)
            times = on_new
        else:
            ev = submit_event(state, [rng.choice(keys)], now)
            times = on_submit
        state.apply(ev)
        t0 = time.perf_counter_ns()
        dispatch_pass(state, emit, now, eligible)
        times.append((time.perf_counter_ns() - t0) / 1e9)
        busy = [t for t in busy if t.running] or [t for t in state.taskers.values() if t.running]
    floor = heap_floor(args.jobs, 2000)
    both = on_finish + on_submit + on_new
    p50, p99 = pct(both, 50), pct(both, 99)
    log(
        f"per event: p50 {p50 * 1e3:.3f} ms, p99 {p99 * 1e3:.3f} ms "
        f"(finish p99 {pct(on_finish, 99) * 1e3:.3f} ms, submit p99 "
        f"{pct(on_submit, 99) * 1e3:.3f} ms); {len(sent) - first:,} dispatched; "
        f"floor {floor * 1e6:.2f} us: ratio p50 {p50 / floor:,.0f}x, p99 {p99 / floor:,.0f}x"
    )
    note = f"{args.taskers:,} taskers, {args.jobs:,} queued, {len(state.buckets):,} buckets"
    figures = [
        at_most(BENCH, "dispatch per event p99", p99 * 1e3, "ms", 10, note),
        info(BENCH, "dispatch per event p50", p50 * 1e3, "ms", note),
        info(BENCH, "dispatch per finish p99", pct(on_finish, 99) * 1e3, "ms", note),
        info(BENCH, "dispatch per submit p99", pct(on_submit, 99) * 1e3, "ms", note),
        info(BENCH, "dispatch per submit, new bucket p99", pct(on_new, 99) * 1e3, "ms", note),
        info(BENCH, "floor: heap push+pop, 1M", floor * 1e6, "us", "same run"),
        info(BENCH, "ratio p50 / floor", p50 / floor, "x", ""),
        info(BENCH, "ratio p99 / floor", p99 / floor, "x", ""),
        info(BENCH, "first pass (fills all taskers)", first_s, "s", f"{first:,} dispatches"),
    ]
    report(figures, args.json)


if __name__ == "__main__":
    main()
