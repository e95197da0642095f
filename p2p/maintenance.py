"""Peer maintenance: keep connected to the bootstrap list and remembered peers, find out which
gossiping peers this node can actually reach, measure RTTs.

A peer's health record says it is alive; only a connection says this node can reach it. Every
peer with a fresh record that this node is not connected to is dialed (verified addresses first,
then what it claims, never addresses that cannot work from here), with a growing back-off per
peer; a failed dial marks it ``unreachable`` with the reason, which takes it out of routing until
a connection exists. Runs as one service in the node's nursery.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import trio

from ..node.limits import (
    BOOTSTRAP_REDIAL_MAX,
    DEAD_AFTER_STALE,
    MAX_PARALLEL_DIALS,
    PING_INTERVAL,
    PING_TIMEOUT,
    PROBE_EVERY,
    PROBE_TIMEOUT,
    REDIAL_MAX,
    REDIAL_MIN,
    SWEEP_INTERVAL,
    SWEEP_MAX_CONNECTIONS,
)
from . import addrs as addrlib
from .host import DialError, FederationHost, libp2p_id
from .peers import PeerState, PeerTable

log = logging.getLogger("rentahal.p2p")


class PeerMaintenance:
    def __init__(
        self,
        fh: FederationHost,
        table: PeerTable,
        *,
        dial_timeout: float,
        bootstrap: Sequence[str] = (),
        forget_after: float = 600.0,
        max_peers: int = 5000,
        state_interval: float = 0.5,
        quiet_after: float = 1.1,
    ) -> None:
        self.fh = fh
        self.table = table
        self.dial_timeout = dial_timeout
        self.quiet_after = quiet_after  # no health record for this long: probe the connection
        self.bootstrap = tuple(bootstrap)
        self.forget_after = forget_after
        self.max_peers = max_peers
        self.state_interval = state_interval
        self._next_dial: dict[str, float] = {}
        self._backoff: dict[str, float] = {}
        self._dialing: set[str] = set()
        self._same_host: set[str] = set()  # peers seen connecting over loopback
        self._closing: dict[str, float] = {}  # peer -> when its dead connection may be closed again
        self._last_sweep = -1e9
        # Set by the node: does a query of ours run on this peer now? (its stream is the judge then)
        self.busy: Callable[[str], bool] = lambda peer_id: False
        # Set by the node: a peer connected (this node's health record goes out to it at once).
        self.on_connect: Callable[[str], None] = lambda peer_id: None
        self._wake = trio.Event()

    def record_arrived(self, peer_id: str) -> None:
        """A fresh record of a peer this node has no connection to: dial it now, not at the
        next sweep."""
        e = self.table.get(peer_id)
        if e is not None and not e.connected and peer_id not in self._dialing:
            self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_connections)
            for addr in self.bootstrap:
                nursery.start_soon(self._keep_bootstrap, addr)
            nursery.start_soon(self._ping_peers)
            nursery.start_soon(self._watch_states)
            task_status.started()
            while True:
                self._sweep(nursery)
                with trio.move_on_after(SWEEP_INTERVAL):
                    await self._wake.wait()
                self._wake = trio.Event()

    # --- dialing -----------------------------------------------------------------------------
    def usable_addrs(self, peer_id: str) -> list[str]:
        """What to dial for ``peer_id`` from here: loopback and link-local addresses only for a
        peer on this very host (its connection came over loopback) or when this node is itself
        local-only."""
        same_host = peer_id in self._same_host or self.fh.local_only()
        out = []
        for a in self.table.dial_addrs(peer_id):
            if "/p2p-circuit" in a:
                # Only through a relay this node is connected to: a claimed relay address must
                # not make it dial whatever host the claim names.
                head = a.split("/p2p-circuit", 1)[0]
                relay = head.rsplit("/p2p/", 1)[-1] if "/p2p/" in head else ""
                if relay and relay != peer_id and self.fh.is_connected(relay):
                    out.append(a)
            elif addrlib.usable_by(a, same_host=same_host):
                out.append(a)
        return out

    async def dial(self, peer_id: str) -> None:
        """Connect to ``peer_id`` or raise DialError; the table learns either way."""
        if self.fh.is_connected(peer_id):
            return
        addrs = self.usable_addrs(peer_id)
        try:
            if not addrs:
                raise DialError(f"{peer_id}: no address this node can dial (it advertises none usable from here)")
            await self.fh.dial_peer(peer_id, addrs, timeout=self.dial_timeout)
        except DialError as exc:
            if not self.fh.is_connected(peer_id):  # it may have dialed us meanwhile
                self.table.set_unreachable(peer_id, str(exc).removeprefix(f"{peer_id}: "))
                raise

    def _sweep(self, nursery: trio.Nursery) -> None:
        now = trio.current_time()
        connected = self.fh.connected_peers()
        for e in self.table:  # a connection event can be lost (bounded channel): reconcile
            if e.connected != (e.peer_id in connected):
                facts = self.fh.connection(e.peer_id)
                self.table.set_connected(e.peer_id, facts is not None, relayed=bool(facts and facts[2]))
        known = {e.peer_id for e in self.table}
        for d in (self._next_dial, self._backoff):
            for pid in [p for p in d if p not in known]:
                del d[pid]
        self._same_host &= known | connected
        late = now - self._last_sweep > 2 * SWEEP_INTERVAL + 1.0  # this loop itself was stalled
        self._last_sweep = now
        for e in self.table:
            age = self.table.record_age(e)
            since = min(age, now - e.connected_at) if age is not None else None
            if (
                e.connected
                and since is not None
                and since > self.table.stale_after + DEAD_AFTER_STALE
                and not late
                and not self.busy(e.peer_id)
                and now >= self._closing.get(e.peer_id, 0.0)
            ):
                self._closing[e.peer_id] = now + 30.0
                nursery.start_soon(self._close_dead, e.peer_id, age)
        if len(self._closing) > 4 * SWEEP_MAX_CONNECTIONS:
            self._closing = {p: t for p, t in self._closing.items() if t > now}
        if len(connected) >= SWEEP_MAX_CONNECTIONS:
            return
        for e in self.table:
            if len(self._dialing) >= MAX_PARALLEL_DIALS:
                return
            if e.connected or e.blocked or e.peer_id in self._dialing:
                continue
            if self.table.state(e) not in (PeerState.PENDING, PeerState.UNREACHABLE):
                continue  # no fresh record: nothing says it is there
            if now < self._next_dial.get(e.peer_id, 0.0):
                continue
            nursery.start_soon(self._dial_in_background, e.peer_id)

    async def _close_dead(self, peer_id: str, age: float | None) -> None:
        """A cut cable leaves TCP "established" for many minutes, and nobody redials a peer that
        still counts as connected: close a connection that has carried no health record for
        long, so that whoever can dial (the side behind NAT, the bootstrap loop) dials afresh
        once the path is back."""
        log.info("peer %s: no health record for %.0fs; closing its connection", peer_id, age or 0.0)
        with trio.move_on_after(5):
            try:
                await self.fh.host.disconnect(libp2p_id(peer_id))
            except Exception as exc:
                log.debug("closing the connection to %s failed: %s", peer_id, exc)

    async def _dial_in_background(self, peer_id: str) -> None:
        self._dialing.add(peer_id)
        try:
            await self.dial(peer_id)
            self._backoff.pop(peer_id, None)
        except Exception as exc:  # DialError, or a claim the library chokes on: this peer's loss only
            backoff = min(self._backoff.get(peer_id, REDIAL_MIN / 2) * 2, REDIAL_MAX)
            self._backoff[peer_id] = backoff
            self._next_dial[peer_id] = trio.current_time() + backoff
            if backoff == REDIAL_MIN:
                log.info("peer %s is unreachable: %s", peer_id, str(exc).removeprefix(f"{peer_id}: "))
        finally:
            self._dialing.discard(peer_id)

    async def _keep_bootstrap(self, addr: str) -> None:
        backoff = 1.0
        peer_id = addr.rsplit("/p2p/", 1)[-1]
        while True:
            if not self.fh.is_connected(peer_id):
                try:
                    await self.fh.dial(addr, timeout=self.dial_timeout)
                    log.info("connected to bootstrap %s", addr)
                    backoff = 1.0
                except DialError as exc:
                    log.warning("bootstrap unreachable: %s (retry in %.0fs)", exc, backoff)
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, BOOTSTRAP_REDIAL_MAX)
                    continue
            await trio.sleep(2.0)

    # --- states --------------------------------------------------------------------------------
    async def _watch_states(self) -> None:
        """One log line per change of a peer's state or served realms (joins, stalls,
        recoveries), and peers gone for good (``forget_after``) leave the table."""
        last: dict[str, tuple[PeerState, str]] = {}
        while True:
            for e in self.table:
                state = self.table.state(e)
                realms = ",".join(r.name for r in e.record.realms) if e.record else ""
                if last.get(e.peer_id) != (state, realms):
                    if state is PeerState.LIVE:
                        log.info("peer %s is live (serves: %s)", e.peer_id, realms or "none")
                    elif state in (PeerState.STALE, PeerState.UNREACHABLE, PeerState.CIRCUIT_OPEN):
                        log.warning("peer %s is %s", e.peer_id, state.value)
                    elif state is PeerState.UNRESPONSIVE:
                        log.warning("peer %s is unresponsive: %s", e.peer_id, e.unresponsive)
                    elif state is PeerState.BLOCKED:
                        log.info("peer %s is blocked", e.peer_id)
                    last[e.peer_id] = (state, realms)
            pruned = self.table.prune(max_age=self.forget_after, max_peers=self.max_peers)
            if pruned:
                log.info("forgot %d peer(s) not heard from in a long time", pruned)
                known = {e.peer_id for e in self.table}
                last = {k: v for k, v in last.items() if k in known}
            await trio.sleep(self.state_interval)

    # --- connection events -------------------------------------------------------------------
    async def _watch_connections(self) -> None:
        async with trio.open_nursery() as nursery:
            async for ev in self.fh.connection_events:
                if ev.connected:
                    self.table.hear_of(ev.peer_id, source="connection")
                    self.table.set_connected(ev.peer_id, True, relayed=ev.relayed)
                    self._backoff.pop(ev.peer_id, None)
                    self._next_dial.pop(ev.peer_id, None)
                    if ev.remote and ev.outbound and not ev.relayed:
                        # An address we dialed and that worked: the one to use next time.
                        self.table.verify_addr(ev.peer_id, ev.remote)
                    if ev.remote and addrlib.scope(ev.remote) == "loopback":
                        self._same_host.add(ev.peer_id)
                    nursery.start_soon(self.fh.add_dht_peer, ev.peer_id)
                    self.on_connect(ev.peer_id)
                    log.debug("connection up: %s %s", ev.peer_id, ev.remote)
                else:
                    still = self.fh.connection(ev.peer_id)
                    self.table.set_connected(ev.peer_id, still is not None, relayed=bool(still and still[2]))
                    log.debug("connection down: %s", ev.peer_id)

    async def _ping_peers(self) -> None:
        """RTTs for the score, and the cheap probe that finds a frozen peer: one whose health
        record is late gets a ping on its open connection, and is unresponsive (out of
        routing) if it does not answer within PROBE_TIMEOUT. One ping in flight per peer: a
        ping stuck on a dead connection holds up no other.

        Routine RTTs come from the connection's muxer, which pings on its own (yamux, every
        30 s, one frame each way): a ping stream costs a stream, a protocol negotiation and
        five or so frames, and at an idle node those were a third of its writes. A ping stream
        only where the muxer measures nothing. The loop sleeps until the first moment a peer
        can fall quiet or is due, rather than looking every PROBE_EVERY."""
        from libp2p.host.ping import PingService

        pinger = PingService(self.fh.host)
        in_flight: set[str] = set()
        last_ping: dict[str, float] = {}  # when the current (or last) ping or RTT reading was
        # A record arriving later only moves a peer's quiet moment later, so a peer that had
        # none at the last look is looked at again within this.
        longest = max(PROBE_EVERY, min(5.0, self.quiet_after / 2))

        async def ping(pid: str, timeout: float, quiet: float | None) -> None:
            answered = False
            try:
                with trio.move_on_after(timeout):
                    # The library rounds RTTs to whole milliseconds; time it ourselves.
                    t0 = trio.current_time()
                    if await pinger.ping(libp2p_id(pid)):
                        answered = True
                        self.table.record_rtt(pid, (trio.current_time() - t0) * 1000.0)
            except Exception:
                pass
            finally:
                in_flight.discard(pid)
            if quiet is not None and not answered:
                self.table.mark_unresponsive(
                    pid, f"no health record for {quiet:.1f}s and no answer to a ping in {timeout:g}s"
                )

        async with trio.open_nursery() as nursery:
            while True:
                now = trio.current_time()
                wake = now + longest
                for pid in self.fh.connected_peers():
                    entry = self.table.get(pid)
                    age = self.table.record_age(entry) if entry is not None else None
                    watched = entry is not None and age is not None and not entry.unresponsive
                    quiet = watched and age is not None and age > self.quiet_after
                    since = now - last_ping.get(pid, -1e9)
                    if pid in in_flight:
                        if quiet and since >= PROBE_TIMEOUT:  # a routine ping unanswered this long
                            self.table.mark_unresponsive(
                                pid, f"no health record for {age:.1f}s and no answer to a ping in {since:.1f}s"
                            )
                        elif quiet:
                            wake = min(wake, now - since + PROBE_TIMEOUT)
                        continue
                    if quiet and since >= 2 * PROBE_TIMEOUT:
                        in_flight.add(pid)
                        last_ping[pid] = now
                        nursery.start_soon(ping, pid, PROBE_TIMEOUT, age)
                        wake = min(wake, now + PROBE_TIMEOUT)
                        continue
                    if since >= PING_INTERVAL:
                        last_ping[pid] = now
                        rtt = self.fh.muxer_rtt(pid)
                        if rtt is None:  # a muxer that does not measure: a ping stream
                            in_flight.add(pid)
                            nursery.start_soon(ping, pid, PING_TIMEOUT, None)
                        elif rtt > 0:
                            self.table.record_rtt(pid, rtt * 1000.0)
                        else:  # not measured yet (the muxer's first ping goes out 0.5 s in)
                            last_ping[pid] = now - PING_INTERVAL + 1.0
                        since = now - last_ping[pid]
                    wake = min(wake, now - since + PING_INTERVAL)
                    if quiet:
                        wake = min(wake, now - since + 2 * PROBE_TIMEOUT)
                    elif watched and age is not None:
                        wake = min(wake, now - age + self.quiet_after + 1e-3)
                if len(last_ping) > 4 * len(in_flight) + 1024:
                    connected = self.fh.connected_peers()
                    for pid in [p for p in last_ping if p not in connected]:
                        del last_ping[pid]
                await trio.sleep_until(max(wake, now + PROBE_EVERY))
