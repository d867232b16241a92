"""Leading: load the queue from the swd, fence the previous leader off, serve, stop cleanly.

Imported by server/main.py only once it has won the election and answers from its boot
app: everything here (the state, the journal, pydantic through the commands) is paid for
while ``/healthz`` and the loading 503 already answer. ``take_over`` loads the state in a
thread, puts the hot routes in (server/http/hot.py), and builds the full FastAPI app in a
thread too, while the hot routes serve; ``/readyz`` says ready once it is in.
"""

from __future__ import annotations

import asyncio
import compileall
import contextlib
import dataclasses
import errno
import importlib
import importlib.util
import logging
import os
import secrets
import signal
import time
from collections.abc import Callable
from pathlib import Path

import uvicorn
from crq.server import checkpoint, commands, election, fence, marks, recovery, replay, tasks
from crq.server.asgi import ASGIApp
from crq.server.engine import Engine
from crq.server.events import Event
from crq.server.history import History, HistoryError, db_path
from crq.server.http.hot import Hot
from crq.server.journal import Journal
from crq.server.marks import Marker
from crq.server.service import Service, StartError, StopError
from crq.server.standby import STALE, STAND_BY, Candidate, Switch, stand_by_now

from crq import procfs
from crq.durable import fsync_dir, write_atomic
from crq.wire import MODE_STOPPED, Swd

log = logging.getLogger("crq.server")

FULL_APP = "crq.server.app"  # imported once the hot routes serve (FastAPI: about 0.2 s)


async def take_over(
    cand: Candidate, switch: Switch, server: uvicorn.Server, serving: asyncio.Task[None]
) -> int:
    """Elected, answering from the boot app: lead, serve until the stop, stop cleanly."""
    srv, loaded, unclean, first = await asyncio.to_thread(lead, cand)
    srv.engine.emit([first])
    hot = Hot(srv)
    switch.swap(hot)
    cand.loading = False
    return await serve(srv, cand, server, serving, loaded, unclean, hot)


def full_app(srv: Service) -> ASGIApp:
    """The FastAPI app (server/app.py), imported and built on first need: in a thread."""
    create: Callable[[Service], ASGIApp] = importlib.import_module(FULL_APP).create_app
    return create(srv)


OWN_CODE = ("crq", "crq.server", "crq.tasker", "crq.client")


def compile_bytecode() -> None:
    """Leave bytecode beside our sources: an editable install has none, and where
    PYTHONDONTWRITEBYTECODE is set nothing else writes it, so every start (the server's, the
    CLI's, the tasker's) would compile them again. Once they are compiled this only reads
    timestamps; a place we may not write is left as it is."""
    for name in OWN_CODE:
        spec = importlib.util.find_spec(name)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            with contextlib.suppress(OSError):
                compileall.compile_dir(folder, quiet=2, workers=1)


def count_reports(swd: Path) -> int:
    """The crash recoveries this swd has seen, by their reports: a count that survives the
    server's own crash (server/observe.py)."""
    try:
        return sum(1 for _ in swd.glob("crash_recovery_report_*.json"))
    except OSError:
        return 0


def ensure_token(path: Path) -> str:
    if not path.exists():
        write_atomic(path, (secrets.token_urlsafe(32) + "\n").encode(), 0o600)
    token = path.read_text().strip()
    if not token:
        raise StartError(f"{path} is empty")
    return token


def lead(cand: Candidate) -> tuple[Service, replay.Replayed, bool, Event]:
    """Elected: read the queue from the swd, fence the previous leader off, take over.

    Runs in a thread while the loop answers: it emits nothing (that is the loop's); the
    first event, the takeover, comes back to be emitted there."""
    settings, paths, epoch = cand.settings, cand.settings.paths, cand.epoch
    admin = ensure_token(paths.admin_token)
    tasker = ensure_token(paths.tasker_token)
    clean = paths.clean_marker.exists()
    started = time.time()
    try:
        history = History(
            db_path(settings.swd), settings.fsync == "always", settings.history_interval
        )
    except (HistoryError, OSError) as e:
        raise StartError(f"accounting history: {e}; move it aside to start a new one") from None
    history.delay = settings.history_delay
    try:
        loaded = replay.load(paths.trace, None, settings.accept_loss, history.attach)
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
    fences = loaded.fences.with_fence(fence.new_fence(epoch, st.seq, me))
    try:  # the fence first: from here on, what the previous leader writes does not count
        fence.write(paths.trace, fences)
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
    engine.observed.recoveries = count_reports(paths.root)
    engine.observed.failovers = fences.moves()
    history.start(lambda: journal.durable_seq, guard)
    engine.marker = start_marks(paths, settings.queue, loaded, journal)  # before any event
    engine.fresh_within = 3 * settings.heartbeat + 1  # a long poll lasts at most 3 heartbeats
    srv = Service(settings, engine, admin.encode(), tasker.encode(), cand.instance, cand.url)
    srv.epoch, srv.previous = epoch, prev
    srv.history = history
    with contextlib.suppress(marks.MarkError):
        srv.queue_id = str((marks.read_identity(paths.trace) or {}).get("uuid") or "")
    srv.standbys = lambda: _standbys(paths, cand.instance)
    return srv, loaded, unclean, commands.take_over(epoch, st.seq, me, prev, time.time())


def _standbys(paths: Swd, me: str) -> list[str]:
    """The other candidates that wrote their file lately (each does every 2 s)."""
    out = []
    now = time.time()
    for f in sorted(paths.servers.glob("*.json")):
        info = election.read_json(f)
        try:
            fresh = now - f.stat().st_mtime < STALE
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
    hot: Hot,
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
    hot.install(await asyncio.to_thread(full_app, srv))
    log.info("ready: every route served")
    running.append(asyncio.create_task(asyncio.to_thread(compile_bytecode)))
    await serving
    for t in running:
        t.cancel()
    await engine.durable()
    try:
        await checkpoint.final(engine, settings, srv.history)
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
