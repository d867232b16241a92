"""Who a caller is and what its role lets it do (SPEC section 9).

The answer to "who" comes from server/http/auth.py (a MUNGE credential, a personal token, the
admin token); this module holds what follows from it: the roles and their order, the role of a
user by config.toml's ``[roles]`` (users and ``@groups``), the rules a refusal names, and the
personal tokens' text and hash. Names and groups are the server host's (pwd, grp), as Slurm's
controller resolves a MUNGE uid.
"""

from __future__ import annotations

import functools
import grp
import hashlib
import os
import pwd
import re
import secrets
import time
from dataclasses import dataclass, field

from crq.server.refused import BadRequest

ADMIN, OPERATOR, USER, READONLY = "admin", "operator", "user", "readonly"
ROLES = (READONLY, USER, OPERATOR, ADMIN)  # each may what the ones before it may
RANK = {r: i for i, r in enumerate(ROLES)}
TOKEN_PREFIX = "crq_"
MAX_NOTE = 200

#: a user name as useradd takes it (and a trailing $ for machine accounts): what a tasker
#: host resolves a job's owner by, what a need's key and the logs show
USER_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}\$?$")


def valid_user(name: str) -> bool:
    return USER_NAME.match(name) is not None


# the rules a 403 names
OWN_JOBS = "own-jobs"
READ_ONLY = "readonly"
NEEDS_OPERATOR = "operator-only"
NEEDS_ADMIN = "admin-only"
ROOT_JOBS = "root-jobs"
OWN_TOKENS = "own-tokens"


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated caller: ``via`` is munge, token, admin_token or tasker_token."""

    user: str
    role: str
    via: str
    uid: int | None = None
    groups: tuple[str, ...] = field(default=())
    token_id: str | None = None

    def at_least(self, role: str) -> bool:
        return RANK.get(self.role, -1) >= RANK[role]

    def may(self) -> dict[str, bool]:
        return {
            "read": self.at_least(READONLY),
            "submit": self.at_least(USER),
            "control_all": self.at_least(OPERATOR),
            "admin": self.at_least(ADMIN),
        }

    def as_json(self) -> dict[str, object]:
        return {
            "user": self.user,
            "role": self.role,
            "via": self.via,
            "groups": list(self.groups),
            "may": self.may(),
        }


@functools.cache
def owner_name() -> str:
    """The queue's owner: the unix user this server runs as."""
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


GROUPS_TTL = 60.0  # a user added to a group is seen within a minute, as nscd would
_groups: dict[tuple[str, int | None], tuple[float, tuple[str, ...]]] = {}


def groups_of(user: str, gid: int | None = None) -> tuple[str, ...]:
    """The user's group names on this host (primary first); none for an unknown user.
    Kept a minute: every request of a personal token asks, and NSS reads files (or asks a
    directory service) each time."""
    now = time.monotonic()
    hit = _groups.get((user, gid))
    if hit is not None and now - hit[0] < GROUPS_TTL:
        return hit[1]
    if len(_groups) > 10_000:
        _groups.clear()
    found = _lookup_groups(user, gid)
    _groups[(user, gid)] = (now, found)
    return found


def _lookup_groups(user: str, gid: int | None) -> tuple[str, ...]:
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        return ()
    names: list[str] = []
    for g in os.getgrouplist(user, pw.pw_gid if gid is None else gid):
        try:
            name = grp.getgrgid(g).gr_name
        except KeyError:
            continue
        if name not in names:
            names.append(name)
    return tuple(names)


def role_of(roles: dict[str, str], user: str, groups: tuple[str, ...]) -> str:
    """The user's role by config.toml: its own entry, else its highest group's, else user.
    The queue owner is admin whatever the config says."""
    if user == owner_name():
        return ADMIN
    if user in roles:
        return roles[user]
    found = [roles["@" + g] for g in groups if "@" + g in roles]
    return max(found, key=RANK.__getitem__) if found else USER


def check_roles(roles: object) -> dict[str, str]:
    """config.toml's ``[roles]``, checked: names (or @groups) to one of ROLES."""
    if not isinstance(roles, dict):
        raise ValueError("[roles] maps user names and @groups to roles")
    out: dict[str, str] = {}
    for name, role in roles.items():
        if not isinstance(name, str) or not name.strip("@") or role not in ROLES:
            raise ValueError(
                f"[roles] {name!r} = {role!r}: a role is one of {', '.join(reversed(ROLES))}"
            )
        out[name] = role
    return out


# -- personal tokens -------------------------------------------------------------------------


def new_token() -> tuple[str, str]:
    """A token's id and its whole text ``crq_<id>_<secret>``: shown once, kept hashed."""
    token_id = secrets.token_hex(4)
    return token_id, f"{TOKEN_PREFIX}{token_id}_{secrets.token_urlsafe(32)}"


def token_hash(text: bytes) -> str:
    return hashlib.sha256(text).hexdigest()


# -- the rules -------------------------------------------------------------------------------


def forbid(who: Identity, what: str, rule: str, why: str) -> BadRequest:
    err = BadRequest(403, "forbidden", f"{who.user} (role {who.role}) may not {what}: {why}")
    err.extra = {"rule": rule}
    return err


def require(who: Identity, role: str, what: str) -> None:
    """Refuse ``what`` to a caller below ``role``, naming the rule."""
    if who.at_least(role):
        return
    if role == USER:
        raise forbid(who, what, READ_ONLY, "a readonly role only looks")
    if role == OPERATOR:
        raise forbid(who, what, NEEDS_OPERATOR, "this is for operators and admins")
    raise forbid(who, what, NEEDS_ADMIN, "this is for admins")


def control(who: Identity, action: str, job_id: int, owner: str) -> None:
    """A user controls its own jobs; an operator or admin every job."""
    require(who, USER, f"{action} job {job_id}")
    if who.user != owner and not who.at_least(OPERATOR):
        raise forbid(
            who,
            f"{action} job {job_id} of {owner}",
            OWN_JOBS,
            "users control only their own jobs (operator or admin may)",
        )
