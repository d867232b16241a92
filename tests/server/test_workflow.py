"""Dependencies, arrays and holds end to end (SPEC 10): a real server, a real tasker running
real commands, the real ``crq``, and a kill -9 of the server in the middle of a chain."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.rigs import PATIENCE, ROOT, CrqServer, Tasker, env_with_root, wait_until


def crq(srv: CrqServer, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**env_with_root(), "CRQ_SERVER": srv.url, "CRQ_TOKEN": srv.admin_token}
    return subprocess.run(
        [sys.executable, "-m", "crq.client.cli", *args],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=PATIENCE,
    )  # fmt: skip


def ok(srv: CrqServer, *args: str) -> str:
    out = crq(srv, *args)
    assert out.returncode == 0, (args, out.stdout, out.stderr)
    return out.stdout


def job(srv: CrqServer, job_id: int) -> dict[str, Any]:
    answer: dict[str, Any] = srv.request("GET", f"/jobs/{job_id}")
    return answer


def test_a_chain_runs_in_order_once_through_a_kill_9_of_the_server(
    crq_server: Callable[..., CrqServer], crq_tasker: Callable[..., Tasker], tmp_path: Path
) -> None:
    srv = crq_server("--recovery-grace", "60", "--heartbeat", "2", "--fsync", "always")
    crq_tasker("tk1", "--swd", str(srv.swd), "--slots", "4")
    trail = tmp_path / "trail"
    gate = tmp_path / "gate"
    # the head waits for a file, so the chain is still waiting when the server dies
    first = int(ok(srv, "submit", "--", "sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.05; done"))
    ids = [first]
    for n in range(5):
        line = f"echo {n} >> {trail}"
        ids.append(int(ok(srv, "submit", "--after", str(ids[-1]), "--", "sh", "-c", line)))
    bad = int(ok(srv, "submit", "--dependency", f"afternotok:{first}", "--", "true"))
    assert [job(srv, i)["state"] for i in ids[1:]] == ["waiting"] * 5
    assert job(srv, ids[1])["after"] == [["afterok", first]]
    srv.kill9()
    srv.start(port=srv.port)
    gate.touch()
    for i in ids:
        assert srv.wait(i)["state"] == "done"
    assert trail.read_text().split() == ["0", "1", "2", "3", "4"]  # in order, each once
    stopped = srv.wait(bad)
    assert stopped["state"] == "stopped" and "can never be met" in stopped["reason"]
    out = crq(srv, "submit", "--after", "999999", "--", "true")
    assert out.returncode != 0 and "no job 999999" in out.stderr


def test_an_array_runs_each_index_within_its_cap(
    crq_server: Callable[..., CrqServer], crq_tasker: Callable[..., Tasker], tmp_path: Path
) -> None:
    srv = crq_server()
    crq_tasker("tk1", "--swd", str(srv.swd), "--slots", "4")
    marks = tmp_path / "marks"
    marks.mkdir()
    # each element notes its index, then counts the elements running beside it
    script = (
        f"touch {marks}/run.$CRQ_ARRAY_INDEX;"
        f" ls {marks} | grep -c run > {marks}/seen.$CRQ_ARRAY_INDEX;"
        f" sleep 0.3; rm {marks}/run.$CRQ_ARRAY_INDEX; echo $CRQ_ARRAY_ID:$CRQ_ARRAY_INDEX"
    )
    log = str(tmp_path / "out.%A_%a.log")
    first = int(ok(srv, "submit", "--array", "2-12:2%2", "-l", log, "--", "sh", "-c", script))
    ids = list(range(first, first + 6))
    for i in ids:
        assert srv.wait(i)["state"] == "done"
    for k, index in enumerate(range(2, 13, 2)):
        out = (tmp_path / f"out.{first}_{index}.log").read_text().strip()
        assert out == f"{first}:{index}"
        assert int((marks / f"seen.{index}").read_text()) <= 2  # never more than %2 at once
        assert job(srv, first + k)["index"] == index and job(srv, first + k)["array"] == first
    listed = json.loads(ok(srv, "list", "--array", str(first), "--json", "--oldest"))
    assert [j["index"] for j in listed] == list(range(2, 13, 2))
    out = crq(srv, "list", "--array", str(first + 1))
    assert out.returncode != 0 and f"no array {first + 1}" in out.stderr
    # the elements that did not end done rerun together: none here
    out = crq(srv, "rerun", "--array", str(first))
    assert out.returncode == 0 and f"no jobs of array {first} to rerun" in out.stderr
    again = ok(srv, "rerun", "--array", str(first), "--state", "done", "--yes")
    assert again.count("requeued") == 6
    for i in ids:
        assert srv.wait(i)["state"] == "done"


def test_hold_and_release_from_the_command_line(
    crq_server: Callable[..., CrqServer], crq_tasker: Callable[..., Tasker]
) -> None:
    srv = crq_server()
    crq_tasker("tk1", "--swd", str(srv.swd), "--slots", "2")
    held = int(ok(srv, "submit", "--hold", "--", "true"))
    other = int(ok(srv, "submit", "--", "true"))
    assert srv.wait(other)["state"] == "done"
    assert job(srv, held)["state"] == "waiting" and job(srv, held)["reason"] == "held"
    assert "held" in ok(srv, "hold", str(held))  # holding a held job again: fine
    assert f"job {held} released" in ok(srv, "release", str(held))
    assert srv.wait(held)["state"] == "done"
    out = crq(srv, "hold", str(held))
    assert out.returncode != 0 and "only queued or waiting jobs hold" in out.stderr
    assert [h["action"] for h in job(srv, held)["history"]] == ["release"]
    queued = [int(ok(srv, "submit", "--", "sleep", "30")) for _ in range(3)]
    last = queued[-1]
    wait_until(lambda: job(srv, last)["state"] == "queued" and job(srv, queued[1])["pid"])
    ok(srv, "hold", str(last))
    assert job(srv, last)["state"] == "waiting"
    assert [h["action"] for h in job(srv, last)["history"]] == ["hold"]
    for i in queued:
        ok(srv, "stop", str(i))
