"""The server process: lock the swd, rebuild the state, serve, and stop cleanly.

Start-up failures print one line ``crq-server: …`` and exit 3, so ``ncmgr start`` can show
the reason. A clean stop waits for the journal, writes a snapshot, prunes what it covers,
and leaves ``trace.db/clean``: the next start knows nothing was lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import logging.handlers
import os
import secrets
import signal
import socket
import stat
import sys
import time
import uuid
from pathlib import Path

import uvicorn
import uvloop
from crq.server import checkpoint, httplimits, marks, recovery, replay, tasks
from crq.server.app import create_app
from crq.server.engine import Engine
from crq.server.journal import Journal
from crq.server.marks import Marker
from crq.server.service import Service, StartError, StopError
from crq.server.settings import Settings, SettingsError, load

from crq.durable import LockBusy, fsync_dir, lock_pidfile, write_atomic
from crq.wire import MODE_STOPPED, Swd

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


def lock_swd(paths: Swd) -> int:
    """server.lock, held for the process's life: one server per swd."""
    try:
        return lock_pidfile(paths.server_lock)
    except LockBusy as e:
        raise StartError(f"{paths.root} is in use by another server (pid {e.holder})") from None


def ensure_token(path: Path) -> str:
    if not path.exists():
        write_atomic(path, (secrets.token_urlsafe(32) + "\n").encode(), 0o600)
    token = path.read_text().strip()
    if not token:
        raise StartError(f"{path} is empty")
    return token


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
    try:
        settings = load(argv)
    except SettingsError as e:
        print(f"crq-server: {e}", file=sys.stderr)
        return 2
    try:
        return run(settings)
    except StartError as e:
        print(f"crq-server: {e}", file=sys.stderr)
        log.error("cannot start: %s", e)
        return 3
    except StopError as e:
        print(f"crq-server: {e}", file=sys.stderr)
        return 1


def run(settings: Settings) -> int:
    paths = settings.paths
    paths.root.mkdir(parents=True, exist_ok=True)
    os.umask(0o077)  # everything the server writes below is its owner's alone
    make_private(paths)
    lock_fd = lock_swd(paths)
    setup_logging(paths)
    admin = ensure_token(paths.admin_token)
    tasker = ensure_token(paths.tasker_token)
    sock = bind(settings.host, settings.port)
    if settings.port == 0:
        settings.port = sock.getsockname()[1]

    clean = paths.clean_marker.exists()
    started = time.time()
    try:
        loaded = replay.load(paths.trace, None, settings.accept_loss)
    except replay.ReplayError as e:
        raise StartError(str(e)) from None
    except OSError as e:
        raise StartError(f"cannot read {paths.trace}: {e}") from None
    had_data = loaded.snapshot is not None or loaded.events_replayed > 0
    unclean = (not clean and had_data) or bool(loaded.losses) or loaded.bytes_discarded > 0
    log.info(
        "loaded %d jobs (snapshot %s, %d events) in %.2f s; last stop %s",
        len(loaded.state.jobs),
        loaded.snapshot,
        loaded.events_replayed,
        time.time() - started,
        "clean" if clean else "unclean" if unclean else "none",
    )
    if clean:
        os.unlink(paths.clean_marker)
        fsync_dir(paths.trace)

    host = settings.host if settings.host not in ("0.0.0.0", "::") else socket.getfqdn()
    url = (
        f"http://{host}:{settings.port}" if ":" not in host else f"http://[{host}]:{settings.port}"
    )
    journal = Journal(paths.trace, next_seq=loaded.state.seq + 1, fsync=settings.fsync == "always")
    engine = Engine(loaded.state, journal)
    engine.marker = start_marks(paths, settings.queue, loaded, journal)
    engine.fresh_within = 3 * settings.heartbeat + 1  # a long poll lasts at most 3 heartbeats
    srv = Service(settings, engine, admin.encode(), tasker.encode(), uuid.uuid4().hex[:12], url)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(srv, sock, loaded, unclean))
    os.close(lock_fd)
    return 0


