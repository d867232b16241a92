"""Run every benchmark one after the other and print one table: figure, floor, ratio, target.

Moderate sizes by default (a few minutes on a 2-core machine); ``--full`` uses the sizes
the targets are stated for (1,000,000 jobs), still within about ten minutes (and six more
for the takeover runs, which fill 1,000,000 jobs once per election). Each benchmark runs
as its own process (``python bench/<name>.py … --json FILE``), its output shown as it
goes; each measures its own floors in the same run (``floors.py``). A planned bench whose
script is not there (yet) is reported as missing, not run.
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
from typing import Any

from benchlib import Figure, table

HERE = Path(__file__).resolve().parent

MODERATE: dict[str, list[str]] = {
    "submit": ["--seconds", "5"],
    "throughput": ["--jobs", "2000"],
    "latency": ["--samples", "200"],
    "memory": ["--jobs", "200000"],
    "recovery": ["--sizes", "10000,100000", "--snapshot-size", "100000", "--tasker-size", "100000"],
    "cli": [],
    "scale": [],
    "checkpoint": ["--jobs", "200000"],
    "bigbatch": ["--jobs", "100000", "--repeat", "2"],
    "takeover": ["--sizes", "10000,100000", "--submit-seconds", "3"],
    "auth": ["--seconds", "5"],
    "workflow": ["--elements", "1000000", "--e2e", "2000"],
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
    "cli": [],
    "scale": [],
    "checkpoint": ["--jobs", "1000000"],
    "bigbatch": ["--jobs", "100000", "--repeat", "3"],
    "takeover": ["--sizes", "10000,100000,1000000", "--submit-seconds", "5"],
    "auth": ["--seconds", "10"],
    "workflow": ["--elements", "1000000", "--e2e", "10000"],
}


def not_done(name: str, why: str, note: str) -> Figure:
    return Figure(name, why, float("nan"), "", "exit 0", False, note)


def run_one(name: str, args: list[str], tmp: Path) -> tuple[list[Figure], str]:
    """The bench's figures, and "" or why it has none ("missing", "exit N")."""
    script = HERE / f"{name}.py"
    if not script.exists():
        print(f"\n=== {name}: {script.name} is missing (not merged yet?): skipped", flush=True)
        note = f"no {script.name} (not merged yet?)"
        return [Figure(name, "benchmark missing", float("nan"), "", "", None, note)], "missing"
    out = tmp / f"{name}.json"
    cmd = [sys.executable, str(script), *args, "--json", str(out)]
    print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.time()
    rc = subprocess.call(cmd)
    print(f"=== {name}: exit {rc} after {time.time() - t0:.0f} s", flush=True)
    if rc != 0 or not out.exists():
        return [not_done(name, "benchmark did not complete", f"exit code {rc}")], f"exit {rc}"
    try:
        return [Figure.from_json(f) for f in json.loads(out.read_text())], ""
    except (ValueError, TypeError, KeyError) as e:
        return [not_done(name, "figures unreadable", str(e)[:80])], "bad json"


def load_text(load: tuple[float, float, float]) -> str:
    return " / ".join(f"{x:.2f}" for x in load)


def main() -> int:
    p = argparse.ArgumentParser(description="Run all crq benchmarks and compare with targets.")
    p.add_argument("--full", action="store_true", help="the 1,000,000-job sizes")
    p.add_argument("--only", help="comma-separated subset, e.g. submit,latency")
    p.add_argument("--json", metavar="FILE", help="also write the run (machine, figures) to FILE")
    args = p.parse_args()
    plan = FULL if args.full else MODERATE
    names = [n.strip() for n in args.only.split(",")] if args.only else list(plan)
    unknown = [n for n in names if n not in plan]
    if unknown:
        print(f"run_all: unknown benchmark(s): {', '.join(unknown)}", file=sys.stderr)
        return 2

    figures: list[Figure] = []
    problems: dict[str, str] = {}
    load0 = os.getloadavg()
    t_all = time.time()
    with tempfile.TemporaryDirectory(prefix="crq-bench-all-") as tmp:
        for name in names:
            got, why = run_one(name, plan[name], Path(tmp))
            figures += got
            if why:
                problems[name] = why
    load1 = os.getloadavg()
    took = time.time() - t_all
    sizes = "full" if args.full else "moderate"

    print(
        f"\n=== summary ({sizes} sizes, {took:.0f} s, {os.cpu_count()} CPUs; load average "
        f"1/5/15 min {load_text(load0)} before, {load_text(load1)} after)\n"
    )
    print(table(figures, with_bench=True))
    judged = [f for f in figures if f.ok is not None and f.bench not in problems]
    passed = sum(bool(f.ok) for f in judged)
    failed = [n for n, why in problems.items() if why != "missing"]
    missing = [n for n, why in problems.items() if why == "missing"]
    print(
        f"\n{passed} of {len(judged)} targets met"
        + (f"; failed: {', '.join(failed)}" if failed else "")
        + (f"; missing: {', '.join(missing)}" if missing else "")
    )
    if args.json:
        run: dict[str, Any] = {
            "sizes": sizes,
            "seconds": round(took, 1),
            "cpus": os.cpu_count(),
            "load_before": list(load0),
            "load_after": list(load1),
            "plan": {n: plan[n] for n in names},
            "problems": problems,
            "figures": [f.as_json() for f in figures],
        }
        Path(args.json).write_text(json.dumps(run, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
