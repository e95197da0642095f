"""The libp2p host of a node: TCP + Noise only + Yamux, GossipSub and a Kademlia DHT.

py-libp2p 0.8.1 facts this module is built on (see DESIGN.md): the default security options
also accept plaintext and SECIO, so a Noise-only ``sec_opt`` is always passed; GossipSub's
default heartbeat is 120 s; Pubsub learns only of connections made after it started; the DHT
does not add connected peers to its routing table by itself.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio

from ..node.limits import ADDRS_TTL, HANDSHAKE_TIMEOUT, INTERFACES_TTL, PEER_IDS_KEPT
from ..node.limits import DIAL_MAX_CIRCUITS as MAX_CIRCUITS
from ..node.limits import DIAL_MAX_DIRECT as MAX_DIRECT
from . import addrs as addrlib
from .budget import ConnectionGate, network_key
from .identity import Identity

log = logging.getLogger("rentahal.p2p")

REALM_KEY_PREFIX = "/rentahal/realm/"


def realm_multihash(realm: str) -> bytes:
    """sha2-256 multihash of ``/rentahal/realm/<realm>``: the DHT key of the realm's providers."""
    import hashlib

    return b"\x12\x20" + hashlib.sha256((REALM_KEY_PREFIX + realm).encode()).digest()


def realm_cid(realm: str) -> str:
    """The realm's provider key as a CIDv1 (raw codec, sha2-256) in base32: what a go or js
    Kademlia client passes to ``FindProviders``. A CID string is never misread as hex or text."""
    import base64

    raw = b"\x01\x55" + realm_multihash(realm)
    return "b" + base64.b32encode(raw).decode("ascii").lower().rstrip("=")


class DialError(Exception):
    """A peer could not be reached; the message says which and why."""


class ListenError(Exception):
    """This node cannot listen where it was told (a taken port, an address not on this host)."""


