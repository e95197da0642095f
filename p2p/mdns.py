"""LAN discovery with mDNS (the libp2p mDNS spec, ``_p2p._udp.local``): nodes on one LAN find each
other when nobody typed an address.

py-libp2p 0.8.1's ``MDNSDiscovery`` is used by hand, not through ``new_host(enable_mDNS=True)``
(measured in the testbed): that path advertises the raw listen addresses (``0.0.0.0``, which
dials this very host), registers the service with a blocking ~1.6 s call on the event loop, and
delivers peers from zeroconf's threads to a process-global callback. Here the service carries
only the node's advertised LAN addresses, zeroconf starts and stops in a worker thread, and each
discovered peer crosses into trio through a bounded channel. A node whose addresses are all
loopback has nobody on the LAN to tell and runs no mDNS at all. A discovered peer is a stranger
like any other: it is dialed (at most ``MAX_DIALS_PER_MINUTE``) and must then gossip its record.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ..node.limits import MDNS_DIALS_PER_MINUTE as MAX_DIALS_PER_MINUTE
from . import addrs as addrlib
from .host import FederationHost

log = logging.getLogger("rentahal.p2p")


class _NoPeerstore:
    """Takes and forgets what mDNS's listener would write into the peer store."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


class LanDiscovery:
    def __init__(self, fh: FederationHost, on_peer: Callable[[str, tuple[str, ...]], Awaitable[None]]) -> None:
        self.fh = fh
        self.on_peer = on_peer
        self.found = 0

    def lan_addrs(self) -> list[str]:
        return [
            addrlib.without_peer(a, self.fh.peer_id)
            for a in self.fh.addrs()
            if addrlib.scope(a) in ("private", "public")
        ]

    async def run(self) -> None:
        from libp2p.discovery.events.peerDiscovery import peerDiscovery
        from libp2p.discovery.mdns import MDNSDiscovery

        adv = self.lan_addrs()
        if not adv:
            log.info("mdns: off (no LAN address to announce)")
            return
        port = addrlib.parse(adv[0]).port if addrlib.parse(adv[0]) else 4001  # type: ignore[union-attr]
        token = trio.lowlevel.current_trio_token()
        send, receive = trio.open_memory_channel[Any](64)

        def discovered(info: Any) -> None:  # a zeroconf thread
            try:
                token.run_sync_soon(_offer, info)
            except trio.RunFinishedError:
                pass

        def _offer(info: Any) -> None:
            try:
                send.send_nowait(info)
            except (trio.WouldBlock, trio.ClosedResourceError):
                pass  # a flood of announcements: the rest wait for the next one

        def start() -> Any:
            md = MDNSDiscovery(self.fh.host.get_network(), port=port, listen_addrs=adv)
            # The library's listener writes discovered (and "goodbye") addresses into the peer
            # store from zeroconf's thread: trio-owned state changed off the loop, and any LAN
            # host could clear a peer's addresses. Here discoveries only reach the channel.
            md.listener.peerstore = _NoPeerstore()  # type: ignore[assignment]
            md.broadcaster.register()
            return md

        peerDiscovery.register_peer_discovered_handler(discovered)
        md = None
        try:
            try:
                md = await trio.to_thread.run_sync(start)
            except Exception as exc:  # no multicast, port 5353 taken: discovery is a bonus
                log.warning("mdns: cannot start (%s); LAN peers need a bootstrap address", exc)
                return
            log.info("mdns: announcing %s", " ".join(adv))
            async with trio.open_nursery() as nursery:
                await self._serve(receive, nursery)
        finally:
            peerDiscovery.unregister_peer_discovered_handler(discovered)
            if md is not None:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(md.stop)

    async def _serve(self, receive: trio.MemoryReceiveChannel[Any], nursery: trio.Nursery) -> None:
        budget, window_start = MAX_DIALS_PER_MINUTE, trio.current_time()
        async for info in receive:
            pid = info.peer_id.to_base58()
            if pid == self.fh.peer_id or self.fh.is_connected(pid):
                continue
            if trio.current_time() - window_start > 60:
                budget, window_start = MAX_DIALS_PER_MINUTE, trio.current_time()
            if budget <= 0:
                continue
            budget -= 1
            self.found += 1
            found = tuple(str(a) for a in info.addrs if addrlib.scope(str(a)) in ("private", "public"))
            if found:
                log.info("mdns: found %s at %s", pid, " ".join(found))
                nursery.start_soon(self.on_peer, pid, found)
