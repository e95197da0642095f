"""Tests for rentahal.node.config: node.toml loading, validation and --set overrides."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import msgspec
import pytest

from rentahal.node.config import (
    REALMS,
    Config,
    ConfigError,
    LimitsConfig,
    P2PConfig,
    RealmConfig,
    RouterConfig,
    UIConfig,
    apply_overrides,
    default_config_text,
    load_config,
    parse_set_option,
)
from rentahal.realms.catalog import CATALOG

PEER = "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(text, encoding="utf-8")
    return path


def error_for(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message
    assert message.startswith(f"{path}: ")
    return message


# --- defaults ---------------------------------------------------------------------------------


def test_defaults_without_file(tmp_path: Path) -> None:
    cfg = load_config(None)
    assert cfg == Config()
    assert load_config(tmp_path / "absent.toml") == Config()
    assert cfg.node.log_level == "info"
    assert cfg.p2p.listen == ("/ip4/0.0.0.0/tcp/4001",)
    assert cfg.p2p.bootstrap == ()
    assert cfg.router.hang_timeout == 1.5 and cfg.router.first_progress == 5.0
    assert (cfg.limits.peer_queries_per_minute, cfg.limits.peer_burst) == (60000.0, 1000)
    assert cfg.ui.host == "127.0.0.1" and cfg.ui.port == 8765
    assert tuple(cfg.realms) == REALMS
    assert cfg.served_realms() == ("chat",)
    assert cfg.realms["vision"] == RealmConfig(serve=False)


def test_missing_file_with_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="absent.toml: file not found"):
        load_config(tmp_path / "absent.toml", must_exist=True)


def test_config_is_immutable() -> None:
    cfg = Config()
    with pytest.raises(AttributeError, match="immutable"):
        cfg.router.hang_timeout = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.realms["chat"] = RealmConfig()  # type: ignore[index]


def test_shipped_file_equals_defaults(tmp_path: Path) -> None:
    text = default_config_text()
    assert load_config(write(tmp_path, text)) == Config()


def test_shipped_file_documents_every_key() -> None:
    data = tomllib.loads(default_config_text())
    lines = default_config_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"\w+ = ", line):
            assert lines[i - 1].startswith("#"), f"no comment above {line!r}"
    expected = {
        "node": {"name", "log_level", "log_format"},
        "p2p": {f.name for f in msgspec.structs.fields(P2PConfig)},
        "router": {f.name for f in msgspec.structs.fields(RouterConfig)},
        "ui": {f.name for f in msgspec.structs.fields(UIConfig)},
        "limits": {f.name for f in msgspec.structs.fields(LimitsConfig)},
    }
    for section, keys in expected.items():
        assert set(data[section]) == keys
    assert set(data["realms"]) == set(REALMS)
    # Each realm's own settings (realms/catalog.py): every one of chat's, and the common ones
    # plus what is theirs alone for the others.
    assert set(data["realms"]["chat"]) == CATALOG["chat"].settings
    assert set(data["realms"]["vision"]) == {"serve", "model", "mmproj", "slots", "queue_limit"}
    assert set(data["realms"]["imagine"]) == {"serve", "model", "max_steps", "max_pixels", "slots", "queue_limit"}
    assert set(data["realms"]["speech"]) == {"serve", "model", "slots", "queue_limit"}
    assert {f.name for f in msgspec.structs.fields(RealmConfig)} == set().union(*(r.settings for r in CATALOG.values()))


def test_partial_file_keeps_other_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
        [router]
        hang_timeout = 5
        [p2p]
        bootstrap = ["/ip4/10.0.0.2/tcp/4001/p2p/{PEER}", "/ip6/::1/tcp/4001/p2p/{PEER}"]
        [realms.vision]
        serve = true
        model = "/models/llava.gguf"
        [realms.chat]
        max_tokens = 64
        """,
    )
    cfg = load_config(path)
    assert cfg.router.hang_timeout == 5.0 and isinstance(cfg.router.hang_timeout, float)
    assert cfg.router.query_deadline == 300.0
    assert len(cfg.p2p.bootstrap) == 2
    assert cfg.served_realms() == ("chat", "vision")
    assert cfg.realms["chat"].max_tokens == 64 and cfg.realms["chat"].serve is True
    assert cfg.realms["vision"].model == "/models/llava.gguf"


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("[nodes]\nname = 'x'", ["unknown section 'nodes'", "did you mean 'node'?"]),
        (
            "[p2p]\nlisten_adress = []",
            ["unknown key 'p2p.listen_adress'", "(did you mean 'p2p.listen'?)"],
        ),
        ("[router]\nhang_timeout = 'abc'", ["router.hang_timeout: expected a number", "'abc'"]),
        ("[router]\nmax_attempts = 2.5", ["router.max_attempts: expected an integer", "2.5"]),
        ("[router]\nmax_attempts = true", ["router.max_attempts: expected an integer", "true"]),
        ("[ui]\nport = false", ["ui.port: expected an integer in 0..65535, got false"]),
        ("[ui]\nport = 70000", ["ui.port: expected an integer in 0..65535, got 70000"]),
        ("[ui]\nhost = 'example.com'", ["ui.host:", "'example.com'"]),
        ("[ui]\nhost = ''", ["ui.host:"]),
        ("[node]\nlog_level = 'verbose'", ["node.log_level:", "'verbose'"]),
        ('[node]\nname = "a\\nb"', ["node.name:", "printable", "'a\\nb'"]),
        ("[node]\nname = '" + "x" * 65 + "'", ["node.name:"]),
        ("[p2p]\nhealth_interval = 0.1", ["p2p.health_interval: expected a number in 0.2..60"]),
        ("[p2p]\ndial_timeout = 0", ["p2p.dial_timeout: expected a number > 0 and <= 120"]),
        ("[p2p]\ndht_refresh = nan", ["p2p.dht_refresh:"]),
        ("[router]\nquery_deadline = inf", ["router.query_deadline:"]),
        ("[router]\nlocal_queue_limit = -1", ["router.local_queue_limit:"]),
        ("[p2p]\nlisten = '/ip4/0.0.0.0/tcp/4001'", ["p2p.listen: expected a list"]),
        ("[p2p]\nlisten = ['/ip4/0.0.0.0/udp/4001']", ["p2p.listen: item 0:", "udp"]),
        ("[p2p]\nlisten = ['/dns4/example.com/tcp/1']", ["p2p.listen: item 0:"]),
        ("[p2p]\nlisten = ['/ip4/300.0.0.1/tcp/1']", ["p2p.listen: item 0:"]),
        ("[p2p]\nlisten = ['/ip6/1.2.3.4/tcp/1']", ["p2p.listen: item 0:"]),
        ("[p2p]\nlisten = ['/ip4/0.0.0.0/tcp/1', 4]", ["p2p.listen[1]: expected a string, got 4"]),
        ("[p2p]\nlisten = ['/ip4/0.0.0.0/tcp/65536']", ["p2p.listen: item 0:", "65536"]),
        ("[p2p]\nbootstrap = ['/ip4/10.0.0.1/tcp/4001']", ["p2p.bootstrap: item 0:", "/p2p/"]),
        (
            "[p2p]\nbootstrap = ['/ip4/10.0.0.1/tcp/4001/p2p/0OIl']",
            ["p2p.bootstrap: item 0:", "/p2p/"],
        ),
        (
            "[p2p]\nhealth_heartbeat = 5\nstale_after = 3.5",
            ["p2p.stale_after: must be greater than p2p.health_heartbeat"],
        ),
        (
            "[router]\nquery_deadline = 10\nhang_timeout = 10",
            ["router.hang_timeout: must be less than router.query_deadline"],
        ),
        (
            "[router]\nbreaker_backoff = 10\nbreaker_backoff_max = 5",
            ["router.breaker_backoff_max: must be at least router.breaker_backoff"],
        ),
        ("[realms.text]\nserve = true", ["unknown realm 'realms.text'"]),
        ("[realms.chat]\nserv = true", ["unknown key 'realms.chat.serv'", "realms.chat.serve"]),
        ("[realms.speech]\nslots = 0", ["realms.speech.slots: expected an integer in 1..64"]),
        ("[realms.chat]\nn_gpu_layers = -2", ["realms.chat.n_gpu_layers:"]),
        ("[realms.chat]\nserve = 1", ["realms.chat.serve: expected true or false, got 1"]),
        ("realms = 3", ["realms: expected a table, got 3"]),
        ("p2p = 'x'", ["p2p: expected a table"]),
        ("[realms]\nchat = 1", ["realms.chat: expected a table"]),
    ],
)
def test_bad_input(tmp_path: Path, text: str, fragments: list[str]) -> None:
    message = error_for(tmp_path, text)
    for fragment in fragments:
        assert fragment in message, message


