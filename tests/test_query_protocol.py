"""The query protocol between two real libp2p hosts in this process."""

from __future__ import annotations

from typing import Any

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from rentahal.p2p import wire
from rentahal.p2p.host import open_federation_host
from rentahal.p2p.identity import Identity
from rentahal.p2p.query import IncomingQuery, QueryClient, QueryService


async def test_hundreds_of_queries_over_one_connection() -> None:
    """Every query opens a stream; each must be closed, or yamux's 256-stream limit stops
    routing to that peer after 255 queries (found by the routing benchmark)."""
    served = 0

    async def handler(incoming: IncomingQuery, emit: Any) -> dict[str, Any]:
        nonlocal served
        served += 1
        await emit({"type": "token", "text": "hi", "index": 0})
        return {"output": {"text": "hi"}, "stats": {"tokens": 1}}

    a_id, b_id = (Identity(Ed25519PrivateKey.generate()) for _ in range(2))
    async with open_federation_host(a_id, ["/ip4/127.0.0.1/tcp/0"]) as a, \
            open_federation_host(b_id, ["/ip4/127.0.0.1/tcp/0"]) as b:
        b.set_stream_handler(wire.PROTOCOL_ID, QueryService(handler).handle_stream)
        await a.dial(b.addrs()[0], timeout=10)
        client = QueryClient(a.host, a.peer_id, dial_timeout=5)
        tokens: list[dict[str, Any]] = []

        async def emit(event: dict[str, Any]) -> None:
            tokens.append(event)

        with trio.fail_after(120):
            for i in range(300):
                result = await client.execute(
                    b.peer_id, query_id=f"q{i}", realm="chat", payload={"prompt": "x"},
                    deadline_s=10, emit=emit, hang_timeout=5,
                )
                assert result["output"] == {"text": "hi"}
    assert served == 300 and len(tokens) == 300
