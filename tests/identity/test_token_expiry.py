"""Expired personal tokens leave the state a day after they expired (commands.prune_tokens)."""

from __future__ import annotations

from crq.server import commands

from tests.core import Core


def test_expired_tokens_are_dropped_a_day_after_their_expiry() -> None:
    core = Core()
    now = core.tick()
    for expires in (now + 10, now + 100_000, None):
        events, _ = commands.issue_token(core.state, "alice", None, expires, "", "admin", now)
        core.emit(events)
    assert commands.prune_tokens(core.state, now + 20) == []  # expired, still listed a day
    later = now + 10 + commands.TOKEN_KEEP + 1
    events = commands.prune_tokens(core.state, later)
    assert [ev["by"] for ev in events] == ["expiry"]  # type: ignore[typeddict-item]
    core.emit(events)
    assert sorted(t.expires or 0 for t in core.state.tokens.values()) == [0, now + 100_000]
