"""Peer maintenance (p2p/maintenance.py) between real libp2p hosts in this process: the round
trip shown for a peer comes from the connection's muxer, which pings on its own, not from ping
streams; a peer whose health record is late is probed on the ping protocol at once, and one that
does not answer is out of routing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from rentahal.p2p.health import HealthRecord, RealmStatus
from rentahal.p2p.host import FederationHost, open_federation_host
from rentahal.p2p.identity import Identity
from rentahal.p2p.maintenance import PeerMaintenance
from rentahal.p2p.peers import PeerState, PeerTable

PING = "/ipfs/ping/1.0.0"


async def _host(stack: AsyncExitStack) -> FederationHost:
    return await stack.enter_async_context(
        open_federation_host(Identity(Ed25519PrivateKey.generate()), ["/ip4/127.0.0.1/tcp/0"])
    )


def _count_streams(fh: FederationHost) -> list[str]:
    """The protocols of every stream ``fh`` opens from now on."""
    opened: list[str] = []
    new_stream = fh.host.new_stream

    async def counting(peer_id: Any, protocols: Any, *a: Any, **kw: Any) -> Any:
        opened.extend(str(p) for p in protocols)
        return await new_stream(peer_id, protocols, *a, **kw)

    fh.host.new_stream = counting
    return opened


def _table(fh: FederationHost) -> PeerTable:
    return PeerTable(
        fh.peer_id,
        stale_after=30.0,
        breaker_failures=3,
        breaker_backoff=5.0,
        breaker_backoff_max=60.0,
        half_life=60.0,
        clock=trio.current_time,
    )


@asynccontextmanager
async def _pair(quiet_after: float) -> AsyncIterator[tuple[FederationHost, PeerTable, list[str], PeerMaintenance]]:
    """Host A connected to host B: (B, A's peer table, the protocols of the streams A opens, A's
    maintenance service, not yet started)."""
    async with AsyncExitStack() as stack:
        a, b = await _host(stack), await _host(stack)
        opened = _count_streams(a)
        table = _table(a)
        await a.dial(b.addrs()[0], timeout=15)
        table.set_connected(b.peer_id, True)
        yield b, table, opened, PeerMaintenance(a, table, dial_timeout=5.0, quiet_after=quiet_after)


def _record(peer_id: str) -> HealthRecord:
    return HealthRecord(peer_id, 1, 1_750_000_000.0, (RealmStatus("chat", "m", True, 0, 1, 0.0, False),), 1.0)


async def test_round_trips_come_from_the_muxer_without_a_ping_stream() -> None:
    async with _pair(quiet_after=11.0) as (b, table, opened, maintenance):
        async with trio.open_nursery() as nursery:
            await nursery.start(maintenance.run)
            with trio.fail_after(10):  # yamux pings 0.5 s after the connection is up
                while (e := table.get(b.peer_id)) is None or e.rtt_ms is None:
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
    assert e.rtt_ms is not None and 0.0 < e.rtt_ms < 1000.0
    assert PING not in opened, opened


async def test_a_peer_whose_record_is_late_is_probed_and_out_of_routing_if_it_does_not_answer() -> None:
    async with _pair(quiet_after=1.0) as (b, table, opened, maintenance):
        assert table.apply_record(_record(b.peer_id))
        async with trio.open_nursery() as nursery:
            await nursery.start(maintenance.run)
            # Answering pings: probed once the record is a second old, and still live after.
            with trio.fail_after(10):
                while PING not in opened:
                    await trio.sleep(0.05)
            probed_at = trio.current_time()
            e = table.get(b.peer_id)
            assert e is not None
            record_age = table.record_age(e)
            assert record_age is not None and 1.0 <= record_age < 3.0, record_age  # not before it is late
            with trio.fail_after(5):
                while opened.count(PING) < 2:  # probed again a second later, answered
                    await trio.sleep(0.05)
            assert table.state(e) is PeerState.LIVE and not e.unresponsive
            # B stops answering pings (as a frozen process would): out of routing at the next probe.
            b.host.remove_stream_handler(PING)
            with trio.fail_after(5):
                while not e.unresponsive:
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
    assert "no answer to a ping" in e.unresponsive
    assert trio.current_time() - probed_at < 4.0
