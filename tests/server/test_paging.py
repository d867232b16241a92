"""Paging of ``GET /api/v1/jobs``: a sparse filter never walks the whole id range at once.

The real app and engine, in process (httpx's ASGI transport), with a real journal in a
temp dir; the scan budget is made small so a few hundred jobs show the behaviour of a
million.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from crq.server.http import jobs as app_module

from tests.core import serving


async def scenario(tmp: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with serving(tmp / "q.swd") as (c, _srv):
        jobs = [{"command": ["true"], "cwd": "/tmp"} for _ in range(300)]
        r = await c.post("/api/v1/jobs", json={"jobs": jobs})
        assert r.status_code == 201, r.text
        for job_id in (5, 150, 299):  # three sparse stopped jobs among 300
            r = await c.post(f"/api/v1/jobs/{job_id}/stop")
            assert r.status_code == 200, r.text

        async def pages(**params: Any) -> list[tuple[list[int], int | None]]:
            got, after = [], 0
            while True:
                r = await c.get("/api/v1/jobs", params={**params, "after": after})
                page = r.json()
                got.append(([j["id"] for j in page["jobs"]], page["next"]))
                if page["next"] is None:
                    return got
                after = page["next"]

        async def newest(**params: Any) -> list[tuple[list[int], int | None]]:
            got, before = [], 0
            while True:
                r = await c.get(
                    "/api/v1/jobs", params={**params, "order": "desc", "before": before}
                )
                page = r.json()
                got.append(([j["id"] for j in page["jobs"]], page["next"]))
                if page["next"] is None:
                    return got
                before = page["next"]

        out["stopped"] = await pages(state="stopped", limit=1000)
        out["queued"] = await pages(state="queued", limit=120)
        out["stopped_desc"] = await newest(state="stopped", limit=1000)
        out["desc"] = await newest(limit=120)
        r = await c.get("/api/v1/jobs", params={"order": "desc", "limit": 2, "after": 297})
        out["desc_after"] = r.json()
    return out


def test_a_sparse_filter_pages_through_in_bounded_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app_module, "SCAN_BUDGET", 100)
    out = asyncio.run(scenario(tmp_path))
    # 300 ids examined 100 at a time: short pages, each with a `next` until the end
    assert out["stopped"] == [([5], 100), ([150], 200), ([299], None)]
    ids = [i for page, _ in out["queued"] for i in page]
    assert ids == [i for i in range(1, 301) if i not in (5, 150, 299)]
    assert all(len(page) <= 100 for page, _ in out["queued"])


def test_newest_first_pages_down_from_the_top(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``order=desc``: what ``crq list -n N`` asks for, one page however many jobs."""
    monkeypatch.setattr(app_module, "SCAN_BUDGET", 100)
    out = asyncio.run(scenario(tmp_path))
    assert out["stopped_desc"] == [([299], 201), ([150], 101), ([5], None)]
    ids = [i for page, _ in out["desc"] for i in page]
    assert ids == list(range(300, 0, -1))
    assert [j["id"] for j in out["desc_after"]["jobs"]] == [300, 299]
    assert out["desc_after"]["next"] == 299
