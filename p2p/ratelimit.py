"""Rate limits, one token bucket per key: a client's query submissions, a gossip forwarder's records.

A bucket holds at most ``burst`` tokens and refills at ``per_minute / 60`` tokens a second; a
submission takes one. Keys are chosen by the caller (node/control.py: a remote client's IP
address, or a local user's GUID; p2p/gossip.py: the forwarding peer). Memory stays bounded
however many keys a hostile client makes up: buckets that have refilled completely carry no
state worth keeping and are dropped once there are more than ``max_keys``; if every bucket is
still draining, the least recently used go first. (The caller keys IPv6 clients by their /64,
so one host cannot make up keys.)
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable

from .budget import network_key


class RateLimiter:
    def __init__(
        self,
        per_minute: float,
        burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 4096,
    ) -> None:
        if per_minute < 0 or burst < 1 or max_keys < 1:
            raise ValueError("per_minute must be >= 0, burst and max_keys >= 1")
        self.per_second = per_minute / 60.0
        self.burst = float(burst)
        self.clock = clock
        self.max_keys = max_keys
        self._buckets: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)
        self._reported: set[Hashable] = set()  # keys refused and logged already

    @property
    def enabled(self) -> bool:
        return self.per_second > 0

    def __len__(self) -> int:
        return len(self._buckets)

    def _level(self, key: Hashable, now: float) -> float:
        tokens, at = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + (now - at) * self.per_second)

    def take(self, key: Hashable) -> float:
        """Take one token for ``key``: 0.0 if allowed, else the seconds until one is available."""
        if not self.enabled:
            return 0.0
        now = self.clock()
        level = self._level(key, now)
        if level < 1.0 - 1e-9:  # float refill: a retry at exactly the advertised wait succeeds
            self._buckets[key] = (level, now)
            self._buckets.move_to_end(key)
            return (1.0 - level) / self.per_second
        self._buckets[key] = (level - 1.0, now)
        self._buckets.move_to_end(key)
        if len(self._buckets) > self.max_keys:
            self._prune(now)
        return 0.0

    def first_refusal(self, key: Hashable) -> bool:
        """True the first time ``key`` is refused (so an operator sees one log line per client,
        not one per refused request); remembers at most max_keys of them."""
        if key in self._reported or len(self._reported) >= self.max_keys:
            return False
        self._reported.add(key)
        return True

    def _prune(self, now: float) -> None:
        """Drop down to half of max_keys, so the next prune is max_keys / 2 new keys away: full
        buckets first (nothing is lost), then the least recently used ones."""
        target = self.max_keys // 2
        for key in [k for k in self._buckets if self._level(k, now) >= self.burst]:
            del self._buckets[key]
        while len(self._buckets) > target:
            self._buckets.popitem(last=False)


def client_network(client: str) -> str:
    """What one remote client is counted as: its IPv4 address, or its IPv6 /64 (a host on a
    SLAAC network can use any address of its /64). The same rule as for peers' connections."""
    return network_key(client)
