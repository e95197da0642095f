"""Resource budgets against hostile peers and clients (buffered frame bytes, query streams,
inbound connections and handshakes per address, websocket message bytes), tested on the budget
objects and on a real node process."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from rentahal.p2p import wire
from rentahal.p2p.budget import ByteBudget, ConnectionGate, network_key
from rentahal.p2p.host import FederationHost, open_federation_host
from rentahal.p2p.identity import Identity
from rentahal.scripts.federation import Federation, NodeProcess

MiB = 1024 * 1024


def rss(node: NodeProcess) -> int:
    assert node.proc is not None
    with open(f"/proc/{node.proc.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@asynccontextmanager
async def probe_host() -> AsyncIterator[tuple[FederationHost, Identity]]:
    me = Identity(Ed25519PrivateKey.generate())
    async with open_federation_host(me, ["/ip4/127.0.0.1/tcp/0"]) as fh:
        yield fh, me


async def poll(check: Any, timeout: float = 20.0) -> Any:
    with trio.fail_after(timeout):
        while not (value := check()):
            await trio.sleep(0.1)  # pacing between polls, not synchronisation
        return value


# --- the budget objects -----------------------------------------------------------------------
def test_byte_budget_counts_per_key_and_in_all() -> None:
    b = ByteBudget(100, 60)
    assert b.reserve("a", 60) and not b.reserve("a", 1)
    assert b.reserve("b", 40) and not b.reserve("c", 1)
    assert "per-peer" in b.why_not("a", 1) and "all peers" in b.why_not("c", 1)
    b.release("a", 60)
    assert b.used == 40 and b.used_by("a") == 0 and b.reserve("c", 60)
    with pytest.raises(ValueError):
        b.release("b", 41)


def test_frame_decoder_reserves_large_frames_and_always_releases() -> None:
    b = ByteBudget(10 * MiB, 3 * MiB)
    big = wire.encode(wire.Token("q1", "x" * 60_000, 0))
    small = wire.encode(wire.Cancel("q1"))
    d = wire.FrameDecoder(budget=b, key="p", free_below=1024)
    d.feed(small + big[:100])  # a small frame, then the header of a large one
    assert d.next_message() == wire.Cancel("q1")
    assert d.next_message() is None and b.used_by("p") == len(big) - 4
    d.feed(big[100:])
    assert isinstance(d.next_message(), wire.Token) and b.used == 0
    # A header beyond the peer's share is refused before its bytes are kept.
    d2 = wire.FrameDecoder(budget=b, key="p")
    d2.feed((2 * MiB).to_bytes(4, "big") + b"x" * 1000)
    assert b.used_by("p") == 2 * MiB
    d3 = wire.FrameDecoder(budget=b, key="p")
    with pytest.raises(wire.OverBudget) as refused:
        d3.feed((2 * MiB).to_bytes(4, "big"))
    assert refused.value.code.value == "busy" and "per-peer budget" in str(refused.value)
    assert d3.buffered == 0 and b.used_by("p") == 2 * MiB
    d2.release()
    d2.release()  # idempotent
    assert b.used == 0
    # An error mid-frame gives its reservation back too.
    d4 = wire.FrameDecoder(budget=b, key="p", free_below=8)
    d4.feed((100).to_bytes(4, "big") + b"\xc1" * 100)
    with pytest.raises(wire.MalformedFrame):
        d4.next_message()
    assert b.used == 0


def test_connection_gate_limits_pending_open_and_total() -> None:
    now = [0.0]
    g = ConnectionGate(pending_per_ip=2, open_per_ip=3, total=5, clock=lambda: now[0])
    assert g.admit("a") is None and g.admit("a") is None
    assert "handshakes pending" in (g.admit("a") or "")
    g.upgraded("a")
    assert g.admit("a") is None  # 1 open + 2 pending
    g.upgraded("a")
    assert "connections open" in (g.admit("a") or "")
    assert g.admit("b") is None and g.admit("c") is None
    assert "in all" in (g.admit("d") or "")
    g.closed("b", upgraded=False)
    assert g.admit("d") is None
    g.closed("a", upgraded=True)
    assert g.pending["a"] == 1 and g.open["a"] == 2 and g.inbound == 4
    assert g.should_log("x") and not g.should_log("x")
    now[0] += 61
    assert g.should_log("x")
    assert network_key("2001:db8::1") == network_key("2001:db8::ffff") == "2001:db8::/64"
    assert network_key("::ffff:10.0.0.1") == "10.0.0.1"


# --- a real node --------------------------------------------------------------------------
@pytest.fixture
def node(federation: Federation) -> NodeProcess:
    return federation.start("B", serve="chat")


async def test_unfinished_large_frames_are_bounded_per_peer(node: NodeProcess) -> None:
    """48 streams each announcing an 8 MiB frame and sending part of it: the node buffers at
    most the peer's budget, counts the rest as violations (the peer is blocked), and serves
    an honest query afterwards."""
    from libp2p.peer.id import ID

    before = rss(node)
    refused = [0]
    async with probe_host() as (fh, me):
        await fh.dial(node.addr, timeout=15)
        mark = node.mark()
        header = wire.DEFAULT_MAX_FRAME.to_bytes(4, "big")
        part = header + b"\x00" * (4 * MiB)  # 48 x 4 MiB buffered without a budget

        async def attack() -> None:
            try:
                stream = await fh.host.new_stream(ID.from_base58(node.peer_id), [wire.PROTOCOL_ID])
                await stream.write(part)
            except Exception:
                refused[0] += 1

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for _ in range(48):
                    nursery.start_soon(attack)
        await poll(lambda: any(f"blocked peer {me.peer_id}" in x for x in node.lines[mark:]))
        grown = rss(node) - before
    print(f"RSS grew {grown / MiB:.1f} MiB; {refused[0]} of 48 attack streams failed on the attacker's side")
    assert grown < 16 * MiB + 32 * MiB, f"RSS grew {grown / MiB:.0f} MiB"
    lines = [x for x in node.lines[mark:] if "protocol violation by" in x and me.peer_id in x]
    assert 1 <= len(lines) <= 2, lines
    res = await trio.to_thread.run_sync(lambda: node.cli("query", "chat", "hello", "--max-tokens", "4"))
    assert res.stdout.strip()


def _idle_sockets(port: int, source: str, n: int) -> list[socket.socket]:
    out = []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind((source, 0))
        s.connect(("127.0.0.1", port))
        out.append(s)
    return out


async def test_idle_sockets_from_one_address_do_not_lock_out_other_peers(federation: Federation) -> None:
    """~250 idle TCP sockets from 127.0.0.2: the node refuses all but a few before any handshake,
    closes the admitted ones at the handshake timeout, and honest peers (127.0.0.1) connect."""
    node = federation.start("B", serve="none", settings={"limits.handshake_timeout": "3"})
    port = int(node.addr.split("/tcp/")[1].split("/")[0])
    mark = node.mark()
    socks = await trio.to_thread.run_sync(_idle_sockets, port, "127.0.0.2", 250)
    try:
        connected = []
        async with AsyncExitStack() as stack:
            hosts = [await stack.enter_async_context(probe_host()) for _ in range(5)]
            async with trio.open_nursery() as nursery:

                async def dial(fh: FederationHost) -> None:
                    try:
                        await fh.dial(node.addr, timeout=15)
                        connected.append(fh.is_connected(node.peer_id))
                    except Exception as exc:
                        print("honest dial failed:", exc)

                for fh, _ in hosts:
                    nursery.start_soon(dial, fh)
        print(f"honest peers connected: {sum(connected)} of 5")
        assert sum(connected) == 5
        refusals = [x for x in node.lines[mark:] if "refused inbound connections from 127.0.0.2" in x]
        assert len(refusals) == 1, refusals  # once a minute, not once a socket
        # The few admitted idle sockets are closed at the handshake timeout.

        def closed_by_node() -> int:
            n = 0
            for s in socks:
                s.setblocking(False)
                try:
                    n += s.recv(1) == b""
                except BlockingIOError:
                    pass
                except OSError:
                    n += 1
            return n

        await poll(lambda: closed_by_node() == len(socks), timeout=15)
    finally:
        for s in socks:
            s.close()


async def test_websocket_messages_are_capped_and_share_one_budget(node: NodeProcess) -> None:
    """32 messages of 15 MiB (8 clients at once): each is dropped as it arrives with a one-line
    error, RSS stays within the budget, and the websocket and the CLI work afterwards. A chat
    query over its own limit is refused after parsing, naming the limit."""
    from trio_websocket import open_websocket_url

    before = rss(node)
    big = json.dumps(
        {
            "op": "submit_query",
            "rid": 1,
            "realm": "vision",
            "payload": {"prompt": "x", "image": {"$bytes": "A" * (15 * MiB)}},
        }
    )
    answers: list[dict[str, Any]] = []

    async def client() -> None:
        async with open_websocket_url(node.ui, max_message_size=MiB) as ws:
            for _ in range(4):
                await ws.send_message(big)
                answers.append(json.loads(await ws.get_message()))

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(client)
    grown = rss(node) - before
    print(f"RSS grew {grown / MiB:.1f} MiB after 32 messages of 15 MiB")
    assert len(answers) == 32
    for a in answers:  # over the cap, or refused earlier while 8 of them filled the budget
        assert a["op"] == "error" and a["code"] in ("too_large", "busy") and "\n" not in a["message"], a
    assert any(a["code"] == "too_large" for a in answers)
    assert grown < 64 * MiB + 32 * MiB, f"RSS grew {grown / MiB:.0f} MiB"  # the budget, and slack

    async with open_websocket_url(node.ui, max_message_size=MiB) as ws:
        prompt = "y" * (2 * MiB)
        await ws.send_message(
            json.dumps({"op": "submit_query", "rid": 7, "realm": "chat", "payload": {"prompt": prompt}})
        )
        answer = json.loads(await ws.get_message())
        assert answer["op"] == "error" and answer["rid"] == 7 and answer["code"] == "too_large"
        assert "chat query is at most 1048576 bytes" in answer["message"]
        await ws.send_message(json.dumps({"op": "status", "rid": 8}))
        assert json.loads(await ws.get_message())["op"] == "status"
    res = await trio.to_thread.run_sync(lambda: node.cli("query", "chat", "hello", "--max-tokens", "4"))
    assert res.stdout.strip()
