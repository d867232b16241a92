"""Snakemake job resources -> a crq job spec's ``resources`` and ``time_limit``: a pure
function, so the mapping is tested without a workflow."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

#: Snakemake's own resources that are no crq consumable: placement is by CORES and RAM, and
#: ``mem_mib``/``disk_mib`` are derived copies of ``mem_mb``/``disk_mb``.
NOT_CRQ = frozenset(
    {"_cores", "_nodes", "tmpdir", "runtime", "mem_mb", "mem_mib", "mem", "disk_mb", "disk_mib",
     "disk", "threads", "crq_resources"}
)  # fmt: skip
#: A crq resource name (server/resources.py): a word that may hold ``. : + -``.
CRQ_NAME = re.compile(r"[A-Za-z_][\w.:+-]*")


def crq_resources(threads: int, resources: Mapping[str, Any]) -> str:
    """``CORES/threads``, ``RAM/mem_mb``, ``NAME/N`` for every other integer resource, and a
    rule's ``crq_resources`` string verbatim (attributes such as ``linux``, licences)."""
    words = [f"CORES/{max(1, int(threads))}"]
    mem = resources.get("mem_mb")
    if isinstance(mem, int) and not isinstance(mem, bool) and mem > 0:
        words.append(f"RAM/{mem}")
    for name, value in resources.items():
        if name in NOT_CRQ or isinstance(value, bool) or not isinstance(value, int):
            continue
        if not CRQ_NAME.fullmatch(name):
            raise ValueError(f"resource {name!r}: not a crq resource name")
        if value > 0:
            words.append(f"{name}/{value}")
    extra = resources.get("crq_resources")
    if isinstance(extra, str) and extra.strip():
        words.append(extra.strip())
    return " ".join(words)


def time_limit(resources: Mapping[str, Any]) -> int | None:
    """Snakemake's ``runtime`` is in minutes; crq's ``time_limit`` in seconds."""
    runtime = resources.get("runtime")
    if isinstance(runtime, bool) or not isinstance(runtime, int | float) or runtime <= 0:
        return None
    return int(runtime * 60)
