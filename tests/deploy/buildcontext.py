"""A container build's context as podman or docker would send it, without either.

The ignore file's patterns follow docker's rules (moby's patternmatcher), for the subset
that .containerignore uses, checked by ``patterns``: one pattern a line, ``#`` comments,
relative to the context's top (a leading ``/`` is dropped), ``*`` within one path segment,
``**`` as a whole segment for any number of segments; a pattern that matches a folder
excludes all under it. No ``!`` exceptions, ``?``, ``[…]`` or backslashes.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
from fnmatch import fnmatchcase
from pathlib import Path


def patterns(ignore_file: Path) -> list[list[str]]:
    """The file's patterns, each split into its segments."""
    found = []
    for raw in ignore_file.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        assert not any(c in line for c in "!?[]\\"), f"syntax this filter does not do: {line}"
        clean = posixpath.normpath(line).lstrip("/")
        segments = clean.split("/")
        assert all(s == "**" or "**" not in s for s in segments), f"** inside a segment: {line}"
        found.append(segments)
    return found


def _match(pattern: list[str], parts: list[str]) -> bool:
    if not pattern:
        return not parts
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(_match(rest, parts[i:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatchcase(parts[0], head) and _match(rest, parts[1:])


def excluded(rel: str, pats: list[list[str]]) -> bool:
    """Whether the path (relative, with ``/``) or a folder above it is matched."""
    parts = rel.split("/")
    return any(_match(p, parts[:n]) for p in pats for n in range(1, len(parts) + 1))


def copy_context(top: Path, ignore_file: Path, into: Path) -> list[str]:
    """Copy what the build would see of ``top`` into ``into``; the relative files copied."""
    pats = patterns(ignore_file)
    copied = []
    for folder, dirs, files in os.walk(top):
        rel_dir = Path(folder).relative_to(top).as_posix()
        prefix = "" if rel_dir == "." else rel_dir + "/"
        dirs[:] = [d for d in dirs if not excluded(prefix + d, pats)]
        for name in files:
            rel = prefix + name
            if not excluded(rel, pats):
                (into / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(top / rel, into / rel)
                copied.append(rel)
    return copied


def instructions(containerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), comment lines dropped and ``\\`` continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in containerfile.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, args = line.partition(" ")
        out.append((word.upper(), args.strip()))
    return out


def exec_form(args: str) -> list[str]:
    """A JSON-array argument (CMD, ENTRYPOINT, HEALTHCHECK's CMD)."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value
