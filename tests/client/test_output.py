"""A job's output (``crq log``, ``GET /api/v1/jobs/{id}/log``) and the script-facing commands
(``crq status``, ``crq list --format/--json``, ``crq stop`` of ended jobs, bulk stop), with a
real server, a real tasker and the CLI as subprocesses.

The tasker path of the log is tested for real: a tasker in a mount namespace of its own
with a private tmpfs over the jobs' directory writes logs the server's process cannot see
(as on a host without a shared filesystem), so the server must ask the tasker for them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.rigs import CrqServer, Tasker, env_with_root, wait_until

CMD_TIMEOUT = 240.0


def cli(
    srv: CrqServer,
    *args: str,
    cwd: Path | None = None,
    stdin: str | None = None,
    timeout: float = CMD_TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    env = env_with_root()
    env.pop("CRQ_SERVER", None)
    env.update(CRQ_TOKEN=srv.admin_token, CRQ_HOME=str(srv.swd.parent / "home"))
    return subprocess.run(
        [sys.executable, "-m", "crq.client.cli", "--server", srv.url, *args],
        env=env,
        cwd=cwd or srv.swd.parent,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def submit(srv: CrqServer, cwd: Path, command: str, **extra: Any) -> int:
    [job] = srv.submit(
        {"command": command, "cwd": str(cwd), "env": {"PATH": "/usr/bin:/bin"}, **extra}
    )
    return job


@pytest.fixture
def rig(crq_server: Callable[..., CrqServer], crq_tasker: Callable[..., Tasker]) -> CrqServer:
    srv = crq_server("--heartbeat", "2")
    crq_tasker("tk1", "--swd", str(srv.swd), "--slots", "4")
    return srv


# -- crq log ------------------------------------------------------------------------------


def test_log_is_read_in_chunks_with_the_headers_a_follower_needs(
    rig: CrqServer, tmp_path: Path
) -> None:
    job = submit(rig, tmp_path, "printf 'hello\\nworld\\n'")
    assert rig.wait(job)["state"] == "done"
    r = rig.api("GET", f"/jobs/{job}/log", params={"offset": 3, "max": 4})
    assert r.status_code == 200, r.text
    assert r.content == b"lo\nw"
    h = r.headers
    assert (h["x-crq-log-offset"], h["x-crq-log-size"]) == ("7", "12")
    assert (h["x-crq-job-state"], h["x-crq-job-ended"]) == ("done", "1")
    assert (h["x-crq-log-source"], h["x-crq-log-missing"]) == ("server", "0")
    assert h["content-type"] == "application/octet-stream"
    r = rig.api("GET", f"/jobs/{job}/log", params={"offset": 12})
    assert r.content == b"" and r.headers["x-crq-log-offset"] == "12"
    out = cli(rig, "log", str(job))
    assert (out.returncode, out.stdout, out.stderr) == (0, "hello\nworld\n", "")
    # bad input: a clear refusal, nothing else
    assert rig.api("GET", f"/jobs/{job}/log", params={"offset": -1}).status_code == 422
    assert rig.api("GET", f"/jobs/{job}/log", params={"max": 0}).status_code == 422
    r = rig.api("GET", "/jobs/999/log")
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    out = cli(rig, "log", "999")
    assert (out.returncode, out.stderr) == (1, "crq: no job 999\n")


def test_log_follow_prints_until_the_job_ends(rig: CrqServer, tmp_path: Path) -> None:
    job = submit(rig, tmp_path, "for i in 1 2 3 4; do echo line$i; sleep 0.4; done")
    out = cli(rig, "log", "-f", str(job))
    assert out.returncode == 0, out.stderr
    assert out.stdout == "line1\nline2\nline3\nline4\n"
    assert rig.request("GET", f"/jobs/{job}")["state"] == "done"


def test_log_of_a_job_that_never_ran(rig: CrqServer, tmp_path: Path) -> None:
    [job] = rig.submit({"command": "true", "cwd": str(tmp_path), "resources": "nosuchthing"})
    r = rig.api("GET", f"/jobs/{job}/log")
    assert r.status_code == 200 and r.content == b""
    assert (r.headers["x-crq-log-missing"], r.headers["x-crq-job-ended"]) == ("1", "0")
    out = cli(rig, "log", str(job))
    assert out.returncode == 1
    assert out.stderr == f"crq: job {job} is queued: no log yet ({tmp_path}/crq.{job}.log)\n"
    assert cli(rig, "stop", str(job)).returncode == 0
    out = cli(rig, "log", "-f", str(job))
    assert out.returncode == 1 and out.stderr.startswith(f"crq: job {job} stopped: no log")


def _namespaced_tasker(crq_tasker: Callable[..., Tasker], srv: CrqServer, hidden: Path) -> Tasker:
    """A tasker whose ``hidden`` directory is a tmpfs of its own mount namespace: what its
    jobs write there, the server's process cannot see."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("a private mount namespace needs root and unshare")
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare --mount refused here: {probe.stderr.decode().strip()}")
    hidden.mkdir()
    t = crq_tasker("tkns", "--swd", str(srv.swd), "--slots", "2", start=False)
    mount = 'mount -t tmpfs crqlogs "$0" && exec "$@"'
    t.argv = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        mount,
        str(hidden),
        *t.argv,
    ]
    t.start()
    return t


