"""The pieces of ``crq status``, ``crq list --format``, the bulk selection and the log reader
on their own (the commands end to end: tests/client/test_output.py)."""

from __future__ import annotations

import argparse
import base64
import io
import os
import pwd
from pathlib import Path
from typing import Any

import pytest
from crq.client import jobcmds
from crq.client.clitools import UsageError
from crq.client.selection import confirm, describe_selection, select_jobs
from crq.tasker.agent import log_answer

from crq import logread


def test_snakemake_words() -> None:
    words = {s: jobcmds.snakemake_word(s) for s in ("queued", "waiting", "running", "done")}
    assert words == {"queued": "running", "waiting": "running", "running": "running",
                     "done": "success"}  # fmt: skip
    for state in ("failed", "stopped", "lost", "unknown"):
        assert jobcmds.snakemake_word(state) == "failed"


def test_list_fields() -> None:
    assert jobcmds.list_fields("id, State,priority,exit_code") == ["id", "state", "prio", "exit"]
    with pytest.raises(argparse.ArgumentTypeError, match="unknown field 'nope'; fields: id,"):
        jobcmds.list_fields("id,nope")
    with pytest.raises(argparse.ArgumentTypeError, match="no field"):
        jobcmds.list_fields(",")
    text = jobcmds.format_jobs([{"id": 7, "state": "done", "exit_code": 0}], ["id", "exit"])
    assert text.splitlines() == ["ID  EXIT", " 7  0"]


class FakeClient:
    def __init__(self, jobs: list[dict[str, Any]]) -> None:
        self.jobs = jobs
        self.calls: list[tuple[str | None, str | None]] = []

    def list(
        self, state: str | None = None, user: str | None = None, array: int | None = None
    ) -> list[dict[str, Any]]:
        self.calls.append((state, user))
        return [j for j in self.jobs if (not state or j["state"] == state)
                and (not user or j["user"] == user)
                and (array is None or j.get("array") == array)]  # fmt: skip


def test_select_jobs_by_user_states_and_glob() -> None:
    jobs = [
        {"id": 3, "state": "queued", "user": "a", "name": "sim-1"},
        {"id": 1, "state": "running", "user": "a", "name": "sim-2"},
        {"id": 2, "state": "queued", "user": "b", "name": "sim-3"},
        {"id": 4, "state": "queued", "user": "a", "name": None, "command": ["sim", "x"]},
    ]
    client = FakeClient(jobs)
    got = select_jobs(client, user="a", state=["queued", "running"], name="sim*")  # type: ignore[arg-type]
    assert [j["id"] for j in got] == [1, 3, 4]
    assert client.calls == [("queued", "a"), ("running", "a")]
    assert [j["id"] for j in select_jobs(client, name="sim-[23]")] == [1, 2]  # type: ignore[arg-type]
    assert describe_selection("a", ["queued"], "x*") == "jobs of a, queued, named 'x*'"


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_confirm() -> None:
    assert confirm("stop", 10, "jobs", False)
    assert confirm("stop", 11, "jobs", True)
    with pytest.raises(UsageError, match="give --yes"):
        confirm("stop", 11, "jobs", False, stdin=io.StringIO("y\n"))
    err = io.StringIO()
    assert confirm("stop", 11, "jobs", False, stdin=Tty("y\n"), stderr=err)
    assert err.getvalue() == "crq: stop 11 jobs? [y/N] "
    assert not confirm("stop", 11, "jobs", False, stdin=Tty("\n"), stderr=io.StringIO())


def test_read_chunk_and_the_taskers_answer(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_bytes(b"0123456789")
    assert logread.read_chunk(str(log), 2, 3, None) == (b"234", 10)
    assert logread.read_chunk(str(log), 20, 3, None) == (b"", 10)
    me = pwd.getpwuid(os.geteuid()).pw_name
    ask = {"id": "a1", "path": str(log), "user": me, "offset": 8, "max": 100}
    assert log_answer(ask) == {"id": "a1", "data": base64.b64encode(b"89").decode(), "size": 10}
    assert log_answer({**ask, "path": str(tmp_path / "no")})["error"] == "not_found"
    assert log_answer({**ask, "path": str(tmp_path)})["error"] == "refused"  # a directory
    assert log_answer({"id": "a2"})["error"] == "failed"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(logread.LogRefused, match="not a regular file"):
        logread.read_chunk(str(fifo), 0, 10, None)
    with pytest.raises(logread.LogRefused, match="unknown on this host"):
        logread.read_chunk(str(log), 0, 10, "no-such-user-here")
