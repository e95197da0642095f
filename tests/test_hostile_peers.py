"""A real node process faced with peers that misbehave, played by an in-process libp2p host.

The test's host is built with the node's own p2p code (Noise, Yamux, GossipSub, DHT) unless the
test needs something the node would never do, such as offering plaintext.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import msgpack
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from rentahal.p2p import wire
from rentahal.p2p.health import HEALTH_TOPIC, HealthRecord, RealmStatus, sign_record
from rentahal.p2p.host import FederationHost, open_federation_host
from rentahal.p2p.identity import Identity
from rentahal.realms.events import Code
from rentahal.scripts.federation import Federation, NodeProcess


@pytest.fixture
def node(federation: Federation) -> NodeProcess:
    return federation.start("B", serve="chat")


@asynccontextmanager
async def probe_host() -> AsyncIterator[tuple[FederationHost, Identity]]:
    me = Identity(Ed25519PrivateKey.generate())
    async with open_federation_host(me, ["/ip4/127.0.0.1/tcp/0"]) as fh:
        yield fh, me


async def eventually(check: Callable[[], Any], timeout: float = 20.0, every: Callable[[], Any] | None = None) -> Any:
    """Re-run a blocking ``check`` (a CLI call) in a thread until it returns something truthy."""
    with trio.fail_after(timeout):
        while True:
            if every is not None:
                await every()
            value = await trio.to_thread.run_sync(check)
            if value:
                return value
            await trio.sleep(0.3)  # pacing between CLI polls, not synchronisation


async def test_plaintext_dialer_is_refused_and_noise_dialer_accepted(node: NodeProcess) -> None:
    import multiaddr
    from libp2p import create_yamux_muxer_option, new_host
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.peerinfo import info_from_p2p_addr
    from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport

    key_pair = create_new_key_pair()
    plaintext_only = {PLAINTEXT_PROTOCOL_ID: InsecureTransport(key_pair)}
    host = new_host(key_pair=key_pair, sec_opt=plaintext_only, muxer_opt=create_yamux_muxer_option())
    async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        with pytest.raises(Exception) as refused:
            with trio.fail_after(15):
                await host.connect(info_from_p2p_addr(multiaddr.Multiaddr(node.addr)))
        assert not isinstance(refused.value, trio.TooSlowError)
        assert not host.get_network().get_connections()

    async with probe_host() as (fh, _):
        assert await fh.dial(node.addr, timeout=15) == node.peer_id
        assert fh.is_connected(node.peer_id)


def _record(me: Identity, seq: int, *, peer_id: str | None = None) -> HealthRecord:
    return HealthRecord(
        peer_id=peer_id or me.peer_id,
        seq=seq,
        timestamp=time.time(),
        realms=(RealmStatus("chat", model="forged-model", queue_depth=0, slots=1),),
        version="test",
    )


def _forged_envelope(me: Identity, victim: str, seq: int) -> bytes:
    """A record about ``victim``, validly signed, but by *my* key."""
    body = msgpack.packb(_record(me, seq, peer_id=victim).to_body(), use_bin_type=True)
    return msgpack.packb({"body": body, "key": me.public_bytes, "sig": me.sign(body)}, use_bin_type=True)


async def test_health_record_not_signed_by_its_subject_is_ignored(node: NodeProcess) -> None:
    victim = Identity(Ed25519PrivateKey.generate()).peer_id
    async with probe_host() as (fh, me):
        await fh.dial(node.addr, timeout=15)
        await fh.pubsub.subscribe(HEALTH_TOPIC)
        seq = [0]

        async def publish_forged() -> None:
            seq[0] += 1
            await fh.pubsub.publish(HEALTH_TOPIC, _forged_envelope(me, victim, seq[0]))

        mark = node.mark()
        await eventually(
            lambda: any("ignored health record" in line for line in node.lines[mark:]), every=publish_forged
        )
        line = next(line for line in node.lines[mark:] if "ignored health record" in line)
        assert me.peer_id in line and "signed by a key that is not" in line
        peers = await trio.to_thread.run_sync(node.cli_json, "peers")
        assert victim not in {p["peer_id"] for p in peers}
        mine = next((p for p in peers if p["peer_id"] == me.peer_id), None)
        assert mine is None or mine["state"] != "live"

        # The same host's own, honestly signed record is accepted: the refusal above was the forgery.
        async def publish_genuine() -> None:
            seq[0] += 1
            await fh.pubsub.publish(HEALTH_TOPIC, sign_record(_record(me, seq[0]), me))

        peer = await eventually(
            lambda: (p := node.peer(me.peer_id)) and p["state"] == "live" and p, every=publish_genuine
        )
        assert peer["realms"] == ["chat"] and peer["models"] == {"chat": "forged-model"}


async def _raw_query_stream(fh: FederationHost, node: NodeProcess) -> Any:
    from libp2p.peer.id import ID

    return await fh.host.new_stream(ID.from_base58(node.peer_id), [wire.PROTOCOL_ID])


async def _read_all(stream: Any) -> tuple[list[wire.Message], str]:
    """Messages until the stream ends, and how it ended."""
    from libp2p.network.stream.exceptions import StreamEOF, StreamReset

    decoder = wire.FrameDecoder()
    with trio.fail_after(15):
        while True:
            try:
                data = await stream.read(65536)
            except StreamReset:
                return list(decoder.messages()), "reset"
            except StreamEOF:
                return list(decoder.messages()), "eof"
            if not data:
                return list(decoder.messages()), "eof"
            decoder.feed(data)


async def _answer(stream: Any) -> list[wire.Message]:
    """Frames of one query until its result or error (the stream stays open for more)."""
    decoder = wire.FrameDecoder()
    out: list[wire.Message] = []
    with trio.fail_after(15):
        while True:
            for msg in decoder.messages():
                if not (isinstance(msg, wire.Progress) and msg.stage == "keepalive"):
                    out.append(msg)
                if isinstance(msg, (wire.Result, wire.Error)):
                    return out
            decoder.feed(await stream.read(65536))


@pytest.mark.parametrize(
    "garbage, code",
    [
        (b"\x00\x00\x00\x05hello", "bad_request"),  # not msgpack
        (wire.encode(wire.Token(query_id="q1", text="x", index=0)), None),  # a requester's token: reset
        ((64 * 1024 * 1024).to_bytes(4, "big") + b"\x81", None),  # oversized: reset, no answer
    ],
)
async def test_malformed_frames_reset_the_stream_and_count_against_the_sender(
    node: NodeProcess, garbage: bytes, code: str | None
) -> None:
    async with probe_host() as (fh, me):
        await fh.dial(node.addr, timeout=15)
        stream = await _raw_query_stream(fh, node)
        await stream.write(garbage)
        messages, ending = await _read_all(stream)
        # py-libp2p's yamux reports a reset that follows buffered data as either reset or EOF.
        assert ending in ("reset", "eof")
        if code is None:
            assert messages == []
        else:
            assert [type(m) for m in messages] == [wire.Error] and messages[0].code.value == code
        peer = await trio.to_thread.run_sync(node.peer, me.peer_id)
        assert peer is not None and peer["violations"] == 1
        # The node is unharmed: a well-formed request on a new stream is answered.
        stream = await _raw_query_stream(fh, node)
        request = wire.QueryRequest(
            version=wire.PROTOCOL_VERSION,
            query_id="q2",
            realm="chat",
            payload={"prompt": "hi", "max_tokens": 8},
            deadline_ms=30_000,
            origin=me.peer_id,
        )
        await stream.write(wire.encode(request))
        messages = await _answer(stream)
        assert isinstance(messages[0], wire.Accepted)
        assert isinstance(messages[-1], wire.Result) and messages[-1].stats["tokens"] >= 1


async def test_bad_payload_is_refused_with_a_code_not_a_crash(node: NodeProcess) -> None:
    async with probe_host() as (fh, me):
        await fh.dial(node.addr, timeout=15)
        stream = await _raw_query_stream(fh, node)
        request = wire.QueryRequest(
            version=wire.PROTOCOL_VERSION,
            query_id="q3",
            realm="chat",
            payload={"prompt": "hi", "max_tokens": -5},
            deadline_ms=30_000,
            origin=me.peer_id,
        )
        await stream.write(wire.encode(request))
        messages = await _answer(stream)
        err = messages[-1]
        assert isinstance(err, wire.Error) and err.code is Code.BAD_REQUEST
        assert "max_tokens" in err.message
        request = wire.QueryRequest(  # on the same stream: it carries any number of queries
            version=wire.PROTOCOL_VERSION,
            query_id="q4",
            realm="imagine",
            payload={"prompt": "a cat"},
            deadline_ms=30_000,
            origin=me.peer_id,
        )
        await stream.write(wire.encode(request))
        messages = await _answer(stream)
        assert isinstance(messages[-1], wire.Error)
        assert messages[-1].code is Code.REALM_NOT_SERVED


async def test_node_advertises_its_realm_in_the_dht(node: NodeProcess) -> None:
    async with probe_host() as (fh, _):
        await fh.dial(node.addr, timeout=15)

        async def lookup() -> dict[str, tuple[str, ...]]:
            return await fh.find_realm_providers("chat")

        found: dict[str, tuple[str, ...]] = {}
        with trio.fail_after(20):
            while node.peer_id not in found:
                found = await lookup()
                if node.peer_id not in found:
                    await trio.sleep(0.3)  # the node provides once its model is loaded
        assert list(found).count(node.peer_id) == 1
        assert await fh.find_realm_providers("imagine") == {}


async def test_forged_or_replayed_record_is_not_relayed_onward(node: NodeProcess) -> None:
    """X and Y are connected only through the node: what X publishes reaches Y only if the
    node's GossipSub validator let it through."""
    victim = Identity(Ed25519PrivateKey.generate()).peer_id
    async with probe_host() as (fx, x), probe_host() as (fy, _):
        await fx.dial(node.addr, timeout=15)
        await fy.dial(node.addr, timeout=15)
        sub = await fy.pubsub.subscribe(HEALTH_TOPIC)
        await fx.pubsub.subscribe(HEALTH_TOPIC)
        from libp2p.peer.id import ID

        seen: list[bytes] = []

        async def collect() -> None:
            while True:
                msg = await sub.get()
                if ID(msg.from_id).to_base58() == x.peer_id:
                    seen.append(bytes(msg.data))

        genuine = sign_record(_record(x, 10), x)
        forged = _forged_envelope(x, victim, 11)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(collect)
            # Meshes form within a few heartbeats: publish the genuine record until Y has it.
            with trio.fail_after(20):
                while genuine not in seen:
                    await fx.pubsub.publish(HEALTH_TOPIC, genuine)
                    await trio.sleep(0.3)  # pacing the republish, not synchronisation
            # Now a forgery and a replay of the genuine record (same seq), several times each,
            # then a fresh genuine record as the marker that everything before it was handled.
            for _ in range(5):
                await fx.pubsub.publish(HEALTH_TOPIC, forged)
                await fx.pubsub.publish(HEALTH_TOPIC, genuine)
            marker = sign_record(_record(x, 12), x)
            with trio.fail_after(20):
                while marker not in seen:
                    await fx.pubsub.publish(HEALTH_TOPIC, marker)
                    await trio.sleep(0.3)
            nursery.cancel_scope.cancel()
        assert forged not in seen
        assert seen.count(genuine) == 1, "the replayed record was relayed"