def test_a_log_the_server_cannot_see_comes_from_the_tasker(
    crq_server: Callable[..., CrqServer], crq_tasker: Callable[..., Tasker], tmp_path: Path
) -> None:
    srv = crq_server("--heartbeat", "2", "--log-timeout", "3")
    hidden = tmp_path / "hidden"
    tasker = _namespaced_tasker(crq_tasker, srv, hidden)
    job = submit(srv, hidden, "echo from-the-tasker; sleep 1; echo second")
    out = cli(srv, "log", "-f", str(job))
    assert out.returncode == 0, out.stderr
    assert out.stdout == "from-the-tasker\nsecond\n"
    assert not (hidden / f"crq.{job}.log").exists()  # not here: the server never saw it
    r = srv.api("GET", f"/jobs/{job}/log", params={"offset": 5})
    assert r.status_code == 200 and r.content == b"the-tasker\nsecond\n"
    assert (r.headers["x-crq-log-source"], r.headers["x-crq-log-size"]) == ("tasker", "23")
    # a file that does not exist there either: missing, not an error
    gone = f"{hidden}/gone.log"
    [other] = srv.submit({"command": f"rm {gone}", "cwd": str(hidden), "log": gone})
    assert srv.wait(other)["state"] == "done"
    r = srv.api("GET", f"/jobs/{other}/log")
    assert r.status_code == 200 and r.headers["x-crq-log-missing"] == "1"
    # a tasker that does not answer: 504 after log_timeout, and the server goes on
    assert tasker.proc is not None
    tasker.proc.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        r = srv.api("GET", f"/jobs/{job}/log")
        assert r.status_code == 504, r.text
        assert r.json()["message"] == f"tasker tkns did not send the log of job {job} within 3 s"
        assert time.monotonic() - started < 30
        assert srv.api("GET", f"/jobs/{job}").status_code == 200
    finally:
        tasker.proc.send_signal(signal.SIGCONT)
    wait_until(lambda: srv.api("GET", f"/jobs/{job}/log").status_code == 200)


def test_log_via_tasker_setting_forces_the_tasker_path(
    crq_server: Callable[..., CrqServer], crq_tasker: Callable[..., Tasker], tmp_path: Path
) -> None:
    srv = crq_server("--heartbeat", "2", "--log-via", "tasker")
    crq_tasker("tk1", "--swd", str(srv.swd), "--slots", "2")
    job = submit(srv, tmp_path, "echo via")
    assert srv.wait(job)["state"] == "done"
    r = srv.api("GET", f"/jobs/{job}/log")
    assert (r.status_code, r.content, r.headers["x-crq-log-source"]) == (200, b"via\n", "tasker")


# -- crq status ---------------------------------------------------------------------------


def test_status_plain_and_snakemake(rig: CrqServer, tmp_path: Path) -> None:
    ok = submit(rig, tmp_path, "true")
    bad = submit(rig, tmp_path, "exit 3")
    rig.wait(ok), rig.wait(bad)
    [queued] = rig.submit({"command": "true", "cwd": str(tmp_path), "resources": "nosuchthing"})
    out = cli(rig, "status", str(ok), str(bad), str(queued))
    assert (out.returncode, out.stdout) == (0, f"{ok} done\n{bad} failed\n{queued} queued\n")
    out = cli(rig, "status", "--format", "snakemake", str(ok))
    assert out.stdout == "success\n"
    out = cli(rig, "status", "--format", "snakemake", str(bad))
    assert out.stdout == "failed\n"
    out = cli(rig, "status", "--format", "snakemake", str(queued))
    assert out.stdout == "running\n"
    out = cli(rig, "status", "12345")
    assert (out.returncode, out.stdout) == (1, "12345 unknown\n")
    out = cli(rig, "status", "--format", "snakemake", "12345")
    assert (out.returncode, out.stdout) == (0, "failed\n")


