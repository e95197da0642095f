"""GossipSub as the node builds it (p2p/host.py), between real libp2p hosts in this process: a
peer that joins after the federation has run a while gets what is current, promptly, and not
what was said minutes ago.

py-libp2p 0.8.1's "adaptive gossip" (on by default) rates a mesh smaller than its target degree
as poor health and, 30 s after start, sets the GossipSub heartbeat from 1 s to 30-60 s: in any
federation of under 7 nodes meshes were repaired once a minute, and the message cache, which
pubsub replays to each peer that connects, held minutes of records. Restarted nodes were handed
records up to 177 s old (the hour-long soak) and blocked their own bootstrap peer over them.
"""

from __future__ import annotations

import struct
import time
from contextlib import AsyncExitStack

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from rentahal.p2p.host import FederationHost, open_federation_host
from rentahal.p2p.identity import Identity

TOPIC = "test-mesh"
ADAPTS_AFTER = 30.0  # py-libp2p's network-health check runs once 30 s have passed since start


async def _host(stack: AsyncExitStack) -> FederationHost:
    return await stack.enter_async_context(
        open_federation_host(Identity(Ed25519PrivateKey.generate()), ["/ip4/127.0.0.1/tcp/0"])
    )


async def _publish_stamped(fh: FederationHost) -> None:
    """A message every 0.25 s carrying the wall-clock time it was published at."""
    while True:
        try:
            await fh.pubsub.publish(TOPIC, struct.pack("!d", time.time()))
        except Exception:  # no peer subscribed yet: the next one goes out
            pass
        await trio.sleep(0.25)  # the publishing rate, not synchronisation


async def test_a_peer_joining_a_running_federation_gets_current_messages_promptly_and_no_old_ones() -> None:
    async with AsyncExitStack() as stack:
        x, hub = await _host(stack), await _host(stack)
        await x.dial(hub.addrs()[0], timeout=15)
        await hub.pubsub.subscribe(TOPIC)  # the hub relays X's messages: it must be in the topic
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_publish_stamped, x)
            # Run past the point where the library's health check would slow the heartbeat.
            await trio.sleep(ADAPTS_AFTER + 15.0)  # the federation's age is the test's subject
            async with open_federation_host(Identity(Ed25519PrivateKey.generate()), ["/ip4/127.0.0.1/tcp/0"]) as late:
                sub = await late.pubsub.subscribe(TOPIC)
                joined = time.time()
                await late.dial(hub.addrs()[0], timeout=15)
                ages: list[float] = []
                with trio.fail_after(20):
                    while True:
                        msg = await sub.get()
                        published = struct.unpack("!d", msg.data)[0]
                        ages.append(joined - published)
                        if published > joined:  # one published after it joined: relayed through the mesh
                            break
                arrived_after = time.time() - joined
            nursery.cancel_scope.cancel()
    # The hub replays its message cache (3 heartbeats) to a new peer: seconds, not minutes.
    assert max(ages) < 8.0, f"replayed messages {max(ages):.0f}s old: {sorted(ages)[-5:]}"
    # The hub grafts the new peer into its mesh at its next heartbeat (1 s), not a minute later.
    assert arrived_after < 8.0, f"the first relayed message came {arrived_after:.1f}s after joining"
