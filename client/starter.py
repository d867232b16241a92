"""``ncmgr start`` after its checks: spawn the server, watch it until it is open for clients.

A :class:`Starter` runs four named steps: :meth:`~Starter.spawn`, :meth:`~Starter.wait_healthz`,
:meth:`~Starter.register`, :meth:`~Starter.follow_recovery`. A standby's start ends once it
answers as a standby (:meth:`~Starter.wait_standby`): it must not wait for leadership.
It waits while the process lives and makes progress: until it answers, while it uses CPU
(loading a long journal on a busy machine); then while crash recovery has time left. A server
that hangs is not waited for, and a start that gives up kills the server it spawned, so a
failed start leaves nothing running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from crq.client import registry
from crq.client.clitools import fail, say
from crq.client.errors import CrqError, recovery_progress
from crq.client.place import Place, read_server_json

from crq import procfs, wire

if TYPE_CHECKING:
    from crq.client.api import Client

START_TIMEOUT = 60.0  # give up on a server that neither opens nor works for this long
START_CAP = 1800.0  # and on one still not open after this long, however busy
DEFAULT_GRACE = 120.0
POLL = 0.1
#: Recovery progress with an unchanged head is shown again after this many seconds.
SHOW_EVERY = 5.0


class StartFailed(Exception):
    """The start is over and failed: ``message`` is the one line to print; ``kill`` says the
    spawned server must go too."""

    def __init__(self, message: str, kill: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.kill = kill


class Starter:
    """One server start: the process, its log, the deadline and what was seen so far."""

    def __init__(
        self,
        place: Place,
        cmd: list[str],
        host: str,
        port: int,
        url: str,
        *,
        stall: float = START_TIMEOUT,
        grace: float = DEFAULT_GRACE,
        standby: bool = False,
    ) -> None:
        self.place = place
        self.standby = standby
        self.cmd = cmd
        self.host = host
        self.port = port
        self.url = url
        #: How long a server may neither open nor work; the recovery grace comes on top.
        self.stall = max(0.0, stall)
        self.grace = grace
        self.log = place.swd.logs / "server.out"
        self.proc: subprocess.Popen[bytes] | None = None
        self.offset = 0
        self.began = 0.0
        self.deadline = 0.0
        self.cap = 0.0
        self.ticks: int | None = None
        #: The URL other hosts use (server.json's, when it binds every address).
        self.public = url
        self.recovered = False
        self.last_shown = ""
        self.last_shown_at = 0.0
        self.client: Client | None = None
        self.token: str | None = None

    def run(self) -> int:
        """All the steps; the exit status of ``ncmgr start``."""
        self.spawn()
        try:
            self.wait_healthz()
            if self.standby and self.wait_standby():
                return self._standing_by()
            self.register()
            self.follow_recovery()
        except StartFailed as e:
            if e.kill:
                self._kill()
                return fail(f"{e.message}; killed it")
            return fail(e.message)
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return fail(
                f"interrupted; the server (pid {self.pid}) keeps starting in the background"
            )
        finally:
            if self.client is not None:
                self.client.close()
        self.register()  # again: the token may be newer than the first call
        place = self.place
        say(f"queue {place.queue} started at {self.public} (pid {self.pid}, swd {place.swd.root})")
        report = _recovery_report(place.swd, self.began)
        if self.recovered or report:
            say("crash recovery finished" + (f"; report: {report}" if report else ""))
        return 0

    @property
    def pid(self) -> int:
        assert self.proc is not None, "spawn() first"
        return self.proc.pid

    # -- the steps ------------------------------------------------------------------------

    def spawn(self) -> None:
        """Run the server in its own session, output appended to ``logs/server.out``."""
        self.began = time.time()
        with open(self.log, "ab") as out:
            self.offset = out.tell()
            self.proc = subprocess.Popen(
                self.cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.place.swd.root,
                env=child_env(),
                close_fds=True,
            )
        now = time.monotonic()
        self.cap = now + START_CAP + self.grace
        self.deadline = now + self.stall + self.grace
        self.ticks = procfs.cpu_ticks(self.pid)

    def wait_healthz(self) -> None:
        """Until the server answers ``/healthz``; the deadline moves while it uses CPU."""
        while True:
            self._check(busy_counts=True)
            if self._client().healthz(timeout=1.0):
                return
            time.sleep(POLL)

    def wait_standby(self) -> bool:
        """Until a ``--standby`` server says what it is: True for a standby, False when it
        leads already (no other server did), and its start goes on as a leader's."""
        while True:
            self._check(busy_counts=False)
            client = self._client()
            health = client.health(timeout=1.0)
            if health is not None and health.get("mode") == wire.MODE_STANDBY:
                return True
            if health is not None:
                try:
                    mode = client.server().get("mode")
                except CrqError:
                    mode = None
                if mode == wire.MODE_STANDBY:
                    return True
                if mode in (wire.MODE_NORMAL, wire.MODE_RECOVERING):
                    return False
            time.sleep(POLL)

    def _standing_by(self) -> int:
        """The standby answers: record it as a candidate and say who leads."""
        self._read_public()
        self.place.register_standby(self.public)
        leader = None
        try:
            leader = self._client().server().get("leader")
        except CrqError:
            pass
        place = self.place
        say(
            f"queue {place.queue} standby started at {self.public} (pid {self.pid}, swd "
            f"{place.swd.root}); leader: {leader or 'none yet'}"
        )
        return 0

    def register(self) -> None:
        """Record the queue in the registry, under the URL other hosts can use."""
        self._read_public()
        self.place.register(self.public, self.host, self.port)

    def follow_recovery(self) -> None:
        """Until the server is open (mode normal), showing crash recovery progress; the
        deadline moves with the time recovery has left."""
        while True:
            self._check(busy_counts=False)
            client = self._client()
            if not client.healthz(timeout=1.0):
                time.sleep(POLL)
                continue
            self._read_public()
            try:
                status = client.server()
            except CrqError as e:
                fresh = registry.read_token(self.place.swd.admin_token)
                if e.status in (401, 403) and fresh in (None, self.token):  # not a token just made
                    raise StartFailed(
                        f"queue {self.place.queue} refused ncmgr start's check: {e.message}",
                        kill=True,
                    ) from None
                time.sleep(POLL)
                continue
            mode = status.get("mode")
            if mode == wire.MODE_NORMAL:
                return
            if mode == wire.MODE_RECOVERING:
                self._show_recovery(status.get("recovery") or {})
            time.sleep(POLL)

    # -- helpers --------------------------------------------------------------------------

    def _check(self, busy_counts: bool) -> None:
        """Fail if the server exited or the deadline passed; before it answers, CPU use
        counts as progress and moves the deadline (up to the cap)."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            reason = last_reason(self.log, self.offset)
            raise StartFailed(f"queue {self.place.queue} did not start: {reason} (log: {self.log})")
        now_ticks = procfs.cpu_ticks(self.pid) if busy_counts else None
        if now_ticks is not None and now_ticks != self.ticks:  # still loading: wait on
            self.ticks = now_ticks
            self.deadline = max(self.deadline, min(self.cap, time.monotonic() + self.stall))
        if time.monotonic() > self.deadline:
            raise StartFailed(
                f"queue {self.place.queue} (pid {self.pid}) did not open within "
                f"{time.time() - self.began:.0f} s (see {self.log})",
                kill=True,
            )

    def _client(self) -> Client:
        """A client with our own server's swd token ($CRQ_TOKEN may well be another
        queue's), made again when that token appears or changes."""
        place = self.place
        token = registry.read_token(place.swd.admin_token) or place.token()
        if self.client is None or (token and self.client.token != token):
            if self.client is not None:
                self.client.close()
            self.client = place.client(url=self.url, timeout=5.0, token=token or "", follow=False)
        self.token = token
        return self.client

    def _read_public(self) -> None:
        place = self.place
        place.info = read_server_json(place.swd)
        if self.host not in ("0.0.0.0", "::"):
            return
        mine = [i for i in [place.info, *place.servers()] if i.get("pid") == self.pid]
        if mine and mine[0].get("url"):
            self.public = str(mine[0]["url"]).rstrip("/")

    def _show_recovery(self, recovery: dict[str, object]) -> None:
        self.recovered = True
        left = recovery.get("seconds_left")
        if isinstance(left, int | float):
            self.deadline = max(self.deadline, time.monotonic() + float(left) + self.stall)
        shown = recovery_progress(recovery, approx=False)
        head = shown.split(",")[0]
        now = time.monotonic()
        if head != self.last_shown.split(",")[0] or now - self.last_shown_at >= SHOW_EVERY:
            say(f"recovering: {shown or 'replaying the journal'}")
            self.last_shown, self.last_shown_at = shown, now

    def _kill(self) -> None:
        """kill -9 the server's session (the server and any checkpoint child)."""
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            self.proc.kill()
        self.proc.wait()


def child_env() -> dict[str, str]:
    """The server's environment: ours, with this checkout importable even when not installed."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in parts:
        env["PYTHONPATH"] = os.pathsep.join([root, *parts])
    env.pop("CRQ_SERVER", None)
    return env


def last_reason(log: Path, offset: int) -> str:
    """The server's ``crq-server: <reason>`` line written after ``offset``, else its last line."""
    try:
        with open(log, "rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return "no output"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("crq-server:"):
            return line.removeprefix("crq-server:").strip()
    return lines[-1] if lines else "no output"


def _recovery_report(swd: wire.Swd, since: float) -> Path | None:
    reports = [
        p
        for p in swd.root.glob("crash_recovery_report_*")
        if p.suffix != ".json" and p.stat().st_mtime >= since - 1
    ]
    return max(reports, key=lambda p: p.stat().st_mtime) if reports else None
