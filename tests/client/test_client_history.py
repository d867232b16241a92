"""``crq history`` and ``Client.history`` without a server: the arguments, the query sent,
paging, and the sacct-like table."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from crq.client import cli
from crq.client.api import Client
from crq.client.views import HISTORY_HEADERS, history_rows

from tests.client.fakehttp import opener


@pytest.fixture(autouse=True)
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRQ_HOME", str(tmp_path / "crqhome"))
    for var in ("CRQ_SERVER", "CRQ_QUEUE", "CRQ_TOKEN"):
        monkeypatch.delenv(var, raising=False)


def test_history_arguments() -> None:
    args = cli.build_parser().parse_args(
        ["history", "-u", "ann", "-s", "failed", "--since", "2d", "--until", "2026-12-01",
         "--name", "build-*", "-n", "5", "--json"]
    )  # fmt: skip
    assert (args.user, args.state, args.name, args.limit, args.json) == (
        "ann", "failed", "build-*", 5, True,
    )  # fmt: skip
    assert float(args.since) == pytest.approx(time.time() - 2 * 86400, abs=60)
    assert args.until == "2026-12-01"  # the server reads dates (and says what is wrong)
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(["history", "--state", "exploded"])
    assert e.value.code == 2


def test_client_history_sends_the_filters_and_follows_pages() -> None:
    rows = [{"id": i, "state": "done"} for i in range(1, 13)]
    seen: list[httpx.QueryParams] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/api/v1/history"
        seen.append(request.url.params)
        after, limit = int(request.url.params.get("after", 0)), int(request.url.params["limit"])
        page = [r for r in rows if r["id"] > after][:limit]
        more = page and page[-1]["id"] < rows[-1]["id"]
        return httpx.Response(200, json={"jobs": page, "next": page[-1]["id"] if more else None})

    with Client(url="http://fake:1", token="tok", queue="q", opener=opener(handler)) as c:
        got = c.history(user="ann", state="done", since=5.0, name="b*", page_size=5)
        assert [r["id"] for r in got] == list(range(1, 13))
        assert [r["id"] for r in c.history(limit=7, page_size=5)] == list(range(1, 8))
    assert seen[0]["user"] == "ann" and seen[0]["state"] == "done"
    assert seen[0]["since"] == "5.0" and seen[0]["name"] == "b*" and "until" not in seen[0]
    assert [p.get("after") for p in seen[:3]] == [None, "5", "10"]


def test_history_table() -> None:
    now = 1_800_000_000.0
    row = {
        "id": 7, "user": "ann", "name": "build", "state": "failed", "exit_code": 3,
        "signal": None, "host": "h1", "submitted": now - 100, "wait": 2.5, "run": 65.0,
        "tries": 2, "reason": None,
    }  # fmt: skip
    [cells] = history_rows([row], now)
    assert dict(zip(HISTORY_HEADERS, cells, strict=True)) == {
        "ID": "7", "USER": "ann", "NAME": "build", "STATE": "failed", "EXIT": "3",
        "HOST": "h1", "SUBMITTED": time.strftime("%H:%M:%S", time.localtime(now - 100)),
        "WAIT": "2.5s", "RUN": "1m05s", "ATTEMPTS": "2", "REASON": "-",
    }  # fmt: skip
    [killed] = history_rows([{**row, "signal": 9, "exit_code": None, "wait": None}], now)
    assert killed[4] == "SIG9" and killed[7] == "-"
