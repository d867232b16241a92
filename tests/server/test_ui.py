"""The browser UI in a real browser (Debian's chromium driven by playwright) on a real server.

The role tests log in with personal tokens the admin issues (a ``user``, a ``readonly``, an
``operator``; SPEC section 9); with the admin token the UI is the admin's (an older server
without GET /whoami answers 404, and the UI still shows the admin view).

Needs `apt-get install chromium` and `pip install playwright` (no `playwright install`: the
system chromium is used); skipped when either is missing.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sync_api = pytest.importorskip("playwright.sync_api")
from playwright.sync_api import Browser, Page, expect  # noqa: E402

from tests.rigs import PATIENCE, CrqServer  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SHOT = "/tmp/crq-ui.png"

if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)", allow_module_level=True)

expect.set_options(timeout=PATIENCE * 1000)  # a cap: each expect ends once it holds


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh profile per test (own localStorage); uncaught JS errors fail the test."""
    ctx = browser.new_context(viewport={"width": 1400, "height": 860})
    pg = ctx.new_page()
    errors: list[Any] = []
    pg.on("pageerror", lambda e: errors.append(e))
    yield pg
    ctx.close()
    assert not errors, f"JavaScript errors: {errors}"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[CrqServer]:
    srv = CrqServer(tmp_path / "ui.swd", "uitest")
    srv.start()
    yield srv
    srv.stop()
    assert srv.proc is not None and srv.proc.returncode == 0


def submit(srv: CrqServer, user: str = "alice", **spec: Any) -> int:
    spec.setdefault("cwd", "/tmp")
    r = srv.api("POST", "/jobs", json=spec, headers={"X-Crq-User": user})
    assert r.status_code == 201, r.text
    return int(r.json()["ids"][0])


def personal_token(srv: CrqServer, user: str, role: str | None = None) -> str:
    """A personal token issued by the admin (SPEC section 9)."""
    r = srv.api("POST", "/tokens", json={"user": user, "role": role, "expires": 3600, "note": "ui"})
    assert r.status_code == 201, r.text
    return str(r.json()["token"])


def row(page: Page, job: int) -> Any:
    return page.locator(f"#jobs tbody tr[data-id='{job}']")


def test_jobs_detail_stop_rerun_forget(page: Page, server: CrqServer) -> None:
    a = submit(server, command="sleep 100", name="first", priority=7)
    b = submit(server, user="bob", command=["echo", "two words"], resources="CORES/2")
    page.goto(f"{server.url}/#token={server.admin_token}")

    expect(page.locator("#queue")).to_have_text("uitest")
    expect(page.locator("#mode")).to_have_text("normal")
    expect(page.locator("#who-role")).to_have_text("admin")  # the admin token: everything
    expect(page.locator("#who")).to_contain_text("admin token")
    expect(page.locator("#admin")).to_be_visible()
    expect(page.locator("#a-stop")).to_be_visible()
    expect(page.locator("#jobs tbody tr")).to_have_count(2)
    expect(row(page, a)).to_contain_text("first")
    expect(row(page, a).locator(".state")).to_have_text("queued")
    expect(row(page, b)).to_contain_text("bob")
    expect(page.locator(".count[data-state=queued] b")).to_have_text("2")
    assert "token" not in page.url  # the fragment is dropped once stored

    row(page, b).click()
    detail = page.locator("#detail")
    expect(detail).to_be_visible()
    expect(page.locator("#d-stop")).to_be_visible()  # bob's job: the admin controls it too
    expect(page.locator("#d-id")).to_have_text(str(b))
    expect(detail).to_contain_text('"echo" "two words"')
    expect(detail).to_contain_text("/tmp/crq.")
    expect(detail).to_contain_text("CORES/2")

    row(page, a).click()
    expect(page.locator("#d-id")).to_have_text(str(a))
    expect(detail).to_contain_text("sleep 100")
    page.click("#d-stop")
    expect(page.locator("#d-state")).to_have_text("stopped")
    expect(row(page, a).locator(".state")).to_have_text("stopped")
    expect(page.locator("#msg")).to_contain_text(f"job {a}: stop accepted, now stopped")
    assert server.api("GET", f"/jobs/{a}").json()["state"] == "stopped"
    page.screenshot(path=SHOT, full_page=True)

    page.click(".count[data-state=stopped]")  # the counts filter the table
    expect(page.locator("#jobs tbody tr")).to_have_count(1)
    page.select_option("#filter", "")
    expect(page.locator("#jobs tbody tr")).to_have_count(2)

    page.click("#d-rerun")
    expect(row(page, a).locator(".state")).to_have_text("queued")
    expect(page.locator("#d-rerun")).to_be_disabled()  # a queued job cannot be rerun

    page.click("#d-hold")  # held: waiting, at its place; released: queued again
    expect(page.locator("#d-state")).to_have_text("waiting")
    expect(page.locator("#d-hold")).to_be_hidden()
    expect(detail).to_contain_text("held")
    page.click("#d-release")
    expect(page.locator("#d-state")).to_have_text("queued")
    expect(page.locator("#d-release")).to_be_hidden()

    page.click("#d-stop")
    expect(page.locator("#d-state")).to_have_text("stopped")
    page.once("dialog", lambda d: d.accept())
    page.click("#d-forget")
    expect(row(page, a)).to_have_count(0)
    expect(detail).to_be_hidden()
    assert server.api("GET", f"/jobs/{a}").status_code == 404


