"""Dispatch order, resource matching, fencing and accounting, through the real core."""

from __future__ import annotations

from crq.server import sanity

from tests.core import Core


def running(core: Core) -> dict[int, str | None]:
    return {j.id: j.tasker for j in core.state.jobs.values() if j.state == "running"}


def test_priority_then_fifo_across_buckets() -> None:
    core = Core()
    low = core.submit(2, priority=2)
    mixed = core.submit(1, resources="CORES/2") + core.submit(1)
    high = core.submit(1, priority=9)
    assert list(core.state.queue_order()) == high + mixed + low
    core.register("t1", slots=1, resources="CORES/4")
    core.dispatch()
    assert list(running(core)) == high
    core.finish("t1", high[0], 1)
    core.dispatch()
    assert list(running(core)) == mixed[:1]  # the CORES/2 job, its bucket head is older


def test_unfit_job_does_not_block_those_behind() -> None:
    core = Core()
    big = core.submit(1, resources="CORES/64")
    small = core.submit(2)
    core.register("t1", slots=4)
    core.dispatch()
    assert sorted(running(core)) == small
    assert list(core.state.queue_order()) == big


def test_a_tasker_running_as_a_user_is_sent_only_that_users_jobs() -> None:
    """SPEC 9: bob's job at the head of the queue does not hold alice's back from alice's
    own tasker, and a root tasker takes anyone's."""
    core = Core()
    bobs = core.submit(2, user="bob")
    alices = core.submit(2, user="alice")
    assert list(core.state.queue_order()) == bobs + alices
    core.register("alice-tk", slots=4, user="alice")
    core.dispatch()
    assert running(core) == dict.fromkeys(alices, "alice-tk")
    core.register("root-tk", slots=4)
    core.dispatch()
    assert running(core) == {**dict.fromkeys(alices, "alice-tk"), **dict.fromkeys(bobs, "root-tk")}
    assert sanity.check(core.state, {"alice-tk", "root-tk"}).findings == []


def test_attributes_consumables_and_global_resources() -> None:
    core = Core({"License:vcs": 1})
    lic = core.submit(2, resources="License:vcs")
    gpu = core.submit(1, resources="gpu RAM/500")
    core.register("plain", slots=4)
    core.register("gpu-box", slots=4, resources="gpu RAM/1000")
    core.dispatch()
    run = running(core)
    assert lic[0] in run and lic[1] not in run  # one licence only
    assert run[gpu[0]] == "gpu-box"
    core.finish(run[lic[0]], lic[0], 1)
    core.dispatch()
    assert lic[1] in running(core)
    assert core.state.global_used["License:vcs"] == 1


def test_slots_are_never_overcommitted_and_accounting_holds() -> None:
    core = Core()
    ids = core.submit(10)
    core.register("t1", slots=3)
    core.register("t2", slots=2)
    core.dispatch()
    assert len(running(core)) == 5
    assert core.state.taskers["t1"].free_slots == 0 and core.state.taskers["t2"].free_slots == 0
    assert sanity.check(core.state, {"t1", "t2"}).findings == []
    for job_id, tasker in running(core).items():
        core.finish(tasker, job_id, 1)
    core.dispatch()
    assert len(running(core)) == 5 and sanity.check(core.state, {"t1", "t2"}).findings == []
    assert set(ids) >= set(running(core))


def test_superseded_attempt_cannot_overwrite_result() -> None:
    core = Core()
    (job,) = core.submit(1)
    core.register("t1", slots=1)
    core.dispatch()
    from crq.server.commands import lose_tasker

    core.emit(lose_tasker(core.state, "t1", "silent", core.tick()))
    assert core.state.jobs[job].state == "queued"
    core.register("t2", slots=1)
    core.dispatch()
    assert core.state.jobs[job].attempt == 2 and core.state.jobs[job].tasker == "t2"
    out = core.finish("t1", job, 1, code=0)  # the old attempt reports late
    assert out.events == [] and (job, 1) in out.ack
    core.finish("t2", job, 2, code=3)
    assert core.state.jobs[job].state == "failed" and core.state.jobs[job].exit_code == 3
    again = core.finish("t2", job, 2, code=0)  # duplicate report: idempotent
    assert again.events == [] and core.state.jobs[job].exit_code == 3


def test_requeue_keeps_queue_position_and_poison_job_ends_lost() -> None:
    core = Core()
    first, second = core.submit(2, max_attempts=2)
    core.register("t1", slots=1)
    core.dispatch()
    from crq.server.commands import lose_tasker

    core.emit(lose_tasker(core.state, "t1", "silent", core.tick()))
    assert list(core.state.queue_order()) == [first, second]
    core.register("t1", slots=1)
    core.dispatch()
    core.emit(lose_tasker(core.state, "t1", "silent", core.tick()))
    job = core.state.jobs[first]
    assert job.state == "lost" and "gave up after 2 attempts" in (job.reason or "")


def test_reboot_recovers_started_attempts_at_once() -> None:
    core = Core()
    (job,) = core.submit(1)
    core.register("t1", slots=1)
    core.dispatch()
    core.start("t1", job, 1)
    core.register("t1", slots=1, rebooted=True)
    assert core.state.jobs[job].state == "queued"
    assert core.state.jobs[job].attempts[-1].outcome == "requeued"


def test_identical_environments_are_stored_once() -> None:
    core = Core()
    core.submit(500, env={"PATH": "/bin", "HOME": "/root"})
    core.submit(500, env={"HOME": "/root", "PATH": "/bin"})
    assert len(core.state.envs) == 1
    for job_id in list(core.state.jobs):
        core.emit([{"e": "forget", "t": 0, "jobs": [job_id]}])
    assert core.state.envs == {}
