"""A real 3-member etcd cluster on loopback for the election tests, and a cuttable TCP proxy.

The cluster is the Debian package's ``etcd`` binary (CI installs ``etcd-server``); nothing of
it is mocked. Each member gets free ports and a data dir under the test's tmp_path, so the
packaged service (if one runs on 2379) is never touched. The fixture ``etcd_cluster`` kills
every member with SIGKILL at teardown, also when the test fails.

``Proxy`` forwards bytes between a candidate and one member; ``cut()`` drops them in both
directions (a partition: requests hang and time out, as on a real network), ``heal()`` ends it.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.rigs import PATIENCE, free_port, wait_until

ETCD = shutil.which("etcd")
SKIP = "etcd is not installed (Debian package etcd-server; .ci/run installs it)"


def member_healthy(endpoint: str) -> bool:
    """The member's own /health: true once it is in a cluster that has a leader."""
    try:
        with urllib.request.urlopen(f"http://{endpoint}/health", timeout=2) as r:
            return bool(json.loads(r.read()).get("health") == "true")
    except (OSError, ValueError):
        return False


class Proxy:
    """A TCP forwarder to one member that a test can cut, to partition a candidate."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self._target = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._cut = threading.Event()
        self._closed = False
        self._lock = threading.Lock()
        self._socks: set[socket.socket] = set()
        threading.Thread(target=self._accept, daemon=True, name="etcd-proxy").start()

    def cut(self) -> None:
        """From now on every byte either way is dropped; connections stay open and hang."""
        self._cut.set()

    def heal(self) -> None:
        """Forward again; connections that lost bytes during the cut are closed."""
        with self._lock:
            old = list(self._socks)
        self._cut.clear()
        for s in old:
            self._drop(s)

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        with self._lock:
            old = list(self._socks)
        for s in old:
            self._drop(s)

    def _drop(self, s: socket.socket) -> None:
        with self._lock:
            self._socks.discard(s)
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                near, _ = self._listener.accept()
            except OSError:
                return
            try:
                far = socket.create_connection(self._target, timeout=5)
            except OSError:
                near.close()
                continue
            far.settimeout(None)
            with self._lock:
                self._socks |= {near, far}
            for a, b in ((near, far), (far, near)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if not self._cut.is_set():
                    dst.sendall(data)
        except OSError:
            pass
        self._drop(src)
        self._drop(dst)


def _distinct_ports(n: int) -> list[int]:
    """n free ports, no two alike: the kernel may hand a port just freed out again, and
    etcd refuses an initial cluster with a duplicate url (a flake seen in CI)."""
    ports: list[int] = []
    while len(ports) < n:
        p = free_port()
        if p not in ports:
            ports.append(p)
    return ports


class EtcdCluster:
    """Three members on loopback; ``kill(i)``/``restart(i)`` one, ``proxy(i)`` to cut one off."""

    def __init__(self, base: Path, size: int = 3) -> None:
        assert ETCD is not None, SKIP
        self.base = base
        self.names = [f"m{i}" for i in range(size)]
        ports = _distinct_ports(2 * size)
        self.peers = [f"127.0.0.1:{p}" for p in ports[:size]]
        self.endpoints = [f"127.0.0.1:{p}" for p in ports[size:]]
        self.url = "etcd://" + ",".join(self.endpoints)
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * size
        self._proxies: list[Proxy] = []
        self._initial = ",".join(
            f"{n}=http://{p}" for n, p in zip(self.names, self.peers, strict=True)
        )

    def argv(self, i: int) -> list[str]:
        peer, client = f"http://{self.peers[i]}", f"http://{self.endpoints[i]}"
        return [
            str(ETCD),
            "--name", self.names[i],
            "--data-dir", str(self.base / self.names[i]),
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--listen-client-urls", client,
            "--advertise-client-urls", client,
            "--initial-cluster", self._initial,
            "--initial-cluster-state", "new",
            "--initial-cluster-token", f"crq-test-{self.base.name}",
        ]  # fmt: skip

    def start(self, i: int) -> None:
        log = open(self.base / f"{self.names[i]}.log", "ab")  # noqa: SIM115 (the child keeps it)
        self.procs[i] = subprocess.Popen(
            self.argv(i), stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=self.base
        )
        log.close()

    def start_all(self) -> None:
        for i in range(len(self.names)):
            self.start(i)
        self.wait_healthy()

    def wait_healthy(self) -> None:
        """Every running member is healthy (is in a cluster with a leader)."""

        def ok() -> bool:
            for i, p in enumerate(self.procs):
                if p is None:
                    continue
                if p.poll() is not None:
                    why = f"etcd {self.names[i]} exited {p.returncode}: {self.log(i)}"
                    raise AssertionError(why)
                if not member_healthy(self.endpoints[i]):
                    return False
            return True

        wait_until(ok, PATIENCE, step=0.1)

    def log(self, i: int) -> str:
        path = self.base / f"{self.names[i]}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def kill(self, i: int) -> None:
        """kill -9 member i (its data dir stays, for restart)."""
        p = self.procs[i]
        if p is not None:
            p.kill()
            p.wait()
        self.procs[i] = None

    def restart(self, i: int) -> None:
        self.kill(i)
        self.start(i)
        self.wait_healthy()

    def leader_index(self) -> int:
        """Which member is the raft leader now (from a member's status)."""

        def find() -> list[int] | None:
            ids: dict[str, int] = {}
            leader = None
            for i, ep in enumerate(self.endpoints):
                if self.procs[i] is None:
                    continue
                try:
                    req = urllib.request.Request(
                        f"http://{ep}/v3/maintenance/status", data=b"{}", method="POST"
                    )
                    with urllib.request.urlopen(req, timeout=2) as r:
                        st = json.loads(r.read())
                except (OSError, ValueError):
                    continue
                ids[st["header"]["member_id"]] = i
                leader = st.get("leader", leader)
            return [ids[leader]] if leader in ids else None

        found: list[int] = wait_until(find, PATIENCE, step=0.1)
        return found[0]

    def proxy(self, i: int) -> Proxy:
        """A new proxy to member i; its ``endpoint`` goes where the member's would."""
        p = Proxy(self.endpoints[i])
        self._proxies.append(p)
        return p

    def stop(self) -> None:
        for p in self._proxies:
            p.close()
        for i in range(len(self.procs)):
            self.kill(i)


@pytest.fixture
def etcd_cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A fresh 3-member cluster per test; every member is killed at teardown."""
    if ETCD is None:
        pytest.skip(SKIP)
    base = tmp_path / "etcd"
    base.mkdir()
    cluster = EtcdCluster(base)
    try:
        cluster.start_all()
        yield cluster
    finally:
        cluster.stop()
