"""The Snakemake workflow the tests and bench/snakemake.py run: one ``start`` job fans out to
``width`` ``mid`` jobs, each followed by a ``leaf``, gathered by one ``gather`` job (2*width + 2
jobs). Every job writes its output and appends one line to ``runs/<rule>.txt``, so a job that
ran twice shows as a repeated line. ``gather`` is ``run:`` code, so the plugin runs it through
a snakemake process; the others are plain shell rules, run directly."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

SNAKEFILE = """\
N = range({width})
SLEEP = {sleep}

rule all:
    input: "out/gather.txt"

rule start:
    output: "out/start.txt"
    shell: "sleep {{SLEEP}}; echo start >> runs/start.txt; echo ok > {{output}}"

rule mid:
    input: "out/start.txt"
    output: "out/mid/{{i}}.txt"
    threads: 1
    resources: {resources}
    shell: "sleep {{SLEEP}}; echo mid {{wildcards.i}} >> runs/mid.txt; echo ok > {{output}}"

rule leaf:
    input: "out/mid/{{i}}.txt"
    output: "out/leaf/{{i}}.txt"
    shell: "sleep {{SLEEP}}; echo leaf {{wildcards.i}} >> runs/leaf.txt; echo ok > {{output}}"

# run: code needs a snakemake process of its own (the plugin's wrapper path)
rule gather:
    input: expand("out/leaf/{{i}}.txt", i=N)
    output: "out/gather.txt"
    run:
        import time
        time.sleep(SLEEP)
        with open("runs/gather.txt", "a") as f:
            f.write("gather\\n")
        with open(output[0], "w") as f:
            f.writelines(open(i).read() for i in input)
"""


def write(work: Path, width: int, sleep: float, resources: str = "runtime=5") -> int:
    """The workflow in ``work`` (``resources``: the ``mid`` rule's); the number of jobs it
    runs (``all`` aside)."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "runs").mkdir(exist_ok=True)
    (work / "Snakefile").write_text(SNAKEFILE.format(width=width, sleep=sleep, resources=resources))
    return 2 * width + 2


def runs(work: Path) -> Counter[str]:
    """How often each job ran, by its runs line."""
    lines: Counter[str] = Counter()
    for f in sorted((work / "runs").glob("*.txt")):
        lines.update(line for line in f.read_text().splitlines() if line)
    return lines


def snakemake(work: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """``snakemake`` (the Python running this) in ``work``, in its own session; its output in
    ``work/snakemake.log``."""
    out = open(work / "snakemake.log", "ab")  # noqa: SIM115 - kept by the child
    with out:
        return subprocess.Popen(
            [sys.executable, "-m", "snakemake", "--snakefile", "Snakefile", *args],
            cwd=work, env=env or dict(os.environ), stdin=subprocess.DEVNULL,
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