def test_toml_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    message = error_for(tmp_path, "[router]\nhang_timeout = \n")
    assert "invalid TOML" in message
    assert "line 2" in message and "column" in message


def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_bytes(b"name = '\xff'")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path)  # a directory


# --- command-line overrides -------------------------------------------------------------------


def test_overrides() -> None:
    cfg = load_config(
        None,
        {
            "router.hang_timeout": "2.5",
            "router.max_attempts": "5",
            "p2p.bootstrap": f'["/ip4/127.0.0.1/tcp/4001/p2p/{PEER}"]',
            "realms.chat.serve": "false",
            "realms.imagine.serve": "true",
            "ui.host": "localhost",
            "node.name": "2024",
            "realms.chat.model": "/tmp/m.gguf",
        },
    )
    assert cfg.router.hang_timeout == 2.5
    assert cfg.router.max_attempts == 5
    assert cfg.p2p.bootstrap == (f"/ip4/127.0.0.1/tcp/4001/p2p/{PEER}",)
    assert cfg.served_realms() == ("imagine",)
    assert cfg.ui.host == "localhost"
    assert cfg.node.name == "2024"
    assert cfg.realms["chat"].model == "/tmp/m.gguf"


def test_override_bare_strings() -> None:
    cfg = load_config(None, {"ui.host": "::1", "p2p.listen": "/ip4/127.0.0.1/tcp/0"})
    assert cfg.ui.host == "::1"
    assert cfg.p2p.listen == ("/ip4/127.0.0.1/tcp/0",)
    assert load_config(None, {"ui.host": "127.0.0.1"}).ui.host == "127.0.0.1"
    assert load_config(None, {"p2p.listen": ""}).p2p.listen == ()


