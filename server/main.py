"""The server process: stand by or lead, rebuild the state, serve, and stop cleanly.

A server is a candidate (server/standby.py): it binds its port, then leads at once, or as
a standby once elected (server/election.py). Leading = reading the swd, writing the fence
that cuts off the leader before (server/fence.py), then serving; the recovery mode follows
an unclean end of the previous leader, whoever it was.

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
from typing import Any, NoReturn

import uvicorn
import uvloop
from crq.server import (
    checkpoint,
    commands,
    election,
    fence,
    httplimits,
    marks,
    recovery,
    replay,
    standby,
    tasks,
)
from crq.server.app import create_app
from crq.server.election import Busy
from crq.server.engine import Engine
from crq.server.journal import Journal
from crq.server.marks import Marker
from crq.server.service import Service, StartError, StopError
from crq.server.settings import Settings, SettingsError, load
from crq.server.standby import Candidate, Switch

from crq import procfs
from crq.durable import fsync_dir, write_atomic
from crq.wire import MODE_RECOVERING, MODE_STOPPED, Swd

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


STAND_BY = -1  # run() ends so: this process goes on as a standby (deposed, or handed over)


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
    cand = Candidate(settings, chosen, url, uuid.uuid4().hex[:12], argv)
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
    switch = Switch(standby.app(cand, lambda: _read_token(settings.paths.admin_token)))
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
    cand.write(MODE_RECOVERING)
    try:
        srv, loaded, unclean = lead(cand)
    finally:
        cand.loading = False
    switch.app = create_app(srv)
    return await serve(srv, cand, server, serving, loaded, unclean)


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
        await asyncio.sleep(0.01)


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


def lead(cand: Candidate) -> tuple[Service, replay.Replayed, bool]:
    """Elected: read the queue from the swd, fence the previous leader off, take over."""
    settings, paths, epoch = cand.settings, cand.settings.paths, cand.epoch
    admin = ensure_token(paths.admin_token)
    tasker = ensure_token(paths.tasker_token)
    clean = paths.clean_marker.exists()
    started = time.time()
    try:
        loaded = replay.load(paths.trace, None, settings.accept_loss)
    except replay.ReplayError as e:
        raise StartError(str(e)) from None
    except OSError as e:
        raise StartError(f"cannot read {paths.trace}: {e}") from None
    if epoch <= loaded.highest_epoch:
        raise StartError(
            f"the {cand.election.name} election gave epoch {epoch}, but {paths.trace} has "
            f"seen epoch {loaded.highest_epoch} (was the etcd cluster reset?)"
        )
    st = loaded.state
    had_data = loaded.snapshot is not None or loaded.events_replayed > 0
    unclean = (not clean and had_data) or bool(loaded.losses) or loaded.bytes_discarded > 0
    log.info(
        "epoch %d: loaded %d jobs (snapshot %s, %d events, %d fenced off) in %.2f s; last stop %s",
        epoch,
        len(st.jobs),
        loaded.snapshot,
        loaded.events_replayed,
        loaded.fenced,
        time.time() - started,
        "clean" if clean else "unclean" if unclean else "none",
    )
    me = {**cand.me(), "election": cand.election.name}
    prev = {"epoch": st.epoch, **st.leader} if st.epoch or st.leader else {}
    try:  # the fence first: from here on, what the previous leader writes does not count
        fence.write(paths.trace, loaded.fences.with_fence(fence.new_fence(epoch, st.seq, me)))
    except OSError as e:
        raise StartError(f"cannot write {paths.trace / fence.EPOCHS}: {e.strerror or e}") from None
    if clean:
        os.unlink(paths.clean_marker)
        fsync_dir(paths.trace)
    guard = cand.election.valid if cand.election.name != "file" else None
    journal = Journal(
        paths.trace,
        next_seq=st.seq + 1,
        fsync=settings.fsync == "always",
        epoch=epoch,
        guard=guard,
    )
    engine = Engine(st, journal)
    engine.guard = guard
    engine.marker = start_marks(paths, settings.queue, loaded, journal)  # before any event
    engine.emit([commands.take_over(epoch, st.seq, me, prev, time.time())])
    engine.fresh_within = 3 * settings.heartbeat + 1  # a long poll lasts at most 3 heartbeats
    srv = Service(settings, engine, admin.encode(), tasker.encode(), cand.instance, cand.url)
    srv.epoch, srv.previous = epoch, prev
    with contextlib.suppress(marks.MarkError):
        srv.queue_id = str((marks.read_identity(paths.trace) or {}).get("uuid") or "")
    srv.standbys = lambda: _standbys(paths, cand.instance)
    return srv, loaded, unclean


def _standbys(paths: Swd, me: str) -> list[str]:
    """The other candidates that wrote their file lately (each does every 2 s)."""
    out = []
    now = time.time()
    for f in sorted(paths.servers.glob("*.json")):
        info = election.read_json(f)
        try:
            fresh = now - f.stat().st_mtime < standby.STALE
        except OSError:
            continue
        if not fresh or not info or info.get("instance") == me or not info.get("url"):
            continue
        pid = info.get("pid")
        if info.get("host") == os.uname().nodename and not (
            isinstance(pid, int) and procfs.process_exists(pid)
        ):
            f.unlink(missing_ok=True)  # a candidate of this host that died (kill -9)
            continue
        out.append(str(info["url"]))
    return out


def start_marks(paths: Swd, queue: str, loaded: replay.Replayed, journal: Journal) -> Marker:
    """Record the queue's identity if it has none yet, and where its journal stands now.

    The new mark is written before serving: after an accepted loss the old one is ahead of
    the journal and would refuse the next start.
    """
    st = loaded.state
    ceiling = max(st.id_ceiling, loaded.mark.ceiling if loaded.mark else 1)
    pos = journal.durable_pos
    mark = marks.Mark(st.seq, pos[0], pos[1], st.next_id, ceiling, time.time(), journal.epoch)
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


async def serve(
    srv: Service,
    cand: Candidate,
    server: uvicorn.Server,
    serving: asyncio.Task[None],
    loaded: replay.Replayed,
    unclean: bool,
) -> int:
    engine, settings = srv.engine, srv.settings
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, srv.request_stop, False)
    srv.step_down = lambda why: stand_by_now(cand, why)
    engine.journal.on_deposed = lambda: stand_by_now(cand, "the journal refused to write")
    if settings.resources != engine.state.global_total:
        engine.emit([{"e": "resources", "t": time.time(), "totals": settings.resources}])
    if unclean:
        skip_ids(engine)
        await recovery.begin(srv, loaded)  # serving starts at once, the recovery ends later
    else:
        engine.open()
    srv.write_server_json(engine.mode)
    cand.write(engine.mode)
    running = [asyncio.create_task(t) for t in tasks.background(srv)]
    running.append(asyncio.create_task(_exit_when_stopped(srv, server)))
    running.append(asyncio.create_task(_stop_when_asked_before(srv, cand)))
    running.append(asyncio.create_task(_watch_lease(cand)))
    life = election.SignOfLife(settings.paths) if cand.election.name != "file" else None
    if life is not None and not life.take(cand.instance):
        log.info("server.lock is busy: standbys will wait for the lease's TTL if we die")
    running.append(asyncio.create_task(_keep_pointing(srv, cand, life)))
    log.info(
        "serving queue %s at %s (pid %d, epoch %d, %s election)",
        settings.queue, srv.url, os.getpid(), srv.epoch, cand.election.name,
    )  # fmt: skip
    if not server.started:
        await _started(server, serving)
    await serving
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
    await cand.election.resign()  # a standby takes over from the snapshot at once
    log.info("stopped cleanly")
    return STAND_BY if srv.handover is not None else 0


async def _exit_when_stopped(srv: Service, server: uvicorn.Server) -> None:
    """Half a second after a stop request, uvicorn stops: the long polls answered meanwhile."""
    await srv.stop_requested.wait()
    await asyncio.sleep(0.5)
    server.should_exit = True


async def _stop_when_asked_before(srv: Service, cand: Candidate) -> None:
    """A stop asked of the candidate (a signal, or ``POST /server/stop`` to the standby app)
    just as it won or while it loaded is not lost. A standby's stop becomes a ``--freeze``
    stop: it was meant for one candidate, not to end the queue's running jobs."""
    await cand.stop_requested.wait()
    srv.request_stop(srv.settings.standby)


