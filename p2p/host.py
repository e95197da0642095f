"""The libp2p host of a node: TCP + Noise only + Yamux, GossipSub and a Kademlia DHT.

py-libp2p 0.8.1 facts this module is built on (see DESIGN.md): the default security options
also accept plaintext and SECIO, so a Noise-only ``sec_opt`` is always passed; GossipSub's
default heartbeat is 120 s; Pubsub learns only of connections made after it started; the DHT
does not add connected peers to its routing table by itself.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio

from .identity import Identity

log = logging.getLogger("rentahal.p2p")

REALM_KEY_PREFIX = "/rentahal/realm/"


class DialError(Exception):
    """A peer could not be reached; the message says which and why."""


def quiet_libp2p_logs() -> None:
    """py-libp2p logs expected failures (a peer hanging up) as warnings with tracebacks."""
    for name in ("libp2p", "multiaddr", "async_service", "libp2p.kad_dht", "libp2p.pubsub"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    logging.getLogger("gguf").setLevel(logging.WARNING)


@dataclass(frozen=True)
class ConnectionEvent:
    peer_id: str
    connected: bool


class _Notifee:
    """Forwards connect/disconnect notifications into a bounded trio channel."""

    def __init__(self, send: trio.MemorySendChannel[ConnectionEvent]) -> None:
        self.send = send

    def _put(self, conn: Any, connected: bool) -> None:
        try:
            self.send.send_nowait(ConnectionEvent(conn.muxed_conn.peer_id.to_base58(), connected))
        except (trio.WouldBlock, trio.ClosedResourceError, AttributeError):
            pass

    async def connected(self, network: Any, conn: Any) -> None:
        self._put(conn, True)

    async def disconnected(self, network: Any, conn: Any) -> None:
        self._put(conn, False)

    async def opened_stream(self, network: Any, stream: Any) -> None:
        pass

    async def closed_stream(self, network: Any, stream: Any) -> None:
        pass

    async def listen(self, network: Any, multiaddr: Any) -> None:
        pass

    async def listen_close(self, network: Any, multiaddr: Any) -> None:
        pass


class FederationHost:
    def __init__(self, host: Any, pubsub: Any, dht: Any, events: trio.MemoryReceiveChannel[ConnectionEvent]) -> None:
        self.host = host
        self.pubsub = pubsub
        self.dht = dht
        self.connection_events = events

    @property
    def peer_id(self) -> str:
        return self.host.get_id().to_base58()

    def addrs(self) -> list[str]:
        """Listen addresses with ``/p2p/<id>``."""
        return [str(a) for a in self.host.get_addrs()]

    def connected_peers(self) -> set[str]:
        return {p.to_base58() for p in self.host.get_network().get_connections_map()}

    def is_connected(self, peer_id: str) -> bool:
        from libp2p.peer.id import ID

        return bool(self.host.get_network().get_connections(ID.from_base58(peer_id)))

    async def dial(self, addr: str, *, timeout: float) -> str:
        """Connect to a full ``/p2p/``-suffixed multiaddr; return the peer ID."""
        import multiaddr
        from libp2p.peer.peerinfo import info_from_p2p_addr

        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        except Exception as exc:
            raise DialError(f"{addr}: not a dialable /p2p/ multiaddr ({exc})") from None
        await self._connect(info, addr, timeout)
        return info.peer_id.to_base58()

    async def dial_peer(self, peer_id: str, addrs: Sequence[str], *, timeout: float) -> None:
        import multiaddr
        from libp2p.peer.id import ID
        from libp2p.peer.peerinfo import PeerInfo

        maddrs = []
        for a in addrs:
            try:
                m = multiaddr.Multiaddr(a)
                maddrs.append(m.decapsulate(multiaddr.Multiaddr(f"/p2p/{peer_id}")) if "/p2p/" in a else m)
            except Exception:
                continue
        if not maddrs:
            raise DialError(f"{peer_id}: no usable address")
        await self._connect(PeerInfo(ID.from_base58(peer_id), maddrs), peer_id, timeout)

    async def _connect(self, info: Any, label: str, timeout: float) -> None:
        from libp2p.exceptions import BaseLibp2pError

        try:
            with trio.fail_after(timeout):
                await self.host.connect(info)
        except trio.TooSlowError:
            raise DialError(f"{label}: no connection within {timeout:g}s") from None
        except (BaseLibp2pError, OSError) as exc:
            raise DialError(f"{label}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        await self.dht.add_peer(info.peer_id)

    async def add_dht_peer(self, peer_id: str) -> None:
        from libp2p.peer.id import ID

        try:
            await self.dht.add_peer(ID.from_base58(peer_id))
        except Exception as exc:  # the routing table check dials; a failure only means "not now"
            log.debug("dht add_peer %s failed: %s", peer_id, exc)

    async def provide_realm(self, realm: str) -> bool:
        return bool(await self.dht.provide(REALM_KEY_PREFIX + realm))

    async def find_realm_providers(self, realm: str) -> dict[str, tuple[str, ...]]:
        """DHT hints for a realm, de-duplicated; liveness is for gossip or a dial to decide."""
        found: dict[str, tuple[str, ...]] = {}
        for info in await self.dht.find_providers(REALM_KEY_PREFIX + realm):
            pid = info.peer_id.to_base58()
            if pid == self.peer_id:
                continue
            addrs = tuple(str(a) for a in info.addrs)
            found[pid] = tuple(dict.fromkeys(found.get(pid, ()) + addrs))
        return found

    def set_stream_handler(self, protocol: str, handler: Any) -> None:
        self.host.set_stream_handler(protocol, handler)


def _build_libp2p_host(identity: Identity) -> Any:
    from libp2p import create_yamux_muxer_option, new_host
    from libp2p.crypto.x25519 import create_new_key_pair as new_x25519
    from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID
    from libp2p.security.noise.transport import Transport as NoiseTransport

    key_pair = identity.libp2p_key_pair()
    noise_only = {NOISE_ID: NoiseTransport(key_pair, noise_privkey=new_x25519().private_key)}
    return new_host(key_pair=key_pair, sec_opt=noise_only, muxer_opt=create_yamux_muxer_option())


@asynccontextmanager
async def open_federation_host(
    identity: Identity, listen: Sequence[str], *, health_topic_heartbeat: float = 1.0
) -> AsyncIterator[FederationHost]:
    import multiaddr
    from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
    from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, GossipSub
    from libp2p.pubsub.pubsub import Pubsub
    from libp2p.tools.anyio_service import background_trio_service

    quiet_libp2p_logs()
    host = _build_libp2p_host(identity)
    gossipsub = GossipSub(
        [PROTOCOL_ID_V11], degree=6, degree_low=4, degree_high=12,
        heartbeat_interval=int(max(1, health_topic_heartbeat)),
    )
    pubsub = Pubsub(host, gossipsub, strict_signing=True)
    dht = KadDHT(host, DHTMode.SERVER)
    send, receive = trio.open_memory_channel[ConnectionEvent](256)
    host.get_network().register_notifee(_Notifee(send))
    try:
        maddrs = [multiaddr.Multiaddr(a) for a in listen]
    except Exception as exc:
        raise DialError(f"bad listen address in {list(listen)}: {exc}") from None
    async with host.run(maddrs):
        async with background_trio_service(pubsub), background_trio_service(gossipsub):
            async with background_trio_service(dht):
                await pubsub.wait_until_ready()
                yield FederationHost(host, pubsub, dht, receive)
