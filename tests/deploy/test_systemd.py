"""``ncmgr systemd`` and deploy/systemd/: the units name this install's commands, are clean
for ``systemd-analyze verify``, and what their ExecStart= lines run really works (the server
unit's command starts a queue, the tasker unit's serves it from its environment file alone).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sysconfig
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from crq.client import systemd

from crq import wire
from tests.conftest import MARK
from tests.deploy import unitexec
from tests.rigs import PATIENCE, ROOT, free_port, kill_jobs, wait_until

SHIPPED = ROOT / "deploy" / "systemd"
BIN = Path(sysconfig.get_path("scripts"))
ANALYZE = Path("/usr/bin/systemd-analyze")

installed = pytest.mark.skipif(
    not all(os.access(BIN / c, os.X_OK) for c in systemd.COMMANDS),
    reason=f"crq is not pip-installed here (no ncmgr and vovtasker in {BIN})",
)


def ncmgr(*args: str) -> subprocess.CompletedProcess[str]:
    """The installed console script, as a site runs it."""
    return subprocess.run(
        [str(BIN / "ncmgr"), "systemd", *args], capture_output=True, text=True, timeout=PATIENCE
    )


def test_shipped_units_are_what_ncmgr_writes_by_default() -> None:
    for name, text in systemd.render().items():
        assert (SHIPPED / name).read_text() == text, f"deploy/systemd/{name} is out of date"
    assert sorted(p.name for p in SHIPPED.iterdir()) == sorted(systemd.render())


@installed
def test_ncmgr_systemd_writes_this_installs_paths(tmp_path: Path) -> None:
    data, etc, units = tmp_path / "data", tmp_path / "etc", tmp_path / "units"
    done = ncmgr("--dir", str(units), "--data", str(data), "--env-dir", str(etc))
    assert done.returncode == 0, done.stderr
    for name in systemd.render():
        assert f"wrote {units / name}" in done.stdout
        text = (units / name).read_text()
        assert f"{BIN}/" in text and "/usr/local/bin" not in text.replace(str(BIN), "")
        # the shipped file apart from the paths
        default = (
            text.replace(str(BIN), str(systemd.DEFAULT_BIN))
            .replace(str(data), str(systemd.DEFAULT_DATA))
            .replace(str(etc), str(systemd.DEFAULT_ENV_DIR))
        )
        assert default == (SHIPPED / name).read_text()
    assert "systemctl daemon-reload" in done.stdout
    assert "systemctl enable --now crq-server@vnc" in done.stdout
    assert "systemctl enable --now crq-tasker@vnc" in done.stdout
    assert done.stderr == ""


@installed
@pytest.mark.parametrize(
    ("args", "status", "says"),
    [
        (["--user", "a b"], 2, "bad --user 'a b'"),
        (["--group", "Root;x"], 2, "bad --group"),
        (["--bin", "/nonexistent"], 2, "no executable /nonexistent/ncmgr"),
        (["--data", "relative/dir"], 2, "--data 'relative/dir' is not an absolute path"),
        (["--data", "/srv/my crq"], 2, "--data '/srv/my crq' cannot go in a unit"),
        (["--host", "0.0.0.0 --x"], 2, "bad --host"),
    ],
)
def test_bad_input_is_one_line(args: list[str], status: int, says: str, tmp_path: Path) -> None:
    done = ncmgr("--dir", str(tmp_path / "u"), *args)
    assert done.returncode == status
    assert says in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert not (tmp_path / "u").exists()


@installed
def test_an_unwritable_dir_is_a_failure(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    done = ncmgr("--dir", str(blocker / "units"))
    assert done.returncode == 1
    assert "cannot write the units in" in done.stderr and done.stderr.count("\n") == 1


@installed
@pytest.mark.skipif(not ANALYZE.exists(), reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    data, etc, units = tmp_path / "data", tmp_path / "etc", tmp_path / "units"
    data.mkdir()
    etc.mkdir()
    (etc / "tasker-vnc.env").write_text("CRQ_SERVER=http://127.0.0.1:6259\n")
    done = ncmgr("--dir", str(units), "--data", str(data), "--env-dir", str(etc))
    assert done.returncode == 0, done.stderr
    instances = []
    for name in systemd.render():  # verify wants instances of the templates
        instance = units / name.replace("@.", "@vnc.")
        shutil.copy(units / name, instance)
        instances.append(str(instance))
    checked = subprocess.run(
        [str(ANALYZE), "verify", *instances], capture_output=True, text=True, timeout=PATIENCE
    )
    assert (checked.returncode, checked.stdout, checked.stderr) == (0, "", "")
    # it does look at the commands: a unit naming a missing one is not clean
    broken = units / "crq-server@bad.service"
    broken.write_text(Path(instances[0]).read_text().replace(f"{BIN}/ncmgr", "/nonexistent/x"))
    checked = subprocess.run(
        [str(ANALYZE), "verify", str(broken)], capture_output=True, text=True, timeout=PATIENCE
    )
    assert checked.returncode != 0 and "/nonexistent/x" in checked.stderr


# -- the ExecStart= lines, run -------------------------------------------------------------


class Site:
    """One host's install as the units describe it, in a temp dir; kills what it started."""

    def __init__(self, root: Path) -> None:
        self.data, self.etc = root / "data", root / "etc"
        self.data.mkdir()
        self.etc.mkdir()
        units = systemd.render(BIN, data=self.data, env_dir=self.etc, host="127.0.0.1")
        self.server_unit = unitexec.parse(units[systemd.SERVER_UNIT])
        self.tasker_unit = unitexec.parse(units[systemd.TASKER_UNIT])
        self.queue = self._queue()
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs = root

    def _queue(self) -> str:
        """A queue name whose home port (the server unit gives no --port) is free now."""
        for _ in range(100):
            name = f"dep{uuid.uuid4().hex[:6]}"
            if _port_free(wire.default_port(name)):
                return name
        raise AssertionError("no queue with a free home port")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{wire.default_port(self.queue)}"

    @property
    def swd(self) -> wire.Swd:
        return wire.Swd(self.data / f"{self.queue}.swd")

    def start(self, service: unitexec.Service, what: str) -> subprocess.Popen[bytes]:
        env = unitexec.environment(service, self.queue)
        env[MARK] = os.environ[MARK]  # the suite's leak check follows what this starts
        out = open(self.logs / f"{what}.out", "ab")  # noqa: SIM115 - kept by the child
        with out:
            proc = subprocess.Popen(
                unitexec.argv(service, self.queue, env),
                cwd=service.one("WorkingDirectory") if service.all("WorkingDirectory") else "/",
                env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
            )  # fmt: skip
        self.procs.append(proc)
        return proc

    def log(self, what: str) -> str:
        f = self.logs / f"{what}.out"
        return f.read_text(errors="replace") if f.exists() else ""

    def api(self, method: str, path: str, **kw: object) -> object:
        import httpx

        token = self.swd.admin_token.read_text().strip()
        r = httpx.request(
            method, f"{self.url}/api/v1{path}", headers={"Authorization": f"Bearer {token}"},
            timeout=30, **kw,  # type: ignore[arg-type]
        )  # fmt: skip
        assert r.status_code < 400, f"{method} {path}: {r.status_code} {r.text}"
        return r.json()

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        kill_jobs(self.data / "taskers" / self.queue)


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _healthy(url: str) -> bool:
    import httpx

    try:
        r = httpx.get(f"{url}/readyz", timeout=5.0)
    except httpx.HTTPError:
        return False
    return r.status_code == 200


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    s = Site(tmp_path)
    yield s
    s.close()


