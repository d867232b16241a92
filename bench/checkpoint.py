"""Request latency while the server checkpoints N queued jobs.

The queue is filled (batches of 10,000) by a server whose ``--checkpoint-bytes`` is set
just above what the fill writes to the journal (topped up with a few more jobs until the
journal is ``--checkpoint-bytes`` short of it). With ``--restart`` the queue is filled by a
server that never checkpoints, stopped cleanly, and restarted with a small
``--checkpoint-bytes``: its jobs then come from the snapshot. Two closed-loop clients then
run side by side, one sending ``GET /api/v1/server``, one sending single-job submits; their
submits grow the journal past the threshold, and the server forks a child that writes the
snapshot of the N jobs. Each request is classed by when it ran: before the checkpoint,
during it (overlapping the window the server log reports: ``checkpoint … written in X s``),
or after. The forked child is also watched through /proc, as a cross-check of the window.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

import httpx
from benchlib import (
    API,
    Figure,
    Server,
    below,
    checkpoints_in_log,
    children,
    fill,
    info,
    log,
    ms,
    parser,
    pct,
    report,
    rss_kb,
    running,
    workdir,
)

BENCH = "checkpoint"
BYTES_PER_JOB_MAX = 200  # journal bytes of one batch-submitted sim job (measured: ~180)


@dataclass
class Sample:
    kind: str  # "get" or "submit"
    start: float  # time.time()
    took: float  # seconds
    ok: bool


@dataclass
class ChildWatch:
    """The server's children seen by polling /proc every few ms: (first seen, gone) times."""

    pid: int
    seen: dict[int, list[float]] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            now = time.time()
            alive = set(children(self.pid))
            for c in alive:
                self.seen.setdefault(c, [now, now])[1] = now
            time.sleep(0.005)


async def closed_loop(srv: Server, kind: str, until: threading.Event, out: list[Sample]) -> None:
    headers = {**srv.headers(), "Content-Type": "application/json"}
    body = b'{"command":["true"],"cwd":"/tmp"}'
    async with httpx.AsyncClient(
        base_url=srv.url, headers=headers, timeout=60.0, trust_env=False
    ) as c:
        while not until.is_set():
            t0 = time.time()
            p0 = time.perf_counter()
            try:
                if kind == "get":
                    r = await c.get(API + "/server")
                    ok = r.status_code == 200
                else:
                    r = await c.post(API + "/jobs", content=body)
                    ok = r.status_code == 201
            except httpx.HTTPError:
                ok = False
            out.append(Sample(kind, t0, time.perf_counter() - p0, ok))


def journal_bytes(srv: Server) -> int:
    """Bytes in the journal segments: the server's ``bytes_written`` while none rotated."""
    return sum(p.stat().st_size for p in (srv.swd / "trace.db").glob("CR.*"))


