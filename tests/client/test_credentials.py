"""Which credential the clients show (SPEC section 9, crq.client.credentials), and that a
MUNGE credential they send is one a real munged decodes as this process's uid.

The choice is checked at the header level (tests/client/fakehttp.py: the real Client, a
handler instead of a server); the MUNGE credentials on a real socket, decoded by a real
munged (tests/munged.py) in a tiny HTTP endpoint of the test's own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from crq.client import credentials, registry
from crq.client.api import Client
from crq.client.cli import main as crq_main
from crq.client.errors import CrqError
from crq.client.place import Place
from crq.tasker import link

from crq import munge, wire
from tests.client.fakehttp import opener
from tests.munged import Munged

URL = "http://127.0.0.1:6399"


@pytest.fixture(autouse=True)
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "crqhome"
    monkeypatch.setenv("CRQ_HOME", str(home))
    for var in ("CRQ_SERVER", "CRQ_QUEUE", "CRQ_TOKEN", "CRQ_TASKER_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CRQ_MUNGE_SOCKET", str(tmp_path / "no-munged.socket"))
    monkeypatch.chdir(tmp_path)
    return home


@pytest.fixture
def with_munged(munged: Munged, monkeypatch: pytest.MonkeyPatch) -> Munged:
    monkeypatch.setenv("CRQ_MUNGE_SOCKET", munged.socket)
    return munged


class Seen:
    """The Authorization header of every request a fake server got."""

    def __init__(self) -> None:
        self.auth: list[str | None] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.auth.append(request.headers.get("authorization"))
        return httpx.Response(200, json={"mode": "normal", "ids": [1]})


def registered(tmp_path: Path, token: str | None = "from-registry") -> Path:
    swd = tmp_path / "q.swd"
    (swd / "security").mkdir(parents=True)
    (swd / "security" / "admin.token").write_text("from-swd\n")
    registry.register("q", URL, swd, token)
    return swd


def client(seen: Seen, **kwargs: Any) -> Client:
    return Client(queue="q", opener=opener(seen), **kwargs)


# -- the order ----------------------------------------------------------------------------


def test_without_munged_registry_then_swd_token(tmp_path: Path) -> None:
    swd = registered(tmp_path)
    seen = Seen()
    with client(seen) as c:
        c.server()
        assert (c.credential.via, c.credential.source) == ("token", "the registry")
    registry.register("q", URL, swd, None)
    with client(seen) as c:
        c.server()
        assert c.credential.source == str(wire.Swd(swd).admin_token)
    assert seen.auth == ["Bearer from-registry", "Bearer from-swd"]


def test_munge_before_the_registry_token_fresh_per_request(
    tmp_path: Path, with_munged: Munged
) -> None:
    registered(tmp_path)
    seen = Seen()
    with client(seen) as c:
        assert c.credential.via == "munge" and c.token is None
        c.server()
        c.submit(command="true")
        c.get(1)
    assert len(seen.auth) == 3 and len(set(seen.auth)) == 3  # never the same credential twice
    for header in seen.auth:
        assert header is not None and header.startswith("Munge ")
        cred = munge.decode(header.removeprefix("Munge "), socket=with_munged.socket)
        assert (cred.uid, cred.gid) == (os.getuid(), os.getgid())


def test_explicit_token_and_crq_token_before_munge(
    tmp_path: Path, with_munged: Munged, monkeypatch: pytest.MonkeyPatch
) -> None:
    registered(tmp_path)
    seen = Seen()
    monkeypatch.setenv("CRQ_TOKEN", "from-env")
    with client(seen, token="explicit") as c:
        c.server()
    with client(seen) as c:
        c.server()
        assert c.credential.source == "CRQ_TOKEN"
    assert seen.auth == ["Bearer explicit", "Bearer from-env"]


def test_empty_token_means_munge_or_nothing(tmp_path: Path, with_munged: Munged) -> None:
    registered(tmp_path)
    seen = Seen()
    with client(seen, token="") as c:
        c.server()
    assert seen.auth[0] is not None and seen.auth[0].startswith("Munge ")


def test_no_munge_and_empty_token_sends_nothing(tmp_path: Path) -> None:
    registered(tmp_path)
    seen = Seen()
    with client(seen, token="") as c:
        c.server()
        assert c.credential.via == "none"
    assert seen.auth == [None]


def test_munge_false_skips_munge(tmp_path: Path, with_munged: Munged) -> None:
    registered(tmp_path)
    seen = Seen()
    with client(seen, munge=False) as c:
        c.server()
    assert seen.auth == ["Bearer from-registry"]


def test_ncmgr_prefers_the_readable_admin_token_then_munge(
    tmp_path: Path, with_munged: Munged
) -> None:
    import argparse

    swd = registered(tmp_path)
    args = argparse.Namespace(queue="q", swd=str(swd), host=None, port=None)
    place = Place(args)
    with place.client() as c:
        assert c.credential.via == "token" and c.token == "from-swd"
    (swd / "security" / "admin.token").unlink()
    registry.register("q", URL, tmp_path / "other.swd", None)  # no token in the registry
    with Place(args).client() as c:
        assert c.credential.via == "munge"


def test_a_401_under_munge_says_so(tmp_path: Path, with_munged: Munged) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"error": "unauthorized", "message": "replayed"})

    with Client(queue="q", opener=opener(refuse)) as c, pytest.raises(CrqError) as e:
        c.server()
    assert e.value.status == 401
    assert "MUNGE credential of munged at" in e.value.message and "\n" not in e.value.message


def test_a_403_with_a_rule_keeps_the_servers_words(tmp_path: Path) -> None:
    registered(tmp_path)
    msg = "alice (role user) may not stop job 12 of bob: users control only their own jobs"

    def refuse(request: httpx.Request) -> httpx.Response:
        return httpx.Response(403, json={"error": "forbidden", "message": msg, "rule": "own-jobs"})

    with client(refuse) as c, pytest.raises(CrqError) as e:  # type: ignore[arg-type]
        c.stop(12)
    assert e.value.message == msg and e.value.code == "forbidden"


def test_munged_gone_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A socket that exists but where no munged answers: not MUNGE (available() loads
    libmunge and sees the socket, encode fails): a one-line CrqError at the request."""
    sock = tmp_path / "dead.socket"
    sock.write_text("")
    monkeypatch.setenv("CRQ_MUNGE_SOCKET", str(sock))
    registered(tmp_path)
    seen = Seen()
    with client(seen) as c:
        assert c.credential.via == "munge"
        with pytest.raises(CrqError) as e:
            c.server()
    assert e.value.code == "munge" and str(sock) in e.value.message
    assert seen.auth == []


