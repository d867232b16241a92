"""Argument parsing of crq, ncmgr and vovproject (no server needed)."""

from __future__ import annotations

import argparse
import ast
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from crq.client import cli, clitools, ncmgr, place, registry, starter, vovproject

from crq import procfs, wire
from tests.rigs import ROOT, free_port, wait_until


@pytest.fixture(autouse=True)
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRQ_HOME", str(tmp_path / "crqhome"))
    for var in ("CRQ_SERVER", "CRQ_QUEUE", "CRQ_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)


def parse_submit(*words: str) -> argparse.Namespace:
    args = cli.build_parser().parse_args(["submit", *words])
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    return args


def test_submit_options_and_command() -> None:
    args = parse_submit("-r", "CORES/2", "-P", "9", "-J", "n", "-e", "A=1", "-e", "B=x=y", "--",
                        "sleep", "-n", "10")  # fmt: skip
    assert args.resources == "CORES/2" and args.priority == 9 and args.name == "n"
    assert args.setenv == [("A", "1"), ("B", "x=y")]
    assert args.command == ["sleep", "-n", "10"]
    assert args.env == "all" and not args.wait and not args.no_rerun


def test_submit_without_double_dash_stops_at_command() -> None:
    args = parse_submit("echo", "-J", "x")
    assert args.name is None and args.command == ["echo", "-J", "x"]


@pytest.mark.parametrize(
    "words",
    [["-P", "0", "--", "true"], ["-P", "16", "--", "true"], ["-e", "NOEQUALS", "--", "true"],
     ["--max-attempts", "0", "--", "true"], ["--env", "A=B", "--", "true"]],
)  # fmt: skip
def test_submit_usage_errors_exit_2(words: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["submit", *words])
    assert exc.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_submit_needs_a_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["submit"])
    assert exc.value.code == 2
    assert "missing command" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["submit", "--file", "x", "--", "true"])
    with pytest.raises(SystemExit):
        cli.main(["submit", "--file", "x", "-l", "log"])


