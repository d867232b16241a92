"""Registry file and the server/token resolution order of SPEC section 2."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from crq.client import registry
from crq.client.errors import CrqError

from crq import wire


@pytest.fixture(autouse=True)
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "crqhome"
    monkeypatch.setenv("CRQ_HOME", str(home))
    for var in ("CRQ_SERVER", "CRQ_QUEUE", "CRQ_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    return home


def test_default_port_is_stable_and_in_range() -> None:
    for name in ("vnc", "regression", "a", "x" * 200, "ünïcode"):
        port = wire.default_port(name)
        assert 6200 <= port <= 6455
        assert port == wire.default_port(name)
    assert len({wire.default_port(f"q{i}") for i in range(100)}) > 50


def test_register_writes_private_file_atomically(clean_env: Path) -> None:
    entry = registry.register("vnc", "http://127.0.0.1:6321/", "/x/vnc.swd", "tok")
    assert entry == {
        "url": "http://127.0.0.1:6321",
        "swd": "/x/vnc.swd",
        "host": "127.0.0.1",
        "port": 6321,
        "token": "tok",
        "candidates": ["http://127.0.0.1:6321"],
    }
    path = clean_env / "registry.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(clean_env.stat().st_mode) == 0o700
    assert json.loads(path.read_text())["vnc"]["token"] == "tok"
    registry.register("other", "http://h:7000", "/y", None)
    assert sorted(registry.entries()) == ["other", "vnc"]
    assert registry.lookup("vnc")["port"] == 6321
    assert registry.lookup("missing") is None
    assert not [p for p in clean_env.iterdir() if p.name.endswith(".tmp")]
    assert registry.unregister("other") and not registry.unregister("other")
    assert sorted(registry.entries()) == ["vnc"]


def test_missing_registry_is_empty() -> None:
    assert registry.entries() == {}
    assert not hasattr(registry, "all"), "registry.all shadowed the builtin inside its module"


def test_damaged_registry_is_a_clear_error(clean_env: Path) -> None:
    clean_env.mkdir()
    (clean_env / "registry.json").write_text("{not json")
    with pytest.raises(CrqError, match="not valid JSON"):
        registry.entries()


def test_resolution_falls_back_to_default_port_of_vnc() -> None:
    target = registry.resolve_server(None, None)
    assert target == (f"http://127.0.0.1:{wire.default_port('vnc')}", "vnc", None)


def test_resolution_order(monkeypatch: pytest.MonkeyPatch) -> None:
    registry.register("vnc", "http://vnc-host:1111", "/s/vnc.swd", "t-vnc")
    registry.register("reg", "http://reg-host:2222", "/s/reg.swd", "t-reg")
    assert registry.resolve_server().url == "http://vnc-host:1111"
    monkeypatch.setenv("CRQ_QUEUE", "reg")
    assert registry.resolve_server().url == "http://reg-host:2222"
    assert registry.resolve_server(None, "vnc").url == "http://vnc-host:1111"
    monkeypatch.setenv("CRQ_SERVER", "http://env-host:3333/")
    target = registry.resolve_server()
    assert target.url == "http://env-host:3333" and target.entry is None
    target = registry.resolve_server("flag-host:4444")
    assert target.url == "http://flag-host:4444"
    # A URL from the flag that is registered gets the queue's name and token.
    target = registry.resolve_server("http://reg-host:2222")
    assert target.queue == "reg" and registry.resolve_token(target) == "t-reg"


def test_unregistered_queue_uses_its_hashed_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRQ_QUEUE", "nightly")
    target = registry.resolve_server()
    assert target.url == f"http://127.0.0.1:{wire.default_port('nightly')}"
    assert target.queue == "nightly"


def test_token_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    swd = wire.Swd(tmp_path / "q.swd")
    swd.security.mkdir(parents=True)
    swd.admin_token.write_text("from-swd\n")
    registry.register("q", "http://h:1", swd.root, None)
    target = registry.resolve_server(None, "q")
    assert registry.resolve_token(target) == "from-swd"
    registry.register("q", "http://h:1", swd.root, "from-registry")
    target = registry.resolve_server(None, "q")
    assert registry.resolve_token(target) == "from-registry"
    monkeypatch.setenv("CRQ_TOKEN", "from-env")
    assert registry.resolve_token(target) == "from-env"


def test_token_from_default_swd_when_unregistered(tmp_path: Path) -> None:
    swd = wire.Swd(tmp_path / "vnc.swd")
    swd.security.mkdir(parents=True)
    swd.admin_token.write_text("local\n")
    assert registry.resolve_token(registry.resolve_server()) == "local"


def test_unreadable_token_is_none(tmp_path: Path) -> None:
    assert registry.read_token(tmp_path / "nope") is None
    (tmp_path / "empty").write_text("\n")
    assert registry.read_token(tmp_path / "empty") is None
