"""A standard libp2p peer, not ours: js-libp2p (tests/js_peer, versions pinned in its lockfile)
connects to a node over TCP + Noise + Yamux, finds it as a provider of the chat realm's CIDv1 in
the Kademlia DHT, and receives its signed health records on GossipSub.

Needs Node.js and `npm ci --prefix tests/js_peer` (scripts/test.sh runs it); skipped loudly
otherwise."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from rentahal.p2p.host import realm_cid
from rentahal.scripts.federation import Federation

PEER = Path(__file__).parent / "js_peer"
NODE = shutil.which("node")
_WHY = (
    "Node.js is not installed"
    if NODE is None
    else "tests/js_peer/node_modules is missing (npm ci --prefix tests/js_peer)"
    if not (PEER / "node_modules" / "libp2p").is_dir()
    else None
)
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"SKIPPED, NO JS-LIBP2P PEER: {_WHY}")


def test_js_libp2p_peer_finds_the_chat_provider_and_hears_health_gossip(federation: Federation) -> None:
    node = federation.start("A", serve="chat")
    res = subprocess.run(
        [NODE or "node", str(PEER / "peer.mjs"), node.addr, "20", "40"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
    kinds = {x["kind"]: x for x in lines}
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert kinds["key"]["cid"] == realm_cid("chat") and kinds["key"]["equal"]
    assert kinds["connected"]["encryption"] == "/noise" and kinds["connected"]["multiplexer"] == "/yamux/1.0.0"
    protocols = kinds["remote-protocols"]["protocols"]
    assert {"/ipfs/kad/1.0.0", "/meshsub/1.1.0", "/rentahal/query/2.0.0"} <= set(protocols)
    provider = next(x for x in lines if x["kind"] == "provider" and x["matches"])
    assert provider["peer"] == node.peer_id
    assert any(x["kind"] == "health" and x["from"] == node.peer_id and x["type"] == "signed" for x in lines)
