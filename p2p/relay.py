"""Circuit relay v2 and hole punching (DCUtR): how nodes behind NATs reach each other.

py-libp2p 0.8.1 ships the pieces (``libp2p.relay.circuit_v2``) but ``new_host`` wires none of
them; this service does, as measured in the testbed (scripts/testbed.py):

- **Hop** (serving as a relay) is on when ``p2p.relay_service`` is ``on``, or ``auto`` and peers
  have confirmed this node is publicly reachable; limits come from node.toml.
- **Reservations**: a node that peers cannot dial reserves a slot on up to ``TARGET_RELAYS``
  directly connected peers that accept, advertises ``<relay addr>/p2p/<relay>/p2p-circuit`` in
  its health record and in identify (hence the DHT), and replaces a relay that goes away.
- **Dialing** a ``/p2p-circuit`` address uses a transport without the CLIENT role (with it, the
  library reserves a slot before every connect).
- **DCUtR** runs on every node: over a relayed connection the two sides exchange their
  predicted public addresses and dial at once (TCP simultaneous open); where the NATs allow it a
  direct connection appears beside the relayed one and new streams take it. The library's DCUtR
  also dials a peer's ``0.0.0.0`` addresses (which reach this very host): those are skipped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import trio

from ..node.limits import DCUTR_DIALS_PER_MINUTE, RESERVATION_TTL, RESERVE_TIMEOUT, RETRY_RELAY_AFTER, TARGET_RELAYS
from ..node.limits import RELAY_CHECK_INTERVAL as CHECK_INTERVAL
from . import addrs as addrlib
from .host import DialError, FederationHost, libp2p_id

log = logging.getLogger("rentahal.p2p")


@dataclass(frozen=True)
class RelayLimits:
    reservations: int = 32
    duration: float = 1800.0
    bytes: int = 128 * 1024 * 1024
    circuits: int = 4


def _library_limits(limits: RelayLimits) -> Any:
    from libp2p.relay.circuit_v2.resources import RelayLimits as LibLimits

    return LibLimits(
        duration=int(limits.duration),
        data=limits.bytes,
        max_circuit_conns=limits.circuits,
        max_reservations=limits.reservations,
        reservation_ttl=RESERVATION_TTL,
    )


def _dcutr_class() -> type:
    from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol

    class CleanDCUtR(DCUtRProtocol):
        """The library dials every address a peer sends in a hole-punch CONNECT (up to ~400),
        three rounds, plus the peer store's: a stranger could aim this node at anyone. Here a
        peer gets at most ``DCUTR_DIALS_PER_MINUTE`` dials, never to unspecified, loopback,
        link-local or relay addresses."""

        _budget: ClassVar[dict[str, tuple[float, int]]] = {}

        async def _dial_peer(self, peer_id: Any, addr: Any, *args: Any, **kw: Any) -> Any:
            if addrlib.scope(str(addr)) in ("unspecified", "loopback", "link-local", "relay", "invalid"):
                return None
            key, now = str(peer_id), trio.current_time()
            start, used = self._budget.get(key, (now, 0))
            if now - start > 60.0:
                start, used = now, 0
            if used >= DCUTR_DIALS_PER_MINUTE:
                return None
            self._budget[key] = (start, used + 1)
            if len(self._budget) > 4096:
                self._budget.clear()
            return await super()._dial_peer(peer_id, addr, *args, **kw)

    return CleanDCUtR


class RelayService:
    def __init__(self, fh: FederationHost, limits: RelayLimits, *, mode: str = "auto") -> None:
        self.fh = fh
        self.limits = limits
        self.mode = mode
        self.hop = False
        self.want_reservations = False  # set by the node from its reachability verdict
        self.reservations: dict[str, str] = {}  # relay peer -> our circuit address through it
        self._failed: dict[str, float] = {}
        self._holding: set[str] = set()
        self._proto: Any = None
        self._reserver: Any = None
        self._dialer: Any = None

    # --- hop ---------------------------------------------------------------------------------
    def set_hop(self, enabled: bool) -> None:
        """Serve as a relay (or stop). ``mode`` off never serves; on always does."""
        from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_ID

        enabled = self.mode == "on" or (self.mode == "auto" and enabled)
        if enabled == self.hop or self._proto is None:
            return
        self.hop = self._proto.allow_hop = enabled
        if enabled:
            self.fh.host.set_stream_handler(HOP_ID, self._proto._handle_hop_stream)
            log.info(
                "relay: serving as a circuit relay (max %d reservations, %d circuits, %gs, %d bytes each)",
                self.limits.reservations,
                self.limits.circuits,
                self.limits.duration,
                self.limits.bytes,
            )
        else:
            self.fh.host.remove_stream_handler(HOP_ID)
            log.info("relay: no longer serving as a relay")

    # --- service -----------------------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
        from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
        from libp2p.relay.circuit_v2.transport import CircuitV2Transport
        from libp2p.tools.anyio_service import background_trio_service

        lib_limits = _library_limits(self.limits)
        self._proto = CircuitV2Protocol(self.fh.host, limits=lib_limits, allow_hop=False)
        self._reserver = CircuitV2Transport(
            self.fh.host, self._proto, RelayConfig(roles=RelayRole.STOP | RelayRole.CLIENT, limits=lib_limits)
        )
        self._dialer = CircuitV2Transport(
            self.fh.host, self._proto, RelayConfig(roles=RelayRole.STOP, limits=lib_limits)
        )
        self.fh.circuit_dialer = self.dial_circuit
        dcutr = _dcutr_class()(self.fh.host)
        async with background_trio_service(self._proto), background_trio_service(dcutr):
            await self._proto.event_started.wait()
            if self.mode == "on":
                self.set_hop(True)
            task_status.started()
            async with trio.open_nursery() as nursery:
                while True:
                    self._keep_reservations(nursery)
                    await trio.sleep(CHECK_INTERVAL)

    # --- reservations --------------------------------------------------------------------------
    def _keep_reservations(self, nursery: trio.Nursery) -> None:
        if not self.want_reservations or len(self.reservations) + len(self._holding) >= TARGET_RELAYS:
            return
        import random

        now = trio.current_time()
        peers = list(self.fh.connected_peers())
        random.shuffle(peers)  # a peer ID chosen to sort first must not capture every reservation
        for pid in peers:
            if len(self.reservations) + len(self._holding) >= TARGET_RELAYS:
                break
            if pid in self.reservations or pid in self._holding or now < self._failed.get(pid, 0.0):
                continue
            facts = self.fh.connection(pid)
            if facts is None or facts[2] or not facts[1]:
                continue  # only relays we dialed directly: their address is one we know works
            self._holding.add(pid)
            nursery.start_soon(self._hold, pid, facts[0], nursery)

    async def _hold(self, relay: str, relay_addr: str, service_nursery: trio.Nursery) -> None:
        """Reserve a slot on ``relay`` and keep it while the connection lasts. The library's one
        renewal task (shared by all reservations) lives in the service's nursery, not here, so
        it outlives the first relay to go."""
        from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_ID

        rid = libp2p_id(relay)
        circuit = f"{relay_addr}/p2p/{relay}/p2p-circuit"
        try:
            async with trio.open_nursery() as nursery:
                ok = False
                with trio.move_on_after(RESERVE_TIMEOUT):
                    try:
                        stream = await self.fh.host.new_stream(rid, [HOP_ID])
                        try:
                            ok = await self._reserver.reserve(stream, rid, service_nursery)
                        finally:
                            with trio.move_on_after(1) as cs:
                                cs.shield = True
                                await stream.close()
                    except Exception as exc:
                        log.debug("relay: %s refused a reservation: %s", relay, exc)
                if not ok:
                    self._failed[relay] = trio.current_time() + RETRY_RELAY_AFTER
                    nursery.cancel_scope.cancel()
                    return
                self.reservations[relay] = circuit
                self._publish()
                log.info("relay: reserved a slot on %s; reachable at %s/p2p/%s", relay, circuit, self.fh.peer_id)
                while self.fh.is_connected(relay) and self.want_reservations:
                    await trio.sleep(CHECK_INTERVAL)
                if self.want_reservations:
                    log.warning("relay: %s is gone; looking for another", relay)
                nursery.cancel_scope.cancel()
        finally:
            self._holding.discard(relay)
            if self.reservations.pop(relay, None) is not None:
                try:
                    self._reserver._reservations.pop(rid, None)
                except Exception:
                    pass
                self._publish()

    def _publish(self) -> None:
        self.fh.book.relayed = list(self.reservations.values())

    # --- dialing through a relay ---------------------------------------------------------------
    async def dial_circuit(self, addr: str, peer_id: str, timeout: float) -> None:
        import multiaddr

        full = addrlib.with_peer(addr, peer_id)
        try:
            with trio.fail_after(timeout):
                await self._dialer.dial(multiaddr.Multiaddr(full))
        except trio.TooSlowError:
            raise DialError(f"{peer_id}: no relayed connection within {timeout:g}s via {addr}") from None
        except Exception as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DialError(f"{peer_id}: relay {addr} could not connect: {first}") from None
