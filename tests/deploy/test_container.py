"""deploy/Containerfile without a container daemon: its build context as the ignore file
filters it has no .git and still builds the wheel with every package; its COPY and RUN lines
name what is in that context; EXPOSE, ENTRYPOINT and HEALTHCHECK agree on the port, and the
health check's own command tells a live server from none."""

from __future__ import annotations

import shlex
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy import buildcontext
from tests.rigs import PATIENCE, ROOT, CrqServer, free_port, server_available

CONTAINERFILE = ROOT / "deploy" / "Containerfile"
IGNORE = ROOT / ".containerignore"
PORT = "6321"


def test_both_ignore_files_are_the_same() -> None:
    assert (ROOT / ".dockerignore").read_text() == IGNORE.read_text()


@pytest.mark.parametrize(
    ("path", "out"),
    [
        (".git/HEAD", True),
        ("tests/rigs.py", True),
        ("server/__pycache__/app.cpython-311.pyc", True),
        ("crq.egg-info/PKG-INFO", True),
        ("server/static/app.js", False),
        ("README.md", False),
        ("deploy/Containerfile", False),
        ("client/egg.egg-info", False),  # docker's *.egg-info is the context's top only
        ("q.swd/trace.db/clean", True),
        ("a/b/q.swd/x", True),
    ],
)
def test_the_filter_follows_dockers_rules(path: str, out: bool) -> None:
    assert buildcontext.excluded(path, buildcontext.patterns(IGNORE)) is out


@pytest.fixture(scope="module")
def context(tmp_path_factory: pytest.TempPathFactory) -> Path:
    into = tmp_path_factory.mktemp("context")
    buildcontext.copy_context(ROOT, IGNORE, into)
    return into


def copies(context: Path) -> dict[str, Path]:
    """Each COPY's destination in the image -> what it holds, from the context."""
    found = {}
    for word, args in buildcontext.instructions(CONTAINERFILE):
        if word in ("COPY", "ADD"):
            assert word == "COPY" and not args.startswith("--"), f"not checked: {word} {args}"
            *sources, dest = shlex.split(args)
            assert sources == ["."], f"only COPY . DEST is checked here: {args}"
            found[dest.rstrip("/")] = context
    return found


def test_the_context_has_no_git_and_the_lines_name_what_it_has(context: Path) -> None:
    assert not (context / ".git").exists() and not (context / "tests").exists()
    mapped = copies(context)
    assert mapped, "the Containerfile copies nothing"
    named = 0
    for word, args in buildcontext.instructions(CONTAINERFILE):
        if word != "RUN":
            continue
        for token in shlex.split(args):
            for dest, source in mapped.items():
                if token == dest or token.startswith(dest + "/"):
                    inside = source / token[len(dest) :].lstrip("/")
                    assert inside.exists(), f"RUN names {token}: not in the build context"
                    named += 1
    assert named, "no RUN line uses what COPY put in the image"
    src = mapped["/src"]
    assert (src / "pyproject.toml").is_file() and (src / "README.md").is_file()


def test_the_filtered_context_builds_a_wheel_with_every_package(
    context: Path, tmp_path: Path
) -> None:
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "-q", "-w", str(tmp_path / "wheels"), str(context)],
        capture_output=True, text=True, timeout=PATIENCE, cwd=tmp_path,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "wheels").glob("crq-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    homes = {"crq": "crq", "server": "crq/server", "tasker": "crq/tasker",
             "client": "crq/client", "server/http": "crq/server/http"}  # fmt: skip
    for folder, package in homes.items():
        for module in (ROOT / folder).glob("*.py"):
            assert f"{package}/{module.name}" in names, f"{package}/{module.name} not shipped"
    for static in (ROOT / "server" / "static").iterdir():
        assert f"crq/server/static/{static.name}" in names, f"static {static.name} not shipped"
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
    for command in ("ncmgr", "vovtasker", "crq"):
        assert f"{command} = crq." in scripts


def test_expose_entrypoint_and_healthcheck_agree_on_the_port() -> None:
    lines = dict(buildcontext.instructions(CONTAINERFILE))
    assert lines["EXPOSE"] == PORT
    entry = buildcontext.exec_form(lines["ENTRYPOINT"])
    assert entry[:3] == ["ncmgr", "start", "--foreground"]
    assert entry[entry.index("--port") + 1] == PORT and "0.0.0.0" in entry
    assert f"127.0.0.1:{PORT}/healthz" in lines["HEALTHCHECK"]


def health_command(port: int) -> list[str]:
    """HEALTHCHECK's CMD, its python the one running here, pointed at ``port``."""
    args = dict(buildcontext.instructions(CONTAINERFILE))["HEALTHCHECK"]
    options, _, command = args.partition("CMD ")
    assert all(o.startswith("--") for o in options.split()), options
    argv = buildcontext.exec_form(command)
    assert argv[0] == "python", "the image's python, no curl"
    return [sys.executable, *(a.replace(f":{PORT}/", f":{port}/") for a in argv[1:])]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CrqServer]:
    if not server_available():
        pytest.skip("server not written yet")
    s = CrqServer(tmp_path_factory.mktemp("health") / "q.swd")
    s.start()
    yield s
    s.kill9()


def test_the_healthcheck_tells_a_live_server_from_none(server: CrqServer) -> None:
    live = subprocess.run(health_command(server.port), capture_output=True, timeout=PATIENCE)
    assert live.returncode == 0, live.stderr
    dead = subprocess.run(health_command(free_port()), capture_output=True, timeout=PATIENCE)
    assert dead.returncode == 1  # docker: 1 is unhealthy (2 is reserved)
