"""Who did each control action is in the job's history (SPEC section 9): the core, in
process; replay and the snapshot keep it (tests/server/test_replay.py, test_formats.py)."""

from __future__ import annotations

from crq.server import commands

from tests.core import Core


def test_every_control_action_names_who_did_it() -> None:
    core = Core()
    [job] = core.submit(1, user="bob")
    core.register("t1", slots=1)
    core.dispatch()
    core.start("t1", job, 1)
    core.emit(commands.recover_job(core.state, job, core.tick(), "carol"))  # ncmgr cleanup
    core.dispatch()
    core.emit(commands.stop(core.state, job, core.tick(), "carol"))
    core.finish("t1", job, 2, None)
    core.emit(commands.rerun(core.state, job, core.tick(), "bob"))
    actions = [(a, by) for _, a, by in core.state.controls[job]]
    assert actions == [("cleanup", "carol"), ("stop", "carol"), ("rerun", "bob")]
    core.emit(commands.stop(core.state, job, core.tick(), "bob"))
    core.emit(commands.forget(core.state, job, core.tick(), "bob"))
    assert job not in core.state.controls  # forgotten with its job


def test_actions_of_the_server_itself_are_not_anyones() -> None:
    """A recovery after a lost tasker or an autoforget names nobody: no history line."""
    core = Core()
    [job] = core.submit(1)
    core.emit(commands.stop(core.state, job, core.tick()))
    assert job not in core.state.controls
