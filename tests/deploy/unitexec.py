"""Start a unit's ExecStart= the way systemd would, for the few forms our units use.

No systemd runs as PID 1 here, so the tests read the unit themselves: ``Environment=``,
``EnvironmentFile=`` (unquoted values: kept verbatim, quotes included, as systemd.exec(5)
says), ``WorkingDirectory=`` and ``ExecStart=`` with ``%i``, ``${VAR}`` (one word, whitespace
kept) and ``$VAR`` (split into words, quotes respected and removed: systemd.service(5)).
Anything else in an ExecStart= fails the test instead of being guessed at.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

# what systemd gives a system service before the unit's own settings
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_BRACED = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_WORD_VAR = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")


@dataclass
class Service:
    """A unit's [Service] settings that decide what runs."""

    settings: dict[str, list[str]] = field(default_factory=dict)

    def one(self, key: str) -> str:
        values = self.settings.get(key, [])
        assert len(values) == 1, f"{key}= given {len(values)} times"
        return values[0]

    def all(self, key: str) -> list[str]:
        return self.settings.get(key, [])


def parse(text: str) -> Service:
    """The [Service] section's assignments (no line continuations in our units)."""
    service, section = Service(), ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        assert not line.endswith("\\"), f"line continuation not handled: {line}"
        key, _, value = line.partition("=")
        if section == "[Service]":
            service.settings.setdefault(key.strip(), []).append(value.strip())
    return service


def read_env_file(path: Path) -> dict[str, str]:
    """An EnvironmentFile= of plain ``KEY=value`` lines (no quoted values, no backslashes)."""
    env = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")) or "=" not in line:
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        assert not value.startswith(("'", '"')) and "\\" not in value, f"not handled: {line}"
        env[key.strip()] = value
    return env


def environment(service: Service, instance: str) -> dict[str, str]:
    """The process environment: systemd's PATH, Environment=, then EnvironmentFile=."""
    env = {"PATH": BASE_PATH}
    for assignment in service.all("Environment"):
        for word in shlex.split(assignment):
            key, _, value = word.partition("=")
            env[key] = value.replace("%i", instance)
    for name in service.all("EnvironmentFile"):
        optional = name.startswith("-")
        path = Path(name.lstrip("-").replace("%i", instance))
        if optional and not path.exists():
            continue
        env.update(read_env_file(path))
    return env


def argv(service: Service, instance: str, env: dict[str, str]) -> list[str]:
    """ExecStart= as the argument vector systemd would exec."""
    line = service.one("ExecStart").replace("%i", instance)
    assert "%" not in line, f"a specifier other than %i: {line}"
    words: list[str] = []
    for word in line.split():
        assert not any(q in word for q in "\"'\\"), f"quoting not handled: {word}"
        if _WORD_VAR.fullmatch(word):
            words += shlex.split(env.get(word[1:], ""))
            continue
        expanded = _BRACED.sub(lambda m: env.get(m.group(1), ""), word)
        assert "$" not in expanded, f"an expansion not handled: {word}"
        words.append(expanded)
    assert words and Path(words[0]).is_absolute(), f"not an absolute command: {line}"
    return words
