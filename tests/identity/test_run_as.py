"""Jobs run as their owner (SPEC section 9): a real root tasker, real users made with
useradd, jobs that print ``id``. Each job's log belongs to its owner; a log or cwd its owner
cannot reach fails the attempt with the reason, and so does an owner unknown on the host."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from crq.tasker import cgroups
from crq.tasker.statedir import StateDir

from tests.rigs import ROOT, CrqServer, Tasker, kill_jobs, wait_until
from tests.users import ALICE, BOB, CAROL, OPS, Users

PROBE = 'id -u; id -g; id -G; echo "$HOME $USER $LOGNAME"; pwd'


@pytest.fixture
def rig(
    crq_server: Callable[..., CrqServer],
    crq_tasker: Callable[..., Tasker],
    tmp_path: Path,
    unix_users: Users,
) -> tuple[CrqServer, Users]:
    if os.geteuid() != 0:
        pytest.skip("a tasker runs jobs as their owners only as root")
    srv = crq_server("--heartbeat", "2")
    crq_tasker("tk1", "--swd", str(srv.swd), "--slots", "4")
    return srv, unix_users


def _token(srv: CrqServer, user: str) -> str:
    return str(srv.request("POST", "/tokens", json={"user": user})["token"])


def _run(srv: CrqServer, user: str, **spec: Any) -> dict[str, Any]:
    """Run one job as ``user``; its log is a new file in its cwd unless given (the users'
    homes outlive each test's server, whose job ids start at 1 again)."""
    spec.setdefault("log", os.path.join(spec["cwd"], f"crq.{uuid.uuid4().hex[:12]}.log"))
    r = srv.api("POST", "/jobs", token=_token(srv, user), json=spec)
    assert r.status_code == 201, r.text
    [job] = r.json()["ids"]
    return srv.wait(job)


def test_a_job_runs_with_its_owners_uid_gid_groups_and_home(rig: tuple[CrqServer, Users]) -> None:
    srv, users = rig
    for user in (ALICE, CAROL):
        home = users.home(user)
        j = _run(
            srv, user, command=PROBE, cwd=str(home), env={"HOME": "/root", "PATH": "/usr/bin:/bin"}
        )
        assert j["state"] == "done", j
        log = Path(j["log"])
        st = log.stat()
        assert (st.st_uid, st.st_gid) == (users.uid[user], users.gid[user])
        uid, gid, groups, names, cwd = log.read_text().splitlines()
        assert (int(uid), int(gid)) == (users.uid[user], users.gid[user])
        want = set(os.getgrouplist(user, users.gid[user]))
        assert set(map(int, groups.split())) == want
        assert names == f"{home} {user} {user}"
        assert cwd == str(home)
    assert grp.getgrnam(OPS).gr_gid in set(os.getgrouplist(CAROL, users.gid[CAROL]))


def test_a_stored_script_runs_as_its_owner_from_a_private_state_dir(
    rig: tuple[CrqServer, Users],
) -> None:
    """The owner cannot reach the tasker's state dir (0700 under root's tmp): the script is
    handed over open, and is the owner's own 0700 file."""
    srv, users = rig
    body = 'id -u; echo "arg $1"; stat -L -c "%u %a" "$0"; test -w "$0" && echo writable\n'
    for script in (body, "#!/bin/sh\n" + body):
        j = _run(srv, ALICE, script=script, command=["x"], cwd=str(users.home(ALICE)))
        assert j["state"] == "done", j
        uid, arg, st, *rest = Path(j["log"]).read_text().splitlines()
        assert (int(uid), arg, st) == (users.uid[ALICE], "arg x", f"{users.uid[ALICE]} 700")
        assert rest == ["writable"]  # its own file: the owner may, nobody else


def test_a_job_writes_only_what_its_owner_may(rig: tuple[CrqServer, Users]) -> None:
    srv, users = rig
    bob_file = users.home(BOB) / "mine"
    j = _run(srv, ALICE, command=f"echo x > {bob_file}", cwd=str(users.home(ALICE)))
    assert j["state"] == "failed" and j["exit_code"] != 0
    assert not bob_file.exists()
    assert "Permission denied" in Path(j["log"]).read_text()


def test_a_log_its_owner_cannot_write_fails_the_attempt(rig: tuple[CrqServer, Users]) -> None:
    srv, users = rig
    cwd = str(users.home(ALICE))
    for log, why in (
        ("/etc/crq-test-owner.log", f"/etc is not writable by {ALICE}"),
        (str(users.home(BOB) / "x.log"), f"{users.home(BOB)} is not searchable by {ALICE}"),
    ):
        j = _run(srv, ALICE, command="echo ran", cwd=cwd, log=log, max_attempts=1)
        assert j["state"] == "failed", j
        reason = j["attempts"][-1].get("reason") or j.get("reason")
        assert "cannot open log" in str(reason) and why in str(reason), j
        assert not Path(log).exists()
    # a cwd the owner cannot enter
    j = _run(srv, ALICE, command="echo ran", cwd=str(users.home(BOB)), max_attempts=1)
    assert j["state"] == "failed"
    assert f"not searchable by {ALICE}" in str(j["attempts"][-1].get("reason")), j


def test_an_owner_unknown_on_the_host_fails_the_attempt(rig: tuple[CrqServer, Users]) -> None:
    srv, _ = rig
    with pytest.raises(KeyError):
        pwd.getpwnam("crqtnobody")
    j = _run(srv, "crqtnobody", command="id", cwd="/tmp", max_attempts=1)
    assert j["state"] == "failed"
    assert "user crqtnobody unknown on host" in str(j["attempts"][-1].get("reason")), j


def test_a_job_run_as_its_owner_outlives_a_killed_tasker(
    crq_server: Callable[..., CrqServer],
    crq_tasker: Callable[..., Tasker],
    unix_users: Users,
) -> None:
    """The wrapper stays root and records the status: a tasker killed with -9 while the
    owner's job runs finds it again on restart, and the job ends once, done."""
    if os.geteuid() != 0:
        pytest.skip("a tasker runs jobs as their owners only as root")
    srv = crq_server("--heartbeat", "2")
    t = crq_tasker("tk1", "--swd", str(srv.swd))
    home = unix_users.home(ALICE)
    mark = uuid.uuid4().hex[:12]
    flag, log = home / f"started.{mark}", home / f"outlive.{mark}.log"
    r = srv.api(
        "POST",
        "/jobs",
        token=_token(srv, ALICE),
        json={"command": f"touch {flag}; sleep 2; id -u", "cwd": str(home), "log": str(log)},
    )
    [job] = r.json()["ids"]
    wait_until(flag.exists)
    t.kill9()
    t.start()
    j = srv.wait(job)
    assert j["state"] == "done" and len(j["attempts"]) == 1, j
    assert Path(j["log"]).read_text().split() == [str(unix_users.uid[ALICE])]
    assert flag.stat().st_uid == unix_users.uid[ALICE]


SYSTEM_PYTHON = "/usr/bin/python3"  # root's own interpreter (/root is 0700) is not theirs


def _package_for_all(where: Path) -> Path:
    """crq laid out as it installs (crq/, crq/tasker), readable by every user: the tasker
    needs nothing but the standard library."""
    pkg = where / "pkg"
    (pkg / "crq").mkdir(parents=True)
    for f in (ROOT / "crq").glob("*.py"):
        shutil.copy(f, pkg / "crq" / f.name)
    shutil.copytree(
        ROOT / "tasker", pkg / "crq" / "tasker", ignore=shutil.ignore_patterns("__pycache__")
    )
    (pkg / "crq" / "server").mkdir()
    for name in ("__init__.py", "resources.py"):  # the tasker checks its --resources
        shutil.copy(ROOT / "server" / name, pkg / "crq" / "server" / name)
    for p in [pkg, *pkg.rglob("*")]:
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    return pkg


def test_a_tasker_not_running_as_root_gets_only_its_users_jobs(
    crq_server: Callable[..., CrqServer], tmp_path: Path, unix_users: Users
) -> None:
    """alice's own tasker (as alice) is sent alice's jobs and never bob's, though bob's came
    first; a root tasker started later runs bob's, as bob."""
    if os.geteuid() != 0 or not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"needs root, and {SYSTEM_PYTHON} to run a tasker as another user")
    srv = crq_server("--heartbeat", "2")
    share = Path(tempfile.mkdtemp(prefix="crq-pkg-", dir="/tmp"))
    proc = None
    try:
        os.chmod(share, 0o755)
        pkg = _package_for_all(share)
        home = unix_users.home(ALICE)
        bob_home = unix_users.home(BOB)
        mark = uuid.uuid4().hex[:12]
        bobs = [_submit(srv, BOB, str(bob_home), f"b{mark}.{i}") for i in range(2)]
        alices = [_submit(srv, ALICE, str(home), f"a{mark}.{i}") for i in range(2)]
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(pkg), "HOME": str(home),
               "CRQ_TASKER_TOKEN": srv.tasker_token,
               "CRQ_TEST_RUN": os.environ.get("CRQ_TEST_RUN", "")}  # fmt: skip
        proc = subprocess.Popen(
            [SYSTEM_PYTHON, "-m", "crq.tasker", "--name", "alice-tk", "--server", srv.url,
             "--state-dir", str(home / f"state.{mark}"), "--slots", "4"],
            env=env, cwd=str(home), user=ALICE, group=unix_users.gid[ALICE],
            extra_groups=[], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        for job in alices:
            try:
                j = srv.wait(job)
            except AssertionError:
                proc.kill()
                err = proc.communicate()[1].decode(errors="replace")
                raise AssertionError(f"alice's tasker: {err[-3000:]}") from None
            assert j["state"] == "done" and j["attempts"][-1]["tasker"] == "alice-tk", j
        assert [srv.request("GET", f"/jobs/{b}")["state"] for b in bobs] == ["queued"] * 2
        t = {x["name"]: x for x in srv.request("GET", "/taskers")["taskers"]}["alice-tk"]
        assert t["state"] == "ready", t
        root_tk = Tasker(tmp_path / "root.state", "--swd", str(srv.swd), name="root-tk")
        try:
            root_tk.start()
            for job in bobs:
                j = srv.wait(job)
                assert j["state"] == "done" and j["attempts"][-1]["tasker"] == "root-tk", j
                assert Path(j["log"]).stat().st_uid == unix_users.uid[BOB]
        finally:
            root_tk.kill9()
            kill_jobs(root_tk.state)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        shutil.rmtree(share, ignore_errors=True)


def _submit(srv: CrqServer, user: str, cwd: str, name: str) -> int:
    r = srv.api(
        "POST",
        "/jobs",
        token=_token(srv, user),
        json={"command": "id -un", "cwd": cwd, "log": f"{cwd}/{name}.log", "name": name},
    )
    assert r.status_code == 201, r.text
    return int(r.json()["ids"][0])


def test_a_job_run_as_its_owner_is_held_to_its_ram(
    crq_server: Callable[..., CrqServer],
    crq_tasker: Callable[..., Tasker],
    unix_users: Users,
    tmp_path: Path,
) -> None:
    """The group is joined as root, before the switch to the owner: the owner's job is in
    it (and could not leave it), and ends out of memory past its RAM/N."""
    if os.geteuid() != 0:
        pytest.skip("a tasker runs jobs as their owners only as root")
    state = StateDir(tmp_path / "mem.state")
    try:
        memory = cgroups.detect(state.identity())
    except cgroups.Unusable as e:
        pytest.skip(f"no writable cgroup memory controller here: {e}")
    srv = crq_server("--heartbeat", "2")
    args = ("--swd", str(srv.swd), "--enforce-memory", "--resources", "RAM/4000")
    crq_tasker("mem", *args, state=state.root)
    home = str(unix_users.home(ALICE))
    try:
        j = _run(srv, ALICE, command="cat /proc/self/cgroup", cwd=home, resources="RAM/50")
        assert j["state"] == "done", j
        assert f"{memory.base.name}/{j['id']}.1" in Path(j["log"]).read_text()
        eat = "x=$(head -c 209715200 /dev/zero | tr '\\0' a); echo survived"
        j = _run(srv, ALICE, command=eat, cwd=home, resources="RAM/50", max_attempts=1)
        assert (j["state"], j["reason"]) == ("failed", "out of memory (RAM/50)"), j
        wait_until(lambda: not any(p.is_dir() for p in memory.base.iterdir()))
    finally:
        memory.sweep(set())
        if memory.base.is_dir():
            memory.base.rmdir()
