"""Run every benchmark one after the other and print one table against the targets.

Moderate sizes by default (a few minutes on a 2-core machine); ``--full`` uses the sizes
the targets are stated for (1,000,000 jobs), still within about ten minutes (and six more
for the takeover runs, which fill 1,000,000 jobs once per election). Each
benchmark runs as its own process (``python bench/<name>.py … --json FILE``) and its
output is shown as it goes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import Figure, table

HERE = Path(__file__).resolve().parent

MODERATE: dict[str, list[str]] = {
    "submit": ["--seconds", "5"],
    "throughput": ["--jobs", "2000"],
    "latency": ["--samples", "200"],
    "memory": ["--jobs", "200000"],
    "recovery": ["--sizes", "10000,100000", "--snapshot-size", "100000", "--tasker-size", "10000"],
    "checkpoint": ["--jobs", "200000"],
    "bigbatch": ["--jobs", "100000", "--repeat", "2"],
    "takeover": ["--sizes", "10000,100000", "--submit-seconds", "3"],
}
FULL: dict[str, list[str]] = {
    "submit": ["--seconds", "10"],
    "throughput": ["--jobs", "2000"],
    "latency": ["--samples", "200"],
    "memory": ["--jobs", "1000000"],
    "recovery": [
        "--sizes",
        "10000,100000,1000000",
        "--snapshot-size",
        "1000000",
        "--tasker-size",
        "100000",
    ],
    "checkpoint": ["--jobs", "1000000"],
    "bigbatch": ["--jobs", "100000", "--repeat", "3"],
    "takeover": ["--sizes", "10000,100000,1000000", "--submit-seconds", "5"],
}


def main() -> int:
    p = argparse.ArgumentParser(description="Run all crq benchmarks and compare with targets.")
    p.add_argument("--full", action="store_true", help="the 1,000,000-job sizes")
    p.add_argument("--only", help="comma-separated subset, e.g. submit,latency")
    p.add_argument("--json", metavar="FILE", help="also write every figure as JSON to FILE")
    args = p.parse_args()
    plan = FULL if args.full else MODERATE
    names = [n.strip() for n in args.only.split(",")] if args.only else list(plan)
    unknown = [n for n in names if n not in plan]
    if unknown:
        print(f"run_all: unknown benchmark(s): {', '.join(unknown)}", file=sys.stderr)
        return 2

    figures: list[Figure] = []
    failed: list[str] = []
    load0 = os.getloadavg()
    t_all = time.time()
    with tempfile.TemporaryDirectory(prefix="crq-bench-all-") as tmp:
        for name in names:
            out = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, str(HERE / f"{name}.py"), *plan[name], "--json", str(out)]
            print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
            t0 = time.time()
            rc = subprocess.call(cmd)
            print(f"=== {name}: exit {rc} after {time.time() - t0:.0f} s", flush=True)
            if rc != 0 or not out.exists():
                failed.append(name)
                figures.append(
                    Figure(
                        name,
                        "benchmark did not complete",
                        float("nan"),
                        "",
                        "exit 0",
                        False,
                        f"exit code {rc}",
                    )
                )
                continue
            figures += [Figure(**f) for f in json.loads(out.read_text())]
    load1 = os.getloadavg()

    print(
        f"\n=== summary ({'full' if args.full else 'moderate'} sizes, "
        f"{time.time() - t_all:.0f} s, {os.cpu_count()} CPUs, load average "
        f"{load0[0]:.1f} before / {load1[0]:.1f} after)\n"
    )
    print(table(figures, with_bench=True))
    judged = [f for f in figures if f.ok is not None]
    passed = sum(bool(f.ok) for f in judged)
    print(
        f"\n{passed} of {len(judged)} targets met"
        + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    if args.json:
        Path(args.json).write_text(json.dumps([f.__dict__ for f in figures], indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
