"""Protocol violations by peers: each one counts against the peer in the table, is logged once a
minute per peer, and past VIOLATION_LIMIT in a minute the peer is disconnected and blocked."""

from __future__ import annotations

import logging
from collections import deque

import trio

from ..p2p.host import FederationHost, libp2p_id
from ..p2p.peers import PeerTable
from ..realms.events import FailureKind
from .limits import VIOLATION_BLOCK, VIOLATION_LIMIT, VIOLATION_WINDOW
from .limits import VIOLATIONS_TRACKED as MAX_TRACKED

log = logging.getLogger("rentahal.node")

QUEUED_REPORTS = 64  # reports from where nothing may wait, before more are dropped


class Violations:
    def __init__(self, table: PeerTable, fh: FederationHost) -> None:
        self.table, self.fh = table, fh
        self._recent: dict[str, deque[float]] = {}  # peer -> times of its recent violations
        self._send, self._receive = trio.open_memory_channel[tuple[str, str]](QUEUED_REPORTS)

    def report(self, peer_id: str, reason: str) -> None:
        """A violation seen where nothing may wait (pubsub's validator): counted soon after, or,
        with QUEUED_REPORTS already waiting, dropped (the flood is counted well enough)."""
        try:
            self._send.send_nowait((peer_id, reason))
        except trio.WouldBlock:
            pass

    async def run(self) -> None:
        async for peer_id, reason in self._receive:
            await self.count(peer_id, reason)

    async def count(self, peer_id: str, reason: str) -> None:
        """Count a protocol violation: one log line per peer per minute, and past
        VIOLATION_LIMIT in a minute the peer is disconnected and blocked for a while."""
        self.table.record_failure(peer_id, FailureKind.PROTOCOL, reason)
        now = trio.current_time()
        if len(self._recent) > MAX_TRACKED:
            self._recent.clear()
        times = self._recent.setdefault(peer_id, deque())
        times.append(now)
        while times and times[0] < now - VIOLATION_WINDOW:
            times.popleft()
        if len(times) == 1:  # the first in a minute: said once, however many follow
            log.warning("protocol violation by %s: %s", peer_id, reason)
        if len(times) >= VIOLATION_LIMIT and not self.table.is_blocked(peer_id):
            self.table.penalize(
                peer_id,
                VIOLATION_BLOCK,
                f"{len(times)} protocol violations in {VIOLATION_WINDOW:g}s (last: {reason[:100]})",
            )
            log.warning(
                "blocked peer %s for %gs: %d protocol violations in %gs",
                peer_id, VIOLATION_BLOCK, len(times), VIOLATION_WINDOW,
            )  # fmt: skip
            with trio.move_on_after(2):
                try:
                    await self.fh.host.disconnect(libp2p_id(peer_id))
                except Exception as exc:  # it may be gone already
                    log.debug("disconnecting %s: %s", peer_id, exc)
