"""The dashboard (issue 15) in chromium on a real server with a real tasker: search, sort
and filters of the jobs list, why a job waits (held, a dependency, a short resource, no
tasker that offers what it needs), failed-job triage with bulk rerun, the taskers view,
charts drawn from the server's own samples, and the pages a browser gets during crash
recovery and from a standby.

A screenshot of each view goes to the directory ``CRQ_SCREENSHOTS`` names, when set.
"""

# ruff: noqa: F811 - the fixtures of test_ui.py (browser, page) are imported, then named
from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("playwright.sync_api")
from playwright.sync_api import Page, expect  # noqa: E402

from tests.rigs import CrqServer, wait_until  # noqa: E402
from tests.server.test_ui import browser, page, row, submit  # noqa: E402, F401

SAMPLE = "0.5"  # seconds between the server's samples here (10 s by default)


def shot(page: Page, name: str) -> None:
    where = os.environ.get("CRQ_SCREENSHOTS")
    if where:
        Path(where).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(where) / f"{name}.png"), full_page=True)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[CrqServer]:
    swd = tmp_path / "dash.swd"
    swd.mkdir()
    (swd / "config.toml").write_text('[resources]\n"License:vcs" = 1\n')
    srv = CrqServer(swd, "dash", "--sample-interval", SAMPLE)
    srv.start()
    yield srv
    srv.stop()
    srv.kill9()


def why_text(page: Page) -> Any:
    return page.locator("#d-why")