async def _watch_lease(cand: Candidate) -> None:
    await cand.election.lost.wait()
    stand_by_now(cand, "the election lease is lost")


async def _keep_pointing(srv: Service, cand: Candidate, life: election.SignOfLife | None) -> None:
    """server.json points at the leader: put it back if anything else wrote it. An etcd
    leader also keeps trying for server.lock, its sign of life (election.SignOfLife)."""
    while True:
        await asyncio.sleep(2.0)
        if life is not None:
            life.take(cand.instance)
        info = election.read_json(srv.settings.paths.server_json)
        if not srv.engine.shutting_down and (info or {}).get("instance") != srv.instance:
            log.warning("server.json named another server: written again")
            srv.write_server_json(srv.engine.mode)
        cand.write(srv.engine.mode)


def stand_by_now(cand: Candidate, why: str) -> NoReturn:
    """A deposed leader stops acting at once: no answer, no write, no dispatch more. The
    same process starts again as a standby (the journal's pending writes die with it)."""
    log.critical("no longer the leader of queue %s (%s): standing by", cand.settings.queue, why)
    cand.remove()
    logging.shutdown()
    os.execv(sys.executable, [sys.executable, "-m", "crq.server", *standby_argv(cand.argv)])


def standby_argv(argv: list[str]) -> list[str]:
    return [a for a in argv if a != "--standby"] + ["--standby"]
