"""Terminal formatting: tables, human times and durations."""

from __future__ import annotations

import time

from crq.client import table
from crq.client.errors import recovery_progress
from crq.client.views import (
    JOB_HEADERS,
    TASKER_HEADERS,
    counts_text,
    describe_end,
    info_text,
    job_rows,
    recovery_text,
    tasker_rows,
)


def test_table_aligns_columns_without_trailing_blanks() -> None:
    out = table.format_table(
        ("ID", "NAME", "EXIT"), [[1, "a", 0], [1000, "longer", None]], right=(0,)
    )
    lines = out.splitlines()
    assert lines == [
        "  ID  NAME    EXIT",
        "   1  a       0",
        "1000  longer  -",
    ]
    assert all(line == line.rstrip() for line in lines)


def test_cell_and_clip() -> None:
    assert table.cell(None) == "-" and table.cell("") == "-"
    assert table.cell(True) == "yes" and table.cell(False) == "no"
    assert table.clip("abcdef", 4) == "abc…"
    assert table.clip("abc", 4) == "abc"


def test_durations() -> None:
    assert table.duration(None) == "-"
    assert table.duration(0.44) == "0.4s"
    assert table.duration(12.7) == "12s"
    assert table.duration(184) == "3m04s"
    assert table.duration(2 * 3600 + 5 * 60) == "2h05m"
    assert table.duration(3 * 86400 + 4 * 3600) == "3d04h"
    assert table.duration(-3) == "0.0s"


def test_ago() -> None:
    now = 1_000_000.0
    assert table.ago(None) == "-"
    assert table.ago(now - 3, now) == "3s ago"
    assert table.ago(now - 300, now) == "5m ago"
    assert table.ago(now - 7200, now) == "2h ago"
    assert table.ago(now - 4 * 86400, now) == "4d ago"
    assert table.ago(now + 3, now) == "in 3s"


def test_clock() -> None:
    now = time.time()
    assert table.clock(now, now) == time.strftime("%H:%M:%S", time.localtime(now))
    assert table.clock(now - 400 * 86400, now).count("-") == 2
    assert table.when(None) == "-"
    assert table.when(now - 2, now).endswith("(2s ago)")


def test_exit_status() -> None:
    assert table.exit_status({"exit_code": None}) == "-"
    assert table.exit_status({"exit_code": 0}) == "0"
    assert table.exit_status({"exit_code": None, "signal": 9}) == "SIG9"
    assert table.exit_status({"signal": "SIGTERM"}) == "SIGTERM"


def test_job_rows_and_tasker_rows() -> None:
    now = 1_000_000.0
    job = {
        "id": 7,
        "state": "done",
        "priority": 4,
        "user": "ann",
        "name": None,
        "command": ["echo", "hello world"],
        "tasker": "t1",
        "submitted": now - 65,
        "exit_code": 0,
    }
    assert job_rows([job], now) == [
        ["7", "done", "4", "ann", "echo 'hello world'", "t1", "1m ago", "0"]
    ]
    assert len(JOB_HEADERS) == len(job_rows([job], now)[0])
    tasker = {
        "name": "t1",
        "host": "h1",
        "state": "ready",
        "slots": 4,
        "free_slots": 3,
        "running": [7],
        "last_contact": now - 2,
        "resources": "CORES/4",
    }
    rows = tasker_rows([tasker], now)
    assert rows == [["t1", "h1", "ready", "1/4", "7", "2s ago", "CORES/4"]]
    assert len(TASKER_HEADERS) == len(rows[0])


def test_info_text_has_fields_and_attempts() -> None:
    now = time.time()
    job = {
        "id": 3,
        "name": "build",
        "user": "ann",
        "state": "failed",
        "priority": 4,
        "resources": "CORES/2",
        "command": "make all",
        "cwd": "/w",
        "env": {"A": "1"},
        "log": "/w/crq.3.log",
        "rerunnable": True,
        "max_attempts": 3,
        "attempt": 2,
        "tasker": "t1",
        "host": "h1",
        "pid": 99,
        "submitted": now - 100,
        "started": now - 90,
        "ended": now - 30,
        "exit_code": 2,
        "signal": None,
        "reason": None,
        "attempts": [
            {
                "attempt": 1,
                "tasker": "t0",
                "host": "h0",
                "dispatched": now - 99,
                "started": now - 98,
                "ended": now - 95,
                "outcome": "lost",
                "exit_code": None,
            },
            {
                "attempt": 2,
                "tasker": "t1",
                "host": "h1",
                "dispatched": now - 91,
                "started": now - 90,
                "ended": now - 30,
                "outcome": "failed",
                "exit_code": 2,
            },
        ],
    }
    text = info_text(job, now=now)
    assert "failed, exit 2" in text
    assert "/w/crq.3.log" in text
    assert "t1 on h1 (pid 99)" in text
    assert "ran 1m00s" in text
    assert "1 variables" in text and "A=1" not in text
    assert "attempts:" in text and "lost" in text
    assert "A=1" in info_text(job, show_env=True, now=now)


def test_recovery_and_counts_text() -> None:
    rec = {"expected": ["a", "b", "c"], "reconnected": ["a", "b"], "seconds_left": 87.4}
    assert recovery_progress(rec) == "2/3 taskers back, ~87 s left"
    assert recovery_progress(rec, approx=False) == "2/3 taskers back, 87 s left"
    assert recovery_progress(None) == ""
    assert "(missing: c)" in recovery_text({**rec, "events_replayed": 5})
    assert counts_text({"done": 3, "queued": 1, "failed": 0}) == "1 queued, 3 done"
    assert counts_text({}) == "none"


def test_describe_end_names_exit_and_reason() -> None:
    job = {"id": 12, "state": "failed", "exit_code": 1, "reason": "killed by the operator"}
    assert describe_end(job) == "job 12 failed (exit 1, killed by the operator)"
    assert describe_end({"id": 3, "state": "lost"}) == "job 3 lost"
