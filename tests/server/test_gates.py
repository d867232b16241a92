"""Dependencies, holds and arrays in the core (server/gates.py, State.apply): each rule as
a user meets it, and through a snapshot and a replay."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from crq.server import commands as cmd
from crq.server import replay, sanity, snapshot
from crq.server.http.views import dispatch_json, job_json
from crq.server.models import BadRequest

from tests.core import Core, fingerprint, write_journal


def states(core: Core, *ids: int) -> list[str]:
    return [core.state.jobs[i].state for i in ids]


def run_one(core: Core, job_id: int, code: int = 0) -> None:
    """Dispatch until ``job_id`` runs, then finish it with ``code``."""
    core.dispatch()
    job = core.state.jobs[job_id]
    assert job.state == "running", (job_id, job.state)
    core.finish(job.tasker or "", job_id, job.attempt, code)


@pytest.fixture
def core() -> Core:
    c = Core()
    c.register("t1", slots=4)
    return c


def test_a_chain_runs_in_order_and_waits_cost_the_scheduler_nothing(core: Core) -> None:
    (a,) = core.submit()
    (b,) = core.submit(after=[{"job": a}])
    (c,) = core.submit(after=[{"job": b}])
    assert states(core, a, b, c) == ["queued", "waiting", "waiting"]
    assert list(core.state.queue_order()) == [a]  # waiting jobs are in no bucket
    assert job_json(core.state, core.state.jobs[b])["reason"] == "waiting for 1 dependency"
    run_one(core, a)
    assert states(core, b, c) == ["queued", "waiting"]
    run_one(core, b)
    run_one(core, c)
    assert states(core, a, b, c) == ["done"] * 3


def test_an_unmeetable_dependency_stops_the_chain_with_the_reason(core: Core) -> None:
    (a,) = core.submit()
    (b,) = core.submit(after=[{"job": a, "type": "afterok"}])
    (c,) = core.submit(after=[{"job": b}])
    (d,) = core.submit(after=[{"job": a, "type": "afternotok"}])
    (e,) = core.submit(after=[{"job": a, "type": "afterany"}])
    run_one(core, a, code=1)
    assert states(core, b, c, d, e) == ["stopped", "stopped", "queued", "queued"]
    assert core.state.jobs[b].reason == f"dependency afterok:{a} can never be met (job {a} failed)"
    assert core.state.jobs[c].reason == f"dependency afterok:{b} can never be met (job {b} stopped)"
    # already ended the wrong way at submit: stopped at once; the right way: queued
    (f,) = core.submit(after=[{"job": a}])
    (g,) = core.submit(after=[{"job": a, "type": "afternotok"}])
    assert states(core, f, g) == ["stopped", "queued"]


def test_a_job_may_wait_for_an_earlier_job_of_its_batch(core: Core) -> None:
    ids = core.submit_specs([{}, {"after": [{"index": 0}]}, {"after": [{"index": 1}]}])
    assert states(core, *ids) == ["queued", "waiting", "waiting"]
    spec = orjson.loads(core.state.jobs[ids[2]].spec)
    assert spec["after"] == [["afterok", ids[1]]]
    with pytest.raises(BadRequest, match=r"^after\[0\]: index 0 is not an earlier"):
        core.submit_specs([{"after": [{"index": 0}]}])


def test_unknown_or_forgotten_parents_are_refused(core: Core) -> None:
    (a,) = core.submit()
    core.emit(cmd.stop(core.state, a, core.tick()))
    core.emit(cmd.forget(core.state, a, core.tick()))
    seq = core.state.seq
    for parent in (a, 999):
        with pytest.raises(BadRequest, match=f"after\\[0\\]: no job {parent} \\(unknown"):
            core.submit(after=[{"job": parent}])
    with pytest.raises(BadRequest, match="give one of job or index"):
        core.submit(after=[{}])
    assert core.state.seq == seq  # refused: nothing changed


def test_forgetting_a_parent_before_it_ended_breaks_its_afterok(core: Core) -> None:
    (a,) = core.submit(hold=True)
    (b,) = core.submit(after=[{"job": a}])
    (c,) = core.submit(after=[{"job": a, "type": "afterany"}])
    core.emit(cmd.forget(core.state, a, core.tick()))
    assert states(core, b, c) == ["stopped", "queued"]
    assert "job 1 forgotten" in (core.state.jobs[b].reason or "")


def test_hold_keeps_the_place_in_the_queue(core: Core) -> None:
    core.register("t1", slots=0)
    ids = core.submit(3)
    core.emit(cmd.hold(core.state, ids[0], core.tick(), "alice"))
    assert core.state.jobs[ids[0]].state == "waiting"
    assert cmd.hold(core.state, ids[0], core.tick()) == []  # a second hold: nothing to do
    assert list(core.state.queue_order()) == ids[1:]
    core.emit(cmd.release(core.state, ids[0], core.tick(), "alice"))
    assert list(core.state.queue_order()) == ids  # back in front: its id gives its place
    assert [c[1] for c in core.state.controls[ids[0]]] == ["hold", "release"]
    (held,) = core.submit(hold=True, after=[{"job": ids[1]}])
    core.emit(cmd.release(core.state, held, core.tick()))
    assert job_json(core.state, core.state.jobs[held])["reason"] == "waiting for 1 dependency"
    core.register("t1", slots=4)
    run_one(core, ids[0])
    with pytest.raises(BadRequest, match="only queued or waiting jobs hold"):
        core.emit(cmd.hold(core.state, ids[0], core.tick()))


def test_array_elements_share_a_spec_and_know_their_index(core: Core) -> None:
    ids = core.submit(1, array={"start": 0, "stop": 8, "step": 2}, log="/tmp/o.%A_%a.%j.log")
    assert len(ids) == 5
    jobs = [core.state.jobs[i] for i in ids]
    assert len({id(j.spec) for j in jobs}) == 1  # one bytes object for all
    core.dispatch()
    d = dispatch_json(core.state, jobs[3])
    assert d["env"]["CRQ_ARRAY_ID"] == str(ids[0]) and d["env"]["CRQ_ARRAY_INDEX"] == "6"
    assert d["log"] == f"/tmp/o.{ids[0]}_6.{ids[3]}.log"
    view = job_json(core.state, jobs[3])
    assert (view["array"], view["index"]) == (ids[0], 6)


def test_array_max_running_caps_the_elements_at_once(core: Core) -> None:
    ids = core.submit(1, array={"start": 1, "stop": 6, "max_running": 2})
    assert states(core, *ids) == ["queued"] * 2 + ["waiting"] * 4
    core.dispatch()
    assert sum(j.state == "running" for j in core.state.jobs.values()) == 2
    for _ in range(3):
        running = [j for j in core.state.jobs.values() if j.state == "running"]
        core.finish("t1", running[0].id, running[0].attempt, 0)
        core.dispatch()
        assert sum(j.state == "running" for j in core.state.jobs.values()) == 2
    core.emit(cmd.hold(core.state, ids[5], core.tick()))  # a held element gives its turn
    running = [j for j in core.state.jobs.values() if j.state == "running"]
    core.finish("t1", running[0].id, running[0].attempt, 0)
    assert core.state.arrays[ids[0]].active == 1
    assert sanity.check(core.state, {"t1"}).findings == []


def test_rerun_waits_again_for_parents_and_refuses_a_broken_one(core: Core) -> None:
    (a,) = core.submit()
    (b,) = core.submit(after=[{"job": a}])
    run_one(core, a, code=1)
    assert states(core, b) == ["stopped"]
    with pytest.raises(BadRequest, match=f"rerun job {a} first"):
        cmd.rerun(core.state, b, core.tick())
    core.emit(cmd.rerun(core.state, a, core.tick()))
    core.emit(cmd.rerun(core.state, b, core.tick()))
    assert states(core, a, b) == ["queued", "waiting"]
    run_one(core, a)
    assert states(core, b) == ["queued"]


def test_a_rerun_after_its_parent_was_forgotten_is_not_held_by_it(core: Core) -> None:
    (a,) = core.submit()
    (b,) = core.submit(after=[{"job": a}])
    run_one(core, a)
    run_one(core, b)
    core.emit(cmd.forget(core.state, a, core.tick()))  # as autoforget does
    core.emit(cmd.rerun(core.state, b, core.tick()))
    assert states(core, b) == ["queued"]


def test_a_long_chain_broken_at_its_head_does_not_recurse(core: Core) -> None:
    specs = [{}] + [{"after": [{"index": i}]} for i in range(20_000)]
    ids = core.submit_specs(specs)
    core.emit(cmd.stop(core.state, ids[0], core.tick()))
    assert core.state.counts["stopped"] == len(ids)
    assert not core.state.waits and not core.state.dependents


def test_waits_and_arrays_survive_a_snapshot_and_a_replay(core: Core, tmp_path: Path) -> None:
    (a,) = core.submit()
    core.submit(after=[{"job": a}], hold=True)
    core.submit(1, array={"start": 1, "stop": 5, "max_running": 2}, after=[{"job": a}])
    core.submit(1, array={"start": 1, "stop": 4, "max_running": 1})
    core.dispatch()
    write_journal(tmp_path / "j", core.events)
    assert fingerprint(replay.load(tmp_path / "j", None).state) == fingerprint(core.state)
    (tmp_path / "s").mkdir()
    snapshot.write(core.state, tmp_path / "s", fsync=False)
    loaded = replay.load(tmp_path / "s", None).state
    assert fingerprint(loaded) == fingerprint(core.state)
    assert sanity.check(loaded, {"t1"}).findings == []
