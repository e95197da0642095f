"""Addresses a peer can use: what this node advertises, and what it keeps of others' addresses.

A listen address of ``0.0.0.0`` or ``::`` is something nobody can dial: it is expanded to the
host's interface addresses. Loopback and link-local addresses mean nothing off this host, so they
are advertised only by a node that has nothing else (every listener on loopback: a node that can
only be reached from this machine anyway). Addresses the operator knows (``p2p.announce``: a port
forward, a DNS name) come first; addresses that independent peers observed and confirmed come
next. Pure functions except :func:`interface_addresses`, which reads the kernel's tables.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..node.limits import ADDRS_PARSED_KEPT

MAX_ADVERTISED = 16
MAX_PRIVATE = 8


@dataclass(frozen=True)
class Parsed:
    proto: str  # ip4 | ip6 | dns4 | dns6 | dns
    host: str
    port: int
    rest: str  # everything after /tcp/<port>, e.g. "/p2p/Qm..." or ""


@functools.lru_cache(maxsize=ADDRS_PARSED_KEPT)
def parse(addr: str) -> Parsed | None:
    """``/ip4|ip6|dns|dns4|dns6/<host>/tcp/<port>[/...]`` or None for anything else (kept for
    the last few thousand addresses: the node's timers ask about the same ones every second)."""
    parts = addr.split("/")
    if len(parts) < 5 or parts[0] != "" or parts[3] != "tcp":
        return None
    proto, host, port = parts[1], parts[2], parts[4]
    if proto not in ("ip4", "ip6", "dns", "dns4", "dns6") or not port.isdigit():
        return None
    return Parsed(proto, host, int(port), "/" + "/".join(parts[5:]) if len(parts) > 5 else "")


def _ip(p: Parsed) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if p.proto not in ("ip4", "ip6"):
        return None
    try:
        return ipaddress.ip_address(p.host)
    except ValueError:
        return None


@functools.lru_cache(maxsize=ADDRS_PARSED_KEPT)
def scope(addr: str) -> str:
    """``unspecified``, ``loopback``, ``link-local``, ``private``, ``public``, ``dns``,
    ``relay`` (a ``/p2p-circuit`` address) or ``invalid``."""
    if "/p2p-circuit" in addr:
        return "relay"
    p = parse(addr)
    if p is None:
        return "invalid"
    if p.proto.startswith("dns"):
        return "dns"
    ip = _ip(p)
    if ip is None:
        return "invalid"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    return "public" if ip.is_global else "private"


def interface_addresses() -> list[str]:
    """Every IPv4 and IPv6 address of this host's interfaces (this network namespace's)."""
    out: list[str] = []
    out += _ipv4_addresses()
    try:
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            hexaddr = line.split()[0]
            out.append(str(ipaddress.IPv6Address(bytes.fromhex(hexaddr))))
    except (OSError, ValueError, IndexError):
        pass
    return out


def _ipv4_addresses() -> list[str]:
    """IPv4 addresses from /proc/net/fib_trie's local host routes (every address, not only the
    primary one per interface that SIOCGIFADDR would give)."""
    found: list[str] = []
    try:
        lines = Path("/proc/net/fib_trie").read_text().splitlines()
    except OSError:
        return _ipv4_fallback()
    last_ip = ""
    for line in lines:
        s = line.strip()
        if s.startswith("|-- ") or s.startswith("+-- "):
            last_ip = s[4:].split("/")[0].strip()
        elif s == "/32 host LOCAL" and last_ip and last_ip not in found:
            found.append(last_ip)
    return found or _ipv4_fallback()


def _ipv4_fallback() -> list[str]:
    try:
        return sorted({str(i[4][0]) for i in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)})
    except OSError:
        return ["127.0.0.1"]


def expand(addrs: Iterable[str], interfaces: Sequence[str]) -> list[str]:
    """Replace each unspecified listen address with one address per interface address of the same
    family, keeping the port and any suffix; other addresses pass unchanged."""
    out: list[str] = []
    for a in addrs:
        p = parse(a)
        ip = _ip(p) if p else None
        if p is None or ip is None or not ip.is_unspecified:
            out.append(a)
            continue
        for iface in interfaces:
            try:
                iip = ipaddress.ip_address(iface.split("%")[0])
            except ValueError:
                continue
            if iip.version == ip.version:
                out.append(f"/{p.proto}/{iip}/tcp/{p.port}{p.rest}")
    return list(dict.fromkeys(out))


def advertisable(
    listening: Iterable[str],
    *,
    interfaces: Sequence[str],
    announce: Sequence[str] = (),
    observed: Sequence[str] = (),
    relayed: Sequence[str] = (),
) -> list[str]:
    """The addresses this node tells others: announce first, then public, observed, private,
    relayed; loopback and link-local only if there is nothing else at all."""
    expanded = expand(listening, interfaces)
    good: dict[str, None] = {}
    local_only: dict[str, None] = {}
    for a in [*announce, *expanded, *observed]:
        s = scope(a)
        if s in ("loopback", "link-local"):
            local_only[a] = None
        elif s in ("public", "private", "dns"):
            good[a] = None
    rank = {"dns": 0, "public": 1, "private": 2}
    order = list(good)
    ordered = [a for a in announce if a in good] + sorted(
        (a for a in order if a not in announce and scope(a) != "private"), key=lambda a: rank[scope(a)]
    )
    # Relay addresses before private ones: behind NAT they are the only ones that work from
    # outside, and many docker/VPN interfaces must not push them past the cap.
    ordered += [r for r in relayed if scope(r) == "relay"]
    ordered += [a for a in order if a not in announce and scope(a) == "private"][:MAX_PRIVATE]
    if not ordered:
        ordered = list(local_only)
    return list(dict.fromkeys(ordered))[:MAX_ADVERTISED]


def usable_by(addr: str, *, same_host: bool) -> bool:
    """Would dialing ``addr`` (a peer's address) make sense from here?"""
    s = scope(addr)
    if s in ("unspecified", "invalid"):
        return False
    if s in ("loopback", "link-local"):
        return same_host
    return True


def tcp_addr(ip: str, port: int) -> str:
    """``/ip4/<ip>/tcp/<port>`` or ``/ip6/...`` for an address as sockets report it."""
    return f"/ip6/{ip}/tcp/{port}" if ":" in ip else f"/ip4/{ip}/tcp/{port}"


def with_peer(addr: str, peer_id: str) -> str:
    return addr if addr.endswith(f"/p2p/{peer_id}") else f"{addr}/p2p/{peer_id}"


def without_peer(addr: str, peer_id: str) -> str:
    suffix = f"/p2p/{peer_id}"
    return addr[: -len(suffix)] if addr.endswith(suffix) else addr
