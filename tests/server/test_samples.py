"""The dashboard's samples (server/samples.py) over the real app in process: a first
attempt's queue wait is counted when it starts, not hours later when the job ends."""

from __future__ import annotations

import time
from typing import Any

import httpx
from crq.server.samples import FIELDS, Sampler
from crq.server.service import Service

from tests.core import InProcess
from tests.server.test_handlers import as_tasker, register, submit, sync


def test_a_wait_is_sampled_when_the_job_starts(api: InProcess) -> None:
    async def body(c: httpx.AsyncClient, srv: Service) -> list[Any]:
        sampler = Sampler(10.0, 3600.0)
        sampler.attach(srv.state)
        srv.engine.on_wait = sampler.waited
        [job] = await submit(c)
        submitted = srv.state.jobs[job].submitted
        before = sampler.take(srv.state)  # queued, not started: no wait yet
        await register(c)
        assert [d["job"] for d in (await sync(c)).json()["dispatch"]] == [job]
        started = submitted + 7.5
        report = {"job": job, "attempt": 1, "pid": 99, "started": started}
        r = await c.post("/api/v1/taskers/w/sync", json={"started": [report]}, headers=as_tasker())
        assert r.status_code == 200, r.text
        assert srv.state.jobs[job].state == "running"
        running = sampler.take(srv.state, time.time())
        return [before, running]

    before, running = api.run(body)
    b, r = dict(zip(FIELDS, before, strict=True)), dict(zip(FIELDS, running, strict=True))
    assert (b["queued"], b["wait_mean"]) == (1, None)
    assert (r["running"], r["done"]) == (1, 0)
    assert r["wait_mean"] == 7.5  # counted at the start, the job still running
