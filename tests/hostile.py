"""What the tests' hostile peers are made of: an in-process libp2p host built with the node's own
p2p code, and a reader of the query protocol's frames."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from rentahal.p2p import wire
from rentahal.p2p.host import FederationHost, open_federation_host
from rentahal.p2p.identity import Identity


@asynccontextmanager
async def stranger() -> AsyncIterator[tuple[FederationHost, Identity]]:
    """A libp2p host with a fresh identity, listening on loopback."""
    me = Identity(Ed25519PrivateKey.generate())
    async with open_federation_host(me, ["/ip4/127.0.0.1/tcp/0"]) as fh:
        yield fh, me


async def frames(stream: Any) -> AsyncIterator[wire.Message]:
    """Every query-protocol message on ``stream`` until it ends."""
    decoder = wire.FrameDecoder()
    while True:
        for msg in decoder.messages():
            yield msg
        data = await stream.read(65536)
        if not data:
            return
        decoder.feed(data)