def test_submit_form_and_api_errors(page: Page, server: CrqServer) -> None:
    page.goto(f"{server.url}/#token={server.admin_token}")
    expect(page.locator("#jobs-empty")).to_be_visible()
    page.fill("#s-command", "echo from the browser")
    page.fill("#s-name", "webjob")
    page.fill("#s-priority", "9")
    page.click("#submit button")
    expect(page.locator("#msg")).to_contain_text("submitted job 1")
    expect(row(page, 1)).to_contain_text("webjob")
    job = server.api("GET", "/jobs/1").json()
    assert (job["command"], job["cwd"], job["priority"]) == ("echo from the browser", "/tmp", 9)

    page.fill("#s-command", "true")
    page.fill("#s-resources", "CORES/abc")  # refused by the server: its message must show
    page.click("#submit button")
    expect(page.locator("#msg.error")).to_contain_text("invalid: ")
    expect(page.locator("#msg.error")).to_contain_text("CORES/abc")
    assert [j["id"] for j in server.api("GET", "/jobs").json()["jobs"]] == [1]


def test_bad_token_is_a_readable_error(page: Page, server: CrqServer) -> None:
    page.goto(f"{server.url}/#token=not-the-token")
    expect(page.locator("#msg")).to_contain_text("Bad token")
    expect(page.locator("#login")).to_be_visible()
    expect(page.locator("#app")).to_be_hidden()
    page.fill("#token", server.admin_token)
    page.click("#login button")
    expect(page.locator("#app")).to_be_visible()
    expect(page.locator("#msg")).to_be_hidden()
    page.reload()  # the token was kept in localStorage
    expect(page.locator("#mode")).to_have_text("normal")


def test_crash_recovery_banner(page: Page, tmp_path: Path) -> None:
    srv = CrqServer(tmp_path / "rec.swd", "uirec", "--recovery-grace", "60")
    srv.start()
    try:
        job = submit(srv, command="sleep 1000")
        tt = srv.tasker_token
        me = {"X-Crq-Session": "ui-test-session-secret"}  # a tasker shows its session
        r = srv.api("POST", "/taskers/t1/register", token=tt, headers=me,
                    json={"host": "h1", "slots": 2})  # fmt: skip
        assert r.status_code == 200, r.text
        for _ in range(20):
            r = srv.api("POST", "/taskers/t1/sync", token=tt, headers=me, json={"wait": 1})
            sync = r.json()
            if sync["dispatch"]:
                break
        run = {"job": job, "attempt": sync["dispatch"][0]["attempt"]}
        started = {**run, "pid": 4242, "started": time.time()}
        body = {"started": [started], "running": [run]}
        r = srv.api("POST", "/taskers/t1/sync", token=tt, headers=me, json=body)
        assert r.status_code == 200, r.text

        page.goto(f"{srv.url}/#token={srv.admin_token}")
        expect(row(page, job).locator(".state")).to_have_text("running")
        expect(page.locator("#taskers tbody tr")).to_contain_text("t1")

        srv.kill9()
        expect(page.locator("#msg")).to_contain_text("unreachable")
        srv.start(port=srv.port)  # the page keeps polling the same address
        banner = page.locator("#recovery")
        expect(banner).to_be_visible()
        expect(banner).to_contain_text("0 of 1 expected")
        expect(banner).to_contain_text("waiting for t1")
        expect(page.locator("#mode")).to_have_text("recovering")
        expect(page.locator("#msg")).to_be_hidden()
        assert srv.api("GET", "/jobs").status_code == 503

        body = {"host": "h1", "slots": 2, "running": [started]}
        r = srv.api("POST", "/taskers/t1/register", token=tt, headers=me, json=body)
        assert r.status_code == 200, r.text
        expect(banner).to_be_hidden()
        expect(page.locator("#mode")).to_have_text("normal")
        expect(row(page, job).locator(".state")).to_have_text("running")
    finally:
        srv.stop()
    assert srv.proc is not None and srv.proc.returncode == 0


