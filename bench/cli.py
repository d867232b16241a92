"""``crq submit -- true`` as a process: its wall time next to Python's own start-up.

A real server runs on loopback; each sample is one ``crq submit -- true`` from spawn to
exit (argument parsing, imports, the registry, one durable submit, the printed id). The
floor, measured in the same run and interleaved with the samples so both see the same
load: ``python -c pass`` (the interpreter with site, as the ``crq`` script starts it) and
``python -S -c pass`` (without site). The package is byte-compiled first, so an
environment with ``PYTHONDONTWRITEBYTECODE`` does not make every run compile the sources.
"""

from __future__ import annotations

import compileall
import importlib.util
import os
import shutil
import subprocess
import time
from pathlib import Path

from benchlib import (
    PY,
    Server,
    at_most,
    info,
    log,
    ms,
    parser,
    pct,
    report,
    running,
    workdir,
)

BENCH = "cli"
TARGET_MS = 60.0


def crq_command() -> list[str]:
    """The ``crq`` console script beside this interpreter, else ``python -m``."""
    script = Path(PY).with_name("crq")
    if script.exists():
        return [str(script)]
    found = shutil.which("crq")
    return [found] if found else [PY, "-m", "crq.client.cli"]


def compile_package() -> None:
    """Byte-compile every part of the installed crq (each may live in its own folder)."""
    for name in ("crq", "crq.client", "crq.tasker", "crq.server"):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            for folder in spec.submodule_search_locations:
                compileall.compile_dir(folder, quiet=1)


def wall(cmd: list[str], env: dict[str, str]) -> float:
    """Seconds from spawn to exit; a failed run is an error, not a sample."""
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True)
    took = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{cmd} exited {done.returncode}: {done.stderr.decode()[-500:]}")
    return took


def main() -> None:
    p = parser("Wall time of `crq submit -- true` as a process, against Python's start-up.")
    p.add_argument("--runs", type=int, default=40, help="samples of each command")
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args()

    compile_package()
    tmp = workdir(args.keep)
    srv = Server(tmp / "swd")
    crq = [*crq_command(), "submit", "--", "true"]
    kinds = {
        "crq submit": crq,
        "python start": [PY, "-c", "pass"],
        "python -S start": [PY, "-S", "-c", "pass"],
        "import crq.client.cli": [PY, "-c", "import crq.client.cli"],
    }
    times: dict[str, list[float]] = {k: [] for k in kinds}
    with running(srv):
        srv.start()
        srv.wait_normal()
        env = {k: v for k, v in os.environ.items() if not k.startswith("CRQ_")}
        env.update(CRQ_SERVER=srv.url, CRQ_TOKEN=srv.token, CRQ_HOME=str(tmp / "home"))
        log(f"{args.runs} runs each of: {' | '.join(' '.join(c) for c in kinds.values())}")
        for i in range(args.warmup + args.runs):
            for kind, cmd in kinds.items():  # interleaved: every kind sees the same load
                took = wall(cmd, env)
                if i >= args.warmup:
                    times[kind].append(took)
        srv.stop()
    load = os.getloadavg()[0]
    med = {k: ms(pct(v, 50)) for k, v in times.items()}
    p90 = ms(pct(times["crq submit"], 90))
    floor = med["python start"]
    ratio = med["crq submit"] / floor
    log(
        f"crq submit wall {med['crq submit']:.0f} ms (p90 {p90:.0f} ms), python start "
        f"{floor:.0f} ms (-S {med['python -S start']:.0f} ms), ratio {ratio:.1f}x; "
        f"import crq.client.cli {med['import crq.client.cli']:.0f} ms; load {load:.1f}"
    )
    note = f"{args.runs} runs, floor python -c pass {floor:.1f} ms, load {load:.1f}"
    figures = [
        at_most(BENCH, "crq submit -- true wall p50", med["crq submit"], "ms", TARGET_MS, note),
        info(BENCH, "crq submit -- true wall p90", p90, "ms", note),
        info(BENCH, "python -c pass (floor)", floor, "ms"),
        info(BENCH, "python -S -c pass", med["python -S start"], "ms"),
        info(BENCH, "crq submit / python start", ratio, "x", "wall p50 over the floor"),
        info(BENCH, "python -c 'import crq.client.cli'", med["import crq.client.cli"], "ms"),
    ]
    report(figures, args.json)


if __name__ == "__main__":
    main()