def test_status_rides_out_a_kill_9_and_restart(rig: CrqServer, tmp_path: Path) -> None:
    job = submit(rig, tmp_path, "true")
    rig.wait(job)
    rig.kill9()
    env = env_with_root()
    env.update(CRQ_TOKEN=rig.admin_token, CRQ_HOME=str(tmp_path / "home"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "crq.client.cli", "--server", rig.url, "status", str(job)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        time.sleep(1.5)  # it is retrying against a refused connection now
        assert proc.poll() is None
        rig.start(port=rig.port)  # crash recovery: it waits for tk1 to come back
        stdout, stderr = proc.communicate(timeout=CMD_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (proc.returncode, stdout) == (0, f"{job} done\n"), stderr
    assert "retrying" in stderr or "crash recovery" in stderr


# -- crq list -----------------------------------------------------------------------------


def test_list_newest_first_formats_and_json(rig: CrqServer, tmp_path: Path) -> None:
    ids = [submit(rig, tmp_path, "true", name=f"j{i}") for i in range(3)]
    for i in ids:
        rig.wait(i)
    out = cli(rig, "list", "--format", "id,state,name,exit", "--no-header")
    assert out.returncode == 0, out.stderr
    assert [line.split() for line in out.stdout.splitlines()] == [
        [str(i), "done", f"j{n}", "0"] for n, i in reversed(list(enumerate(ids)))
    ]
    out = cli(rig, "list", "--oldest", "-n", "2", "--format", "id")
    assert out.stdout.split() == ["ID", str(ids[0]), str(ids[1])]
    out = cli(rig, "list", "-n", "1", "--json")
    jobs = json.loads(out.stdout)
    assert [j["id"] for j in jobs] == [ids[-1]]
    out = cli(rig, "list", "--format", "id,colour")
    assert out.returncode == 2
    assert "unknown field 'colour'; fields: id,state,prio,user,name" in out.stderr
    assert out.stderr.splitlines()[-1].startswith("crq list: error: argument --format/-o: unknown")


# -- crq stop -----------------------------------------------------------------------------


def test_stop_of_an_ended_job_is_no_error(rig: CrqServer, tmp_path: Path) -> None:
    job = submit(rig, tmp_path, "true")
    rig.wait(job)
    out = cli(rig, "stop", str(job))
    assert (out.returncode, out.stdout, out.stderr) == (0, "", f"crq: job {job} already done\n")
    assert rig.api("POST", f"/jobs/{job}/stop").status_code == 409  # the API keeps its answer
    out = cli(rig, "stop", "999")
    assert (out.returncode, out.stderr) == (1, "crq: job 999 not found\n")


def test_bulk_stop_by_name_and_state_with_confirmation(rig: CrqServer, tmp_path: Path) -> None:
    spec = {"command": "true", "cwd": str(tmp_path), "resources": "nosuchthing"}
    many = rig.submit(*({**spec, "name": f"sim-{i}"} for i in range(12)))
    keep = rig.submit({**spec, "name": "other"})
    out = cli(rig, "stop", "--name", "sim-*")
    assert out.returncode == 2
    assert out.stderr.splitlines()[-1] == (
        "crq: stop 12 jobs named 'sim-*'? more than 10: give --yes to confirm "
        "(no terminal to ask on)"
    )
    assert {j["state"] for j in rig.request("GET", "/jobs")["jobs"]} == {"queued"}
    out = cli(rig, "stop", "--name", "sim-1*", "--state", "queued")
    assert out.returncode == 0, out.stderr
    assert "crq: 3 jobs queued, named 'sim-1*' to stop" in out.stderr  # sim-1, sim-10, sim-11
    out = cli(rig, "stop", "--name", "sim-*", "--user", "nobody-here")
    assert (out.returncode, out.stderr) == (
        0,
        "crq: no jobs of nobody-here, named 'sim-*' to stop\n",
    )
    out = cli(rig, "stop", "--name", "sim-*", "--yes")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("stopped") == 9
    states = {j["id"]: j["state"] for j in rig.request("GET", "/jobs")["jobs"]}
    assert all(states[i] == "stopped" for i in many) and states[keep[0]] == "queued"
    out = cli(rig, "stop")
    assert out.returncode == 2 and "give job ids, or select jobs" in out.stderr
    out = cli(rig, "stop", "1", "--user", "x")
    assert out.returncode == 2 and "not both" in out.stderr
