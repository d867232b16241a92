"""MUNGE credentials through libmunge (ctypes): who a caller is, as munged vouches for it.

Slurm's way of knowing a request's uid and gid without passwords: the client asks its local
``munged`` to encode a credential (uid, gid, time, an optional payload), the server asks its own
``munged`` (same key) to decode it. munged refuses a credential it has seen (replay), one past
its time-to-live, and one made with another key. One call into libmunge per credential, no
process per request. No Python binding of libmunge is kept up (pymunge's last release is from
2018), so this is a thin ctypes layer over the four calls we need; libmunge is loaded on first
use, so importing this module costs nothing where MUNGE is absent.
"""

from __future__ import annotations

import ctypes
import os
import threading
from typing import NamedTuple

#: munged's default socket; ``CRQ_MUNGE_SOCKET`` (or ``socket=``) points at another one
DEFAULT_SOCKET = "/run/munge/munge.socket.2"
SOCKET_ENV = "CRQ_MUNGE_SOCKET"

# munge.h: enum munge_opt, enum munge_err
_OPT_TTL = 4
_OPT_SOCKET = 8
SUCCESS = 0
SOCKET_ERROR = 6
CRED_INVALID = 14
CRED_EXPIRED = 15
CRED_REWOUND = 16
CRED_REPLAYED = 17
CRED_UNAUTHORIZED = 18
MAX_CREDENTIAL = 8192  # a credential with no payload is about 130 characters


class MungeError(Exception):
    """A libmunge error: ``code`` is munge.h's ``munge_err_t``, the message its own words."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class Unavailable(MungeError):
    """libmunge is not installed, or munged does not answer on the socket."""


class Credential(NamedTuple):
    """What a valid credential says: who made it, and its payload. (A NamedTuple, not a
    dataclass: dataclasses and ctypes.util cost a ``crq`` command ~8 ms to import.)"""

    uid: int
    gid: int
    payload: bytes


_lib: ctypes.CDLL | None = None
_libc: ctypes.CDLL | None = None
_load_lock = threading.Lock()


def _load() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    global _lib, _libc
    with _load_lock:
        if _lib is None or _libc is None:
            try:
                lib = _cdll("munge", "libmunge.so.2", use_errno=True)
            except OSError as e:
                raise Unavailable(SOCKET_ERROR, f"libmunge is not installed ({e})") from None
            lib.munge_ctx_create.restype = ctypes.c_void_p
            lib.munge_ctx_create.argtypes = []
            lib.munge_ctx_destroy.restype = None
            lib.munge_ctx_destroy.argtypes = [ctypes.c_void_p]
            lib.munge_encode.restype = ctypes.c_int
            lib.munge_encode.argtypes = [
                ctypes.POINTER(ctypes.c_void_p),
                ctypes.c_void_p,
                ctypes.c_void_p,
                ctypes.c_int,
            ]
            lib.munge_decode.restype = ctypes.c_int
            lib.munge_decode.argtypes = [
                ctypes.c_char_p,
                ctypes.c_void_p,
                ctypes.POINTER(ctypes.c_void_p),
                ctypes.POINTER(ctypes.c_int),
                ctypes.POINTER(ctypes.c_uint32),
                ctypes.POINTER(ctypes.c_uint32),
            ]
            lib.munge_strerror.restype = ctypes.c_char_p
            lib.munge_strerror.argtypes = [ctypes.c_int]
            lib.munge_ctx_strerror.restype = ctypes.c_char_p
            lib.munge_ctx_strerror.argtypes = [ctypes.c_void_p]
            # munge_ctx_set is variadic: argtypes stay unset, each call passes typed values
            lib.munge_ctx_set.restype = ctypes.c_int
            libc = _cdll("c", "libc.so.6")
            libc.free.restype = None
            libc.free.argtypes = [ctypes.c_void_p]
            _lib, _libc = lib, libc
        return _lib, _libc


def _cdll(name: str, soname: str, use_errno: bool = False) -> ctypes.CDLL:
    """The library by its usual soname, else wherever ``find_library`` (which runs
    ``ldconfig``) finds it."""
    try:
        return ctypes.CDLL(soname, use_errno=use_errno)
    except OSError:
        from ctypes import util

        found = util.find_library(name)
        if found is None:
            raise
        return ctypes.CDLL(found, use_errno=use_errno)


def socket_path(socket: str | None = None) -> str:
    return socket or os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET


def available(socket: str | None = None) -> bool:
    """True when libmunge loads and munged's socket exists (it may still not answer)."""
    if not os.path.exists(socket_path(socket)):
        return False
    try:
        _load()
    except Unavailable:
        return False
    return True


