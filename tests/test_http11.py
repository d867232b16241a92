"""crq.http11 against real servers: crq's own (keep-alive, JSON both ways, the HTML page)
and a scripted one on a loopback socket for what a crq server does not do on request (close
an idle connection, answer in chunks, never answer, drop the request); a refused port.
Through the Client and the tasker's link too: each failure ends as one clear error."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from crq.client.api import Client
from crq.client.errors import CrqError, NotSent
from crq.tasker import link

from crq import http11
from tests.rigs import CrqServer, env_with_root, wait_until

Script = Callable[[socket.socket, bytes], bool]


class Scripted:
    """A loopback server that reads each request and lets ``script(conn, request)``
    answer it (True: keep the connection for the next request)."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.closed = 0  # connections this server has closed
        self.requests: list[bytes] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                while self._one(conn):
                    pass
            self.closed += 1

    def _one(self, conn: socket.socket) -> bool:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return False
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                want = int(line.split(b":")[1])
                while len(body) < want:
                    body += conn.recv(65536)
        self.requests.append(head + b"\r\n\r\n" + body)
        return self.script(conn, self.requests[-1])

    def close(self) -> None:
        self.stopping.set()
        self.listener.close()


@pytest.fixture
def scripted() -> Iterator[Callable[[Script], Scripted]]:
    made: list[Scripted] = []

    def make(script: Script) -> Scripted:
        made.append(Scripted(script))
        return made[-1]

    yield make
    for s in made:
        s.close()


def answer(body: bytes, *, status: str = "200 OK", kind: str = "application/json") -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