def top_up(srv: Server, goal: int, first: int) -> int:
    """Submit more sim jobs until the journal is a little under ``goal`` bytes; how many."""
    added = 0
    while True:
        size = journal_bytes(srv)
        n = min(10_000, (goal - size) // BYTES_PER_JOB_MAX)
        if n < 100:
            return added
        fill(srv, n, batch=n, start=first + added)
        added += n


def stats(samples: list[Sample]) -> tuple[float, float, float, int]:
    lat = [s.took for s in samples]
    return pct(lat, 50), pct(lat, 99), max(lat) if lat else float("nan"), len(lat)


def main() -> None:
    p = parser("p50/p99/max request latency before and during a checkpoint of N jobs.")
    p.add_argument("--jobs", type=int, default=1_000_000)
    p.add_argument(
        "--checkpoint-bytes",
        type=int,
        default=1 << 20,
        help="threshold of the measured server: the steady submits cross it",
    )
    p.add_argument("--after", type=float, default=2.0, help="seconds measured after it ends")
    p.add_argument("--timeout", type=float, default=180.0)
    p.add_argument(
        "--restart",
        action="store_true",
        help="fill, stop cleanly and restart before measuring (state from snapshot, "
        "gc-frozen) instead of measuring the process that built the queue",
    )
    args = p.parse_args()

    tmp = workdir(args.keep)
    figures: list[Figure] = []
    if args.restart:
        srv = Server(tmp / "swd", extra=["--checkpoint-bytes", str(1 << 40)])
    else:
        threshold = args.jobs * BYTES_PER_JOB_MAX + args.checkpoint_bytes
        srv = Server(tmp / "swd", extra=["--checkpoint-bytes", str(threshold)])
    with running(srv):
        srv.start()
        srv.wait_normal()
        took, _ = fill(srv, args.jobs)
        if args.restart:
            stop_s = srv.stop()
            log(f"{args.jobs:,} jobs queued in {took:.1f} s; clean stop (snapshot) {stop_s:.1f} s")
            srv.extra = ["--checkpoint-bytes", str(args.checkpoint_bytes)]
            srv.start()
            srv.wait_normal()
            how = f"restarted with --checkpoint-bytes {args.checkpoint_bytes:,}"
        else:
            extra = top_up(srv, threshold - args.checkpoint_bytes, args.jobs)
            log(
                f"{args.jobs:,} jobs queued in {took:.1f} s (+{extra:,} to bring the journal "
                f"{args.checkpoint_bytes:,} B short of --checkpoint-bytes {threshold:,})"
            )
            how = "same process (queue built live)"
        time.sleep(1.0)
        log(
            f"{how}, RSS {rss_kb(srv.pid) / 1024:.0f} MiB; closed-loop GET + submit until a "
            f"checkpoint has run"
        )

        samples: list[Sample] = []
        until = threading.Event()
        watch = ChildWatch(srv.pid)
        watcher = threading.Thread(target=watch.run, daemon=True)
        watcher.start()

        async def drive() -> None:
            tasks = [
                asyncio.create_task(closed_loop(srv, k, until, samples)) for k in ("get", "submit")
            ]
            deadline = time.time() + args.timeout
            ended_at = None
            while time.time() < deadline:
                await asyncio.sleep(0.1)
                if ended_at is None and checkpoints_in_log(srv.log_text()):
                    ended_at = time.time()
                if ended_at is not None and time.time() - ended_at >= args.after:
                    break
            until.set()
            await asyncio.gather(*tasks)

        asyncio.run(drive())
        watch.stop.set()
        watcher.join()
        found = checkpoints_in_log(srv.log_text())
        if not found:
            raise RuntimeError(f"no checkpoint within {args.timeout} s")
        end, dur = found[0]
        begin = end - dur
        kids = sorted(watch.seen.values())
        child = f"{kids[0][1] - kids[0][0]:.2f} s" if kids else "not seen"
        log(
            f"checkpoint of {args.jobs:,} jobs: {dur:.2f} s (server log); "
            f"forked child lived {child}"
        )

        def phase(s: Sample) -> str:
            if s.start + s.took < begin:
                return "before"
            if s.start > end:
                return "after"
            return "during"

        groups: dict[tuple[str, str], list[Sample]] = {}
        for s in samples:
            groups.setdefault((phase(s), s.kind), []).append(s)
            groups.setdefault((phase(s), "all"), []).append(s)
        failed = sum(not s.ok for s in samples)
        for ph in ("before", "during", "after"):
            for kind in ("get", "submit", "all"):
                g = groups.get((ph, kind), [])
                if g:
                    p50, p99, mx, n = stats(g)
                    log(
                        f"  {ph:6} {kind:6}: n={n:5}  p50 {ms(p50):7.2f} ms  "
                        f"p99 {ms(p99):7.2f} ms  max {ms(mx):7.1f} ms"
                    )
        srv.stop()

    note = f"{args.jobs:,} jobs, {'restarted' if args.restart else 'live'}"
    b50, b99, bmax, bn = stats(groups.get(("before", "all"), []))
    d50, d99, dmax, dn = stats(groups.get(("during", "all"), []))
    figures += [
        below(
            BENCH,
            "p99 latency during checkpoint",
            ms(d99),
            "ms",
            100,
            f"{note}, n={dn}, GET+submit",
        ),
        info(BENCH, "p50 latency during checkpoint", ms(d50), "ms", note),
        info(BENCH, "max latency during checkpoint", ms(dmax), "ms", note),
        info(BENCH, "p99 latency before checkpoint", ms(b99), "ms", f"n={bn}"),
        info(BENCH, "p50 latency before checkpoint", ms(b50), "ms", f"n={bn}"),
        info(BENCH, "max latency before checkpoint", ms(bmax), "ms", f"n={bn}"),
        info(BENCH, "checkpoint duration (log)", dur, "s", note),
        info(BENCH, "failed requests", failed, "req"),
    ]
    report(figures, args.json)


if __name__ == "__main__":
    main()