def quiet_libp2p_logs() -> None:
    """py-libp2p logs expected failures (a peer hanging up) as warnings with tracebacks."""
    for name in ("libp2p", "multiaddr", "async_service", "libp2p.kad_dht", "libp2p.pubsub"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    logging.getLogger("gguf").setLevel(logging.WARNING)


@dataclass(frozen=True)
class ConnectionEvent:
    peer_id: str
    connected: bool
    remote: str = ""  # /ip4|ip6/<ip>/tcp/<port> of the other end, "" if not known
    outbound: bool = False  # we dialed it: ``remote`` is an address that worked
    relayed: bool = False


@functools.lru_cache(maxsize=PEER_IDS_KEPT)
def libp2p_id(peer_id: str) -> Any:
    """py-libp2p's ID for a base58 peer ID (decoding base58 is a big-integer loop in Python;
    the node's timers ask for the same few IDs every second). ValueError if it does not parse."""
    from libp2p.peer.id import ID

    return ID.from_base58(peer_id)


def _conn_facts(conn: Any) -> tuple[str, bool, bool]:
    """(remote address, outbound, relayed) of a libp2p connection, as far as it tells; kept on
    the connection once known (they do not change, and the node's timers ask every second)."""
    known: tuple[str, bool, bool] | None = getattr(conn, "_rentahal_facts", None)
    if known is not None:
        return known
    facts = ("", False, False)
    try:
        outbound = str(getattr(conn, "direction", "")).lower().endswith("outbound")
        for a in conn.get_transport_addresses() or ():
            if "p2p-circuit" in str(a):
                facts = (str(a), outbound, True)
                break
        else:
            ra = conn.muxed_conn.get_remote_address()
            facts = (addrlib.tcp_addr(ra[0], ra[1]) if ra else "", outbound, False)
    except Exception:  # a connection torn down while we look at it
        return facts
    if facts[0]:
        try:
            conn._rentahal_facts = facts
        except AttributeError:  # a connection class with __slots__: worked out each time
            pass
    return facts


class AddressBook:
    """What this node advertises (it replaces ``host.get_addrs()``, see :meth:`get_addrs`):
    listen addresses expanded to interface addresses, ``p2p.announce``, addresses peers dialed
    this node back on (``confirmed``, p2p/reachability.py; identify's observed addresses are
    claims, and behind NAT ports nobody can dial, so they are never advertised), and the
    ``/p2p-circuit`` addresses of relay reservations."""

    def __init__(self, announce: Sequence[str] = ()) -> None:
        self.announce = tuple(announce)
        self._relayed: list[str] = []
        self._confirmed: list[str] = []
        self.host: Any = None
        self._ifaces: tuple[float, list[str]] = (-1e9, [])
        # (when, advertised(), get_addrs(), strings()): kept ADDRS_TTL seconds, see get_addrs
        self._kept: tuple[float, list[str], list[Any], list[str]] = (-1e9, [], [], [])

    @property
    def relayed(self) -> list[str]:
        """The ``/p2p-circuit`` addresses of this node's relay reservations."""
        return self._relayed

    @relayed.setter
    def relayed(self, addrs: list[str]) -> None:
        self._relayed = list(addrs)
        self._kept = (-1e9, [], [], [])

    @property
    def confirmed(self) -> list[str]:
        """Addresses peers dialed this node back on."""
        return self._confirmed

    @confirmed.setter
    def confirmed(self, addrs: list[str]) -> None:
        self._confirmed = list(addrs)
        self._kept = (-1e9, [], [], [])

    def interfaces(self) -> list[str]:
        if time.monotonic() - self._ifaces[0] > INTERFACES_TTL:
            self._ifaces = (time.monotonic(), addrlib.interface_addresses())
        return self._ifaces[1]

    def listening(self) -> list[str]:
        return [str(a) for a in self.host.get_transport_addrs()] if self.host is not None else []

    def advertised(self) -> list[str]:
        return list(self._fresh()[1])

    def get_addrs(self) -> list[Any]:
        """Replaces the host's ``get_addrs`` (identify, DHT provider records, DCUtR read it).
        The library's own version strips everything after the first ``/p2p/`` of an address,
        which turns ``<relay>/p2p/<relay id>/p2p-circuit`` into the relay's address under this
        node's ID: a lie. Here each address just gets ``/p2p/<own id>`` appended."""
        return list(self._fresh()[2])

    def strings(self) -> list[str]:
        """:meth:`get_addrs` as text (what the health record and the run file carry)."""
        return list(self._fresh()[3])

    def _fresh(self) -> tuple[float, list[str], list[Any], list[str]]:
        """pubsub reads the addresses for every message it sends (to attach this node's signed
        peer record), the node's timers every second: they are worked out again after
        ADDRS_TTL seconds, or at once when a relay reservation or a dial-back changes them
        (none, before the transports listen, is not kept)."""
        import multiaddr

        now = time.monotonic()
        if now - self._kept[0] < ADDRS_TTL:
            return self._kept
        advertised = addrlib.advertisable(
            self.listening(),
            interfaces=self.interfaces(),
            announce=self.announce,
            observed=self.confirmed,
            relayed=self.relayed,
        )
        own = self.host.get_id().to_base58() if self.host is not None else ""
        out = []
        for a in advertised:
            try:
                out.append(multiaddr.Multiaddr(addrlib.with_peer(a, own)))
            except Exception:  # a /dns4/ name the multiaddr library rejects: skip it, keep the rest
                continue
        fresh = (now if advertised else -1e9, advertised, out, [str(m) for m in out])
        self._kept = fresh
        return fresh


class _Notifee:
    """Forwards connect/disconnect notifications into a bounded trio channel, and sets
    ``changed`` (a fresh event after each) for those that only need to know that something did."""

    def __init__(self, send: trio.MemorySendChannel[ConnectionEvent]) -> None:
        self.send = send
        self.changed = trio.Event()

    def _put(self, conn: Any, connected: bool) -> None:
        self.changed.set()
        self.changed = trio.Event()
        try:
            remote, outbound, relayed = _conn_facts(conn)
            self.send.send_nowait(
                ConnectionEvent(conn.muxed_conn.peer_id.to_base58(), connected, remote, outbound, relayed)
            )
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
    def __init__(
        self,
        host: Any,
        pubsub: Any,
        dht: Any,
        events: trio.MemoryReceiveChannel[ConnectionEvent],
        book: AddressBook,
        notifee: _Notifee | None = None,
    ) -> None:
        self.host = host
        self._notifee = notifee
        self.pubsub = pubsub
        self.dht = dht
        self.connection_events = events
        self.book = book
        # Set by the relay service: dials a /p2p-circuit address (addr, peer, timeout).
        self.circuit_dialer: Any = None

    @property
    def peer_id(self) -> str:
        return str(self.host.get_id().to_base58())

    def next_connection_change(self) -> trio.Event:
        """Set at the next connect or disconnect. Take it before looking at the connections,
        then wait on it: no change is missed."""
        return self._notifee.changed if self._notifee is not None else trio.Event()

    def addrs(self) -> list[str]:
        """The addresses this node advertises, with ``/p2p/<id>``: never an unspecified one,
        loopback only when it has nothing else (see :class:`AddressBook`)."""
        return self.book.strings()

    def listen_addrs(self) -> list[str]:
        """What the transports are bound to (``0.0.0.0`` included), for the operator's log."""
        return self.book.listening()

    def local_only(self) -> bool:
        """True when everything this node advertises is loopback: it lives on this host alone."""
        return all(addrlib.scope(a) == "loopback" for a in self.book.advertised())

    def _open_connections(self, peer_id: str) -> list[Any]:
        """The libp2p connections to ``peer_id`` that are not closed (none for an ID that does
        not even parse)."""
        try:
            conns = self.host.get_network().get_connections(libp2p_id(peer_id))
        except Exception:
            return []
        return [c for c in conns if not getattr(c, "is_closed", False)]

    def connection(self, peer_id: str) -> tuple[str, bool, bool] | None:
        """(remote address, outbound, relayed) of the open connection to ``peer_id`` that new
        streams use: a direct one if there is any, else a relayed one."""
        facts = [_conn_facts(c) for c in self._open_connections(peer_id)]
        facts.sort(key=lambda f: f[2])  # direct first
        return facts[0] if facts else None

    def muxer_rtt(self, peer_id: str) -> float | None:
        """The round trip in seconds that the muxer of the connection to ``peer_id`` measured
        with its own pings (yamux does, every 30 s): 0.0 while it has none yet, None when there
        is no connection or its muxer measures nothing."""
        for c in self._open_connections(peer_id):
            rtt = getattr(getattr(c, "muxed_conn", None), "rtt", None)
            if callable(rtt):
                try:
                    return float(rtt())
                except Exception:
                    return None
        return None

    def connected_peers(self) -> set[str]:
        return {p.to_base58() for p in self.host.get_network().get_connections_map()}

    def is_connected(self, peer_id: str) -> bool:
        try:
            pid = libp2p_id(peer_id)
        except ValueError:  # a peer ID out of someone's claim that does not even parse
            return False
        return bool(self.host.get_network().get_connections(pid))

    async def dial(self, addr: str, *, timeout: float) -> str:
        """Connect to a full ``/p2p/``-suffixed multiaddr; return the peer ID."""
        import multiaddr
        from libp2p.peer.peerinfo import info_from_p2p_addr

        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        except Exception as exc:
            raise DialError(f"{addr}: not a dialable /p2p/ multiaddr ({exc})") from None
        peer_id = info.peer_id.to_base58()
        # Through dial_peer, not host.connect: the library's connect refuses for 60 s a peer whose
        # dial failed once (its "negative cache"), so a bootstrap node back after an outage would
        # stay unreachable for up to a minute.
        try:
            await self.dial_peer(peer_id, [addr], timeout=timeout)
        except DialError as exc:
            raise DialError(f"{addr}: {str(exc).removeprefix(f'{peer_id}: ')}") from None
        return peer_id

    async def dial_peer(self, peer_id: str, addrs: Sequence[str], *, timeout: float) -> None:
        """Connect to ``peer_id`` trying ``addrs`` in the order given (the caller puts verified
        ones first): at most ``MAX_DIRECT`` direct addresses, then at most ``MAX_CIRCUITS``
        relay addresses, all within ``timeout``. (``host.connect`` would try one TCP address of
        its own choosing from the peer store, whatever the order.)"""
        import multiaddr

        direct = [a for a in addrs if "/p2p-circuit" not in a][:MAX_DIRECT]
        circuits = [a for a in addrs if "/p2p-circuit" in a][:MAX_CIRCUITS] if self.circuit_dialer else []
        if not direct and not circuits:
            raise DialError(f"{peer_id}: no usable address")
        try:
            pid = libp2p_id(peer_id)
        except ValueError:
            raise DialError(f"{peer_id}: not a peer ID") from None
        swarm = self.host.get_network()
        start = trio.current_time()
        deadline = start + timeout
        # Relay addresses get the second half of the time whatever the direct ones do.
        direct_until = start + timeout / 2 if circuits else deadline
        errors: list[str] = []
        attempts = [(a, False) for a in direct] + [(c, True) for c in circuits]
        for i, (addr, relayed) in enumerate(attempts):
            if self.is_connected(peer_id):
                return  # it dialed us meanwhile
            left_here = (len(direct) - i) if not relayed else (len(attempts) - i)
            until = deadline if relayed else direct_until
            share = max(until - trio.current_time(), 0.0) / max(left_here, 1)
            bare = addrlib.without_peer(addr, peer_id)
            with trio.move_on_after(share) as cs:
                try:
                    if relayed:
                        await self.circuit_dialer(bare, peer_id, share)
                    else:
                        m = multiaddr.Multiaddr(bare)
                        await swarm.dial_addr(m, pid)
                        self.host.get_peerstore().add_addrs(pid, [m], 3600)
                    return  # the connection event adds it to the DHT's routing table
                except DialError as exc:
                    errors.append(str(exc).removeprefix(f"{peer_id}: "))
                except Exception as exc:  # the library's dial errors, a bad multiaddr
                    errors.append(f"{bare}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
            if cs.cancelled_caught:
                errors.append(f"{bare}: no connection within {share:.1f}s")
        if self.is_connected(peer_id):
            return
        raise DialError(f"{peer_id}: " + "; ".join(errors))

    async def add_dht_peer(self, peer_id: str) -> None:
        try:
            await self.dht.add_peer(libp2p_id(peer_id))
        except Exception as exc:  # the routing table check dials; a failure only means "not now"
            log.debug("dht add_peer %s failed: %s", peer_id, exc)

    async def provide_realm(self, realm: str) -> bool:
        return bool(await self.dht.provide(realm_cid(realm)))

    async def find_realm_providers(self, realm: str) -> dict[str, tuple[str, ...]]:
        """DHT hints for a realm, de-duplicated; liveness is for gossip or a dial to decide."""
        found: dict[str, tuple[str, ...]] = {}
        for info in await self.dht.find_providers(realm_cid(realm)):
            pid = info.peer_id.to_base58()
            if pid == self.peer_id:
                continue
            addrs = tuple(str(a) for a in info.addrs)
            found[pid] = tuple(dict.fromkeys(found.get(pid, ()) + addrs))
        return found

    def set_stream_handler(self, protocol: str, handler: Any) -> None:
        self.host.set_stream_handler(protocol, handler)


def _build_libp2p_host(
    identity: Identity,
    book: AddressBook,
    gate: ConnectionGate | None = None,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
) -> Any:
    from libp2p import create_yamux_muxer_option, new_host
    from libp2p.crypto.x25519 import create_new_key_pair as new_x25519
    from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_ID
    from libp2p.security.noise.transport import Transport as NoiseTransport

    key_pair = identity.libp2p_key_pair()
    noise_only = {NOISE_ID: NoiseTransport(key_pair, noise_privkey=new_x25519().private_key)}
    host = new_host(key_pair=key_pair, sec_opt=noise_only, muxer_opt=create_yamux_muxer_option())
    book.host = host
    host.get_addrs = book.get_addrs  # type: ignore[method-assign]  # see AddressBook.get_addrs
    gate = gate or ConnectionGate()
    _gate_inbound(host.get_network(), gate, handshake_timeout)
    _refuse_after_security(host.get_network(), gate)
    _no_dials_to_refused_peers(host.get_network(), gate)
    _no_auto_dialing(host.get_network())
    _window_updates_at_half_window()
    return host


def _window_updates_at_half_window() -> None:
    """py-libp2p 0.8.1's yamux credits the sender back after every read, however small: each
    gossip message, query frame or token event read sent a WINDOW_UPDATE frame back (a Noise
    encryption and a socket write), a third of an idle node's writes in a 10-node federation
    (py-spy). Here, as in go-yamux (``sendWindowUpdate``), the update goes out once the bytes
    consumed since the last one reach half the stream's window; the window's auto-tuning is
    kept. Reads return what is buffered, so a reader waiting for more than the credit left
    never deadlocks: the sender always has at least half a window. Installed once per process."""
    from libp2p.stream_muxer.yamux.yamux import YamuxStream

    name = "_auto_tune_and_send_window_update"  # what YamuxStream.read calls after each read
    if getattr(getattr(YamuxStream, name), "at_half_window", False):
        return

    async def update(self: Any, *, bytes_read: int = 0) -> None:
        async with self.window_lock:
            buffered = len(self.conn.stream_buffers.get(self.stream_id, b""))
            if self.target_recv_window - (self.recv_window + buffered) < self.target_recv_window // 2:
                return
            delta = self._grow_to_delta(buffered) + self._apply_autotune_epoch(buffered)
            self._pending_recv_release = 0
        await self.send_window_update(delta, skip_lock=True)

    update.at_half_window = True  # type: ignore[attr-defined]
    setattr(YamuxStream, name, update)


def _no_auto_dialing(swarm: Any) -> None:
    """py-libp2p 0.8.1's swarm runs an AutoConnector that, below ``min_connections`` (50: any
    federation smaller than that), dials every peer in the peerstore every 10 s and on every
    disconnect: peers and addresses learned from identify and the DHT, that is, whatever a
    stranger says. This node decides whom to dial (p2p/maintenance.py: peers with a fresh,
    signed health record, with backoff), so the library's dialing is switched off."""

    async def maybe_connect() -> None:
        return None

    swarm.auto_connector.maybe_connect = maybe_connect


def _no_dials_to_refused_peers(swarm: Any, gate: ConnectionGate) -> None:
    """Connections from a peer the node has blocked are closed at the end of their Noise
    handshake (``_refuse_after_security``); this node must not dial one either. py-libp2p's own dialers (the DHT's
    lookups and refreshes, identify's peers) know nothing of the block: a flooder the node had
    blocked and disconnected was dialed again by it within seconds and kept opening streams on
    that connection. Every dial of the swarm, plain or as hole-punch responder, goes through
    the two methods wrapped here."""
    from libp2p.network.exceptions import SwarmException

    for name in ("_dial_addr_single_attempt", "dial_addr_as_responder"):
        dial = getattr(swarm, name)

        async def dial_unless_refused(addr: Any, peer_id: Any, source: Any = None, _dial: Any = dial) -> Any:
            if gate.refuse_peer(peer_id.to_base58()):
                raise SwarmException(f"{peer_id}: blocked by this node")
            return await _dial(addr, peer_id, source)

        setattr(swarm, name, dial_unless_refused)


async def quietly(call: Callable[[], Awaitable[object]]) -> None:
    """Best effort, for closing or resetting what is being refused or torn down (``conn.close``,
    ``stream.reset``): shielded from cancellation, at most a second, no error."""
    with trio.CancelScope(shield=True), trio.move_on_after(1):
        try:
            await call()
        except Exception:
            pass


def _refuse_after_security(swarm: Any, gate: ConnectionGate) -> None:
    """A peer the node has blocked is known by its ID once the Noise handshake ends: its
    connection is closed there, before the muxer, the swarm's bookkeeping and every protocol's
    greeting (pubsub's hello, identify) cost anything. (Closed after the upgrade instead, each
    redial of a blocked flooder cost the node about as much as 15 of its streams.)"""
    from libp2p.transport.exceptions import SecurityUpgradeFailure

    upgrader = swarm.upgrader
    secure = upgrader.upgrade_security

    async def secure_unless_refused(raw_conn: Any, is_initiator: bool, peer_id: Any = None) -> Any:
        conn = await secure(raw_conn, is_initiator, peer_id)
        remote = conn.get_remote_peer()
        if gate.refuse_peer(remote.to_base58()):
            gate.refused += 1
            await quietly(conn.close)
            raise SecurityUpgradeFailure(f"{remote}: blocked by this node")
        return conn

    upgrader.upgrade_security = secure_unless_refused


def _gate_inbound(swarm: Any, gate: ConnectionGate, handshake_timeout: float) -> None:
    """Admit inbound TCP connections by remote network before their handshake.

    py-libp2p 0.8.1's own inbound handler (``Swarm._handle_inbound_connection``, which each
    listener calls through the swarm) counts inbound connections in one pool for all addresses,
    250 by default, and keeps a slot after the upgrade until the swarm stops: one address
    holding idle sockets locked every other peer out. It is replaced here by one that asks
    ``gate`` first (closing a refused socket at once, before any handshake work), runs the
    library's upgrade (Noise, Yamux, ``add_conn``) under ``handshake_timeout``, and gives the
    slot back when the connection closes."""
    from libp2p.network.connection.raw_connection import RawConnection

    swarm.connection_config.inbound_upgrade_timeout = handshake_timeout
    swarm.connection_gate_for_inbound = gate  # for tests and reports

    async def handle_inbound(read_write_closer: Any, maddr: Any) -> None:
        try:
            remote = read_write_closer.get_remote_address()
        except Exception:
            remote = None
        key = network_key(str(remote[0])) if remote else "unknown"
        why = gate.admit(key)
        if why is not None:
            if gate.should_log(key):
                log.warning("refused inbound connections from %s: %s (said once a minute)", key, why)
            await quietly(read_write_closer.close)
            return
        upgraded = False
        raw_conn = None
        try:
            raw_conn = RawConnection(read_write_closer, False)
            muxed = await swarm.upgrade_inbound_raw_conn(raw_conn, maddr)
            gate.upgraded(key)
            upgraded = True
            peer = getattr(muxed, "peer_id", None)
            if peer is not None and gate.refuse_peer(peer.to_base58()):
                gate.refused += 1
                await quietly(muxed.close)
                return
            closed = getattr(muxed, "event_closed", None)
            if closed is not None:
                await closed.wait()
            else:  # a muxer without the event: look now and then
                while not muxed.is_closed:
                    await trio.sleep(1.0)
        except Exception as exc:  # a failed handshake, a refused or lost connection
            log.debug("inbound connection from %s ended: %s", key, exc)
            await quietly((raw_conn or read_write_closer).close)
        finally:
            gate.closed(key, upgraded=upgraded)

    swarm._handle_inbound_connection = handle_inbound


def check_port_free(listen: Sequence[str]) -> None:
    """The library listens with SO_REUSEPORT, so a second node on the same port starts silently
    and the kernel splits incoming connections between the two: refuse that here, in one line."""
    import errno
    import socket

    for a in listen:
        p = addrlib.parse(a)
        if p is None or not p.port or p.proto not in ("ip4", "ip6"):
            continue
        family = socket.AF_INET6 if p.proto == "ip6" else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((p.host, p.port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise ListenError(
                        f"p2p.listen: {a} is already in use (another rentahal-node on this host? "
                        "give each node its own port)"
                    ) from None
                raise ListenError(f"p2p.listen: cannot listen on {a}: {exc.strerror or exc}") from None


@asynccontextmanager
async def open_federation_host(
    identity: Identity,
    listen: Sequence[str],
    *,
    announce: Sequence[str] = (),
    health_topic_heartbeat: float = 1.0,
    gate: ConnectionGate | None = None,
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
) -> AsyncIterator[FederationHost]:
    """``gate``: inbound connection limits by remote address (defaults: ConnectionGate())."""
    import multiaddr
    from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
    from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11
    from libp2p.tools.anyio_service import background_trio_service

    from .gossip import budgeted_pubsub_class, flood_publish_gossipsub_class

    quiet_libp2p_logs()
    check_port_free(listen)
    book = AddressBook(announce)
    host = _build_libp2p_host(identity, book, gate, handshake_timeout)
    gossipsub = flood_publish_gossipsub_class()(  # see p2p/gossip.py
        [PROTOCOL_ID_V11],
        # A node's own record goes to every subscribed peer it is connected to (flood publish),
        # so the mesh carries only relays, each a duplicate for most receivers (an idle node of
        # a 10-node federation wrote 3 relays for each record it took): 3 (2-4) mesh peers
        # rather than the spec's 6 (4-12) cut that node from 4.8 % of a core (degree 6) to 3.3 %
        # (degree 4) and, with the rest of BENCHMARKS.md's list, from 2.1 % to 1.9 %; a relay
        # still reaches everyone (test_gossip_mesh).
        degree=3,
        degree_low=2,
        degree_high=4,
        heartbeat_interval=int(max(1, health_topic_heartbeat)),
        # py-libp2p 0.8.1's "adaptive gossip" rates a mesh below `degree` peers as poor health
        # and then sets the heartbeat to 30-60 s (not 1 s): in any federation of under 7 nodes,
        # after 30 s, meshes were repaired once a minute (relayed records stalled for tens of
        # seconds after a reconnect) and the message cache held minutes of records, which pubsub
        # replays to every peer that (re)connects (a restarted node got records 60-177 s old).
        adaptive_gossip_enabled=False,
        # Its spam protection drops relays past 10 messages a second per forwarder and topic, and
        # lowers the forwarder's score: honest relays in a federation of a few dozen nodes. The
        # node's own per-forwarder budget (limits.gossip_per_second) is charged before that.
        spam_protection_enabled=False,
    )
    # Pubsub that charges each message to its forwarder before handling it (p2p/gossip.py).
    pubsub = budgeted_pubsub_class()(host, gossipsub, strict_signing=True)
    dht = KadDHT(host, DHTMode.SERVER)
    send, receive = trio.open_memory_channel[ConnectionEvent](256)
    notifee = _Notifee(send)
    host.get_network().register_notifee(notifee)
    try:
        maddrs = [multiaddr.Multiaddr(a) for a in listen]
    except Exception as exc:
        raise ListenError(f"p2p.listen: bad address in {list(listen)}: {exc}") from None
    async with host.run(maddrs), background_trio_service(pubsub), background_trio_service(gossipsub):
        async with background_trio_service(dht):
            await pubsub.wait_until_ready()
            yield FederationHost(host, pubsub, dht, receive, book, notifee)