def test_jobs_search_sort_filters_why_taskers_and_charts(
    page: Page, server: CrqServer, crq_tasker: Any, tmp_path: Path
) -> None:
    crq_tasker("tk1", "--swd", str(server.swd), "--slots", "2")
    wait_until(lambda: server.api("GET", "/taskers").json()["taskers"])
    cwd = str(tmp_path)
    quick = submit(server, user="root", command="echo quick", name="quick", cwd=cwd)
    server.wait(quick)
    holder = submit(
        server, user="root", command="sleep 60", name="lic-holder", resources="License:vcs", cwd=cwd
    )
    wait_until(lambda: server.api("GET", f"/jobs/{holder}").json()["state"] == "running")
    short = submit(
        server, user="root", command="sleep 1", name="lic-waiter", resources="License:vcs", cwd=cwd
    )
    child = submit(
        server, user="root", command="echo child", name="child", cwd=cwd,
        after=[{"type": "afterok", "job": holder}],
    )  # fmt: skip
    held = submit(server, user="alice", command="sleep 1", name="held-one", cwd=cwd, hold=True)
    nowhere = submit(server, user="bob", command="true", name="bigmem-job", resources="bigmem")

    page.goto(f"{server.url}/#token={server.admin_token}")
    body = page.locator("#jobs tbody tr")
    expect(body).to_have_count(6)
    expect(body.first).to_have_attribute("data-id", str(nowhere))  # newest first
    expect(body.last).to_have_attribute("data-id", str(quick))
    shot(page, "jobs")

    page.fill("#search", "lic-")  # by name
    expect(body).to_have_count(2)
    page.fill("#search", "echo child")  # by command
    expect(body).to_have_count(1)
    expect(row(page, child)).to_be_visible()
    page.fill("#search", str(held))  # by id
    expect(row(page, held)).to_be_visible()
    page.fill("#search", "")
    expect(body).to_have_count(6)

    page.select_option("#user-filter", "bob")
    expect(body).to_have_count(1)
    expect(row(page, nowhere)).to_be_visible()
    page.select_option("#user-filter", "")
    page.select_option("#filter", "waiting")
    expect(body).to_have_count(2)  # the held one and the child
    page.select_option("#filter", "")
    expect(body).to_have_count(6)

    page.click("#jobs th[data-sort=name]")  # a to z
    expect(page.locator("#jobs th[data-sort=name]")).to_have_class("asc")
    names = [n.strip() for n in page.locator("#jobs tbody tr td:nth-child(5)").all_text_contents()]
    assert names == sorted(names), names
    page.click("#jobs th[data-sort=name]")  # z to a
    names = [n.strip() for n in page.locator("#jobs tbody tr td:nth-child(5)").all_text_contents()]
    assert names == sorted(names, reverse=True), names
    page.click("#jobs th[data-sort=id]")  # newest first again
    expect(body.first).to_have_attribute("data-id", str(nowhere))

    why = why_text(page)
    row(page, short).click()
    expect(why).to_contain_text("short of License:vcs: needs 1, 0 of 1 free")
    expect(page.locator("#d-why-taskers tr[data-name=tk1]")).to_contain_text("yes, now")
    shot(page, "why-short-resource")
    row(page, child).click()
    expect(why).to_contain_text(f"waits for job {holder} (afterok; it is running)")
    expect(page.locator(f"#d-deps tr[data-job='{holder}']")).to_contain_text("not yet")
    shot(page, "why-dependency")
    row(page, held).click()
    expect(why).to_contain_text("held: release it to let it run")
    row(page, nowhere).click()
    expect(why).to_contain_text("no tasker offers what it needs (CORES/1 bigmem)")
    expect(page.locator("#d-why-taskers tr[data-name=tk1]")).to_contain_text("lacks bigmem")
    row(page, quick).click()
    expect(page.locator("#d-id")).to_have_text(str(quick))
    expect(why).to_be_hidden()  # a done job waits for nothing
    page.click("#d-close")

    page.click("#tabs button[data-view=taskers]")
    tk = page.locator("#taskers tr[data-name=tk1]")
    expect(tk).to_contain_text("1/2")  # slots in use of offered
    expect(tk).to_contain_text("50%")
    expect(tk).to_contain_text("CORES 1/2")
    expect(tk.locator(f"a[data-job='{holder}']")).to_be_visible()
    shot(page, "taskers")
    tk.locator(f"a[data-job='{holder}']").click()  # to the job's panel
    expect(page.locator("#d-id")).to_have_text(str(holder))
    expect(page.locator("#view-jobs")).to_be_visible()

    # charts from the server's samples: one every 0.5 s here
    wait_until(lambda: len(server.api("GET", "/stats/series").json()["samples"]) >= 4)
    page.click("#tabs button[data-view=charts]")
    expect(page.locator("#chart-running polyline[data-series=running]")).to_have_count(1)
    expect(page.locator("#chart-running .legend")).to_contain_text("running: 1")
    expect(page.locator("#chart-depth .legend")).to_contain_text("waiting: 2")
    expect(page.locator("#chart-depth .legend")).to_contain_text("queued: 2")
    expect(page.locator("#chart-wait polyline")).not_to_have_count(0)  # quick's wait
    expect(page.locator("#charts-note")).to_contain_text("one every 0.5 s")
    shot(page, "charts")


def test_failed_jobs_triage_and_bulk_rerun(
    page: Page, server: CrqServer, crq_tasker: Any, tmp_path: Path
) -> None:
    crq_tasker("tk1", "--swd", str(server.swd), "--slots", "4")
    cwd = str(tmp_path)
    bad = [
        submit(server, user="root", command=f"exit {n}", name=f"bad{n}", max_attempts=1, cwd=cwd)
        for n in (3, 4, 5)
    ]
    good = submit(server, user="root", command="true", name="good", cwd=cwd)
    for job in (*bad, good):
        server.wait(job)
    page.goto(f"{server.url}/#token={server.admin_token}")
    expect(page.locator("#failed-count")).to_have_text("3")
    page.click("#tabs button[data-view=failed]")
    rows = page.locator("#failed tbody tr")
    expect(rows).to_have_count(3)
    expect(rows.first).to_have_attribute("data-id", str(bad[-1]))  # newest first
    expect(page.locator(f"#failed tr[data-id='{bad[0]}']")).to_contain_text("3")
    expect(page.locator("#f-rerun")).to_be_disabled()
    for job in bad[:2]:
        page.locator(f"#failed input.pick[data-id='{job}']").check()
    expect(page.locator("#f-rerun")).to_have_text("Rerun selected (2)")
    shot(page, "failed")
    page.click("#f-rerun")
    expect(page.locator("#msg")).to_contain_text("reran 2 job(s)")
    for job in bad[:2]:  # rerun: a new attempt (which fails again, as it should)
        wait_until(lambda j=job: server.api("GET", f"/jobs/{j}").json()["attempt"] == 2)  # type: ignore[misc]
    assert server.api("GET", f"/jobs/{bad[2]}").json()["attempt"] == 1  # not selected
    for job in bad[:2]:
        server.wait(job)
    page.reload()  # a page shown fresh, none of them rerunning
    page.click("#tabs button[data-view=failed]")
    expect(rows).to_have_count(3)
    page.locator("#f-all").check()  # all, then rerun: every failed job again
    expect(page.locator("#f-rerun")).to_have_text("Rerun selected (3)")
    page.click("#f-rerun")
    expect(page.locator("#msg")).to_contain_text("reran 3 job(s)")