async def test_old_records_are_dropped_without_blaming_whoever_relayed_them(node: NodeProcess) -> None:
    """Records minutes old, but genuinely signed, as pubsub hands a (re)connecting peer when it
    replays what it held: dropped, one log line, and not a protocol violation of the peer they
    came through (restarted nodes used to block their own bootstrap peer over them)."""
    async with probe_host() as (fh, me):
        await fh.dial(node.addr, timeout=15)
        await fh.pubsub.subscribe(HEALTH_TOPIC)
        mark = node.mark()
        for seq in range(1, 41):  # twice the violations that block a peer
            old = replace(_record(me, seq), timestamp=time.time() - 300)
            await fh.pubsub.publish(HEALTH_TOPIC, sign_record(old, me))
        seq = [100]

        async def publish_fresh() -> None:
            seq[0] += 1
            await fh.pubsub.publish(HEALTH_TOPIC, sign_record(_record(me, seq[0]), me))

        # A fresh record taken means the old ones before it on the same stream were handled.
        peer = await eventually(
            lambda: (p := node.peer(me.peer_id)) and p["state"] == "live" and p, every=publish_fresh
        )
        lines = node.lines[mark:]
        assert not any("protocol violation by" in x for x in lines), "\n".join(lines)
        assert not peer.get("blocked"), peer
        assert any(f"ignored health record from {me.peer_id}: timestamp" in x and "s old" in x for x in lines), lines