@pytest.mark.parametrize(
    "server", ["ftp://host", "http://[::1", "http://host:99999", "http://:8080"]
)
def test_a_bad_server_url_is_a_usage_error(
    server: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["--server", server, "list"])
    assert exc.value.code == 2
    assert "Traceback" not in capsys.readouterr().err
    monkeypatch.setenv("CRQ_SERVER", server)  # the same URL from the environment
    assert cli.main(["list"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("crq: CRQ_SERVER: ") and err.count("\n") == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "--file jobs.txt: No such file or directory"),
        (b"# only a comment\n\n", "jobs.txt: no commands (blank and # lines are skipped)"),
        (b"echo a\n\xff\xfe\n", "--file jobs.txt: not UTF-8 text (byte 7)"),
        (b"echo a\n# c\necho \x00b\n", "--file jobs.txt: line 3 has a NUL byte"),
    ],
)
def test_a_bad_file_of_jobs_is_a_usage_error_and_sends_nothing(
    tmp_path: Path, content: bytes | None, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    if content is not None:
        (tmp_path / "jobs.txt").write_bytes(content)
    # no server listens there: a usage error is found before anything is sent
    assert cli.main(["--server", "http://127.0.0.1:9", "submit", "--file", "jobs.txt"]) == 2
    assert capsys.readouterr().err == f"crq: {message}\n"


def test_a_directory_as_file_of_jobs_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["--server", "http://127.0.0.1:9", "submit", "--file", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"crq: --file {tmp_path}: Is a directory\n"


def test_usage_errors_exit_2_other_failures_1(capsys: pytest.CaptureFixture[str]) -> None:
    def usage(args: argparse.Namespace) -> int:
        raise clitools.UsageError("bad\nvalue")

    assert clitools.run(usage, argparse.Namespace()) == 2
    assert capsys.readouterr().err == "crq: bad value\n"


def test_command_of() -> None:
    assert cli.command_of(["make"]) == ["make"]
    assert cli.command_of(["make all > log"]) == "make all > log"
    assert cli.command_of(["echo $HOME"]) == "echo $HOME"
    assert cli.command_of(["echo", "a b"]) == ["echo", "a b"]
    assert cli.command_of(["/usr/bin/env"]) == ["/usr/bin/env"]


def test_job_env() -> None:
    base = {"PATH": "/bin", "HOME": "/h", "CRQ_TOKEN": "secret", "PWD": "/old", "OLDPWD": "/o"}
    env = cli.job_env("all", [("X", "1")], "/job", base)
    assert env == {"PATH": "/bin", "HOME": "/h", "PWD": "/job", "X": "1"}
    assert cli.job_env("none", [], "/job", base) == {}
    assert cli.job_env("none", [("A", "b")], "/job", base) == {"A": "b"}
    assert cli.job_env("PATH,NOPE", [("PATH", "/x")], "/job", base) == {"PATH": "/x"}


def test_submit_specs(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("# comment\necho 1\n\n  echo 2 > out  \n")
    args = parse_submit("--file", str(jobs), "-r", "linux", "--no-rerun", "--env", "none",
                        "-e", "A=1")  # fmt: skip
    specs, env = cli.submit_specs(args)
    assert [s["command"] for s in specs] == ["echo 1", "echo 2 > out"]
    assert all(s["resources"] == "linux" and s["rerunnable"] is False for s in specs)
    assert all(s["cwd"] == os.getcwd() and "env" not in s for s in specs)
    assert env == {"A": "1"}
    args = parse_submit("-d", "sub", "-l", "my.log", "--max-attempts", "5", "--", "true")
    specs, _ = cli.submit_specs(args)
    assert specs == [
        {
            "cwd": str(tmp_path / "sub"),
            "max_attempts": 5,
            "command": ["true"],
            "log": str(tmp_path / "sub" / "my.log"),
        }
    ]


def test_parse_ids() -> None:
    assert clitools.parse_ids(["3", "1..2", "5-6", "7,8", "3"]) == [3, 1, 2, 5, 6, 7, 8]
    for bad in ("x", "0", "5..1", "-3", "1..2..3"):
        with pytest.raises(argparse.ArgumentTypeError):
            clitools.parse_ids([bad])


def test_format_ids() -> None:
    assert clitools.format_ids([1, 2, 3]) == ["1", "2", "3"]
    assert clitools.format_ids(list(range(5, 1005))) == ["submitted 1000 jobs: 5..1004"]
    sparse = [*range(1, 30), 100]
    assert clitools.format_ids(sparse) == [str(i) for i in sparse]


def test_wait_and_control_parse_ranges() -> None:
    args = cli.build_parser().parse_args(["wait", "1..3", "7", "--timeout", "5"])
    assert cli._flatten(args.ids) == [1, 2, 3, 7] and args.timeout == 5
    args = cli.build_parser().parse_args(["--server", "h:1", "forget", "4"])
    assert args.server == "h:1" and args.action == "forget"


def test_ncmgr_start_passes_settings_through(tmp_path: Path) -> None:
    args = ncmgr.build_parser().parse_args(
        [
            "start",
            "--queue",
            "q1",
            "--swd",
            "s",
            "--port",
            "7001",
            "--fsync",
            "never",
            "--recovery-grace",
            "5",
            "--accept-loss",
        ]  # fmt: skip
    )
    where = place.Place(args)
    assert where.queue == "q1" and where.swd.root == tmp_path / "s"
    cmd = ncmgr.server_command(args, where, "127.0.0.1", 7001)
    assert cmd[:3] == [sys.executable, "-m", "crq.server"]
    assert cmd[3:] == ["--queue", "q1", "--swd", str(tmp_path / "s"), "--host", "127.0.0.1",
                       "--port", "7001", "--recovery-grace", "5", "--fsync", "never",
                       "--accept-loss"]  # fmt: skip


def test_ncmgr_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    where = place.Place(ncmgr.build_parser().parse_args(["status"]))
    assert where.queue == "vnc" and where.swd.root == tmp_path / "vnc.swd"
    assert where.url == f"http://127.0.0.1:{wire.default_port('vnc')}"
    monkeypatch.setenv("CRQ_QUEUE", "night")
    registry.register("night", "http://h:7777", "/elsewhere/night.swd", "t")
    where = place.Place(ncmgr.build_parser().parse_args(["stop"]))
    assert where.queue == "night" and str(where.swd.root) == "/elsewhere/night.swd"
    assert where.url == "http://h:7777" and where.token() == "t"


def test_ncmgr_usage_errors() -> None:
    for words in (["start", "--port", "0"], ["start", "--fsync", "sometimes"], ["frobnicate"]):
        with pytest.raises(SystemExit) as exc:
            ncmgr.main(words)
        assert exc.value.code == 2


def test_ncmgr_cleanup_refuses_bad_combinations(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    swd = str(tmp_path / "none.swd")
    assert ncmgr.main(["cleanup", "--swd", swd, "--job", "1", "--dead-host", "h"]) == 1
    assert "one of --list" in capsys.readouterr().err
    assert ncmgr.main(["cleanup", "--swd", swd, "--reset-lock", "--job", "1"]) == 1
    assert "--reset-lock goes alone" in capsys.readouterr().err
    assert ncmgr.main(["cleanup", "--swd", swd, "--standalone", "--list"]) == 1
    err = capsys.readouterr().err
    assert "no trace.db" in err and len(err.strip().splitlines()) == 1


def test_port_busy_and_local_url() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert place.port_busy("127.0.0.1", port)
    assert place.port_busy("127.0.0.1", port) is None
    assert place.local_url("0.0.0.0", 1) == "http://127.0.0.1:1"
    assert place.local_url("::", 1) == "http://[::1]:1"


def test_pid_alive() -> None:
    assert not place.pid_alive(None)
    assert not place.pid_alive(2**22 + 12345)


def test_pid_alive_wants_a_live_server_process() -> None:
    """A server-looking process is alive; the same pid once it is a zombie is not, nor is a
    process that is not a server (a reused pid)."""
    script = "import sys; sys.stdin.read()"
    server = subprocess.Popen([sys.executable, "-c", script, "server"], stdin=subprocess.PIPE)
    other = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE)
    try:
        assert place.pid_alive(server.pid)
        assert not place.pid_alive(other.pid)
        assert server.stdin is not None
        server.stdin.close()
        wait_until(lambda: procfs.is_zombie(server.pid), timeout=60)  # exited, not reaped
        assert not place.pid_alive(server.pid)
    finally:
        for proc in (server, other):
            proc.kill()
            proc.wait()


def test_last_reason(tmp_path: Path) -> None:
    log = tmp_path / "server.out"
    log.write_text("old crq-server: stale\n")
    offset = log.stat().st_size
    with open(log, "a") as f:
        f.write("INFO starting\ncrq-server: port 6321 is busy\nbye\n")
    assert starter.last_reason(log, offset) == "port 6321 is busy"
    assert starter.last_reason(tmp_path / "missing", 0) == "no output"


def test_vovproject_enable(capsys: pytest.CaptureFixture[str]) -> None:
    assert vovproject.main(["enable", "nope"]) == 1
    assert "not registered" in capsys.readouterr().err
    registry.register("q 1", "http://h:1", "/s", "t")
    assert vovproject.main(["enable", "q 1"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "export CRQ_QUEUE='q 1'",
        "export CRQ_SERVER=http://h:1",
    ]


def test_vovproject_list_marks_down(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    registry.register("gone", f"http://127.0.0.1:{port}", "/s", "t")
    assert vovproject.main(["list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["QUEUE", "URL", "SWD", "STATUS"]
    assert out[1].split()[-1] == "down"


def test_unreachable_server_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert cli.main(["--server", f"http://127.0.0.1:{port}", "list"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("crq: cannot reach the crq server at http://127.0.0.1:")
    assert "connection refused" in err and "ncmgr start" in err


def test_progress_line_without_tty() -> None:
    import io

    stream = io.StringIO()
    line = clitools.ProgressLine(stream, every=3600)
    line(0, 0, 10)
    line(5, 0, 10)  # throttled
    line(9, 1, 10)  # finished: always shown
    line.close()
    assert stream.getvalue() == "waiting: 0/10 done\nwaiting: 9/10 done, 1 failed\n"


def test_unexpected_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    def boom(args: argparse.Namespace) -> int:
        raise ValueError("bad\nthing")

    assert clitools.run(boom, argparse.Namespace()) == 1
    err = capsys.readouterr().err
    assert err == "crq: internal error: ValueError: bad thing (CRQ_DEBUG=1 shows details)\n"


def _starter(tmp_path: Path, script: str, stall: float = 0) -> starter.Starter:
    where = place.Place(argparse.Namespace(queue="st", swd=str(tmp_path / "st.swd")))
    where.swd.logs.mkdir(parents=True)
    port = free_port()
    url = place.local_url("127.0.0.1", port)
    cmd = [sys.executable, "-c", script, "server"]
    return starter.Starter(where, cmd, "127.0.0.1", port, url, stall=stall, grace=0)


def test_starter_reports_a_server_that_exits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = "print('crq-server: swd is locked'); raise SystemExit(3)"
    run = _starter(tmp_path, script, stall=starter.START_CAP)  # waits while it lives
    assert run.run() == 1
    err = capsys.readouterr().err
    assert err.startswith("crq: queue st did not start: swd is locked (log: "), err
    assert run.proc is not None and run.proc.returncode == 3


def test_starter_kills_a_server_that_never_opens(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _starter(tmp_path, "import sys; sys.stdin.read()")
    assert run.run() == 1
    err = capsys.readouterr().err
    assert f"(pid {run.pid}) did not open within" in err and err.endswith("; killed it\n"), err
    assert run.proc is not None and run.proc.returncode == -signal.SIGKILL


def test_the_client_imports_nothing_of_the_server() -> None:
    """ncmgr cleanup --standalone/--reset-lock run ``python -m crq.server cleanup``."""
    for source in (ROOT / "client").glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text(), str(source))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            bad = [n for n in names if n.startswith(("crq.server", "server"))]
            assert not bad, f"{source.name}:{node.lineno} imports {bad}"


def test_ncmgr_reset_lock_without_a_lock(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    swd = tmp_path / "q.swd"
    swd.mkdir()
    assert ncmgr.main(["cleanup", "--swd", str(swd), "--reset-lock"]) == 0
    lock = swd / "trace.db" / "recovery.lock"
    assert capsys.readouterr().out == f"crq: no recovery lock ({lock})\n"
