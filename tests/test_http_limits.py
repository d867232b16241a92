"""Resource limits on the HTTP side: body size while it streams.

Real servers (``python -m server``) for the socket-level behaviour.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.models import MAX_BODY
from tests._tasker_util import CrqServer

MIB = 1 << 20


def status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def read_reply(sock: socket.socket, timeout: float = 30.0) -> bytes:
    """What the server sent before it closed (or until the reply's headers and body)."""
    sock.settimeout(timeout)
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return data


@pytest.fixture
def server(tmp_path: Path) -> Iterator[CrqServer]:
    s = CrqServer(tmp_path / "q.swd")
    s.start()
    yield s
    s.kill9()


# -- body size ---------------------------------------------------------------------------


def test_a_chunked_body_over_the_limit_is_refused_while_it_streams(server: CrqServer) -> None:
    assert server.proc is not None
    pid = server.proc.pid
    before = status_kib(pid, "VmHWM")
    size = 4 * MAX_BODY  # 256 MiB
    chunk = b"x" * MIB
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(
            b"POST /api/v1/jobs HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
            b"Authorization: Bearer " + server.admin_token.encode() + b"\r\n\r\n"
        )
        sent = 0
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while sent < size:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
        reply = read_reply(sock)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b'"too_large"' in reply
    assert sent < size, "the server read the whole body before refusing it"
    grew = (status_kib(pid, "VmHWM") - before) * 1024
    assert grew < size // 2, f"peak RSS grew by {grew / MIB:.0f} MiB for a refused body"
    assert server.submit({"command": ["true"], "cwd": "/tmp"})  # and it keeps serving


@pytest.mark.parametrize("path", ["/api/v1/jobs", "/api/v1/taskers/tk1/sync"])
def test_a_declared_length_over_the_limit_is_refused_before_the_body(
    server: CrqServer, path: str
) -> None:
    token = server.admin_token if path.endswith("jobs") else server.tasker_token
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {MAX_BODY + 1}\r\n"
            f"Content-Type: application/json\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
        )  # and not one byte of the body: the answer must not wait for it
        reply = read_reply(sock)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b"connection: close" in reply.lower()
    assert server.submit({"command": ["true"], "cwd": "/tmp"})


def test_a_body_under_the_limit_is_read_whole(server: CrqServer) -> None:
    jobs = [{"command": ["true", "x" * 1000], "cwd": "/tmp"} for _ in range(3000)]  # 3 MB
    r = server.api("POST", "/jobs", json={"jobs": jobs})
    assert r.status_code == 201, r.text
    assert len(r.json()["ids"]) == 3000