def test_overrides_beat_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[router]\nhang_timeout = 400\n")
    cfg = load_config(path, {"router.query_deadline": "500"})
    assert (cfg.router.hang_timeout, cfg.router.query_deadline) == (400.0, 500.0)
    path = write(tmp_path, "[ui]\nport = 1\n")
    assert load_config(path, {"ui.port": "2"}).ui.port == 2


def test_apply_overrides() -> None:
    cfg = apply_overrides(Config(), {"p2p.health_heartbeat": "2", "p2p.stale_after": "7"})
    assert (cfg.p2p.health_heartbeat, cfg.p2p.stale_after) == (2.0, 7.0)
    with pytest.raises(ConfigError, match=r"^command line: p2p.stale_after: must be greater"):
        apply_overrides(Config(), {"p2p.health_heartbeat": "30"})
    with pytest.raises(ConfigError, match=r"^command line: p2p.health_heartbeat: must be at least"):
        apply_overrides(Config(), {"p2p.health_interval": "12"})


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        ({"router.hang_timeout": "abc"}, ["router.hang_timeout: expected a number", "'abc'"]),
        ({"router.max_attempts": "true"}, ["router.max_attempts: expected an integer"]),
        ({"p2p.listen_adress": "[]"}, ["unknown key 'p2p.listen_adress'", "'p2p.listen'"]),
        ({"p2p": "[]"}, ["unknown key 'p2p'"]),
        ({"realms.text.serve": "true"}, ["unknown key 'realms.text.serve'"]),
        ({"realms.chat.serve": "yes"}, ["realms.chat.serve: expected true or false"]),
        ({"ui.host": "my host"}, ["ui.host:"]),
        ({"p2p.bootstrap": "/ip4/1.2.3.4/tcp/1"}, ["p2p.bootstrap: item 0:"]),
        ({"router.hang_timeout": "300"}, ["router.hang_timeout: must be less than"]),
        ({"ui.port": "1\nx = 2"}, ["ui.port: expected an integer"]),
    ],
)
def test_override_errors(overrides: dict[str, str], fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    message = str(info.value)
    assert message.startswith("command line: ") and "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_cross_field_error_blames_the_file_when_no_override_involved(tmp_path: Path) -> None:
    path = write(tmp_path, "[router]\nhang_timeout = 400\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: router.hang_timeout"):
        load_config(path, {"ui.port": "1"})
    with pytest.raises(ConfigError, match=r"^command line: router.hang_timeout"):
        load_config(path, {"router.query_deadline": "350"})


def test_parse_set_option() -> None:
    assert parse_set_option("router.hang_timeout=2.5") == ("router.hang_timeout", "2.5")
    assert parse_set_option(" ui.host = localhost ") == ("ui.host", "localhost")
    assert parse_set_option("node.name=a=b") == ("node.name", "a=b")
    assert parse_set_option("node.name=") == ("node.name", "")
    for bad in ("router.hang_timeout", "=3", ""):
        with pytest.raises(ConfigError, match="^command line: .*expected KEY=VALUE"):
            parse_set_option(bad)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[realms.speech]\nn_ctx = 4096", ["realms.speech.n_ctx: not a setting of the speech realm", "chat, vision"]),
        ("[realms.chat]\nmax_steps = 20", ["realms.chat.max_steps", "only of imagine"]),
        ("[realms.imagine]\nmmproj = 'x.gguf'", ["realms.imagine.mmproj", "only of vision"]),
        ("[realms.chat]\nslots = 2", ["realms.chat.slots", "runs 1 query at a time", "got 2"]),
    ],
)
def test_a_realm_takes_only_its_own_settings(tmp_path: Path, text: str, expected: list[str]) -> None:
    """The catalog (realms/catalog.py) says which keys a realm has and how many queries its backend
    runs at once: another realm's key, or slots its backend cannot honour, is an error."""
    path = tmp_path / "node.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    for part in expected:
        assert part in str(info.value), str(info.value)
    with pytest.raises(ConfigError):
        apply_overrides(Config(), {"realms.speech.n_ctx": "4096"})
