"""Peers remembered across restarts: the addresses of connected peers are stored as they change,
and a restarted node dials the ones it was connected to (within a week), so it rejoins without
its bootstrap list."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from ..p2p import addrs as addrlib
from ..p2p.host import FederationHost
from ..p2p.peers import PeerTable
from .limits import (
    MAX_REMEMBERED,
    REMEMBER_INTERVAL,
    REMEMBER_LOOK,
    REMEMBER_PEERS_FOR,
    REMEMBER_REFRESH,
    REMEMBERED_PEERS,
)
from .storage import Storage

log = logging.getLogger("rentahal.node")


class PeerMemory:
    def __init__(
        self, storage: Storage, table: PeerTable, fh: FederationHost, self_id: str,
        dial: Callable[[str], Awaitable[None]],
    ) -> None:  # fmt: skip
        self.storage, self.table, self.fh, self.self_id, self.dial = storage, table, fh, self_id, dial

    def addrs_to_remember(self, peer_id: str) -> list[str]:
        """Addresses of a connected peer worth redialing after a restart: those this node
        dialed it on, and those it claims on the IP address its connection comes from (or, over
        a relay, its relay addresses). Loopback only between local-only nodes."""
        entry = self.table.get(peer_id)
        facts = self.fh.connection(peer_id)
        if entry is None or facts is None:
            return []
        remote, _, relayed = facts
        parsed = None if relayed else addrlib.parse(remote)
        seen_ip = parsed.host if parsed else ""
        keep = list(reversed(entry.verified))
        for a in entry.addrs:
            p = addrlib.parse(a)
            if (relayed and "/p2p-circuit" in a) or (p is not None and seen_ip and p.host == seen_ip):
                keep.append(addrlib.without_peer(a, peer_id))
        local = self.fh.local_only()
        return [a for a in dict.fromkeys(keep) if local or addrlib.scope(a) not in ("loopback", "link-local")][:8]

    async def remember(self) -> None:
        """Persist connected peers' addresses when they change, so a restart can rejoin. Looks
        after each new connection (a new peer) and every REMEMBER_LOOK seconds (a known peer's
        new addresses), never twice within REMEMBER_INTERVAL."""
        # peer -> (addresses stored, when, what they were worked out from)
        saved: dict[str, tuple[list[str], float, object]] = {}
        while True:
            change = self.fh.next_connection_change()
            new = unsettled = 0
            now = trio.current_time()
            local = self.fh.local_only()
            for pid in self.fh.connected_peers():
                entry = self.table.get(pid)
                last = saved.get(pid)
                basis = (entry.addrs, entry.verified, self.fh.connection(pid), local) if entry else None
                if last is not None and last[2] == basis and now - last[1] <= REMEMBER_REFRESH:
                    continue  # nothing it is worked out from changed
                addrs = self.addrs_to_remember(pid)
                # Written when the addresses change, and every few minutes to keep last_seen fresh.
                if addrs and (last is None or last[0] != addrs or now - last[1] > REMEMBER_REFRESH):
                    try:
                        await self.storage.note_peer(pid, addrs)
                        new += pid not in saved
                        saved[pid] = (addrs, now, basis)
                    except Exception as exc:  # a storage hiccup costs the memory of one peer only
                        log.debug("could not remember peer %s: %s", pid, exc)
                elif last is not None:
                    saved[pid] = (last[0], last[1], basis)
                else:
                    unsettled += 1  # no address worth keeping yet (its record is still to come)
            if new:
                log.info("remembered %d more peer(s) to rejoin through after a restart (%d in all)", new, len(saved))
            if len(saved) > MAX_REMEMBERED:
                saved.clear()
            with trio.move_on_after(REMEMBER_INTERVAL if unsettled else REMEMBER_LOOK):
                await change.wait()
            await trio.sleep_until(now + REMEMBER_INTERVAL)

    async def rejoin(self) -> None:
        """Dial the peers this node was connected to before it restarted."""
        try:
            known = await self.storage.known_peers(max_age=REMEMBER_PEERS_FOR, limit=REMEMBERED_PEERS)
        except Exception as exc:
            log.warning("could not read remembered peers: %s", exc)
            return
        if not known:
            return
        log.info("rejoining through %d remembered peer(s)", len(known))
        async with trio.open_nursery() as nursery:
            for pid, addrs in known.items():
                if pid == self.self_id:
                    continue
                for a in reversed(addrs):
                    self.table.verify_addr(pid, a)
                self.table.hear_of(pid, source="remembered")
                nursery.start_soon(self.dial, pid)
