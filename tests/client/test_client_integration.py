"""The real CLIs (``ncmgr``, ``crq``, ``vovproject`` as ``python -m client.…``) against a real
server started by ``ncmgr start`` and a real tasker, as subprocesses.

One server per module (unique queue, free port, private ``CRQ_HOME``); tests run in file order
and each leaves the server running and normal. Skipped when the server package is not there yet;
tasker tests are skipped when ``tasker/cli.py`` is missing.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.rigs import (
    PATIENCE,
    ROOT,
    Tasker,
    alive,
    free_port,
    kill_jobs,
    server_available,
    wait_until,
)

HAVE_SERVER = server_available()
HAVE_TASKER = (ROOT / "tasker" / "cli.py").exists()

pytestmark = pytest.mark.skipif(not HAVE_SERVER, reason="server/ not written yet")
needs_tasker = pytest.mark.skipif(not HAVE_TASKER, reason="tasker/cli.py not written yet")

# A cap on each CLI run, above ncmgr start's own patience, so that ncmgr reports (and cleans
# up) a failed start itself; a command returns as soon as it is done.
CMD_TIMEOUT = 240.0


@dataclass
class Queue:
    """A running queue and the means to drive its CLIs."""

    name: str
    port: int
    root: Path
    env: dict[str, str]
    tasker: Tasker | None = None
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    swds: list[Path] = field(default_factory=list)  # of other queues the tests start

    @property
    def swd(self) -> Path:
        return self.root / f"{self.name}.swd"

    @property
    def token(self) -> str:
        return (self.swd / "security" / "admin.token").read_text().strip()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def run(
        self, tool: str, *args: str, timeout: float = CMD_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", f"crq.client.{tool}", *args],
            env=self.env,
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def crq(self, *args: str, timeout: float = CMD_TIMEOUT) -> subprocess.CompletedProcess[str]:
        return self.run("cli", *args, timeout=timeout)

    def ncmgr(self, *args: str, timeout: float = CMD_TIMEOUT) -> subprocess.CompletedProcess[str]:
        return self.run("ncmgr", *args, timeout=timeout)

    def spawn(self, tool: str, *args: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-m", f"crq.client.{tool}", *args],
            env=self.env,
            cwd=self.root,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.procs.append(proc)
        return proc

    def start_args(self) -> list[str]:
        return ["start", "--queue", self.name, "--swd", str(self.swd), "--port", str(self.port),
                "--fsync", "never", "--recovery-grace", "30"]  # fmt: skip

    def server_pid(self) -> int:
        return int(json.loads((self.swd / "server.json").read_text())["pid"])

    def job(self, job_id: int) -> dict[str, Any]:
        out = self.crq("info", "--json", str(job_id))
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def submit(self, *args: str) -> int:
        out = self.crq("submit", *args)
        assert out.returncode == 0, out.stderr
        return int(out.stdout.split()[0])

    def start_tasker(self) -> None:
        self.tasker = Tasker(
            self.root / "tasker-state", "--swd", str(self.swd), "--slots", "2", name="it-tk"
        )
        self.tasker.start(env=self.env)

    def stop_tasker(self) -> None:
        proc = self.tasker.proc if self.tasker else None
        if self.tasker and proc and proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            try:
                self.tasker.term()
            except subprocess.TimeoutExpired:
                self.tasker.kill9()
        kill_jobs(self.root / "tasker-state")

    def close(self) -> None:
        """Kill all the tests started, whatever state a failed test left it in."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.stop_tasker()
        try:
            self.ncmgr("stop", "--queue", self.name)
        except subprocess.TimeoutExpired:
            pass
        for swd in (self.swd, *self.swds):
            kill_servers_of(swd)


def json_lines(text: str) -> list[dict[str, Any]]:
    """JSON lines, or one JSON array (``crq list --json``)."""
    if text.lstrip().startswith("["):
        return list(json.loads(text))
    return [json.loads(line) for line in text.splitlines()]