async def test_a_peer_sending_junk_streams_is_logged_once_then_disconnected_and_blocked(node: NodeProcess) -> None:
    """Many malformed streams: a log line or two, not one per stream; past the limit the peer is
    disconnected, blocked (with the reason in `peers`), and its new streams are reset unread. The
    node goes on serving everyone else."""
    from libp2p.peer.id import ID

    async with probe_host() as (fh, me):
        await fh.dial(node.addr, timeout=15)
        mark = node.mark()
        sent = 0
        with trio.fail_after(60):
            while fh.is_connected(node.peer_id) and sent < 200:
                try:
                    stream = await fh.host.new_stream(ID.from_base58(node.peer_id), [wire.PROTOCOL_ID])
                    await stream.write(b"\x00\x00\x00\x05hello")
                    await _read_all(stream)
                except Exception:
                    break  # the connection went away under us: that is the point
                sent += 1
        assert sent < 60, sent  # cut off well before 200
        peer = await eventually(lambda: (p := node.peer(me.peer_id)) and p["state"] == "blocked" and p)
        assert "protocol violations" in peer["blocked"]
        lines = [x for x in node.lines[mark:] if "protocol violation by" in x and me.peer_id in x]
        assert 1 <= len(lines) <= 2, lines
        assert any(f"blocked peer {me.peer_id}" in x for x in node.lines[mark:])
        # Back again: its connection is closed once the handshake shows who it is, before
        # anything is read or answered (or, caught mid-way, its streams are reset).
        from libp2p.host.exceptions import StreamFailure
        from libp2p.network.exceptions import SwarmException
        from libp2p.network.stream.exceptions import StreamReset
        from libp2p.protocol_muxer.exceptions import MultiselectClientError

        from rentahal.p2p.host import DialError

        try:
            await fh.dial(node.addr, timeout=15)
            stream = await _raw_query_stream(fh, node)
            await stream.write(
                wire.encode(
                    wire.QueryRequest(
                        wire.PROTOCOL_VERSION, "q9", "chat", {"prompt": "hi", "max_tokens": 2}, 30_000, me.peer_id
                    )
                )
            )
            messages, ending = await _read_all(stream)
        except (StreamReset, MultiselectClientError, StreamFailure, SwarmException, DialError):  # closed or reset first
            messages, ending = [], "reset"
        assert messages == [] and ending in ("reset", "eof")
    # An honest client is served as before.
    res = await trio.to_thread.run_sync(lambda: node.cli("query", "chat", "hello", "--max-tokens", "4"))
    assert res.stdout.strip()
