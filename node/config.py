"""Node configuration: node.toml, validated once on load into frozen structs.

This is the only module that reads TOML. Each table is a msgspec struct below: its keys, their
types and bounds, and their defaults (mirrored, with comments, in the shipped ``node.toml``),
checked by realms/schema.py like every payload and control request. Every problem is reported
as a :class:`ConfigError` whose ``str()`` is one line: ``<file or "command line">: <key>: <what>``.
"""

from __future__ import annotations

import difflib
import ipaddress
import operator
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, TypeVar

import msgspec
from msgspec import Meta

from ..p2p.wire import MAX_PAYLOAD
from ..realms.catalog import CATALOG, REALMS
from ..realms.schema import check, number, show

LOG_LEVELS = ("debug", "info", "warning", "error")
CMDLINE = "command line"


class ConfigError(Exception):
    """A bad configuration file, key, type or value; ``str()`` is a single line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.splitlines()))


S = TypeVar("S", bound="Section")


# --- field types (checked by msgspec through realms/schema.py) -------------------------------


def Num(lo: float, hi: float, *, lo_open: bool = False) -> Any:
    """A finite number in lo..hi (or > lo, with lo_open); a TOML integer is taken too."""
    return Annotated[float, Meta(gt=lo, le=hi) if lo_open else Meta(ge=lo, le=hi)]


def Int(lo: int, hi: int) -> Any:
    """An integer in lo..hi (true and false are not integers)."""
    return Annotated[int, Meta(ge=lo, le=hi)]


def Text(max_length: int, description: str) -> Any:
    """A string of printable characters (checked in the section's __post_init__)."""
    return Annotated[str, Meta(max_length=max_length, description=description)]


def One(*values: str) -> Any:
    """One of the strings ``values``."""
    return Annotated[
        str, Meta(pattern="^(" + "|".join(map(re.escape, values)) + ")$", description="one of " + "|".join(values))
    ]


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


_MADDR = re.compile(r"/(?P<proto>ip4|ip6)/(?P<addr>[^/\s]+)/tcp/(?P<port>\d{1,5})(?P<rest>(?:/[^/\s]+)*)")
_PEER_SUFFIX = re.compile(r"(?:/[^/\s]+)*/p2p/[1-9A-HJ-NP-Za-km-z]+")


def _check_multiaddr(v: str, need_peer: bool) -> str:
    shape = "/ip4|ip6/<address>/tcp/<port>" + ("/.../p2p/<peer id>" if need_peer else "")
    m = _MADDR.fullmatch(v)
    if m is None or not _is_ip(m["addr"]) or (m["proto"] == "ip6") != (":" in m["addr"]):
        raise ValueError(f"expected a multiaddr {shape}, got {show(v)}")
    if int(m["port"]) > 65535:
        raise ValueError(f"tcp port {m['port']} is out of range 0..65535 in {show(v)}")
    if need_peer and not _PEER_SUFFIX.fullmatch(m["rest"]):
        raise ValueError(f"expected a multiaddr ending in /p2p/<base58 peer id>, got {show(v)}")
    return v


_DNS_MADDR = re.compile(r"/dns[46]?/(?P<name>[A-Za-z0-9.-]{1,253})/tcp/(?P<port>\d{1,5})")


def _check_announce(v: str) -> str:
    """An address the operator knows this node is reachable at: an IP or a DNS name, no /p2p/."""
    m = _DNS_MADDR.fullmatch(v)
    if m is not None:
        if not 1 <= int(m["port"]) <= 65535:
            raise ValueError(f"tcp port {m['port']} is out of range 1..65535 in {show(v)}")
        return v
    if "/p2p/" in v:
        raise ValueError(f"an announce address names no peer (this node's /p2p/ is added), got {show(v)}")
    try:
        return _check_multiaddr(v, False)
    except ValueError:
        raise ValueError(
            f"expected /ip4|ip6/<address>/tcp/<port> or /dns4|dns6/<name>/tcp/<port>, got {show(v)}"
        ) from None


def _each(name: str, items: tuple[str, ...], check: Callable[[str], object]) -> None:
    """``check`` every item of the list setting ``name``; the error names the item."""
    for i, item in enumerate(items):
        try:
            check(item)
        except ValueError as e:
            raise ValueError(f"{name}: item {i}: {e}") from None


MultiAddrs = Annotated[tuple[str, ...], Meta(description="a list of multiaddr strings")]
_PEER_ID = "^[1-9A-HJ-NP-Za-km-z]{32,128}$"
PeerIds = Annotated[
    tuple[Annotated[str, Meta(pattern=_PEER_ID, description="a base58 peer ID")], ...],
    Meta(description="a list of peer IDs"),
]
# Web origins (scheme://host[:port], no path) allowed to drive the websocket.
Origin = Annotated[
    str,
    Meta(pattern=r"^https?://[A-Za-z0-9.\-\[\]:]{1,260}$", description="an origin scheme://host[:port] with no path"),
]
Origins = Annotated[tuple[Origin, ...], Meta(description='a list of origins like "http://192.0.2.7:3000"')]


class Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A node.toml table: its keys, their types and bounds (msgspec), and its defaults."""


# --- the configuration objects ---------------------------------------------------------------


class NodeSection(Section):
    name: Text(64, "<= 64 printable characters") = ""
    log_level: One(*LOG_LEVELS) = "info"
    # "text" (one line per event) or "json" (one JSON object per line, for journald/Loki/ELK)
    log_format: One("text", "json") = "text"

    def __post_init__(self) -> None:
        if not self.name.isprintable():
            raise ValueError(f"name: expected <= 64 printable characters, got {show(self.name)}")


class P2PConfig(Section):
    listen: MultiAddrs = ("/ip4/0.0.0.0/tcp/4001",)
    bootstrap: MultiAddrs = ()
    announce: MultiAddrs = ()
    mdns: bool = True
    relay_service: One("auto", "on", "off") = "auto"
    relay_reservations: Int(1, 10000) = 32
    relay_duration: Num(1.0, 86400.0) = 1800.0
    relay_bytes: Int(1024, 1 << 40) = 128 * 1024 * 1024
    relay_circuits: Int(1, 1000) = 4
    health_interval: Num(0.2, 60.0) = 1.0
    health_heartbeat: Num(0.2, 600.0) = 10.0
    stale_after: Num(0.0, 3600.0, lo_open=True) = 25.0
    gossip_per_second: Num(1.0, 1e6) = 100.0
    introductions_per_minute: Num(1.0, 1e6) = 60.0
    dht_refresh: Num(5.0, 86400.0) = 300.0
    dial_timeout: Num(0.0, 120.0, lo_open=True) = 10.0
    forget_after: Num(10.0, 30 * 86400.0) = 600.0

    def __post_init__(self) -> None:
        _each("listen", self.listen, lambda v: _check_multiaddr(v, False))
        _each("bootstrap", self.bootstrap, lambda v: _check_multiaddr(v, True))
        _each("announce", self.announce, _check_announce)


class RouterConfig(Section):
    query_deadline: Num(1.0, 86400.0) = 300.0
    hang_timeout: Num(1.0, 3600.0) = 1.5
    first_progress: Num(0.5, 3600.0) = 5.0
    spot_check_every: Num(0.0, 86400.0) = 1800.0
    max_attempts: Int(1, 16) = 3
    local_queue_limit: Int(0, 10000) = 4
    breaker_failures: Int(1, 100) = 3
    breaker_backoff: Num(0.1, 3600.0) = 5.0
    breaker_backoff_max: Num(0.1, 86400.0) = 300.0
    score_half_life: Num(1.0, 86400.0) = 60.0


class UIConfig(Section):
    host: Annotated[str, Meta(description="an IPv4/IPv6 address or 'localhost'")] = "127.0.0.1"
    port: Int(0, 65535) = 8765
    # Pages other than the node's own that may open its websocket (the node's own page, opened
    # by IP address or as localhost, always may).
    allowed_origins: Origins = ()

    def __post_init__(self) -> None:
        if not (self.host == "localhost" or _is_ip(self.host)):
            raise ValueError(f"host: expected an IPv4/IPv6 address or 'localhost', got {show(self.host)}")
        msgspec.structs.force_setattr(self, "allowed_origins", tuple(o.lower() for o in self.allowed_origins))


API_KEY_MODES = ("remote", "all", "none")


class ApiConfig(Section):
    """The OpenAI-compatible API and /metrics on the UI port."""

    enabled: bool = True
    # Which clients must show an API key (`rentahal-node keys create`): "remote" (any client
    # not on loopback), "all", or "none" (only sensible on a trusted network).
    keys: One(*API_KEY_MODES) = "remote"
    # /metrics: whether a client off loopback must show a key too (Prometheus sends one as a
    # bearer token: `authorization` in its scrape config).
    metrics_need_key: bool = True
    # Largest request body (JSON, or a multipart upload for transcriptions), in bytes.
    max_body_bytes: Int(1024, 1 << 30) = 12 * 1024 * 1024


class StorageConfig(Section):
    shards: Int(1, 64) = 4
    # No more than a query request frame carries: a payload a peer cannot be sent is refused.
    max_payload_bytes: Int(1024, MAX_PAYLOAD) = MAX_PAYLOAD


class LimitsConfig(Section):
    queries_per_minute: Num(0.0, 1e6) = 30.0
    burst: Int(1, 100000) = 10
    loopback: bool = False
    max_active: Int(1, 100000) = 64
    peer_queries_per_minute: Num(0.0, 1e6) = 60000.0
    peer_burst: Int(1, 100000) = 1000
    peer_streams: Int(1, 1024) = 8
    peer_buffer_bytes: Int(64 * 1024, 1 << 34) = 16 * 1024 * 1024
    buffer_bytes: Int(64 * 1024, 1 << 36) = 64 * 1024 * 1024
    inbound_per_ip: Int(1, 100000) = 32
    pending_per_ip: Int(1, 100000) = 16
    inbound_total: Int(1, 1000000) = 256
    handshake_timeout: Num(0.0, 600.0, lo_open=True) = 10.0
    ws_buffer_bytes: Int(64 * 1024, 1 << 36) = 64 * 1024 * 1024
    ws_chat_bytes: Int(1024, 1 << 30) = 1024 * 1024
    ws_request_bytes: Int(1024, 1 << 30) = 64 * 1024


class RealmConfig(Section):
    serve: bool = False
    model: str = ""
    slots: Int(1, 64) = 1
    queue_limit: Int(1, 100000) = 16
    n_ctx: Int(16, 1048576) = 2048
    n_gpu_layers: Int(-1, 100000) = -1
    threads: Int(0, 512) = 0
    max_tokens: Int(1, 1048576) = 512
    mmproj: str = ""
    max_steps: Int(1, 1000) = 50
    max_pixels: Int(4096, 64 * 1024 * 1024) = 1024 * 1024
    cost_per_query: Num(0.0, 1e9) = 0.0
    cost_per_second: Num(0.0, 1e9) = 0.0
    cost_per_token: Num(0.0, 1e9) = 0.0
    # An external model server instead of a local model (realms/catalog.py says which realms):
    # its base URL, its API ("openai": any OpenAI-compatible server; "anthropic": the messages
    # API), the model to ask it for, and where its key is (an environment variable or a 0600
    # file: never node.toml).
    url: Annotated[str, Meta(pattern=r"^(|https?://.*)$", description="an http:// or https:// URL")] = ""
    api: One("openai", "anthropic") = "openai"
    remote_model: Text(256, "<= 256 printable characters") = ""
    key_env: Annotated[str, Meta(pattern=r"^\w*$", description="an environment variable name")] = ""
    key_file: str = ""
    allow: PeerIds = ()  # serve this realm to these peers only (empty: to all)
    trusted: PeerIds = ()  # route this realm to these peers only (empty: any)

    def __post_init__(self) -> None:
        if not self.remote_model.isprintable():
            raise ValueError(f"remote_model: expected <= 256 printable characters, got {show(self.remote_model)}")


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
    **{f"{s}.{f.name}": f.default for s, c in _SECTIONS.items() for f in msgspec.structs.fields(c)},
    **{
        f"realms.{r}.{f.name}": f.default
        for r in REALMS
        for f in msgspec.structs.fields(RealmConfig)
        if f.name in CATALOG[r].settings
    },
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


def _section(cls: type[S], table: Any, prefix: str, label: str, base: S) -> S:
    """``table`` (a TOML table or a one-key override) on top of ``base``: msgspec checks every
    key of the merged section; unknown keys get a did-you-mean among all dotted keys."""
    if not isinstance(table, dict):
        raise ConfigError(f"{label}: {prefix}: expected a table, got {show(table)}")
    spec = {f.name for f in msgspec.structs.fields(cls)}
    for key in table:
        dotted = f"{prefix}.{key}"
        if key not in spec and key in ("key", "api_key", "token"):
            raise ConfigError(
                f"{label}: {dotted}: keys never go in node.toml; name an environment variable "
                f"({prefix}.key_env) or a 0600 file ({prefix}.key_file)"
            )
        if key not in spec:
            near = [k for k in _LEAVES if k.startswith(prefix + ".")]
            raise _unknown(label, dotted, near or _LEAVES)
    merged = {**msgspec.structs.asdict(base), **table}
    return check(merged, cls, prefix, lambda line: ConfigError(f"{label}: {line}"))


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
                raise ConfigError(f"{label}: realms: expected a table, got {show(table)}")
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
                f"{label_of(key, other)}: {key}: must be {wording} {other} ({number(limit)}), got {number(value)}"
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
        raise ConfigError(f"{CMDLINE}: --set {show(text)}: expected KEY=VALUE")
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