def kill_servers_of(swd: Path) -> list[int]:
    """kill -9 every server running on ``swd`` (found by its command line, not by a
    server.json that a failed start may not have written); the pids it killed."""
    wanted = b"-m\0crq.server\0", f"--swd\0{swd}\0".encode()
    killed = []
    for pid in [int(p) for p in os.listdir("/proc") if p.isdigit()]:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if all(w in cmdline for w in wanted):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        except OSError:
            pass
    return killed


@pytest.fixture(scope="module")
def q(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Queue]:
    root = tmp_path_factory.mktemp("crq-client-it")
    env = dict(os.environ)
    for var in ("CRQ_SERVER", "CRQ_TOKEN", "CRQ_TASKER_TOKEN"):
        env.pop(var, None)
    name = f"it{os.getpid()}"
    env.update(
        CRQ_HOME=str(root / "home"),
        CRQ_QUEUE=name,
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    queue = Queue(name=name, port=free_port(), root=root, env=env)
    try:
        out = queue.ncmgr(*queue.start_args())
        assert out.returncode == 0, out.stderr + out.stdout
        if HAVE_TASKER:
            queue.start_tasker()
        yield queue
    finally:
        queue.close()


def test_started_and_registered(q: Queue) -> None:
    out = q.ncmgr("status")
    assert out.returncode == 0, out.stderr
    assert re.search(r"^mode\s+normal$", out.stdout, re.M)
    assert q.url in out.stdout and str(q.swd) in out.stdout
    entry = json.loads((Path(q.env["CRQ_HOME"]) / "registry.json").read_text())[q.name]
    assert entry["url"] == q.url and entry["swd"] == str(q.swd) and entry["token"]
    out = q.run("vovproject", "list")
    assert out.returncode == 0
    row = next(line for line in out.stdout.splitlines() if q.name in line)
    assert row.startswith("*") and row.split()[-1] == "up"
    out = q.run("vovproject", "enable", q.name)
    assert out.stdout.splitlines() == [f"export CRQ_QUEUE={q.name}", f"export CRQ_SERVER={q.url}"]


def test_second_start_is_refused(q: Queue) -> None:
    out = q.ncmgr(*q.start_args())
    assert out.returncode == 1
    assert f"queue {q.name} already running at {q.url}" in out.stderr


def test_busy_port_is_a_clear_error(q: Queue) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = q.ncmgr("start", "--queue", "other", "--swd", str(q.root / "other.swd"),
                      "--port", str(port))  # fmt: skip
    assert out.returncode == 1
    assert out.stderr.startswith(f"crq: port {port} is busy")
    assert out.stderr.count("\n") == 1


def _start_other(q: Queue, name: str, *extra: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``ncmgr start`` of a second queue next to q (its servers are killed at the end)."""
    swd = q.root / f"{name}.swd"
    q.swds.append(swd)
    return subprocess.run(
        [sys.executable, "-m", "crq.client.ncmgr", "start", "--queue", name, "--swd", str(swd),
         "--port", str(free_port()), "--fsync", "never", *extra],
        env={**q.env, **env}, cwd=q.root, capture_output=True, text=True, timeout=CMD_TIMEOUT,
    )  # fmt: skip


def test_start_with_another_queues_token(q: Queue) -> None:
    """CRQ_TOKEN set for q: starting another queue checks the new server with that server's
    own token (it hung 90 s on 401s, then failed and left the server running)."""
    other = f"tok{os.getpid()}"
    out = _start_other(q, other, "--recovery-grace", "30", CRQ_TOKEN=q.token)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"crq: queue {other} started at"), out.stdout
    swd = q.swds[-1]
    env = {k: v for k, v in q.env.items() if k != "CRQ_TOKEN"}
    stop = subprocess.run(
        [sys.executable, "-m", "crq.client.ncmgr", "stop", "--queue", other, "--swd", str(swd)],
        env=env, cwd=q.root, capture_output=True, text=True, timeout=CMD_TIMEOUT,
    )  # fmt: skip
    assert stop.returncode == 0, stop.stderr
    assert kill_servers_of(swd) == []


def test_a_start_that_gives_up_kills_its_server(q: Queue) -> None:
    """A server that does not open in time: one line, and nothing left running."""
    name = f"slow{os.getpid()}"
    out = _start_other(q, name, "--timeout", "0", "--recovery-grace", "0")
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1, out.stderr
    m = re.fullmatch(rf"crq: queue {name} \(pid (\d+)\) did not open within \d+ s \(see .+\); "
                     r"killed it\n", out.stderr)  # fmt: skip
    assert m, out.stderr
    assert not alive(int(m[1])), "the server is still there"
    assert kill_servers_of(q.swds[-1]) == [], "ncmgr start gave up but left its server running"


def test_bad_token_is_one_line(q: Queue) -> None:
    env = dict(q.env, CRQ_TOKEN="wrong")
    out = subprocess.run([sys.executable, "-m", "crq.client.cli", "list"], env=env,
                         capture_output=True, text=True, timeout=CMD_TIMEOUT)  # fmt: skip
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and "bad token" in out.stderr


def test_personal_tokens_issue_list_revoke(q: Queue) -> None:
    """ncmgr token issue prints the token once; crq works with it as that user and role;
    list shows it without its secret; revoke closes it."""
    out = q.ncmgr("token", "issue", "crqtdora", "--role", "readonly", "--expires", "1d",
                  "--note", "ci bot")  # fmt: skip
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    assert token.startswith("crq_") and "shown this once only" in out.stderr
    token_id = token.split("_")[1]
    env = dict(q.env, CRQ_TOKEN=token)
    me = subprocess.run([sys.executable, "-m", "crq.client.cli", "whoami", "--json"], env=env,
                        capture_output=True, text=True, timeout=CMD_TIMEOUT)  # fmt: skip
    assert me.returncode == 0, me.stderr
    assert json.loads(me.stdout)["user"] == "crqtdora"
    sub = subprocess.run([sys.executable, "-m", "crq.client.cli", "submit", "--", "true"], env=env,
                         capture_output=True, text=True, timeout=CMD_TIMEOUT)  # fmt: skip
    assert sub.returncode == 1 and "readonly" in sub.stderr and sub.stderr.count("\n") == 1
    listed = q.ncmgr("token", "list")
    assert listed.returncode == 0 and token_id in listed.stdout and "ci bot" in listed.stdout
    assert token not in listed.stdout
    rows = json.loads(q.ncmgr("token", "list", "--json").stdout)
    assert {"id": token_id, "user": "crqtdora", "role": "readonly"}.items() <= rows[-1].items()
    assert q.ncmgr("token", "revoke", token_id).returncode == 0
    me = subprocess.run([sys.executable, "-m", "crq.client.cli", "whoami"], env=env,
                        capture_output=True, text=True, timeout=CMD_TIMEOUT)  # fmt: skip
    assert me.returncode == 1 and "bad token" in me.stderr
    assert q.ncmgr("token", "issue", "x", "--role", "king").returncode == 2


def test_sanity_is_clean(q: Queue) -> None:
    out = q.run("vovproject", "sanity")
    assert out.returncode == 0, out.stderr
    assert "sanity: ok" in out.stdout


def test_a_refused_submit_exits_1_a_usage_error_2(q: Queue) -> None:
    before = q.crq("list", "--json").stdout
    out = q.crq("submit", "-r", "License:nosuch", "--", "true")  # the server refuses: 1
    assert out.returncode == 1
    assert out.stderr == "crq: resources: unknown resource License:nosuch\n"
    (q.root / "jobs.txt").write_bytes(b"echo a\n\xff\n")  # the command line is wrong: 2
    out = q.crq("submit", "--file", "jobs.txt")
    assert out.returncode == 2
    assert out.stderr == "crq: --file jobs.txt: not UTF-8 text (byte 7)\n"
    assert q.crq("list", "--state", "bogus").returncode == 2
    assert q.crq("list", "--json").stdout == before  # nothing was queued


@needs_tasker
def test_submit_wait_info(q: Queue) -> None:
    ok = q.submit("-J", "hello", "--", "sh", "-c", "echo hello from crq")
    bad = q.submit("--", "exit 3")
    out = q.crq("wait", str(ok))
    assert out.returncode == 0, out.stderr
    out = q.crq("wait", str(ok), str(bad))
    assert out.returncode == 1
    assert f"crq: job {bad} failed (exit 3" in out.stderr
    info = q.crq("info", str(ok))
    assert info.returncode == 0
    assert re.search(r"^state\s+done, exit 0$", info.stdout, re.M)
    assert "attempts:" in info.stdout and "it-tk" in info.stdout
    log = q.job(ok)["log"]
    assert log == str(q.root / f"crq.{ok}.log")
    assert "hello from crq" in Path(log).read_text()
    listing = q.crq("list")
    rows = {line.split()[0]: line.split() for line in listing.stdout.splitlines()[1:]}
    assert rows[str(ok)][1] == "done" and rows[str(ok)][4] == "hello"
    assert rows[str(bad)][1] == "failed" and rows[str(bad)][-1] == "3"
    out = q.crq("list", "--state", "failed")
    assert [line.split()[0] for line in out.stdout.splitlines()[1:]] == [str(bad)]


@needs_tasker
def test_submit_env_dir_and_wait_flag(q: Queue) -> None:
    sub = q.root / "sub"
    sub.mkdir()
    out = q.crq("submit", "--wait", "-d", "sub", "-e", "CRQ_IT=42", "--",
                'echo "$CRQ_IT $PWD" > env.out')  # fmt: skip
    assert out.returncode == 0, out.stderr
    job = q.job(int(out.stdout.split()[0]))
    assert job["cwd"] == str(sub) and job["env"]["CRQ_IT"] == "42"
    assert "CRQ_TOKEN" not in job["env"]
    assert (sub / "env.out").read_text().split() == ["42", str(sub)]


@needs_tasker
def test_submit_file_in_one_batch(q: Queue) -> None:
    lines = ["# a comment", ""] + [f"echo job {i}" for i in range(25)] + ["exit 1"]
    (q.root / "jobs.txt").write_text("\n".join(lines) + "\n")
    out = q.crq("submit", "--file", "jobs.txt")
    assert out.returncode == 0, out.stderr
    m = re.fullmatch(r"submitted 26 jobs: (\d+)\.\.(\d+)\n", out.stdout)
    assert m, out.stdout
    first, last = int(m[1]), int(m[2])
    assert last - first == 25
    out = q.crq("wait", f"{first}..{last}")
    assert out.returncode == 1
    assert "waiting: 25/26 done, 1 failed" in out.stderr
    assert f"crq: job {last} failed (exit 1" in out.stderr
    out = q.crq("wait", f"{first}..{last - 1}")
    assert out.returncode == 0, out.stderr


@needs_tasker
def test_stop_rerun_forget(q: Queue) -> None:
    sleeper = q.submit("--", "sleep", "60")
    wait_until(lambda: q.job(sleeper)["state"] == "running")
    out = q.crq("stop", str(sleeper))
    assert out.returncode == 0
    assert out.stdout.strip() in (
        f"job {sleeper} stopped",
        f"job {sleeper} stopping (kill sent to tasker it-tk)",
    )
    out = q.crq("wait", str(sleeper))
    assert out.returncode == 1 and f"job {sleeper} stopped" in out.stderr
    out = q.crq("rerun", str(sleeper))
    assert out.returncode == 0, out.stderr
    wait_until(lambda: q.job(sleeper)["state"] == "running")
    assert q.crq("stop", str(sleeper)).returncode == 0
    wait_until(lambda: q.job(sleeper)["state"] == "stopped")
    assert q.job(sleeper)["attempt"] == 2
    out = q.crq("forget", str(sleeper), "999999")
    assert out.returncode == 1
    assert out.stdout.strip() == f"job {sleeper} forgotten"
    assert out.stderr == "crq: job 999999 not found\n"
    out = q.crq("info", str(sleeper))
    assert out.returncode == 1 and out.stderr == f"crq: job {sleeper} not found\n"


@needs_tasker
def test_taskers_table(q: Queue) -> None:
    out = q.crq("taskers")
    assert out.returncode == 0
    header, *rows = out.stdout.splitlines()
    assert header.split()[:4] == ["NAME", "HOST", "STATE", "SLOTS"]
    row = next(r.split() for r in rows if r.startswith("it-tk"))
    assert row[3].endswith("/2")


def test_queue_order(q: Queue) -> None:
    # A resource no tasker offers keeps the jobs queued.
    low = q.submit("-r", "no_such_license", "-P", "2", "--", "true")
    high = q.submit("-r", "no_such_license", "-P", "12", "--", "true")
    try:
        out = q.crq("list", "--queue-order")
        assert out.returncode == 0, out.stderr
        ids = [int(line.split()[0]) for line in out.stdout.splitlines()[1:]]
        assert ids.index(high) < ids.index(low)
        assert all(line.split()[1] == "queued" for line in out.stdout.splitlines()[1:])
        out = q.crq("rerun", str(low))
        assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
    finally:
        assert q.crq("stop", str(low), str(high)).returncode == 0


@needs_tasker
def test_crash_recovery_seen_by_clients(q: Queue) -> None:
    assert q.tasker is not None
    sleeper = q.submit("--", "sleep", "60")
    wait_until(lambda: q.job(sleeper)["state"] == "running")
    q.tasker.proc.send_signal(signal.SIGSTOP)  # the tasker cannot come back until we say so
    try:
        os.kill(q.server_pid(), signal.SIGKILL)
        wait_until(lambda: q.crq("list").returncode == 1)
        starter = q.spawn("ncmgr", *q.start_args())
        wait_until(lambda: "mode      recovering" in q.ncmgr("status").stdout)
        # a submit rides the recovery out (under one Idempotency-Key), saying so once
        plain = q.spawn("cli", "submit", "-J", "rode-out", "--", "true")
        patient = q.spawn("cli", "submit", "--wait", "--", "true")
        for proc in (plain, patient):
            assert proc.stderr is not None
            ready, _, _ = select.select([proc.stderr], [], [], PATIENCE)
            assert ready, "submit said nothing while the server recovers"
            first_line = proc.stderr.readline()
            assert first_line.startswith(
                f"crq: queue {q.name} is in crash recovery (0/1 taskers back".encode()
            ), first_line
            assert first_line.rstrip().endswith(b"waiting to submit"), first_line
            assert proc.poll() is None
    finally:
        q.tasker.proc.send_signal(signal.SIGCONT)
    stdout, stderr = starter.communicate(timeout=CMD_TIMEOUT)
    assert starter.returncode == 0, stderr
    assert b"recovering: 0/1 taskers back" in stdout
    assert b"crash recovery finished; report:" in stdout
    stdout, stderr = patient.communicate(timeout=CMD_TIMEOUT)
    assert patient.returncode == 0, stderr
    job = q.job(int(stdout.split()[0]))
    assert job["state"] == "done"
    stdout, stderr = plain.communicate(timeout=CMD_TIMEOUT)
    assert plain.returncode == 0 and stderr == b"", stderr  # its one line was read above
    rode_out = [j for j in json_lines(q.crq("list", "--json").stdout) if j["name"] == "rode-out"]
    assert [j["id"] for j in rode_out] == [int(stdout.split()[0])]
    assert q.job(sleeper)["state"] == "running"  # reattached, still on the tasker
    assert q.crq("stop", str(sleeper)).returncode == 0


def test_clean_stop_and_restart(q: Queue) -> None:
    before = q.crq("list", "--json")
    assert before.returncode == 0
    out = q.ncmgr("stop")
    assert out.returncode == 0, out.stderr
    assert "stopped (snapshot written, clean stop" in out.stdout
    out = q.ncmgr("status")
    assert out.returncode == 1
    assert re.search(r"^mode\s+stopped$", out.stdout, re.M)
    assert re.search(r"^last stop\s+clean$", out.stdout, re.M)
    out = q.crq("list")
    assert out.returncode == 1
    assert out.stderr == (
        f"crq: cannot reach queue {q.name} at {q.url}: connection refused — is it started? "
        f"try: ncmgr start --queue {q.name}\n"
    )
    out = q.ncmgr("stop")
    assert out.returncode == 0 and "not running" in out.stdout
    out = q.ncmgr("start", "--fsync", "never")  # swd and port come from the registry
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"crq: queue {q.name} started at {q.url}")
    after = q.crq("list", "--json")
    ids = [job["id"] for job in json_lines(before.stdout)]
    assert [job["id"] for job in json_lines(after.stdout)] == ids
