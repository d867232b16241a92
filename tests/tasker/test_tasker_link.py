"""How the tasker names what went wrong with a request (crq.tasker.link's Failure tree)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from crq.tasker import link

from tests.rigs import env_with_root


@pytest.mark.parametrize(
    ("status", "data", "retry_after", "kind"),
    [
        (409, {"error": "unknown_tasker"}, None, link.UnknownTasker),
        (409, {"error": "wrong_session"}, None, link.WrongSession),
        (401, {"error": "unauthorized"}, "5", link.TokenRefused),
        (403, None, None, link.TokenRefused),
        (409, {"error": "tasker_name_in_use"}, None, link.NameInUse),
        (503, {"error": "recovering"}, "2.5", link.RetryLater),
        (500, "not json", None, link.Refused),
        (422, {"error": "invalid", "message": "bad slots"}, "x", link.Refused),
    ],
)
def test_error_answers_map_to_one_failure_each(
    status: int, data: object, retry_after: str | None, kind: type[link.Failure]
) -> None:
    f = link._refusal(status, data, retry_after)
    assert type(f) is kind
    assert str(f).startswith(f"HTTP {status}")
    if isinstance(f, link.Refused):
        assert f.status == status


def test_wrong_session_registers_again_like_unknown() -> None:
    assert isinstance(link._refusal(409, {"error": "wrong_session"}, None), link.UnknownTasker)


def test_retry_after_is_kept() -> None:
    late = link._refusal(503, {"error": "recovering"}, "2.5")
    assert isinstance(late, link.RetryLater) and late.after == 2.5
    taken = link._refusal(409, {"error": "tasker_name_in_use", "message": "held"}, "7")
    assert isinstance(taken, link.NameInUse) and taken.after == 7.0
    assert str(taken) == "HTTP 409 tasker_name_in_use: held"


def test_link_and_cli_import_without_httpx_or_client() -> None:
    """``vovtasker --help`` stays fast: httpx comes with the first connection only, and the
    tasker takes its argument types from crq.cliargs, not from the client package."""
    code = (
        "import sys, crq.tasker.cli, crq.tasker.link, crq.tasker.agent\n"
        "assert 'httpx' not in sys.modules, 'httpx imported'\n"
        "client = [m for m in sys.modules if m.startswith('crq.client')]\n"
        "assert not client, client\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=env_with_root())