def start_marks(paths: Swd, queue: str, loaded: replay.Replayed, journal: Journal) -> Marker:
    """Record the queue's identity if it has none yet, and where its journal stands now.

    The new mark is written before serving: after an accepted loss the old one is ahead of
    the journal and would refuse the next start.
    """
    st = loaded.state
    ceiling = max(st.id_ceiling, loaded.mark.ceiling if loaded.mark else 1)
    mark = marks.Mark(st.seq, journal.segment, 0, st.next_id, ceiling, time.time())
    try:
        if loaded.identity is None:
            ident = marks.write_identity(paths.trace, queue)
            log.info("recorded the identity of queue %s: %s", queue, ident["uuid"])
        marks.write_mark(paths.trace, mark)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise StartError(f"cannot write {paths.trace}: {e.strerror or e}") from None
        # a full disk holds replies, it does not stop the start: written once space returns
        log.error("disk full: %s not written yet", marks.MARK)
        on_disk = loaded.mark.ceiling if loaded.mark else 1
        mark = dataclasses.replace(mark, seq=-1, ceiling=on_disk)
    return Marker(paths.trace, journal, st, mark)


def skip_ids(engine: Engine) -> None:
    """After an unclean stop, ids go on past every id that may have been handed out.

    The journal's tail may be lost without a trace (a truncation within the last second
    the high-water mark does not know of yet): ids up to the reserved ceiling may have
    been acknowledged in it. As a database sequence does after a crash, skip them; as an
    event, so that replay ends in the same state.
    """
    st, marker = engine.state, engine.marker
    floor = max(st.id_ceiling, marker.written.ceiling if marker else 1)
    if st.next_id < floor:
        log.warning("ids go on at %d after the unclean stop (skipping from %d)", floor, st.next_id)
        engine.emit([{"e": "ids", "t": time.time(), "ceiling": floor, "next_id": floor}])


async def serve(srv: Service, sock: socket.socket, loaded: replay.Replayed, unclean: bool) -> None:
    engine, settings = srv.engine, srv.settings
    fds = httplimits.raise_fd_limit(settings.max_connections + 2 * httplimits.FDS_RESERVED)
    cap = httplimits.connection_cap(settings.max_connections, fds)
    if cap < settings.max_connections:
        log.warning("open-file limit %d: serving at most %d connections at once", fds, cap)
    config = uvicorn.Config(
        create_app(srv),
        loop="none",
        http=httplimits.http_protocol(settings.idle_timeout, cap),
        lifespan="off",
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=3,
        timeout_keep_alive=max(1, round(settings.idle_timeout)),
        limit_concurrency=cap + 1,  # past the cap (no idle connection to close): 503
    )
    server = uvicorn.Server(config)
    # uvicorn's own SIGTERM/SIGINT handlers would only close the sockets (taskers never told,
    # running jobs never released) and re-raise the signal once it has served: ours (below)
    # run the clean stop, the same as `ncmgr stop`.
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    _signals(srv)
    if settings.resources != engine.state.global_total:
        engine.emit([{"e": "resources", "t": time.time(), "totals": settings.resources}])
    if unclean:
        skip_ids(engine)
        await recovery.begin(srv, loaded)  # serving starts at once, the recovery ends later
    else:
        engine.open()
    srv.write_server_json(engine.mode)
    running = [asyncio.create_task(t) for t in tasks.background(srv)]
    running.append(asyncio.create_task(_exit_when_stopped(srv, server)))
    log.info("serving queue %s at %s (pid %d)", settings.queue, srv.url, os.getpid())
    await server.serve(sockets=[sock])
    for t in running:
        t.cancel()
    await engine.durable()
    try:
        await checkpoint.final(engine, settings)
    except OSError as e:
        msg = (
            f"clean stop incomplete: cannot write the snapshot ({e.strerror or e}); "
            "the journal is intact and the next start recovers from it"
        )
        log.error("%s", msg)
        with contextlib.suppress(OSError):
            srv.write_server_json(MODE_STOPPED)
        raise StopError(msg) from None
    srv.write_server_json(MODE_STOPPED)
    log.info("stopped cleanly")


async def _exit_when_stopped(srv: Service, server: uvicorn.Server) -> None:
    """Half a second after a stop request, uvicorn stops: the long polls answered meanwhile."""
    await srv.stop_requested.wait()
    await asyncio.sleep(0.5)
    server.should_exit = True


def _signals(srv: Service) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, srv.request_stop, False)
