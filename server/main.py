"""The server process: stand by or lead, rebuild the state, serve, and stop cleanly.

A server is a candidate (server/standby.py): it binds its port, then leads at once, or as
a standby once elected (server/election.py). Leading = reading the swd, writing the fence
that cuts off the leader before (server/fence.py), then serving; the recovery mode follows
an unclean end of the previous leader, whoever it was.

This module imports only what the first answer needs (uvicorn, the settings, the election,
the boot app of server/standby.py): once elected it answers ``/healthz`` and the loading
503 at once, and only then imports the leading side (server/leading.py, by name, in a
thread), which loads the state and brings in the hot routes, then FastAPI.

Start-up failures print one line ``crq-server: …`` and exit 3, so ``ncmgr start`` can show
the reason. A clean stop waits for the journal, writes a snapshot, prunes what it covers,
and leaves ``trace.db/clean``: the next start knows nothing was lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import logging.handlers
import os
import signal
import socket
import stat
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import uvicorn
import uvloop
from crq.server import election, httplimits, standby
from crq.server.election import Busy
from crq.server.exits import StartError, StopError
from crq.server.settings import Settings, SettingsError, load
from crq.server.standby import STAND_BY, Candidate, Switch, standby_argv

from crq.wire import MODE_RECOVERING, Swd

LEADING = "crq.server.leading"  # imported once elected and answering (server/leading.py)

log = logging.getLogger("crq.server")


def make_private(paths: Swd) -> None:
    """trace.db, logs and security hold job environments (secrets) and tokens: owner only.

    New files are private by the umask; what an older version left readable is tightened.
    """
    for d in (paths.trace, paths.logs, paths.security):
        d.mkdir(mode=0o700, exist_ok=True)
        _tighten(d, 0o700)
        for f in d.iterdir():
            if f.is_file() and not f.is_symlink():
                _tighten(f, 0o600)
    for f in paths.root.glob("crash_recovery_report_*"):
        _tighten(f, 0o600)


def _tighten(path: Path, mode: int) -> None:
    """Drop the permission bits ``mode`` lacks (never add any)."""
    try:
        now = stat.S_IMODE(path.lstat().st_mode)
        if now & ~mode:
            os.chmod(path, now & mode)
    except OSError as e:  # not ours (a tasker log of another user): say so, go on
        log.warning("cannot make %s private: %s", path, e.strerror or e)


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise StartError(
            f"cannot listen on {host}:{port}: {e.strerror} (port busy? use --port)"
        ) from None
    sock.listen(2048)
    sock.set_inheritable(False)
    return sock


def setup_logging(paths: Swd) -> None:
    handler = logging.handlers.WatchedFileHandler(paths.logs / "server.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        settings = load(argv)
    except SettingsError as e:
        print(f"crq-server: {e}", file=sys.stderr)
        return 2
    try:
        code = run(settings, argv)
    except StartError as e:
        print(f"crq-server: {e}", file=sys.stderr)
        log.error("cannot start: %s", e)
        return 3
    except StopError as e:
        print(f"crq-server: {e}", file=sys.stderr)
        return 1
    if code == STAND_BY:
        log.warning("handed over: starting again as a standby (pid %d stays)", os.getpid())
        logging.shutdown()
        os.execv(sys.executable, [sys.executable, "-m", "crq.server", *standby_argv(argv)])
    return code


def run(settings: Settings, argv: list[str]) -> int:
    paths = settings.paths
    paths.root.mkdir(parents=True, exist_ok=True)
    os.umask(0o077)  # everything the server writes below is its owner's alone
    make_private(paths)
    setup_logging(paths)
    try:
        chosen = election.make(settings.election, paths, settings.queue, settings.election_ttl)
    except election.ElectionError as e:
        raise StartError(str(e)) from None
    sock = bind(settings.host, settings.port)
    if settings.port == 0:
        settings.port = sock.getsockname()[1]
    host = settings.host if settings.host not in ("0.0.0.0", "::") else socket.getfqdn()
    url = (
        f"http://{host}:{settings.port}" if ":" not in host else f"http://[{host}]:{settings.port}"
    )
    cand = Candidate(settings, chosen, url, os.urandom(6).hex(), argv)
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(lifecycle(cand, sock))
    finally:
        cand.remove()
        chosen.close()


async def lifecycle(cand: Candidate, sock: socket.socket) -> int:
    """Stand by (unless told to lead at once), lead once elected, stop."""
    settings = cand.settings
    if not settings.standby:
        try:
            await cand.campaign()
        except Busy as e:
            raise StartError(_led_by(settings, e.holder)) from None
    switch = Switch()
    switch.app = standby.app(cand, lambda: _read_token(settings.paths.admin_token), switch)
    server = _uvicorn(settings, switch)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, cand.request_stop)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    if settings.standby:
        cand.write()
        beat = asyncio.create_task(_keep_writing(cand))
        log.info("standby of queue %s at %s (pid %d)", settings.queue, cand.url, os.getpid())
        await _started(server, serving)
        epoch = await cand.campaign()
        beat.cancel()
        if epoch is None:  # stopped while standing by
            server.should_exit = True
            await serving
            log.info("standby stopped")
            return 0
    cand.loading = True
    await _started(server, serving)  # answering first; then the imports, the file, the state
    importing = asyncio.ensure_future(asyncio.to_thread(importlib.import_module, LEADING))
    await asyncio.to_thread(cand.write, MODE_RECOVERING)
    leading = await importing
    take_over: Callable[[Candidate, Switch, uvicorn.Server, asyncio.Task[None]], Awaitable[int]]
    take_over = leading.take_over
    return await take_over(cand, switch, server, serving)


async def _keep_writing(cand: Candidate) -> None:
    while True:
        await asyncio.sleep(2.0)
        cand.write()


async def _started(server: uvicorn.Server, serving: asyncio.Task[None]) -> None:
    """Until uvicorn listens (a failure to start surfaces here, not later)."""
    while not server.started:
        if serving.done():
            serving.result()
            raise StartError("the HTTP server did not start")
        await asyncio.sleep(0.001)


def _led_by(settings: Settings, holder: dict[str, Any] | None) -> str:
    h = holder or {}
    who = h.get("url") or "another server"
    where = f" (pid {h['pid']} on {h.get('host', '?')})" if h.get("pid") else ""
    return f"{settings.paths.root} is led by {who}{where}; start with --standby to wait for it"


def _read_token(path: Path) -> bytes | None:
    try:
        return path.read_text().strip().encode() or None
    except OSError:
        return None


def _uvicorn(settings: Settings, app: Switch) -> uvicorn.Server:
    fds = httplimits.raise_fd_limit(settings.max_connections + 2 * httplimits.FDS_RESERVED)
    cap = httplimits.connection_cap(settings.max_connections, fds)
    if cap < settings.max_connections:
        log.warning("open-file limit %d: serving at most %d connections at once", fds, cap)
    config = uvicorn.Config(
        app,
        loop="none",
        http=httplimits.http_protocol(settings.idle_timeout, cap),
        lifespan="off",
        ws="none",  # no websocket route; "auto" would import websockets before the first answer
        proxy_headers=False,  # nothing reads the client address: no rewrite per request
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=3,
        timeout_keep_alive=max(1, round(settings.idle_timeout)),
        limit_concurrency=cap + 1,  # past the cap (no idle connection to close): 503
    )
    server = uvicorn.Server(config)
    # uvicorn's own SIGTERM/SIGINT handlers would only close the sockets (taskers never told,
    # running jobs never released) and re-raise the signal once it has served: ours run the
    # clean stop, the same as `ncmgr stop`.
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    return server
