"""Damaged storage is refused or reported, never silently lost (issue 9).

Real servers, killed with -9 after acknowledging jobs; then the journal is cut, emptied or
deleted as a failing disk or a careless operator would. The start must refuse and name
the file, the offset and ``--accept-loss``; with that flag the report lists what was lost,
and no acknowledged id is ever handed out again. Also: empty and unreadable old segments
do not stop pruning, a recovery killed half-way does not need an operator, and the swd is
private to its owner.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from crq.server import checkpoint, fence, snapshot
from crq.server.journal import frame

from crq.procfs import boot_id
from tests.core import Core, write_journal
from tests.rigs import (
    PATIENCE,
    ROOT,
    CrqServer,
    env_with_root,
    server_available,
    wait_until,
)

pytestmark = pytest.mark.skipif(not server_available(), reason="needs the server package")

SETTINGS = ("--heartbeat", "1", "--recovery-grace", "5")


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[CrqServer]:
    s = CrqServer(tmp_path / "q.swd", "dmg", *SETTINGS)
    yield s
    s.kill9()


def trace(srv: CrqServer) -> Path:
    return srv.swd / "trace.db"


def submit_many(srv: CrqServer, n: int, batch: int = 10) -> list[int]:
    spec = {"command": "true", "cwd": "/tmp"}
    ids: list[int] = []
    while len(ids) < n:
        ids += srv.submit(*[spec] * min(batch, n - len(ids)))
    return ids


def newest_segment(srv: CrqServer) -> Path:
    """The newest segment that holds records (a start leaves one behind it with no more
    than its epoch header)."""
    return max(
        (p for p in trace(srv).glob("CR.*") if p.stat().st_size > fence.HEADER.size),
        key=lambda p: p.name,
    )


def mark_catches_up(srv: CrqServer) -> None:
    """Wait until durable.json covers what the server has made durable (about a second)."""
    durable = srv.request("GET", "/server")["journal"]["durable_seq"]
    mark = trace(srv) / "durable.json"  # written before the server serves
    wait_until(
        lambda: not mark.exists() or json.loads(mark.read_text())["seq"] >= durable,
        step=0.1,
    )


def open_normal(srv: CrqServer) -> None:
    wait_until(lambda: srv.request("GET", "/server")["mode"] == "normal", step=0.1)


def refused(srv: CrqServer) -> str:
    with pytest.raises(AssertionError, match="server exited 3") as e:
        srv.start(port=srv.port)
    return str(e.value)


def last_report(srv: CrqServer) -> dict[str, Any]:
    reports = sorted(srv.swd.glob("crash_recovery_report_*.json"))
    assert reports, "no crash_recovery_report written"
    return json.loads(reports[-1].read_text())


def accept_loss_and_check(srv: CrqServer, acked: list[int]) -> dict[str, Any]:
    """Start with --accept-loss: the report names the loss; new ids are above every acked one."""
    srv.extra.append("--accept-loss")
    srv.start(port=srv.port)
    open_normal(srv)
    rep = last_report(srv)
    assert rep["journal"]["losses"] and rep["journal"]["lost_seq"], rep["journal"]
    (new,) = srv.submit({"command": "true", "cwd": "/tmp"})
    assert new > max(acked), f"id {new} handed out again (acknowledged up to {max(acked)})"
    srv.extra.remove("--accept-loss")
    return rep


def test_newest_segment_emptied_without_snapshot_is_refused(srv: CrqServer) -> None:
    """Killed right after the acks (the mark has not caught up): still no new queue."""
    srv.start()
    acked = submit_many(srv, 600, batch=100)
    srv.kill9()
    seg = newest_segment(srv)
    seg.write_bytes(b"")
    msg = refused(srv)
    assert "journal ends early" in msg and "--accept-loss" in msg and seg.name in msg, msg
    assert not list(srv.swd.glob("crash_recovery_report_*")), "a refused start reported"
    rep = accept_loss_and_check(srv, acked)
    assert rep["journal"]["lost_seq"][0][0] == 1
    assert rep["journal"]["lost_ids"][0] == 1, rep["journal"]
    text = sorted(p for p in srv.swd.glob("crash_recovery_report_*") if p.suffix != ".json")
    assert "LOSS ACCEPTED: journal ends early" in text[-1].read_text()
    srv.kill9()
    srv.start(port=srv.port)  # the loss was accepted once: the next start does not refuse
    open_normal(srv)


def test_newest_segment_deleted_is_refused(srv: CrqServer) -> None:
    srv.start()
    first = submit_many(srv, 100)
    srv.stop()  # clean: a snapshot holds these
    srv.start(port=srv.port)
    later = submit_many(srv, 430)
    mark_catches_up(srv)
    srv.kill9()
    seg = newest_segment(srv)
    seg.unlink()
    msg = refused(srv)
    assert "journal ends early" in msg and f"{seg.name} had" in msg and "now missing" in msg, msg
    assert "--accept-loss" in msg
    rep = accept_loss_and_check(srv, first + later)
    assert rep["journal"]["lost_ids"] == [later[0], later[-1]], rep["journal"]
    assert srv.request("GET", f"/jobs/{first[-1]}")["id"] == first[-1]


def test_newest_segment_cut_in_half_is_not_a_torn_tail(srv: CrqServer) -> None:
    srv.start()
    acked = submit_many(srv, 300)
    mark_catches_up(srv)
    srv.kill9()
    seg = newest_segment(srv)
    half = seg.stat().st_size // 2
    os.truncate(seg, half)
    msg = refused(srv)
    assert "journal ends early" in msg and f"{seg.name} at byte" in msg, msg
    assert "--accept-loss" in msg
    assert seg.stat().st_size == half, "a refused start changed the journal"
    rep = accept_loss_and_check(srv, acked)
    lost = rep["journal"]["lost_ids"]
    assert lost and lost[1] == acked[-1], rep["journal"]
    assert rep["journal"]["bytes_discarded"] < half


@pytest.mark.parametrize("cut", ["emptied", "halved", "torn record"])
def test_no_acked_id_is_handed_out_again_after_a_loss(srv: CrqServer, cut: str) -> None:
    """Killed right after the acks, the tail lost, the loss accepted at once: ids go on."""
    srv.start()
    acked = submit_many(srv, 200)
    srv.kill9()
    seg = newest_segment(srv)
    size = seg.stat().st_size
    os.truncate(seg, {"emptied": 0, "halved": size // 2, "torn record": size - 5}[cut])
    srv.extra.append("--accept-loss")
    srv.start(port=srv.port)
    open_normal(srv)
    new = srv.submit(*[{"command": "true", "cwd": "/tmp"}] * 3)
    assert min(new) > max(acked), f"ids {new} handed out again (acked up to {max(acked)})"
    srv.kill9()  # and again, with nothing lost this time
    srv.start(port=srv.port)
    open_normal(srv)
    (again,) = srv.submit({"command": "true", "cwd": "/tmp"})
    assert again > max(new)


def test_mid_file_damage_reports_the_jobs_it_can_still_read(srv: CrqServer) -> None:
    srv.start()
    before = submit_many(srv, 5)
    hit = srv.submit({"command": "true", "cwd": "/tmp"})
    after = submit_many(srv, 5)
    srv.kill9()
    seg = newest_segment(srv)
    data = bytearray(seg.read_bytes())
    at = data.find(b'"jobs":[[%d,' % hit[0])  # inside the record of that one submit
    assert at > 0
    data[at] ^= 0xFF
    seg.write_bytes(bytes(data))
    msg = refused(srv)
    assert "checksum" in msg and "--accept-loss" in msg, msg
    rep = accept_loss_and_check(srv, before + hit + after)
    assert set(after) <= set(rep["journal"]["lost_jobs"]), rep["journal"]
    kept = [Path(k) for k in rep["journal"]["kept"]]
    assert kept and all(k.exists() for k in kept)
    assert srv.request("GET", f"/jobs/{before[-1]}")["state"] == "queued"


def test_a_queue_emptied_of_journal_and_snapshots_is_not_taken_for_new(srv: CrqServer) -> None:
    srv.start()
    acked = submit_many(srv, 20)
    srv.stop()
    for p in [*trace(srv).glob("CR.*"), *trace(srv).glob("snapshot.*")]:
        p.unlink()
    msg = refused(srv)
    assert "queue.json" in msg and "no journal segment and no snapshot" in msg, msg
    assert "--accept-loss" in msg
    ident = json.loads((trace(srv) / "queue.json").read_text())
    assert ident["queue"] == "dmg" and ident["uuid"]
    accept_loss_and_check(srv, acked)
    assert json.loads((trace(srv) / "queue.json").read_text())["uuid"] == ident["uuid"]


def test_a_swd_of_an_older_version_gets_its_identity(srv: CrqServer) -> None:
    srv.start()
    acked = submit_many(srv, 3)
    srv.kill9()
    (trace(srv) / "queue.json").unlink(missing_ok=True)  # as an older version left it
    (trace(srv) / "durable.json").unlink(missing_ok=True)
    srv.start(port=srv.port)
    open_normal(srv)
    assert (trace(srv) / "queue.json").exists() and (trace(srv) / "durable.json").exists()
    assert [srv.request("GET", f"/jobs/{i}")["id"] for i in acked] == acked


def test_an_empty_segment_does_not_stop_pruning(srv: CrqServer) -> None:
    srv.start()
    submit_many(srv, 10)
    srv.stop()
    # what a server killed between opening its segment and its first event leaves: the
    # epoch header alone (one killed before the header, an empty file: both hold nothing)
    (trace(srv) / "CR.000002").write_bytes(fence.header(2))
    (trace(srv) / "CR.000003").write_bytes(b"")
    for _ in range(3):  # a kill storm: each start leaves a segment, some empty
        srv.start(port=srv.port)
        open_normal(srv)
        srv.kill9()
    srv.start(port=srv.port)
    open_normal(srv)
    submit_many(srv, 10)
    srv.request("POST", "/server/stop", json={})  # its checkpoint covers everything before
    assert srv.proc is not None and srv.proc.wait(timeout=PATIENCE) == 0
    left = sorted(p.name for p in trace(srv).glob("CR.*"))
    assert len(left) == 1, f"old segments kept: {left}"


def test_prune_passes_empty_and_unreadable_old_segments(tmp_path: Path) -> None:
    core = Core()
    for _ in range(10):
        core.submit(1)
    n = len(core.events)
    write_journal(tmp_path, core.events[:4], first_seq=1, segment=1)
    (tmp_path / "CR.000002").write_bytes(b"")
    garbled = b"".join(frame(i + 1, b"x") for i in range(4, n - 3))
    (tmp_path / "CR.000003").write_bytes(b"\xff" * 12 + garbled[12:])
    write_journal(tmp_path, core.events[n - 3 :], first_seq=n - 2, segment=4)
    (tmp_path / "CR.000005").write_bytes(b"")  # the segment being written
    snapshot.write(core.state, tmp_path, fsync=False)
    checkpoint.prune(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("CR.*")) == ["CR.000004", "CR.000005"]


def _fake_lock(srv: CrqServer, **held: Any) -> Path:
    lock = trace(srv) / "recovery.lock"
    lock.write_text(json.dumps({"time": 1.0, **held}))
    return lock


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_dead_recovery_of_this_boot_is_taken_over(srv: CrqServer) -> None:
    srv.start()
    submit_many(srv, 3)
    srv.kill9()
    pid = _dead_pid()
    _fake_lock(srv, pid=pid, host=socket.gethostname(), boot=boot_id())
    srv.start(port=srv.port)
    open_normal(srv)
    rep = last_report(srv)
    assert rep["lock_taken_over"]["pid"] == pid
    assert not (trace(srv) / "recovery.lock").exists()
    assert "took over the recovery lock" in (srv.swd / "logs" / "server.log").read_text()


@pytest.mark.parametrize("who", ["another boot", "another host", "no boot recorded"])
def test_other_recovery_locks_still_refuse(srv: CrqServer, who: str) -> None:
    srv.start()
    submit_many(srv, 3)
    srv.kill9()
    host, boot = socket.gethostname(), boot_id()
    held = {
        "another boot": {"host": host, "boot": "0" * 32},
        "another host": {"host": "elsewhere.example", "boot": boot},
        "no boot recorded": {"host": host},
    }[who]
    lock = _fake_lock(srv, pid=_dead_pid(), **held)
    msg = refused(srv)
    assert "recovery" in msg and lock.exists(), msg
    if who == "another host":
        assert "already running" in msg
        return
    assert "--reset-lock" in msg
    out = subprocess.run(
        [sys.executable, "-m", "crq.client.ncmgr", "cleanup", "--swd", str(srv.swd),
         "--reset-lock"],
        cwd=ROOT, env=env_with_root(), capture_output=True, text=True, timeout=PATIENCE,
    )  # fmt: skip
    assert out.returncode == 0 and not lock.exists(), out.stderr
    srv.start(port=srv.port)
    open_normal(srv)
    assert last_report(srv)["lock_taken_over"] is None


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_the_swd_is_private(srv: CrqServer) -> None:
    root = srv.swd
    (root / "trace.db").mkdir(parents=True, mode=0o755)
    (root / "logs").mkdir(mode=0o755)
    os.chmod(root / "trace.db", 0o755)  # as an older version (and a umask of 022) left them
    os.chmod(root / "logs", 0o755)
    (root / "logs" / "server.log").write_text("")
    os.chmod(root / "logs" / "server.log", 0o644)
    srv.start()
    srv.submit({"command": "true", "cwd": "/tmp", "env": {"SECRET": "s3cr3t"}})
    srv.stop()  # a snapshot
    srv.start(port=srv.port)
    srv.submit({"command": "true", "cwd": "/tmp"})
    srv.kill9()
    srv.start(port=srv.port)  # a recovery: its report
    open_normal(srv)
    for d in ("trace.db", "logs", "security"):
        assert _mode(root / d) == 0o700, d
    files = [
        *(root / "trace.db").iterdir(),
        *(root / "logs").iterdir(),
        *(root / "security").iterdir(),
        *root.glob("crash_recovery_report_*"),
    ]
    names = {p.name for p in files}
    assert {"server.log", "queue.json", "durable.json"} <= names
    assert any(n.startswith("snapshot.") for n in names) and any(n.startswith("CR.") for n in names)
    assert any(n.startswith("crash_recovery_report_") for n in names)
    loose = {p.name: oct(_mode(p)) for p in files if p.is_file() and _mode(p) & 0o077}
    assert not loose, f"readable by others: {loose}"