def _context(lib: ctypes.CDLL, socket: str | None, ttl: int | None) -> int:
    ctx = lib.munge_ctx_create()
    if not ctx:
        raise MungeError(5, "munge: out of memory")
    err = lib.munge_ctx_set(
        ctypes.c_void_p(ctx),
        ctypes.c_int(_OPT_SOCKET),
        ctypes.c_char_p(os.fsencode(socket_path(socket))),
    )
    if err == SUCCESS and ttl is not None:
        err = lib.munge_ctx_set(ctypes.c_void_p(ctx), ctypes.c_int(_OPT_TTL), ctypes.c_int(ttl))
    if err != SUCCESS:
        message = _ctx_error(lib, ctx, err)
        lib.munge_ctx_destroy(ctx)
        raise MungeError(err, message)
    return int(ctx)


def _ctx_error(lib: ctypes.CDLL, ctx: int, err: int) -> str:
    text = lib.munge_ctx_strerror(ctx) or lib.munge_strerror(err) or b"munge error"
    return "munge: " + bytes(text).decode(errors="replace")


def _raise(lib: ctypes.CDLL, ctx: int, err: int) -> None:
    message = _ctx_error(lib, ctx, err)
    if err == SOCKET_ERROR:
        raise Unavailable(err, message)
    raise MungeError(err, message)


def encode(payload: bytes = b"", socket: str | None = None, ttl: int | None = None) -> str:
    """A fresh credential for this process's uid and gid (``ttl`` seconds, else munged's)."""
    lib, libc = _load()
    ctx = _context(lib, socket, ttl)
    cred = ctypes.c_void_p()
    try:
        buf = ctypes.create_string_buffer(payload, len(payload)) if payload else None
        err = lib.munge_encode(ctypes.byref(cred), ctx, buf, len(payload))
        if err != SUCCESS:
            _raise(lib, ctx, err)
        return ctypes.string_at(cred.value or 0).decode("ascii")
    finally:
        if cred.value:
            libc.free(cred)
        lib.munge_ctx_destroy(ctx)


def decode(credential: str | bytes, socket: str | None = None) -> Credential:
    """The uid, gid and payload of a valid credential; MungeError (with munge's reason) for
    a replayed, expired, rewound, foreign or malformed one."""
    raw = credential.encode("ascii", "replace") if isinstance(credential, str) else credential
    if not raw or len(raw) > MAX_CREDENTIAL or b"\0" in raw:
        raise MungeError(8, "munge: malformed credential")
    lib, libc = _load()
    ctx = _context(lib, socket, None)
    buf = ctypes.c_void_p()
    length = ctypes.c_int(0)
    uid = ctypes.c_uint32(0)
    gid = ctypes.c_uint32(0)
    try:
        err = lib.munge_decode(
            raw,
            ctx,
            ctypes.byref(buf),
            ctypes.byref(length),
            ctypes.byref(uid),
            ctypes.byref(gid),
        )
        if err != SUCCESS:
            _raise(lib, ctx, err)
        payload = ctypes.string_at(buf.value, length.value) if buf.value else b""
        return Credential(uid.value, gid.value, payload)
    finally:
        if buf.value:
            libc.free(buf)
        lib.munge_ctx_destroy(ctx)
