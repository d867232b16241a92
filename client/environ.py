"""The environment a submit exports (``crq submit --env``, ``Client.submit(export_env=…)``)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

#: Never copied into a job's environment: the job would carry the submitter's admin token.
PRIVATE_ENV = frozenset({"CRQ_TOKEN", "CRQ_TASKER_TOKEN"})


def job_env(
    mode: str,
    assignments: Iterable[tuple[str, str]],
    cwd: str,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment to export: ``all`` (minus tokens), ``none``, or the listed variables
    (``VAR,VAR``); the assignments win. With ``all`` PWD follows the job's directory."""
    source = dict(os.environ if base is None else base)
    if mode == "all":
        env = {k: v for k, v in source.items() if k not in PRIVATE_ENV}
        if "PWD" in env:
            env["PWD"] = cwd
        env.pop("OLDPWD", None)
    elif mode == "none":
        env = {}
    else:
        env = {k: source[k] for k in mode.split(",") if k.strip() and k in source}
    env.update(dict(assignments))
    return env
