"""The distribution claims one import name, ``crq``, and ships every package of the tree.

``pip install crq`` next to any other ``server``, ``client`` or ``tasker`` package must break
neither: the top-level folders install as ``crq.server``, ``crq.tasker``, ``crq.client``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _setuptools() -> dict[str, object]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return dict(data["tool"]["setuptools"])


def test_one_top_level_name() -> None:
    tool = _setuptools()
    packages = tool["packages"]
    assert isinstance(packages, list)
    assert {p.split(".")[0] for p in packages} == {"crq"}
    assert tool["package-dir"] == {
        "crq": "crq",
        "crq.server": "server",
        "crq.tasker": "tasker",
        "crq.client": "client",
    }


def test_every_package_folder_is_shipped() -> None:
    """A subpackage missing from the list installs without its modules (as server/http
    once did): every folder with an ``__init__.py`` must be named."""
    tool = _setuptools()
    homes = {"crq": "crq", "server": "crq.server", "tasker": "crq.tasker", "client": "crq.client"}
    found = set()
    for top, name in homes.items():
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top).parts
            found.add(".".join((name, *rel)))
    assert found == set(tool["packages"])  # type: ignore[arg-type]


def test_entry_points_are_in_crq() -> None:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert all(v.startswith("crq.") for v in data["project"]["scripts"].values())