def test_job_panel_shows_the_tail_of_the_log(
    page: Page, server: CrqServer, crq_tasker: Any, tmp_path: Path
) -> None:
    crq_tasker("tk1", "--swd", str(server.swd), "--slots", "2")
    short = submit(server, user="root", command="echo hello-ui; echo second", cwd=str(tmp_path))
    long = submit(server, user="root", command="seq 1 20000", cwd=str(tmp_path))  # 108,894 B
    for job in (short, long):
        server.wait(job)
    page.goto(f"{server.url}/#token={server.admin_token}")
    row(page, short).click()
    expect(page.locator("#d-log")).to_have_text("hello-ui\nsecond\n")
    expect(page.locator("#d-log-note")).to_have_text("(16 bytes)")
    row(page, long).click()
    expect(page.locator("#d-log-note")).to_have_text("(last 16 KiB of 108894 bytes)")
    text = page.locator("#d-log").text_content() or ""
    assert text.endswith("19999\n20000\n") and len(text) == 16384


def test_user_sees_no_admin_controls_and_no_buttons_on_others_jobs(
    page: Page, server: CrqServer
) -> None:
    mine = submit(server, user="alice", command="sleep 100", name="mine")
    theirs = submit(server, user="bob", command="sleep 100", name="theirs")
    token = personal_token(server, "alice")
    page.goto(f"{server.url}/#token={token}")

    expect(page.locator("#who-user")).to_have_text("alice")
    expect(page.locator("#who-role")).to_have_text("user")
    expect(page.locator("#who")).to_contain_text("personal token")
    expect(page.locator("#jobs tbody tr")).to_have_count(2)  # a user sees every job
    expect(page.locator("#admin")).to_be_hidden()
    expect(page.locator("#a-sanity")).to_be_hidden()
    expect(page.locator("#a-stop")).to_be_hidden()
    expect(page.locator("#submit-card")).to_be_visible()

    row(page, theirs).click()
    expect(page.locator("#d-id")).to_have_text(str(theirs))
    for button in ("#d-stop", "#d-rerun", "#d-forget"):
        expect(page.locator(button)).to_be_hidden()
    expect(page.locator("#d-notyours")).to_contain_text("job of bob")
    expect(page.locator("#d-log-note")).to_contain_text(
        f"alice (role user) may not read the log of job {theirs} of bob"
    )

    row(page, mine).click()
    expect(page.locator("#d-id")).to_have_text(str(mine))
    expect(page.locator("#d-stop")).to_be_visible()
    expect(page.locator("#d-notyours")).to_be_hidden()
    page.click("#d-stop")
    expect(page.locator("#d-state")).to_have_text("stopped")
    assert server.api("GET", f"/jobs/{theirs}").json()["state"] == "queued"

    page.fill("#s-command", "echo from alice")
    page.click("#submit button")
    expect(page.locator("#msg")).to_contain_text("submitted job 3")
    assert server.api("GET", "/jobs/3").json()["user"] == "alice"  # the token's user, not a claim

    page.click("#logout")
    expect(page.locator("#login")).to_be_visible()
    expect(page.locator("#app")).to_be_hidden()
    expect(page.locator("#who")).to_be_hidden()
    page.reload()  # the token is forgotten
    expect(page.locator("#login")).to_be_visible()


def test_readonly_sees_no_submit_and_no_controls(page: Page, server: CrqServer) -> None:
    job = submit(server, user="carol", command="sleep 100")
    token = personal_token(server, "carol", role="readonly")
    page.goto(f"{server.url}/#token={token}")

    expect(page.locator("#who-role")).to_have_text("readonly")
    expect(row(page, job)).to_contain_text("carol")
    expect(page.locator("#submit-card")).to_be_hidden()
    expect(page.locator("#admin")).to_be_hidden()
    row(page, job).click()  # even its own job: readonly only looks
    expect(page.locator("#d-id")).to_have_text(str(job))
    expect(page.locator("#d-actions")).to_be_hidden()
    expect(page.locator("#d-notyours")).to_contain_text("read only")


def test_operator_controls_every_job_but_not_the_server(page: Page, server: CrqServer) -> None:
    job = submit(server, user="bob", command="sleep 100")
    token = personal_token(server, "dave", role="operator")
    page.goto(f"{server.url}/#token={token}")

    expect(page.locator("#who-role")).to_have_text("operator")
    expect(page.locator("#admin")).to_be_visible()
    expect(page.locator("#a-sanity")).to_be_visible()
    expect(page.locator("#a-stop")).to_be_hidden()
    row(page, job).click()
    expect(page.locator("#d-stop")).to_be_visible()
    page.click("#a-sanity")
    expect(page.locator("#msg")).to_contain_text("sanity check")


def test_admin_runs_a_sanity_check(page: Page, server: CrqServer) -> None:
    page.goto(f"{server.url}/#token={server.admin_token}")
    expect(page.locator("#admin")).to_be_visible()
    page.click("#a-sanity")
    expect(page.locator("#msg")).to_contain_text("sanity check: ok")
