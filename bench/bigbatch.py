"""/healthz latency while one big batch is submitted: the event loop must stay responsive.

One client POSTs a single batch of ``--jobs`` sim jobs (a shared 30-variable env, as in
``memory.py``); meanwhile another polls ``/healthz`` back to back. Each ``--repeat`` adds
another batch to the same queue. Prints the worst /healthz wait overlapping the batch and
the batch's own time.
"""

from __future__ import annotations

import threading
import time

import httpx
from benchlib import (
    API,
    Server,
    below,
    info,
    log,
    ms,
    parser,
    pct,
    report,
    running,
    sim_batch,
    workdir,
)

BENCH = "bigbatch"


def _poll_healthz(srv: Server, stop: threading.Event, out: list[tuple[float, float]]) -> None:
    """(start, seconds) of every /healthz until ``stop``."""
    with httpx.Client(base_url=srv.url, timeout=60.0, trust_env=False) as c:
        while not stop.is_set():
            t0 = time.time()
            c.get("/healthz").raise_for_status()
            out.append((t0, time.time() - t0))
            time.sleep(0.002)


def main() -> None:
    p = parser("/healthz latency during one big batch submit.")
    p.add_argument("--jobs", type=int, default=100_000)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()

    tmp = workdir(args.keep)
    srv = Server(tmp / "swd")
    worst: list[float] = []
    took: list[float] = []
    with running(srv):
        srv.start()
        srv.wait_normal()
        with srv.client(timeout=600.0) as c:
            for r in range(args.repeat):
                body = sim_batch(r * args.jobs, args.jobs)
                samples: list[tuple[float, float]] = []
                stop = threading.Event()
                poller = threading.Thread(target=_poll_healthz, args=(srv, stop, samples))
                poller.start()
                time.sleep(0.2)
                t0 = time.time()
                resp = c.post(
                    API + "/jobs", content=body, headers={"Content-Type": "application/json"}
                )
                t1 = time.time()
                time.sleep(0.2)
                stop.set()
                poller.join()
                if resp.status_code != 201:
                    raise RuntimeError(f"submit: {resp.status_code} {resp.text[:300]}")
                during = [d for s, d in samples if s + d >= t0 and s <= t1]
                worst.append(max(during, default=0.0))
                took.append(t1 - t0)
                log(
                    f"batch {r + 1}: {args.jobs} jobs ({len(body) / 1e6:.1f} MB) in "
                    f"{t1 - t0:.2f} s; /healthz during it: {len(during)} answers, "
                    f"p50 {ms(pct(during, 50)):.1f} ms, worst {ms(worst[-1]):.1f} ms"
                )
        srv.stop()
    note = f"{args.jobs} jobs a batch, {args.repeat} batches"
    report(
        [
            below(BENCH, "/healthz worst wait during a batch", ms(max(worst)), "ms", 1000, note),
            info(BENCH, "batch submit time (median)", pct(took, 50), "s", note),
        ],
        args.json,
    )


if __name__ == "__main__":
    main()