@installed
def test_the_units_commands_run_a_queue_and_a_tasker(site: Site, tmp_path: Path) -> None:
    """The server unit's command line serves the queue; the tasker unit's takes its servers
    (a dead candidate first: a failover queue's comma-separated list), token and arguments
    from the environment file only; SIGTERM of the server is the clean stop the comment says."""
    server = site.start(site.server_unit, "server")
    wait_until(lambda: server.poll() is not None or _healthy(site.url))
    assert server.poll() is None, site.log("server")
    token = site.swd.tasker_token.read_text().strip()
    dead = f"http://127.0.0.1:{free_port()}"
    (site.etc / f"tasker-{site.queue}.env").write_text(
        f"CRQ_SERVER={dead},{site.url}\n"
        f"CRQ_TASKER_TOKEN={token}\n"
        'CRQ_TASKER_ARGS=--name tk-unit --slots 3 --resources "RAM/64000 linux"\n'
    )
    tasker = site.start(site.tasker_unit, "tasker")

    def registered() -> dict[str, object] | None:
        assert tasker.poll() is None, site.log("tasker")
        found = site.api("GET", "/taskers")["taskers"]  # type: ignore[index]
        return next((t for t in found if t["name"] == "tk-unit"), None)

    t = wait_until(registered)
    assert t["slots"] == 3, t
    assert "linux" in str(t["resources"]) and "RAM" in str(t["resources"]), t
    work = tmp_path / "work"
    work.mkdir()
    env = {"PATH": unitexec.BASE_PATH}
    spec = {"command": ["sleep", "600"], "cwd": str(work), "env": env}
    (job,) = site.api("POST", "/jobs", json={"jobs": [spec]})["ids"]  # type: ignore[index]
    wait_until(lambda: site.api("GET", f"/jobs/{job}")["state"] == "running")  # type: ignore[index]

    server.send_signal(signal.SIGTERM)  # systemctl stop
    assert server.wait(timeout=PATIENCE) == 0, site.log("server")
    assert site.swd.clean_marker.exists()
    tasker.wait(timeout=PATIENCE)  # it kills the job and exits; its unit restarts it
    assert "shutting down without --freeze" in site.log("tasker")

    again = site.start(site.server_unit, "server")  # the next start: no crash recovery
    wait_until(lambda: again.poll() is not None or _healthy(site.url))
    j = site.api("GET", f"/jobs/{job}")
    assert j["state"] == "queued", j  # type: ignore[index]