@pytest.fixture
def refused_url() -> Iterator[str]:
    """A port bound but not listening: a connection there is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


# -- against crq's server ------------------------------------------------------------------


def test_one_connection_carries_many_requests(crq_server: Callable[..., CrqServer]) -> None:
    srv = crq_server()
    auth = {"Authorization": f"Bearer {srv.admin_token}"}
    with http11.Connection(srv.url, auth) as c:
        r = c.request(
            "POST",
            "/api/v1/jobs",
            body=http11.dumps({"command": ["true"], "cwd": "/tmp", "name": "é"}),
            headers={"Content-Type": "application/json"},
        )
        assert r.status == 201, r.body
        (job,) = r.json()["ids"]
        first = c._sock
        assert first is not None
        where = first.getsockname()
        got = c.request("GET", f"/api/v1/jobs/{job}")
        listed = c.request("GET", "/api/v1/jobs", params={"limit": 5, "state": None})
        assert c._sock is first and first.getsockname() == where  # the same connection
    assert got.json()["name"] == "é" and (got.header("Content-Type") or "").startswith(
        "application/json"
    )
    assert [j["id"] for j in listed.json()["jobs"]] == [job]


def test_a_page_that_is_not_json_is_one_clear_error(crq_server: Callable[..., CrqServer]) -> None:
    srv = crq_server()
    with http11.Connection(srv.url) as c:
        page = c.request("GET", "/")
    assert page.status == 200 and b"<html" in page.body.lower()
    with pytest.raises(ValueError):
        page.json()
    with Client(url=srv.url, token=srv.admin_token) as client, pytest.raises(CrqError) as exc:
        client.request("GET", "/")
    assert exc.value.code == "bad_reply" and "not JSON (HTTP 200)" in exc.value.message


# -- against a scripted server -------------------------------------------------------------


def test_a_connection_the_server_closed_while_idle_is_made_again(
    scripted: Callable[[Script], Scripted],
) -> None:
    """As a keep-alive timeout does: answer, then close without saying so."""

    def once(conn: socket.socket, request: bytes) -> bool:
        conn.sendall(answer(b'{"ok": true}'))
        return False

    srv = scripted(once)
    with http11.Connection(srv.url) as c:
        assert c.request("POST", "/a", body=b"{}").json() == {"ok": True}
        wait_until(lambda: srv.closed == 1)
        assert c.request("POST", "/b", body=b"{}").json() == {"ok": True}
    assert srv.connections == 2 and len(srv.requests) == 2  # nothing sent into the dead one


def test_chunked_and_interim_answers(scripted: Callable[[Script], Scripted]) -> None:
    def chunks(conn: socket.socket, request: bytes) -> bool:
        conn.sendall(
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\nX-A: 2\r\n\r\n"
            b"4\r\n[1, \r\n3;ext=1\r\n2, \r\n2\r\n3]\r\n0\r\nTrailer: x\r\n\r\n"
        )
        return True

    srv = scripted(chunks)
    with http11.Connection(srv.url) as c:
        for _ in range(2):
            r = c.request("GET", "/")
            assert r.json() == [1, 2, 3] and r.header("x-a") == "1, 2"
    assert srv.connections == 1


def test_a_server_that_never_answers_times_out(scripted: Callable[[Script], Scripted]) -> None:
    srv = scripted(lambda conn, request: srv.stopping.wait() and False)
    with http11.Connection(srv.url) as c, pytest.raises(http11.TransportError) as exc:
        c.request("GET", "/", timeout=0.2)
    assert exc.value.timed_out and exc.value.sent
    with Client(url=srv.url, token="t") as client, pytest.raises(CrqError) as err:
        client.request("GET", "server", timeout=0.2)
    assert err.value.code == "timeout" and "did not answer within 0.2 s" in err.value.message


def test_a_request_dropped_unanswered_is_a_lost_connection(
    scripted: Callable[[Script], Scripted],
) -> None:
    srv = scripted(lambda conn, request: False)
    with http11.Connection(srv.url) as c, pytest.raises(http11.TransportError) as exc:
        c.request("POST", "/x", body=b"{}")
    assert exc.value.sent and not exc.value.timed_out
    assert str(exc.value) == "the server closed the connection before answering"
    with Client(url=srv.url, token="t") as client, pytest.raises(CrqError) as err:
        client.request("POST", "jobs", json={"command": "true"})
    assert err.value.code == "disconnected" and "may or may not have been applied" in str(err.value)


def test_the_taskers_link_names_each_failure(
    scripted: Callable[[Script], Scripted], refused_url: str
) -> None:
    html = scripted(lambda conn, r: conn.sendall(answer(b"<p>hi</p>", kind="text/html")) or True)
    with link.open_client(html.url, "tok", "s1") as c, pytest.raises(link.BadAnswer):
        link.post(c, "/api/v1/taskers/t/sync", {"wait": 0}, 5.0)
    sent = html.requests[0].decode()
    assert "Authorization: Bearer tok" in sent and '{"wait":0}' in sent
    late = scripted(lambda conn, r: conn.sendall(answer(b"{}", status="503 Busy")) or True)
    with link.open_client(late.url, "tok", "s1") as c, pytest.raises(link.Refused) as exc:
        link.post(c, "/x", {}, 5.0)
    assert exc.value.status == 503
    with link.open_client(refused_url, "tok", "s1") as c, pytest.raises(link.Unreachable) as gone:
        link.post(c, "/x", {}, 5.0)
    assert str(gone.value) == "connection refused"
    with pytest.raises(link.SourceError):
        link.open_client("ftp://host", "tok", "s1")


def test_a_refused_connection_was_not_sent(refused_url: str, tmp_path: Path) -> None:
    with http11.Connection(refused_url) as c, pytest.raises(http11.TransportError) as exc:
        c.request("POST", "/x", body=b"{}")
    assert not exc.value.sent and str(exc.value) == "connection refused"
    with Client(url=refused_url, token="t") as client, pytest.raises(NotSent) as err:
        client.server()
    assert err.value.message.startswith(f"cannot reach the crq server at {refused_url}: ")
    assert "connection refused — is it started?" in err.value.message


def test_queries_and_bad_urls() -> None:
    assert (
        http11.query({"a": 1, "b": None, "c": True, "d": "x y/é"}) == "?a=1&c=true&d=x%20y%2F%C3%A9"
    )
    assert http11.query({"b": None}) == "" and http11.query(None) == ""
    with pytest.raises(ValueError):
        http11.Connection("localhost:80")
    with pytest.raises(CrqError) as bad:  # a registry entry can hold anything
        Client(url="http://h:99999", token="t")
    assert bad.value.code == "usage" and "no server URL" in bad.value.message
    c = http11.Connection("http://[::1]:81/base/", {"X": "1"})
    assert (
        c.headers["Host"] == "[::1]:81" and c.prefix == "/base" and c.url == "http://[::1]:81/base"
    )
    with pytest.raises(http11.TransportError) as exc:
        c.request("GET", "/x", headers={"X": "a\r\nInjected: 1"})
    assert not exc.value.sent


def test_the_clis_and_the_tasker_import_no_http_library() -> None:
    """A CLI process pays for every import: none of httpx, http.client (email, ssl), urllib's
    opener, orjson or uuid at start-up, in a fresh interpreter."""
    code = (
        "import sys\n"
        "import crq.client.cli, crq.client.api, crq.client.ncmgr, crq.client.vovproject\n"
        "import crq.tasker.cli, crq.tasker.agent, crq.tasker.etcdleader\n"
        "heavy = {'httpx', 'httpcore', 'http.client', 'email', 'ssl', 'urllib.request',\n"
        "         'orjson', 'uuid'}\n"
        "assert not heavy & set(sys.modules), sorted(heavy & set(sys.modules))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=env_with_root())
