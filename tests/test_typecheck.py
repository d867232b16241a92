"""mypy --strict over the package as it installs (``.ci/typecheck``): part of the suite, so
the one test command also keeps the types honest."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_mypy_strict_is_clean() -> None:
    pytest.importorskip("mypy")
    out = subprocess.run(
        ["bash", str(ROOT / ".ci" / "typecheck")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
