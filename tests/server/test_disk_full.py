"""A full disk under a real server: nothing is acknowledged that is not on disk, nothing is lost.

The swd lives on a small tmpfs mounted for the test (root only; skipped elsewhere, with the
reason). A filler file takes the last free byte; then the server must hold its replies (not
fail them, not lie), keep answering /healthz, and carry on once space returns. A clean stop
that cannot write its snapshot must not mark the stop clean: the next start recovers from
the journal.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.rigs import PATIENCE, CrqServer, server_available, wait_until

SIZE = "8m"


def _can_mount(where: Path) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)],
                        capture_output=True).returncode == 0  # fmt: skip
    if ok:
        subprocess.run(["umount", str(where)], check=True)
    return ok


pytestmark = pytest.mark.skipif(
    not server_available() or os.geteuid() != 0, reason="mounting a small tmpfs needs root"
)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    fs = tmp_path / "fs"
    if not _can_mount(fs):
        pytest.skip("this machine does not let root mount a tmpfs")
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE}", "tmpfs", str(fs)], check=True)
    try:
        yield fs
    finally:
        subprocess.run(["umount", "-l", str(fs)], check=False)


def fill(fs: Path) -> Path:
    """Take every free byte of the file system; returns the filler to delete."""
    filler = fs / "filler"
    block = b"\0" * 65536
    with open(filler, "wb", buffering=0) as f:
        while True:
            try:
                f.write(block)
            except OSError:
                break
        while True:  # the last few bytes too
            try:
                f.write(b"\0")
            except OSError:
                break
    return filler


def job(n: int) -> dict[str, Any]:
    return {"command": ["true", str(n)], "cwd": "/tmp"}


def submit_in_thread(srv: CrqServer, out: dict[str, Any]) -> threading.Thread:
    def go() -> None:
        # more than the page the journal's last write left room in (tmpfs allocates pages)
        batch = {"jobs": [job(n) for n in range(200)]}
        try:
            out["response"] = srv.api("POST", "/jobs", json=batch, timeout=120)
        except httpx.HTTPError as e:  # the server was killed while it held the reply
            out["error"] = e

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t


def one_acked_one_held(
    srv: CrqServer, fs: Path
) -> tuple[int, Path, dict[str, Any], threading.Thread, dict[str, Any]]:
    """One job acknowledged, the disk filled, a batch submitted in a thread and held.

    Returns the acknowledged id, the filler, the thread's outcome and the thread, and the
    server's status once it says the disk is full (the log is on that disk too).
    """
    (first,) = srv.request("POST", "/jobs", json=job(1))["ids"]
    filler = fill(fs)
    out: dict[str, Any] = {}
    t = submit_in_thread(srv, out)
    info = wait_until(
        lambda: (s := srv.request("GET", "/server"))["journal"]["disk_full_since"] and s
    )
    return first, filler, out, t, info


def test_replies_wait_for_space_and_every_ack_survives_a_kill(small_fs: Path) -> None:
    srv = CrqServer(small_fs / "q.swd", "full", "--fsync", "always")
    srv.start()
    try:
        first, filler, out, t, info = one_acked_one_held(srv, small_fs)
        assert info["counts"] is None, "counts that nothing durable backs yet are not shown"
        assert httpx.get(f"{srv.url}/healthz", timeout=5).status_code == 200
        metrics = httpx.get(f"{srv.url}/metrics", timeout=5).text
        assert "crq_journal_disk_full 1.0" in metrics
        assert t.is_alive() and "response" not in out, "acknowledged while the disk was full"
        filler.unlink()
        t.join(timeout=PATIENCE)
        r = out["response"]
        assert r.status_code == 201, r.text
        held = r.json()["ids"]
        assert srv.request("GET", "/server")["journal"]["disk_full_since"] is None
        srv.kill9()
        srv.start()
        wait_until(lambda: srv.request("GET", "/server")["mode"] == "normal")
        for job_id in (first, *held):
            assert srv.request("GET", f"/jobs/{job_id}")["state"] == "queued"
    finally:
        srv.kill9()


def test_a_kill_while_replies_wait_loses_only_what_was_not_acknowledged(small_fs: Path) -> None:
    srv = CrqServer(small_fs / "q.swd", "full", "--fsync", "always")
    srv.start()
    try:
        first, filler, out, t, _ = one_acked_one_held(srv, small_fs)
        srv.kill9()
        t.join(timeout=PATIENCE)
        assert "response" not in out and "error" in out, "no answer from a server killed mid-wait"
        filler.unlink()
        srv.start()
        info = wait_until(lambda: (s := srv.request("GET", "/server"))["mode"] == "normal" and s)
        assert srv.request("GET", f"/jobs/{first}")["state"] == "queued"
        assert info["counts"]["queued"] in (1, 201), "a batch is journaled whole or not at all"
    finally:
        srv.kill9()


def test_a_checkpoint_that_finds_no_room_fails_alone(small_fs: Path) -> None:
    """The forked snapshot runs out of space: it is dropped, the server serves on, the
    journal still holds everything, and the next checkpoint, with room, succeeds."""
    srv = CrqServer(small_fs / "q.swd", "full", "--fsync", "always", "--checkpoint-bytes", "1")
    srv.start()
    try:
        ids = srv.request("POST", "/jobs", json={"jobs": [job(i) for i in range(4000)]})["ids"]
        trace = srv.swd / "trace.db"
        wait_until(lambda: list(trace.glob("snapshot.*")))  # room: it works
        filler = fill(small_fs)
        os.truncate(filler, filler.stat().st_size - 256 * 1024)  # room for the journal only
        more = srv.request("POST", "/jobs", json={"jobs": [job(i) for i in range(1000)]})
        ids += more["ids"]
        failed = 'crq_checkpoints_total{result="failed"} 1.0'
        wait_until(lambda: failed in httpx.get(f"{srv.url}/metrics", timeout=30).text)
        assert not list(trace.glob(".snapshot.*.tmp")), "the partial snapshot must not stay"
        assert httpx.get(f"{srv.url}/healthz", timeout=5).status_code == 200
        filler.unlink()
        ids += srv.request("POST", "/jobs", json={"jobs": [job(i) for i in range(10)]})["ids"]
        srv.kill9()
        srv.start()
        info = wait_until(lambda: (s := srv.request("GET", "/server"))["mode"] == "normal" and s)
        assert info["counts"]["queued"] == len(ids) == 5010
    finally:
        srv.kill9()


def test_a_clean_stop_that_cannot_write_its_snapshot_is_not_clean(small_fs: Path) -> None:
    srv = CrqServer(small_fs / "q.swd", "full", "--fsync", "always")
    srv.start()
    try:
        ids = srv.request("POST", "/jobs", json={"jobs": [job(i) for i in range(2000)]})["ids"]
        filler = fill(small_fs)
        srv.request("POST", "/server/stop", json={"freeze": False})
        assert srv.proc is not None
        code = srv.proc.wait(timeout=PATIENCE)
        err = srv.proc.stderr.read().decode() if srv.proc.stderr else ""
        assert code != 0, "a stop that wrote no snapshot must not exit 0"
        assert "Traceback" not in err and "snapshot" in err, err
        trace = srv.swd / "trace.db"
        assert not (trace / "clean").exists()
        assert not list(trace.glob(".snapshot.*.tmp")), "the partial snapshot must not stay"
        filler.unlink()
        srv.start()
        info = wait_until(lambda: (s := srv.request("GET", "/server"))["mode"] == "normal" and s)
        reports = list(srv.swd.glob("crash_recovery_report_*.json"))
        assert reports, "an unclean stop is recovered, with a report"
        assert info["counts"]["queued"] == len(ids)
    finally:
        with contextlib.suppress(Exception):
            srv.kill9()
