"""``crq.client.Executor`` against a real server and a real tasker running real commands:
results, failures, order, one watching stream for many jobs, cancel, a kill -9 of the server
in the middle of ``as_completed``, the exported environment, and a submit during recovery."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, as_completed, wait
from pathlib import Path

import pytest
from crq.client import Client, CrashRecovery, CrqError, Executor, Job, JobFailed

from crq import wire
from tests.rigs import PATIENCE, CrqServer, Tasker, kill_jobs, wait_until

NOWHERE = "no_such_host_attribute"  # a resource no tasker offers: the job stays queued
SECRET = "ghost-session-secret-0123456789"


@pytest.fixture(scope="module")
def queue(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CrqServer]:
    """One server and a 4-slot tasker for the tests that leave both as they found them."""
    root = tmp_path_factory.mktemp("executor")
    srv = CrqServer(root / "q.swd", "exq")
    tasker = Tasker(root / "tk1.state", "--swd", str(srv.swd), "--slots", "4", name="tk1")
    try:
        srv.start()
        tasker.start()
        yield srv
    finally:
        tasker.kill9()
        kill_jobs(tasker.state)
        srv.kill9()


def executor(srv: CrqServer, **options: object) -> Executor:
    return Executor(srv.url, srv.admin_token, srv.queue, **options)  # type: ignore[arg-type]


def test_futures_resolve_with_the_jobs_and_a_failure_raises(
    queue: CrqServer, tmp_path: Path
) -> None:
    with executor(queue) as ex:
        ok = ex.submit(["sh", "-c", "echo hi"], cwd=str(tmp_path), name="ok")
        bad = ex.submit("exit 3", cwd=str(tmp_path), name="bad")
        job = ok.result(PATIENCE)
        assert isinstance(job, Job) and job.ok and job.state == wire.DONE
        assert job.exit_code == 0 and job.name == "ok" and job["id"] == job.id == ok.job_id
        with pytest.raises(JobFailed) as failed:
            bad.result(PATIENCE)
    e = failed.value
    assert e.job.state == wire.FAILED and e.returncode == 3 and e.cmd == "exit 3"
    assert str(e) == f"job {bad.job_id} failed with exit status 3", str(e)
    assert isinstance(e, CrqError)


def test_map_keeps_the_order_of_its_inputs(queue: CrqServer, tmp_path: Path) -> None:
    # the first sleeps longest: they end in reverse order, and come back in input order
    delays = [0.6, 0.3, 0.0]
    with executor(queue) as ex:
        jobs = list(
            ex.map(
                lambda d: {"command": f"sleep {d}", "cwd": str(tmp_path), "name": f"d{d}"},
                delays,
                timeout=PATIENCE,
            )
        )
    assert [j.name for j in jobs] == [f"d{d}" for d in delays]
    assert all(j.ok for j in jobs)


def test_as_completed_over_200_jobs_is_one_stream_not_a_request_each(
    queue: CrqServer, tmp_path: Path
) -> None:
    n = 200
    with executor(queue) as ex:
        futures = [ex.submit(["true"], cwd=str(tmp_path), name=f"many{i}") for i in range(n)]
        ends = [f.result().id for f in as_completed(futures, timeout=PATIENCE)]
        watched, sent = ex.watcher.requests_sent, ex.client.requests_sent
    assert sorted(ends) == sorted(f.job_id for f in futures if f.job_id is not None)
    assert len(set(ends)) == n
    print(f"{n} jobs: {watched} watching requests, {sent} submit requests")
    # one long poll answers every job that ended since the last: a request per job would be 200
    assert watched <= n // 4, watched
    assert sent <= n // 10, sent  # submits made in a burst go as batches


def test_cancel_stops_a_queued_job_and_leaves_a_running_one(
    queue: CrqServer, tmp_path: Path
) -> None:
    with executor(queue) as ex:
        queued = ex.submit(["true"], cwd=str(tmp_path), resources=NOWHERE)
        running = ex.submit(["sleep", "60"], cwd=str(tmp_path))
        wait_until(lambda: queued.job_id is not None and running.job_id is not None)
        assert queue.request("GET", f"/jobs/{queued.job_id}")["state"] == wire.QUEUED
        wait_until(lambda: queue.request("GET", f"/jobs/{running.job_id}")["state"] == "running")
        assert queued.cancel() and queued.cancelled()
        assert queue.request("GET", f"/jobs/{queued.job_id}")["state"] == wire.STOPPED
        done, _ = wait([queued], timeout=PATIENCE)  # its waiters were told
        assert done == {queued}
        assert not running.cancel()  # it runs: cancel() leaves it alone
        assert queue.request("GET", f"/jobs/{running.job_id}")["state"] == "running"
        ex.client.stop(running.job_id)  # stopped by someone: the future fails
        with pytest.raises(JobFailed) as e:
            running.result(PATIENCE)
        assert e.value.job.state == wire.STOPPED


def test_shutdown_cancel_futures_stops_what_has_not_started(
    queue: CrqServer, tmp_path: Path
) -> None:
    ex = executor(queue)
    held = [ex.submit(["true"], cwd=str(tmp_path), resources=NOWHERE) for _ in range(3)]
    wait_until(lambda: all(f.job_id is not None for f in held))
    ex.shutdown(wait=True, cancel_futures=True)
    assert all(f.cancelled() for f in held)
    states = {queue.request("GET", f"/jobs/{f.job_id}")["state"] for f in held}
    assert states == {wire.STOPPED}
    with pytest.raises(RuntimeError):
        ex.submit(["true"])


def test_the_environment_is_sent_when_asked(
    queue: CrqServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CRQ_EXEC_TEST", "from-the-caller")
    monkeypatch.setenv("CRQ_TOKEN", queue.admin_token)  # never exported: it is a secret
    check = 'test "$CRQ_EXEC_TEST" = from-the-caller && test -z "$CRQ_TOKEN" && test "$MINE" = 1'
    with executor(queue, export_env=True) as ex:
        job = ex.submit(["sh", "-c", check], cwd=str(tmp_path), env={"MINE": "1"}).result(PATIENCE)
    assert job.ok, job
    with executor(queue) as ex:  # not asked: not sent
        plain = ex.submit(["sh", "-c", 'test -z "$CRQ_EXEC_TEST"'], cwd=str(tmp_path))
        assert plain.result(PATIENCE).ok
    with Client(queue.url, queue.admin_token, queue.queue) as c:
        job_id = c.submit(command=["true"], cwd=str(tmp_path), export_env="CRQ_EXEC_TEST,NOPE")
        assert c.get(job_id).env == {"CRQ_EXEC_TEST": "from-the-caller"}
        ids = c.submit_many([{"command": ["true"], "cwd": str(tmp_path)}], export_env=True)
        assert c.get(ids[0]).env["CRQ_EXEC_TEST"] == "from-the-caller"
        assert "CRQ_TOKEN" not in c.get(ids[0]).env
        assert c.wait(job_id, timeout=PATIENCE).ok


def test_as_completed_rides_out_a_kill_9_and_restart_of_the_server(
    crq_server: Callable[..., CrqServer], crq_tasker: Callable[..., Tasker], tmp_path: Path
) -> None:
    srv = crq_server("--recovery-grace", "60", "--heartbeat", "2")
    crq_tasker("tk1", "--swd", str(srv.swd), "--slots", "4")
    n = 24
    with executor(srv) as ex:
        futures = [ex.submit(["sleep", "0.3"], cwd=str(tmp_path), name=f"k{i}") for i in range(n)]
        seen = []
        for i, f in enumerate(as_completed(futures, timeout=PATIENCE * 2)):
            seen.append(f.result())
            if i == 1:  # jobs running, queued, and futures waiting: the server dies
                srv.kill9()
                srv.start(port=srv.port)
    assert len(seen) == n and all(j.ok for j in seen)
    jobs = srv.request("GET", "/jobs")["jobs"]
    names = sorted(j["name"] for j in jobs)
    assert names == sorted(f"k{i}" for i in range(n))  # each queued once, none run twice
    assert all(j["attempt"] == 1 for j in jobs), [(j["id"], j["attempt"]) for j in jobs]


def test_a_submit_during_crash_recovery_waits_for_it_and_is_queued_once(
    crq_server: Callable[..., CrqServer], crq_tasker: Callable[..., Tasker], tmp_path: Path
) -> None:
    srv = crq_server("--recovery-grace", "300")
    ghost = {"host": "ghost-host", "pid": 4242, "slots": 1}

    def register_ghost() -> int:
        r = srv.api(
            "POST", "/taskers/ghost/register", token=srv.tasker_token, json=ghost,
            headers={wire.SESSION_HEADER: SECRET},
        )  # fmt: skip
        return r.status_code

    assert register_ghost() == 200
    (held,) = srv.submit({"command": ["sleep", "1"], "cwd": str(tmp_path)})
    wait_until(lambda: srv.request("GET", f"/jobs/{held}")["state"] == "running")
    srv.kill9()
    srv.start(port=srv.port)  # the ghost had a job: the recovery waits for it
    notes: list[str] = []
    with executor(srv, notify=notes.append) as ex:
        with pytest.raises(CrashRecovery):
            ex.client.get(held)  # a plain read is refused: the server is recovering
        future = ex.submit(["true"], cwd=str(tmp_path), name="during-recovery")
        wait_until(lambda: any("crash recovery" in n for n in notes))
        assert future.job_id is None and not future.done()
        assert register_ghost() == 200  # back: the recovery ends, the submit goes through
        crq_tasker("tk1", "--swd", str(srv.swd), "--slots", "2")
        done, _ = wait([future], timeout=PATIENCE, return_when=FIRST_COMPLETED)
        assert done == {future} and future.result().ok
    named = [j for j in srv.request("GET", "/jobs")["jobs"] if j["name"] == "during-recovery"]
    assert [j["id"] for j in named] == [future.job_id]
    assert any(n.endswith("waiting to submit") for n in notes), notes
