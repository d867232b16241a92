"""Fixtures of the tasker tests: a state dir whose jobs die with the test, a work dir."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from crq.tasker.statedir import StateDir

from tests.rigs import kill_jobs


@pytest.fixture
def state(tmp_path: Path) -> Iterator[StateDir]:
    s = StateDir(tmp_path / "state")
    yield s
    kill_jobs(s.root)  # a failed test leaves its jobs running


@pytest.fixture
def work(tmp_path: Path) -> Path:
    d = tmp_path / "work"
    d.mkdir()
    return d
