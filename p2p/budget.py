"""Budgets for what a stranger can make this node hold: buffered bytes and connections.

Plain counting objects, no I/O: the query service charges a :class:`ByteBudget` for the frame
bytes it buffers, the web socket server one for message bytes, and the libp2p host asks a
:class:`ConnectionGate` before it spends a Noise handshake on an inbound TCP connection.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Hashable

from ..node.limits import REFUSAL_LOG_EVERY as LOG_EVERY


def network_key(ip: str) -> str:
    """What one remote host is counted as: its IPv4 address, or its IPv6 /64 (a host on a
    SLAAC network can use any address of its /64)."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.ip_network(f"{addr}/64", strict=False))
    return str(addr)


class ByteBudget:
    """Bytes reserved against a total and against each key's share (a peer, a client).

    ``reserve`` either takes all of ``n`` or nothing; every successful reserve is paired with
    one ``release`` of the same amount (callers use try/finally)."""

    def __init__(self, total: int, per_key: int | None = None) -> None:
        if total < 1 or (per_key is not None and per_key < 1):
            raise ValueError("budgets must be >= 1 byte")
        self.total = total
        self.per_key = per_key if per_key is not None else total
        self.used = 0
        self._by_key: dict[Hashable, int] = {}

    def used_by(self, key: Hashable) -> int:
        return self._by_key.get(key, 0)

    def reserve(self, key: Hashable, n: int) -> bool:
        if n < 0:
            raise ValueError("cannot reserve a negative amount")
        mine = self._by_key.get(key, 0)
        if self.used + n > self.total or mine + n > self.per_key:
            return False
        self.used += n
        self._by_key[key] = mine + n
        return True

    def release(self, key: Hashable, n: int) -> None:
        mine = self._by_key.get(key, 0)
        if n > mine:
            raise ValueError(f"releasing {n} bytes for {key!r}, which holds {mine}")
        self.used -= n
        if mine == n:
            del self._by_key[key]
        else:
            self._by_key[key] = mine - n

    def why_not(self, key: Hashable, n: int) -> str:
        """One phrase saying which limit a refused ``reserve(key, n)`` hit."""
        if self._by_key.get(key, 0) + n > self.per_key:
            return f"over the per-peer budget of {self.per_key} buffered bytes"
        return f"over the budget of {self.total} buffered bytes this node holds for all peers"


class Counter:
    """How many of something each key holds at once, with a cap per key."""

    def __init__(self, per_key: int) -> None:
        self.per_key = per_key
        self._by_key: dict[Hashable, int] = {}

    def __getitem__(self, key: Hashable) -> int:
        return self._by_key.get(key, 0)

    def take(self, key: Hashable) -> bool:
        n = self._by_key.get(key, 0)
        if n >= self.per_key:
            return False
        self._by_key[key] = n + 1
        return True

    def give(self, key: Hashable) -> None:
        n = self._by_key.get(key, 0) - 1
        if n <= 0:
            self._by_key.pop(key, None)
        else:
            self._by_key[key] = n


class ConnectionGate:
    """Admission of inbound connections before their handshake, by remote network.

    A connection is ``pending`` from accept until its Noise + Yamux upgrade finishes, then
    ``open`` until it closes. A network may hold ``pending_per_ip`` of the first and
    ``open_per_ip`` connections in all (pending included); the node ``total`` inbound ones.
    """

    def __init__(
        self,
        *,
        pending_per_ip: int = 16,
        open_per_ip: int = 32,
        total: int = 256,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if min(pending_per_ip, open_per_ip, total) < 1:
            raise ValueError("connection limits must be >= 1")
        self.pending = Counter(pending_per_ip)
        self.open = Counter(open_per_ip)
        self.total = total
        self.inbound = 0
        self.refused = 0  # connections refused since start
        self.clock = clock
        # Set by the node: a peer it has blocked (its connections are closed once the handshake
        # has shown who it is, before any protocol runs on them).
        self.refuse_peer: Callable[[str], bool] = lambda peer_id: False
        self._logged: dict[str, float] = {}

    def admit(self, key: str) -> str | None:
        """Count a new inbound connection from ``key``; None if admitted, else why not."""
        if self.inbound >= self.total:
            why = f"{self.total} inbound connections open in all"
        elif self.open[key] >= self.open.per_key:
            why = f"{self.open.per_key} connections open from this address"
        elif self.pending[key] >= self.pending.per_key:
            why = f"{self.pending.per_key} handshakes pending from this address"
        else:
            self.inbound += 1
            self.open.take(key)
            self.pending.take(key)
            return None
        self.refused += 1
        return why

    def upgraded(self, key: str) -> None:
        """The handshake of an admitted connection finished."""
        self.pending.give(key)

    def closed(self, key: str, *, upgraded: bool) -> None:
        """An admitted connection ended (``upgraded``: after ``upgraded`` was called)."""
        if not upgraded:
            self.pending.give(key)
        self.open.give(key)
        self.inbound -= 1

    def should_log(self, key: str) -> bool:
        """True at most once per ``LOG_EVERY`` seconds per key (memory bounded)."""
        now = self.clock()
        if len(self._logged) > 4096:
            self._logged = {k: t for k, t in self._logged.items() if now - t < LOG_EVERY}
        last = self._logged.get(key)
        if last is not None and now - last < LOG_EVERY:
            return False
        self._logged[key] = now
        return True