def test_the_cli_does_not_load_munge_without_munged(tmp_path: Path) -> None:
    """Importing the CLI and choosing a credential cost a stat without munged: crq.munge
    (ctypes, libmunge) is not even imported."""
    registered(tmp_path)
    code = (
        "import sys; from crq.client.api import Client; import crq.client.cli\n"
        "c = Client(queue='q'); assert c.credential.via == 'token', c.credential\n"
        "assert 'crq.munge' not in sys.modules and 'ctypes' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=os.environ.copy())


def test_token_file_flag(tmp_path: Path, with_munged: Munged) -> None:
    registered(tmp_path)
    (tmp_path / "tok").write_text("from-file\n")
    with Endpoint(with_munged.socket) as ep:
        assert crq_main(["--server", ep.url, "--token-file", "tok", "whoami"]) == 0
    assert ep.auth == ["Bearer from-file"]
    assert crq_main(["--server", ep.url, "--token-file", "missing", "whoami"]) != 0


# -- a real endpoint: munged decodes what the client sent -----------------------------------


class Endpoint:
    """A tiny HTTP server (a thread of this process) that decodes every request's MUNGE
    credential with munged and answers the identity endpoints of the issue 13 contract
    with what it decoded; a replayed credential gets the 401 a server would give."""

    def __init__(self, socket: str) -> None:
        self.socket = socket
        self.auth: list[str | None] = []
        self.uids: list[int] = []
        self.tokens: list[dict[str, Any]] = []
        self.fail_first = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _who(self) -> dict[str, Any] | None:
                header = self.headers.get("Authorization")
                outer.auth.append(header)
                if header and header.startswith("Munge "):
                    try:
                        cred = munge.decode(header[6:], socket=outer.socket)
                    except munge.MungeError as e:
                        self._answer(401, {"error": "unauthorized", "message": str(e)})
                        return None
                    outer.uids.append(cred.uid)
                    return {"user": f"uid{cred.uid}", "role": "user", "via": "munge"}
                return {"user": "tokenholder", "role": "readonly", "via": "token"}

            def do_GET(self) -> None:
                who = self._who()
                if who is None:
                    return
                if self.path == "/api/v1/whoami":
                    may = {"read": True, "submit": True, "control_all": False, "admin": False}
                    self._answer(200, {**who, "groups": ["g1"], "may": may})
                else:
                    self._answer(200, {"mode": "normal"})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                who = self._who()
                if who is None:
                    return
                if outer.fail_first > 0:
                    outer.fail_first -= 1
                    self._answer(503, {"error": "crash_recovery", "message": "recovering"})
                    return
                if self.path == "/api/v1/tokens":
                    outer.tokens.append(body)
                    out = {"id": "t1", "token": "crq_t1_" + "s" * 32, "user": who["user"],
                           "role": who["role"], "expires": None}  # fmt: skip
                    self._answer(201, out)
                elif self.path == "/api/v1/jobs":
                    self._answer(201, {"ids": [7]})
                else:
                    self._answer(404, {"error": "not_found", "message": self.path})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> Endpoint:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def endpoint(with_munged: Munged) -> Iterator[Endpoint]:
    with Endpoint(with_munged.socket) as ep:
        yield ep


def test_munged_decodes_the_clients_credentials_as_our_uid(endpoint: Endpoint) -> None:
    endpoint.fail_first = 2  # a submit retried through recovery: a new credential each time
    with Client(url=endpoint.url, timeout=10.0) as c:
        assert c.whoami()["via"] == "munge"
        assert c.submit(command="true") == 7
        c.server()
    assert endpoint.uids == [os.getuid()] * 5  # whoami, 3 submit tries, server: none refused
    assert len(set(endpoint.auth)) == 5


def test_crq_whoami_and_token(endpoint: Endpoint, capsys: pytest.CaptureFixture[str]) -> None:
    assert crq_main(["--server", endpoint.url, "whoami"]) == 0
    out = capsys.readouterr().out
    assert f"user   uid{os.getuid()}" in out and "role   user" in out
    assert "via    a MUNGE credential (from munged at " in out and "groups g1" in out

    assert crq_main(["--server", endpoint.url, "token", "--expires", "8h", "--note", "ui"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "crq_t1_" + "s" * 32 + "\n"  # the token alone on stdout
    assert "shown this once only" in captured.err and "in the browser" in captured.err
    assert endpoint.tokens == [{"user": None, "role": None, "expires": 28800.0, "note": "ui"}]
    assert endpoint.uids == [os.getuid()] * 2


def test_crq_token_bad_expires_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        crq_main(["token", "--expires", "soon"])
    assert e.value.code == 2 and "not a duration: 'soon'" in capsys.readouterr().err


# -- the tasker ----------------------------------------------------------------------------


def test_tasker_prefers_a_tasker_token_then_munge(tmp_path: Path, with_munged: Munged) -> None:
    swd = tmp_path / "t.swd"
    (swd / "security").mkdir(parents=True)
    (tmp_path / "tf").write_text("from-file\n")
    assert link.ServerSource([URL], token_file=tmp_path / "tf", token="env")._token() == (
        "from-file"
    )
    assert link.ServerSource([URL], token="env")._token() == "env"
    (swd / "security" / "tasker.token").write_text("from-swd\n")
    assert link.ServerSource(swd=swd)._token() == "from-swd"
    (swd / "security" / "tasker.token").unlink()
    assert link.ServerSource(swd=swd)._token() == link.MUNGE_TOKEN + with_munged.socket
    assert link.ServerSource([URL])._token() == link.MUNGE_TOKEN + with_munged.socket


def test_tasker_without_token_or_munged_says_both(tmp_path: Path) -> None:
    with pytest.raises(link.SourceError) as e:
        link.ServerSource([URL])._token()
    assert "no tasker token" in str(e.value) and "munged" in str(e.value)


def test_tasker_connection_sends_fresh_credentials(endpoint: Endpoint) -> None:
    conn = link.open_client(endpoint.url, link.MUNGE_TOKEN + endpoint.socket, "sess")
    try:
        for _ in range(3):
            assert conn.request("GET", "/api/v1/server").status == 200
    finally:
        conn.close()
    assert endpoint.uids == [os.getuid()] * 3 and len(set(endpoint.auth)) == 3


def test_choose_is_what_the_client_uses(tmp_path: Path) -> None:
    registered(tmp_path)
    target = registry.resolve_server(None, "q")
    assert credentials.choose(target).authorization() == "Bearer from-registry"
    assert credentials.choose(target, "").authorization() is None
