"""Server settings: defaults < ``<swd>/config.toml`` < command-line flags."""

from __future__ import annotations

import argparse
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from crq.server.identity import check_roles

from crq.wire import DEFAULT_QUEUE, MAX_ARRAY, Swd, default_port


@dataclass
class Settings:
    queue: str = DEFAULT_QUEUE
    swd: Path = Path()
    host: str = "127.0.0.1"
    port: int = 0
    recovery_grace: float = 120.0
    tasker_timeout: float = 90.0
    heartbeat: float = 10.0
    fsync: str = "always"
    checkpoint_bytes: int = 64 << 20
    autoforget_done: float = 3600.0
    autoforget_other: float = 2 * 86400.0
    max_connections: int = 4096  # fewer if the open-file limit is lower
    idle_timeout: float = 30.0  # an idle or half-sent request is closed after this
    idempotency_window: float = 86400.0  # a submit's Idempotency-Key is kept this long
    accept_loss: bool = False
    standby: bool = False  # wait for leadership instead of refusing to start (SPEC 8)
    election: str = "file"  # or etcd://host:port[,host:port…]
    election_ttl: float = 5.0  # etcd lease: a lost leader is replaced after this
    resources: dict[str, int] = field(default_factory=dict)  # global totals, config.toml only
    # identity and roles (SPEC 9), config.toml only except munge_socket
    roles: dict[str, str] = field(default_factory=dict)  # user or @group -> role
    tasker_users: list[str] = field(default_factory=list)  # MUNGE users that may be taskers
    allow_root_jobs: bool = False
    munge_socket: str = ""  # "" = CRQ_MUNGE_SOCKET, else munged's default
    # the accounting history (server/history.py)
    history_days: float = 90.0  # rows are deleted this long after the job left the queue
    history_max_rows: int = 10_000_000  # and the oldest beyond this many
    max_array: int = MAX_ARRAY  # elements of one array (Slurm's MaxArraySize)
    history_interval: float = 0.2  # seconds between the writer's batches
    history_delay: float = 0.0  # tests only: hold each batch this long before its commit
    # job logs (GET /api/v1/jobs/{id}/log): read here when possible (auto), always through
    # the job's tasker (tasker), or never through it (server); a tasker's answer within
    log_via: str = "auto"
    log_timeout: float = 15.0
    # the dashboard's charts (server/samples.py): a sample this often, kept this long
    sample_interval: float = 10.0
    sample_keep: float = 86400.0

    @property
    def paths(self) -> Swd:
        return Swd(self.swd)


LOG_VIA = ("auto", "tasker", "server")

TUNABLES = {
    "recovery_grace": float,
    "tasker_timeout": float,
    "heartbeat": float,
    "fsync": str,
    "checkpoint_bytes": int,
    "autoforget_done": float,
    "autoforget_other": float,
    "max_connections": int,
    "idle_timeout": float,
    "election": str,
    "election_ttl": float,
    "idempotency_window": float,
    "munge_socket": str,
    "history_days": float,
    "history_max_rows": int,
    "max_array": int,
    "history_interval": float,
    "history_delay": float,
    "log_via": str,
    "log_timeout": float,
    "sample_interval": float,
    "sample_keep": float,
}


class SettingsError(ValueError):
    pass


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m crq.server", description="Run a crq queue server.")
    p.add_argument("--queue", default=DEFAULT_QUEUE)
    p.add_argument("--swd", help="server working directory (default ./<queue>.swd)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    for name, kind in TUNABLES.items():
        flag = "--" + name.replace("_", "-")
        if name == "fsync":
            p.add_argument(flag, choices=["always", "never"])
        elif name == "log_via":
            p.add_argument(flag, choices=LOG_VIA, help="where job logs are read (default auto)")
        elif name == "election":
            p.add_argument(flag, metavar="file|etcd://H:P,…", help="how the leader is chosen")
        else:
            p.add_argument(flag, type=kind)
    p.add_argument(
        "--standby",
        action="store_true",
        help="wait as a standby while another server leads the queue, then take over",
    )
    p.add_argument(
        "--accept-loss",
        action="store_true",
        help="start even if the journal or snapshot is damaged, dropping what is lost",
    )
    return p


def load(argv: list[str] | None = None) -> Settings:
    args = parser().parse_args(argv)
    s = Settings(queue=args.queue)
    s.swd = Path(args.swd or f"{args.queue}.swd").absolute()
    cfg_path = s.paths.config
    if cfg_path.exists():
        try:
            cfg = tomllib.loads(cfg_path.read_text())
        except (tomllib.TOMLDecodeError, OSError) as e:
            raise SettingsError(f"{cfg_path}: {e}") from None
        known = {f.name for f in fields(Settings)} - {
            "queue", "swd", "resources", "standby", "roles", "tasker_users"
        }  # fmt: skip
        for key, value in cfg.items():
            if key == "resources":
                if not isinstance(value, dict) or not all(
                    isinstance(v, int) for v in value.values()
                ):
                    raise SettingsError(f"{cfg_path}: [resources] maps names to whole numbers")
                s.resources = dict(value)
            elif key == "roles":
                try:
                    s.roles = check_roles(value)
                except ValueError as e:
                    raise SettingsError(f"{cfg_path}: {e}") from None
            elif key == "tasker_users":
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise SettingsError(f"{cfg_path}: tasker_users is a list of user names")
                s.tasker_users = list(value)
            elif key in known:
                setattr(s, key, _coerce(cfg_path, key, value))
            else:
                raise SettingsError(f"{cfg_path}: unknown setting {key!r}")
    for name in ("host", "port", *TUNABLES):
        value = getattr(args, name)
        if value is not None:
            setattr(s, name, value)
    s.accept_loss = s.accept_loss or args.accept_loss
    s.standby = args.standby
    if s.election != "file" and not s.election.startswith("etcd://"):
        raise SettingsError(f"election must be file or etcd://host:port[,…], not {s.election!r}")
    if s.election_ttl < 1:
        raise SettingsError("election_ttl must be at least 1 second (etcd's lease unit)")
    if not s.port:
        s.port = default_port(s.queue)
    if s.log_via not in LOG_VIA:
        raise SettingsError(f"log_via must be one of {', '.join(LOG_VIA)}, not {s.log_via!r}")
    if s.fsync not in ("always", "never"):
        raise SettingsError(f"fsync must be always or never, not {s.fsync!r}")
    if s.max_connections < 1 or s.idle_timeout <= 0:
        raise SettingsError("max_connections must be at least 1 and idle_timeout above 0")
    if not 1 <= s.max_array <= MAX_ARRAY:
        raise SettingsError(f"max_array must be from 1 to {MAX_ARRAY}")
    if not (s.history_days > 0 and s.history_max_rows > 0 and s.history_interval > 0):
        raise SettingsError("history_days, history_max_rows and history_interval must be above 0")
    if not (s.sample_interval > 0 and s.sample_keep > 0):
        raise SettingsError("sample_interval and sample_keep must be above 0")
    if not s.idempotency_window > 0:
        raise SettingsError(f"idempotency_window must be above 0, not {s.idempotency_window}")
    return s


def _coerce(path: Path, key: str, value: object) -> object:
    kind = {
        "host": str, "port": int, "accept_loss": bool, "allow_root_jobs": bool, **TUNABLES
    }[key]  # fmt: skip
    if kind is float and isinstance(value, int):
        value = float(value)
    if not isinstance(value, kind):
        raise SettingsError(f"{path}: {key} should be {kind.__name__}")
    return value
