"""crq.munge against real munged daemons: what a server may believe of a credential."""

from __future__ import annotations

import os
import time

import pytest

from crq import munge
from tests.munged import Munged


def test_a_credential_says_who_made_it(munged: Munged) -> None:
    cred = munge.encode(b"payload", socket=munged.socket)
    got = munge.decode(cred, socket=munged.socket)
    assert (got.uid, got.gid, got.payload) == (os.getuid(), os.getgid(), b"payload")


def test_a_replayed_credential_is_refused(munged: Munged) -> None:
    cred = munge.encode(socket=munged.socket)
    munge.decode(cred, socket=munged.socket)
    with pytest.raises(munge.MungeError) as e:
        munge.decode(cred, socket=munged.socket)
    assert e.value.code == munge.CRED_REPLAYED
    assert "replayed" in str(e.value).lower()


def test_a_credential_of_another_key_is_refused(munged: Munged, foreign_munged: Munged) -> None:
    cred = munge.encode(socket=foreign_munged.socket)
    with pytest.raises(munge.MungeError) as e:
        munge.decode(cred, socket=munged.socket)
    assert e.value.code == munge.CRED_INVALID


def test_an_expired_credential_is_refused(munged: Munged) -> None:
    cred = munge.encode(socket=munged.socket, ttl=1)
    time.sleep(2.5)  # munged allows a skew of one ttl; this is past it
    with pytest.raises(munge.MungeError) as e:
        munge.decode(cred, socket=munged.socket)
    assert e.value.code == munge.CRED_EXPIRED


@pytest.mark.parametrize("junk", ["", "MUNGE:", "MUNGE:AwQFAAB" + "x" * 50 + ":", "a\0b", "é"])
def test_junk_is_refused_with_a_reason(munged: Munged, junk: str) -> None:
    with pytest.raises(munge.MungeError) as e:
        munge.decode(junk, socket=munged.socket)
    assert str(e.value).startswith("munge: ")


def test_no_daemon_is_unavailable(tmp_path: object) -> None:
    with pytest.raises(munge.Unavailable):
        munge.encode(socket="/nonexistent/munge.socket")
    assert not munge.available("/nonexistent/munge.socket")
