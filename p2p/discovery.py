"""Realm discovery in the Kademlia DHT: provide the realms this node serves, and find providers
when the router has no candidate for a realm.

Provider records are keyed by the realm's CIDv1 (see host.realm_cid), so go and js peers find
them too. DHT answers are hints (py-libp2p returns stale and duplicate providers): a found peer
is dialed, and becomes a candidate only once it is connected and gossips a fresh record.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

import trio

from ..node.limits import LOOKUP_MAX_DIALS as MAX_DIALS
from ..node.limits import LOOKUP_TIMEOUT, PROVIDE_TIMEOUT
from .host import FederationHost
from .peers import PeerTable

log = logging.getLogger("rentahal.p2p")


class RealmDiscovery:
    def __init__(
        self,
        fh: FederationHost,
        table: PeerTable,
        *,
        refresh: float,
        dial: Callable[[str], Awaitable[None]],
    ) -> None:
        self.fh = fh
        self.table = table
        self.refresh = refresh
        self.dial = dial  # dial a peer, logging (not raising) a failure
        self._records_changed = trio.Event()
        # counters for /metrics: provide rounds that stored / failed, lookups and what they found
        self.provides_ok = self.provides_failed = self.lookups = self.lookups_failed = self.providers_found = 0

    def records_changed(self) -> None:
        """Called by the node whenever the peer table took a new health record."""
        self._records_changed.set()
        self._records_changed = trio.Event()

    async def advertise(self, served: Sequence[str]) -> None:
        """Provide each served realm now and every ``refresh`` seconds."""
        while True:
            for realm in served:
                try:
                    with trio.fail_after(PROVIDE_TIMEOUT):
                        ok = await self.fh.provide_realm(realm)
                    log.debug("dht: provided %s (%s)", realm, "stored" if ok else "no peer took it")
                    self.provides_ok += int(bool(ok))
                    self.provides_failed += int(not ok)
                except Exception as exc:  # the DHT may have no peers yet; try again next round
                    self.provides_failed += 1
                    log.debug("dht: provide %s failed: %s", realm, exc)
            await trio.sleep(self.refresh)

    async def discover(self, realm: str) -> None:
        """Fill the peer table from the DHT, then wait until a provider is a live candidate
        (the caller bounds the wait)."""
        self.lookups += 1
        try:
            with trio.fail_after(LOOKUP_TIMEOUT):
                found = await self.fh.find_realm_providers(realm)
        except Exception as exc:
            self.lookups_failed += 1
            log.info("dht: lookup for %s failed: %s", realm, exc)
            return
        self.providers_found += len(found)
        fresh = [p for p in found if (e := self.table.get(p)) is None or e.record is None]
        unconnected = [p for p in found if (e := self.table.get(p)) is None or not e.connected]
        log.info("dht: %d provider(s) of %s, %d new", len(found), realm, len(fresh))
        async with trio.open_nursery() as nursery:
            for pid in unconnected[:MAX_DIALS]:
                self.table.hear_of(pid, found[pid], source="dht")
                nursery.start_soon(self.dial, pid)
        while self.table.live_count(realm) == 0:
            await self._records_changed.wait()
