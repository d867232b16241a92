"""Accelerator-style resource strings: ``CORES/2 RAM/4000 License:vcs linux``.

A word ``NAME/N`` asks for N units of a consumable; a bare ``NAME`` asks for an attribute
the tasker must have. Names with a colon (``License:vcs``) are global counted resources
whose totals come from config.toml; a bare global name asks for one unit.
Jobs ask for ``CORES/1`` unless they say otherwise.
"""

from __future__ import annotations

import re

_WORD = re.compile(r"^([A-Za-z_][\w.:+-]*)(?:/(\d{1,12}))?$")
MAX_TEXT = 1000


class ResourceError(ValueError):
    pass


class Need:
    """What one job needs; interned per text and owner, so a million alike jobs share one.

    ``resources`` is the canonical resource text (what a user sees and the journal keeps);
    ``text`` is the key the queue's buckets and the scheduler's indexes go by: the resources
    and the owner, since a tasker not running as root runs only its own user's jobs
    (SPEC section 9), so two users' alike jobs are not interchangeable."""

    __slots__ = ("text", "resources", "user", "local", "attributes", "globals")

    def __init__(
        self,
        text: str,
        local: tuple[tuple[str, int], ...],
        attributes: frozenset[str],
        globals_: tuple[tuple[str, int], ...],
        user: str = "",
    ) -> None:
        self.resources = text
        self.user = user
        self.text = f"{text} @{user}" if user else text  # "@" is in no resource word
        self.local = local
        self.attributes = attributes
        self.globals = globals_

    def of(self, user: str) -> Need:
        return Need(self.resources, self.local, self.attributes, self.globals, user)


def _words(text: str) -> list[tuple[str, int | None]]:
    if len(text) > MAX_TEXT:
        raise ResourceError(f"resource string longer than {MAX_TEXT} characters")
    out = []
    for word in text.split():
        m = _WORD.match(word)
        if not m:
            raise ResourceError(
                f"bad resource word {word!r} (expected NAME, NAME/N or Kind:NAME, N < 10^12)"
            )
        out.append((m.group(1), int(m.group(2)) if m.group(2) is not None else None))
    return out


def parse_need(text: str) -> Need:
    local: dict[str, int] = {}
    attributes: set[str] = set()
    globals_: dict[str, int] = {}
    for name, amount in _words(text):
        if ":" in name:
            globals_[name] = globals_.get(name, 0) + (1 if amount is None else amount)
        elif amount is None:
            attributes.add(name)
        else:
            local[name] = local.get(name, 0) + amount
    local.setdefault("CORES", 1)
    canonical = " ".join(
        [f"{k}/{v}" for k, v in sorted(local.items())]
        + [f"{k}/{v}" for k, v in sorted(globals_.items())]
        + sorted(attributes)
    )
    return Need(
        canonical,
        tuple(sorted((k, v) for k, v in local.items() if v)),
        frozenset(attributes),
        tuple(sorted((k, v) for k, v in globals_.items() if v)),
    )


def parse_capacity(text: str, slots: int) -> tuple[dict[str, int], frozenset[str]]:
    """A tasker's offer: consumables (CORES defaults to its slots) and attributes."""
    local: dict[str, int] = {}
    attributes: set[str] = set()
    for name, amount in _words(text):
        if amount is None:
            attributes.add(name)
        else:
            local[name] = amount
    local.setdefault("CORES", slots)
    return local, frozenset(attributes)


class NeedCache:
    """Interns parsed needs by their text, and by owner."""

    def __init__(self) -> None:
        self._by_text: dict[str, Need] = {}
        self._by_owner: dict[str, dict[str, Need]] = {}

    def get(self, text: str, user: str = "") -> Need:
        """The need of resource text ``text``, of ``user``'s jobs ("" for the resources
        alone, as a submit checks them)."""
        if user:
            mine = self._by_owner.get(user)
            if mine is None:
                mine = self._by_owner[user] = {}
            need = mine.get(text)
            if need is None:
                base = self.get(text)
                need = mine.get(base.resources)
                if need is None:
                    need = mine[base.resources] = base.of(user)
                mine[text] = need
            return need
        need = self._by_text.get(text)
        if need is None:
            need = parse_need(text)
            canonical = self._by_text.get(need.text)
            if canonical is not None:
                need = canonical
            else:
                self._by_text[need.text] = need
            self._by_text[text] = need
        return need