def _recovering_server(tmp_path: Path) -> tuple[CrqServer, dict[str, Any]]:
    """A server with a job running on tasker t1 (faked over the API), then kill -9 and a
    start with a 60 s grace period: it stays in crash recovery until t1 registers."""
    srv = CrqServer(tmp_path / "rec.swd", "dashrec", "--recovery-grace", "60")
    srv.start()
    job = submit(srv, command="sleep 1000")
    tt = srv.tasker_token
    me = {"X-Crq-Session": "dash-test-session-secret"}
    r = srv.api(
        "POST", "/taskers/t1/register", token=tt, headers=me, json={"host": "h1", "slots": 2}
    )
    assert r.status_code == 200, r.text

    def dispatched() -> Any:
        got = srv.api("POST", "/taskers/t1/sync", token=tt, headers=me, json={"wait": 1}).json()
        return got["dispatch"]

    [order] = wait_until(dispatched)
    started = {"job": job, "attempt": order["attempt"], "pid": 4242, "started": time.time()}
    body = {"started": [started], "running": [{"job": job, "attempt": order["attempt"]}]}
    assert srv.api("POST", "/taskers/t1/sync", token=tt, headers=me, json=body).status_code == 200
    return srv, {"token": tt, "headers": me, "running": started}


def test_recovery_page_and_standby_page(page: Page, tmp_path: Path) -> None:
    srv, t1 = _recovering_server(tmp_path)
    standby = CrqServer(srv.swd, "dashrec", "--standby")
    try:
        page.goto(f"{srv.url}/#token={srv.admin_token}")  # the token is kept for later
        expect(page.locator("#mode")).to_have_text("normal")
        srv.kill9()
        srv.start(port=srv.port)
        page.reload()  # a browser that opens the dashboard now
        rec = page.locator("main#recovering")
        expect(rec).to_contain_text("Crash recovery in progress")
        expect(rec).to_contain_text("Taskers back: 0 of 1 expected")
        expect(rec).to_contain_text("Waiting for: t1")
        shot(page, "recovery")
        api = httpx.get(srv.url + "/", headers={"Accept": "application/json"}, timeout=30)
        assert api.status_code == 503 and api.json()["error"] == "crash_recovery"  # unchanged
        html = httpx.get(srv.url + "/", headers={"Accept": "text/html"}, timeout=30)
        assert html.status_code == 503 and html.headers["content-type"].startswith("text/html")
        assert html.headers["retry-after"] == "1"

        body = {"host": "h1", "slots": 2, "running": [t1["running"]]}
        r = srv.api(
            "POST", "/taskers/t1/register", token=t1["token"], headers=t1["headers"], json=body
        )
        assert r.status_code == 200, r.text
        expect(page.locator("#mode")).to_have_text("normal")  # the page reloaded itself

        standby.start()
        page.goto(standby.url)
        sb = page.locator("main#standby")
        expect(sb).to_contain_text("Standby server")
        expect(sb.locator("#leader")).to_have_text(srv.url)
        shot(page, "standby")
        api = httpx.get(standby.url + "/", timeout=30)  # no Accept: the JSON refusal
        assert api.status_code == 503 and api.json()["error"] == "standby"
    finally:
        standby.kill9()
        srv.stop()
        srv.kill9()
