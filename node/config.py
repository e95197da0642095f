"""Node configuration: node.toml, validated once on load into frozen dataclasses.

This is the only module that reads TOML. Defaults live in the dataclass fields below (and are
mirrored, with comments, in the shipped ``node.toml``). Every problem is reported as a
:class:`ConfigError` whose ``str()`` is one line: ``<file or "command line">: <key>: <what>``.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import operator
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ..p2p.wire import MAX_PAYLOAD
from ..realms.catalog import CATALOG, REALMS

LOG_LEVELS = ("debug", "info", "warning", "error")
CMDLINE = "command line"


class ConfigError(Exception):
    """A bad configuration file, key, type or value; ``str()`` is a single line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.splitlines()))


class _Bad(Exception):
    """Raised by field checkers; turned into a ConfigError naming source and key."""


def _show(value: object) -> str:
    if isinstance(value, bool):
        text = "true" if value else "false"
    else:
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _n(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


# --- field checkers --------------------------------------------------------------------------

Check = Callable[[Any], Any]


def _opt(default: Any, check: Check) -> Any:
    return field(default=default, metadata={"check": check})


def _float(default: float, lo: float, hi: float, *, lo_open: bool = False) -> Any:
    bounds = f"> {_n(lo)} and <= {_n(hi)}" if lo_open else f"in {_n(lo)}..{_n(hi)}"
    want = f"expected a number {bounds}"

    def check(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise _Bad(f"{want}, got {_show(v)}")
        try:
            x = float(v)
        except OverflowError:
            raise _Bad(f"{want}, got {_show(v)}") from None
        if not (math.isfinite(x) and (x > lo if lo_open else x >= lo) and x <= hi):
            raise _Bad(f"{want}, got {_show(v)}")
        return x

    return _opt(default, check)


def _int(default: int, lo: int, hi: int) -> Any:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise _Bad(f"expected an integer in {lo}..{hi}, got {_show(v)}")
        return v

    return _opt(default, check)


def _bool(default: bool) -> Any:
    def check(v: Any) -> bool:
        if not isinstance(v, bool):
            raise _Bad(f"expected true or false, got {_show(v)}")
        return v

    return _opt(default, check)


def _str(default: str, ok: Callable[[str], bool] = lambda s: True, want: str = "a string") -> Any:
    def check(v: Any) -> str:
        if not isinstance(v, str) or not ok(v):
            raise _Bad(f"expected {want}, got {_show(v)}")
        return v

    return _opt(default, check)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


_MADDR = re.compile(r"/(?P<proto>ip4|ip6)/(?P<addr>[^/\s]+)/tcp/(?P<port>\d{1,5})(?P<rest>(?:/[^/\s]+)*)")
_PEER_SUFFIX = re.compile(r"(?:/[^/\s]+)*/p2p/[1-9A-HJ-NP-Za-km-z]+")


def _check_multiaddr(v: Any, need_peer: bool) -> str:
    shape = "/ip4|ip6/<address>/tcp/<port>" + ("/.../p2p/<peer id>" if need_peer else "")
    m = _MADDR.fullmatch(v) if isinstance(v, str) else None
    if m is None or not _is_ip(m["addr"]) or (m["proto"] == "ip6") != (":" in m["addr"]):
        raise _Bad(f"expected a multiaddr {shape}, got {_show(v)}")
    if int(m["port"]) > 65535:
        raise _Bad(f"tcp port {m['port']} is out of range 0..65535 in {_show(v)}")
    if need_peer and not _PEER_SUFFIX.fullmatch(m["rest"]):
        raise _Bad(f"expected a multiaddr ending in /p2p/<base58 peer id>, got {_show(v)}")
    return v


_DNS_MADDR = re.compile(r"/dns[46]?/(?P<name>[A-Za-z0-9.-]{1,253})/tcp/(?P<port>\d{1,5})")


def _check_announce(v: Any) -> str:
    """An address the operator knows this node is reachable at: an IP or a DNS name, no /p2p/."""
    m = _DNS_MADDR.fullmatch(v) if isinstance(v, str) else None
    if m is not None:
        if not 1 <= int(m["port"]) <= 65535:
            raise _Bad(f"tcp port {m['port']} is out of range 1..65535 in {_show(v)}")
        return v
    if isinstance(v, str) and "/p2p/" in v:
        raise _Bad(f"an announce address names no peer (this node's /p2p/ is added), got {_show(v)}")
    try:
        return _check_multiaddr(v, False)
    except _Bad:
        raise _Bad(f"expected /ip4|ip6/<address>/tcp/<port> or /dns4|dns6/<name>/tcp/<port>, got {_show(v)}") from None


def _multiaddrs(default: tuple[str, ...], *, need_peer: bool, announce: bool = False) -> Any:
    def check(v: Any) -> tuple[str, ...]:
        if not isinstance(v, list | tuple):
            raise _Bad(f"expected a list of multiaddr strings, got {_show(v)}")
        out = []
        for i, item in enumerate(v):
            try:
                out.append(_check_announce(item) if announce else _check_multiaddr(item, need_peer))
            except _Bad as e:
                raise _Bad(f"item {i}: {e}") from None
        return tuple(out)

    return _opt(default, check)


_PEER_ID = re.compile(r"[1-9A-HJ-NP-Za-km-z]{32,128}")


def _peer_ids() -> Any:
    """A list of base58 libp2p peer IDs (an empty list: nobody singled out)."""

    def check(v: Any) -> tuple[str, ...]:
        if not isinstance(v, list | tuple):
            raise _Bad(f"expected a list of peer IDs, got {_show(v)}")
        for i, item in enumerate(v):
            if not (isinstance(item, str) and _PEER_ID.fullmatch(item)):
                raise _Bad(f"item {i}: expected a base58 peer ID, got {_show(item)}")
        return tuple(v)

    return _opt((), check)


_ORIGIN = re.compile(r"https?://[A-Za-z0-9.\-\[\]:]{1,260}")


def _origins() -> Any:
    """A list of web origins (scheme://host[:port], no path) allowed to drive the websocket."""

    def check(v: Any) -> tuple[str, ...]:
        if not isinstance(v, list | tuple):
            raise _Bad(f'expected a list of origins like "http://192.0.2.7:3000", got {_show(v)}')
        for i, item in enumerate(v):
            if not (isinstance(item, str) and _ORIGIN.fullmatch(item)):
                raise _Bad(f"item {i}: expected an origin scheme://host[:port] with no path, got {_show(item)}")
        return tuple(x.lower() for x in v)

    return _opt((), check)


# --- the configuration objects ---------------------------------------------------------------


@dataclass(frozen=True)
class NodeSection:
    name: str = _str("", lambda s: len(s) <= 64 and s.isprintable(), "<= 64 printable characters")
    log_level: str = _str("info", lambda s: s in LOG_LEVELS, "one of " + "|".join(LOG_LEVELS))
    # "text" (one line per event) or "json" (one JSON object per line, for journald/Loki/ELK)
    log_format: str = _str("text", lambda s: s in ("text", "json"), "'text' or 'json'")


@dataclass(frozen=True)
class P2PConfig:
    listen: tuple[str, ...] = _multiaddrs(("/ip4/0.0.0.0/tcp/4001",), need_peer=False)
    bootstrap: tuple[str, ...] = _multiaddrs((), need_peer=True)
    announce: tuple[str, ...] = _multiaddrs((), need_peer=False, announce=True)
    mdns: bool = _bool(True)
    relay_service: str = _str("auto", lambda s: s in ("auto", "on", "off"), "one of auto|on|off")
    relay_reservations: int = _int(32, 1, 10000)
    relay_duration: float = _float(1800.0, 1.0, 86400.0)
    relay_bytes: int = _int(128 * 1024 * 1024, 1024, 1 << 40)
    relay_circuits: int = _int(4, 1, 1000)
    health_interval: float = _float(1.0, 0.2, 60.0)
    health_heartbeat: float = _float(5.0, 0.2, 600.0)
    stale_after: float = _float(12.0, 0.0, 3600.0, lo_open=True)
    gossip_per_second: float = _float(100.0, 1.0, 1e6)
    introductions_per_minute: float = _float(60.0, 1.0, 1e6)
    dht_refresh: float = _float(300.0, 5.0, 86400.0)
    dial_timeout: float = _float(10.0, 0.0, 120.0, lo_open=True)
    forget_after: float = _float(600.0, 10.0, 30 * 86400.0)


@dataclass(frozen=True)
class RouterConfig:
    query_deadline: float = _float(300.0, 1.0, 86400.0)
    hang_timeout: float = _float(1.5, 1.0, 3600.0)
    first_progress: float = _float(5.0, 0.5, 3600.0)
    spot_check_every: float = _float(1800.0, 0.0, 86400.0)
    max_attempts: int = _int(3, 1, 16)
    local_queue_limit: int = _int(4, 0, 10000)
    breaker_failures: int = _int(3, 1, 100)
    breaker_backoff: float = _float(5.0, 0.1, 3600.0)
    breaker_backoff_max: float = _float(300.0, 0.1, 86400.0)
    score_half_life: float = _float(60.0, 1.0, 86400.0)


@dataclass(frozen=True)
class UIConfig:
    host: str = _str("127.0.0.1", lambda s: s == "localhost" or _is_ip(s), "an IPv4/IPv6 address or 'localhost'")
    port: int = _int(8765, 0, 65535)
    # Pages other than the node's own that may open its websocket (the node's own page, opened
    # by IP address or as localhost, always may).
    allowed_origins: tuple[str, ...] = _origins()


API_KEY_MODES = ("remote", "all", "none")


@dataclass(frozen=True)
class ApiConfig:
    """The OpenAI-compatible API and /metrics on the UI port."""

    enabled: bool = _bool(True)
    # Which clients must show an API key (`rentahal-node keys create`): "remote" (any client
    # not on loopback), "all", or "none" (only sensible on a trusted network).
    keys: str = _str("remote", lambda s: s in API_KEY_MODES, "one of " + ", ".join(map(repr, API_KEY_MODES)))
    # /metrics: whether a client off loopback must show a key too (Prometheus sends one as a
    # bearer token: `authorization` in its scrape config).
    metrics_need_key: bool = _bool(True)
    # Largest request body (JSON, or a multipart upload for transcriptions), in bytes.
    max_body_bytes: int = _int(12 * 1024 * 1024, 1024, 1 << 30)


@dataclass(frozen=True)
class StorageConfig:
    shards: int = _int(4, 1, 64)
    # No more than a query request frame carries: a payload a peer cannot be sent is refused.
    max_payload_bytes: int = _int(MAX_PAYLOAD, 1024, MAX_PAYLOAD)


@dataclass(frozen=True)
class LimitsConfig:
    queries_per_minute: float = _float(30.0, 0.0, 1e6)
    burst: int = _int(10, 1, 100000)
    loopback: bool = _bool(False)
    max_active: int = _int(64, 1, 100000)
    peer_queries_per_minute: float = _float(60000.0, 0.0, 1e6)
    peer_burst: int = _int(1000, 1, 100000)
    peer_streams: int = _int(8, 1, 1024)
    peer_buffer_bytes: int = _int(16 * 1024 * 1024, 64 * 1024, 1 << 34)
    buffer_bytes: int = _int(64 * 1024 * 1024, 64 * 1024, 1 << 36)
    inbound_per_ip: int = _int(32, 1, 100000)
    pending_per_ip: int = _int(16, 1, 100000)
    inbound_total: int = _int(256, 1, 1000000)
    handshake_timeout: float = _float(10.0, 0.0, 600.0, lo_open=True)
    ws_buffer_bytes: int = _int(64 * 1024 * 1024, 64 * 1024, 1 << 36)
    ws_chat_bytes: int = _int(1024 * 1024, 1024, 1 << 30)
    ws_request_bytes: int = _int(64 * 1024, 1024, 1 << 30)


@dataclass(frozen=True)
class RealmConfig:
    serve: bool = _bool(False)
    model: str = _str("")
    slots: int = _int(1, 1, 64)
    queue_limit: int = _int(16, 1, 100000)
    n_ctx: int = _int(2048, 16, 1048576)
    n_gpu_layers: int = _int(-1, -1, 100000)
    threads: int = _int(0, 0, 512)
    max_tokens: int = _int(512, 1, 1048576)
    mmproj: str = _str("")
    max_steps: int = _int(50, 1, 1000)
    max_pixels: int = _int(1024 * 1024, 4096, 64 * 1024 * 1024)
    cost_per_query: float = _float(0.0, 0.0, 1e9)
    cost_per_second: float = _float(0.0, 0.0, 1e9)
    cost_per_token: float = _float(0.0, 0.0, 1e9)
    # An external model server instead of a local model (realms/catalog.py says which realms):
    # its base URL, its API ("openai": any OpenAI-compatible server; "anthropic": the messages
    # API), the model to ask it for, and where its key is (an environment variable or a 0600
    # file: never node.toml).
    url: str = _str("", lambda s: s == "" or s.startswith(("http://", "https://")), "an http:// or https:// URL")
    api: str = _str("openai", lambda s: s in ("openai", "anthropic"), "'openai' or 'anthropic'")
    remote_model: str = _str("", lambda s: len(s) <= 256 and s.isprintable(), "<= 256 printable characters")
    key_env: str = _str("", lambda s: s == "" or s.replace("_", "a").isalnum(), "an environment variable name")
    key_file: str = _str("")
    allow: tuple[str, ...] = _peer_ids()  # serve this realm to these peers only (empty: to all)
    trusted: tuple[str, ...] = _peer_ids()  # route this realm to these peers only (empty: any)


def _default_realms() -> Mapping[str, RealmConfig]:
    return MappingProxyType({r: RealmConfig(serve=(r == "chat")) for r in REALMS})


@dataclass(frozen=True)
class Config:
    node: NodeSection = field(default_factory=NodeSection)
    p2p: P2PConfig = field(default_factory=P2PConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    ui: UIConfig = field(default_factory=UIConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    realms: Mapping[str, RealmConfig] = field(default_factory=_default_realms, hash=False)

    def served_realms(self) -> tuple[str, ...]:
        """Names of the realms this node advertises and executes, in REALMS order."""
        return tuple(r for r in REALMS if self.realms[r].serve)


_SECTIONS: dict[str, type] = {
    "node": NodeSection,
    "p2p": P2PConfig,
    "router": RouterConfig,
    "ui": UIConfig,
    "api": ApiConfig,
    "storage": StorageConfig,
    "limits": LimitsConfig,
}
_LEAVES: dict[str, Any] = {  # every valid dotted key -> its built-in default
    **{f"{s}.{f.name}": f.default for s, c in _SECTIONS.items() for f in fields(c)},
    **{f"realms.{r}.{f.name}": f.default for r in REALMS for f in fields(RealmConfig) if f.name in CATALOG[r].settings},
}
_CROSS = (  # (key, relation, other key, wording)
    ("p2p.health_heartbeat", operator.ge, "p2p.health_interval", "at least"),
    ("p2p.stale_after", operator.gt, "p2p.health_heartbeat", "greater than"),
    ("router.hang_timeout", operator.lt, "router.query_deadline", "less than"),
    ("router.breaker_backoff_max", operator.ge, "router.breaker_backoff", "at least"),
    ("limits.buffer_bytes", operator.ge, "limits.peer_buffer_bytes", "at least"),
    ("limits.inbound_per_ip", operator.ge, "limits.pending_per_ip", "at least"),
)


# --- building -------------------------------------------------------------------------------


def _unknown(label: str, key: str, candidates: Iterable[str], what: str = "key") -> ConfigError:
    close = difflib.get_close_matches(key, list(candidates), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"{label}: unknown {what} '{key}'{hint}")


def _section(cls: type, table: Any, prefix: str, label: str, base: Any) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"{label}: {prefix}: expected a table, got {_show(table)}")
    spec = {f.name: f for f in fields(cls)}
    values = {}
    for key, raw in table.items():
        dotted = f"{prefix}.{key}"
        if key not in spec and key in ("key", "api_key", "token"):
            raise ConfigError(
                f"{label}: {dotted}: keys never go in node.toml; name an environment variable "
                f"({prefix}.key_env) or a 0600 file ({prefix}.key_file)"
            )
        if key not in spec:
            near = [k for k in _LEAVES if k.startswith(prefix + ".")]
            raise _unknown(label, dotted, near or _LEAVES)
        try:
            values[key] = spec[key].metadata["check"](raw)
        except _Bad as e:
            raise ConfigError(f"{label}: {dotted}: {e}") from None
    return replace(base, **values)


def _own_settings(definition: Any, table: Any, label: str) -> None:
    """A realm takes its own settings only (its catalog entry's): ``realms.speech.n_ctx`` is
    an error, not silently ignored."""
    name = definition.name
    for key in table if isinstance(table, dict) else ():
        having = [r.name for r in CATALOG.values() if key in r.settings]
        if key not in definition.settings and having:
            raise ConfigError(
                f"{label}: realms.{name}.{key}: not a setting of the {name} realm (only of {', '.join(having)}); "
                f"{name} takes {', '.join(sorted(definition.settings))}"
            )


def _check_slots(definition: Any, rc: RealmConfig, label: str) -> None:
    """No more slots than the realm's backend runs at once: more would be advertised to peers,
    then wait on the backend's lock."""
    name = definition.name
    if rc.slots > definition.concurrency:
        raise ConfigError(
            f"{label}: realms.{name}.slots: the {name} backend runs {definition.concurrency} query at a time "
            f"(one model context); slots may be at most {definition.concurrency}, got {rc.slots}"
        )


def _merge(data: Mapping[str, Any], label: str, base: Config) -> Config:
    """Validate a parsed TOML document (or a one-key override) on top of ``base``."""
    parts: dict[str, Any] = {}
    for sec, table in data.items():
        if sec in _SECTIONS:
            parts[sec] = _section(_SECTIONS[sec], table, sec, label, getattr(base, sec))
        elif sec == "realms":
            if not isinstance(table, dict):
                raise ConfigError(f"{label}: realms: expected a table, got {_show(table)}")
            realms = dict(base.realms)
            for name, sub in table.items():
                if name not in REALMS:
                    names = [f"realms.{r}" for r in REALMS]
                    raise _unknown(label, f"realms.{name}", names, "realm")
                _own_settings(CATALOG[name], sub, label)
                realms[name] = _section(RealmConfig, sub, f"realms.{name}", label, realms[name])
                _check_slots(CATALOG[name], realms[name], label)
            parts["realms"] = MappingProxyType(realms)
        else:
            raise _unknown(label, sec, [*_SECTIONS, "realms"], "section")
    return replace(base, **parts)


def _get(cfg: Config, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = obj[part] if isinstance(obj, Mapping) else getattr(obj, part)
    return obj


def _cross_check(cfg: Config, label_of: Callable[[str, str], str]) -> None:
    for key, rel, other, wording in _CROSS:
        value, limit = _get(cfg, key), _get(cfg, other)
        if not rel(value, limit):
            raise ConfigError(
                f"{label_of(key, other)}: {key}: must be {wording} {other} ({_n(limit)}), got {_n(value)}"
            )


def _override_value(key: str, text: str) -> Any:
    """A command-line value: a TOML value if it parses as one, else the bare string."""
    try:
        doc = tomllib.loads(f"v = {text}")
        value = doc["v"] if doc.keys() == {"v"} else text
    except tomllib.TOMLDecodeError:
        value = text
    default = _LEAVES[key]
    if isinstance(default, str) and not isinstance(value, str):
        value = text  # e.g. node.name=2024
    if isinstance(default, tuple) and isinstance(value, str):
        value = [value] if value else []  # p2p.bootstrap=/ip4/.../p2p/... (single item)
    return value


def _apply(cfg: Config, overrides: Mapping[str, str]) -> tuple[Config, set[str]]:
    done: set[str] = set()
    for raw_key, text in overrides.items():
        key = raw_key.strip()
        if key not in _LEAVES:
            raise _unknown(CMDLINE, key, _LEAVES)
        nested: Any = _override_value(key, text)
        for part in reversed(key.split(".")):
            nested = {part: nested}
        cfg = _merge(nested, CMDLINE, cfg)
        done.add(key)
    return cfg, done


def apply_overrides(cfg: Config, overrides: Mapping[str, str]) -> Config:
    """Return ``cfg`` with ``--set`` style overrides ({dotted key: TOML value text}) applied."""
    cfg, _ = _apply(cfg, overrides)
    _cross_check(cfg, lambda a, b: CMDLINE)
    return cfg


def parse_set_option(text: str) -> tuple[str, str]:
    """Split a CLI ``--set KEY=VALUE`` argument into (key, value text)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"{CMDLINE}: --set {_show(text)}: expected KEY=VALUE")
    return key.strip(), value.strip()


def resolve_data_dir(data_dir: Path | None) -> Path:
    """The node's data dir: the one given (``--data-dir`` or $RENTAHAL_HOME), else ~/.rentahal."""
    return (data_dir or Path.home() / ".rentahal").expanduser().resolve()


def default_config_text() -> str:
    """The shipped, fully commented node.toml (equal to the built-in defaults)."""
    return resources.files("rentahal").joinpath("node.toml").read_text(encoding="utf-8")


_NO_OVERRIDES: Mapping[str, str] = MappingProxyType({})


def load_config(path: Path | None, overrides: Mapping[str, str] = _NO_OVERRIDES, *, must_exist: bool = False) -> Config:
    """Load and validate ``path`` (None or missing -> built-in defaults), then ``overrides``."""
    cfg, label = Config(), CMDLINE
    if path is not None:
        path, label = Path(path), str(path)
        if path.exists() or must_exist:
            try:
                data = tomllib.loads(path.read_text(encoding="utf-8"))
            except FileNotFoundError:
                raise ConfigError(f"{label}: file not found") from None
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError(f"{label}: cannot read: {e}") from None
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"{label}: invalid TOML: {e}") from None
            cfg = _merge(data, label, cfg)
    cfg, overridden = _apply(cfg, overrides)
    _cross_check(cfg, lambda a, b: CMDLINE if {a, b} & overridden else label)
    return cfg
