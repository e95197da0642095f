"""Real networks: `rentahal-node run` processes on separate hosts (network namespaces), on one LAN
and behind home NAT routers (nftables masquerade), each node on its default listen address.

These need root, iproute2 and nftables (scripts/test.sh installs the tools; CI runs as root).
Where a testbed cannot be built the tests are skipped with the reason, never passed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from rentahal.scripts import testbed as tb
from rentahal.scripts.federation import Federation, NodeProcess

_WHY = tb.unavailable()
pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(_WHY is not None, reason=f"SKIPPED, NO MULTI-HOST TESTBED: {_WHY}"),
]

CHAT = {"realms.chat.max_tokens": "4000", "realms.chat.n_ctx": "4096"}


@pytest.fixture
def net(tmp_path: Path) -> Iterator[tuple[tb.Testbed, Federation]]:
    bed = tb.Testbed()
    fed = Federation(tmp_path)
    try:
        yield bed, fed
    finally:
        fed.close()
        bed.close()


def start(fed: Federation, host: tb.Host, name: str, **kw: object) -> NodeProcess:
    """A node on ``host`` with its default listen address (0.0.0.0, port 4001)."""
    node = NodeProcess(fed.root / name, name=name, netns=host.ns, listen=None, **kw)  # type: ignore[arg-type]
    fed.nodes.append(node)
    return node.launch()


def answered_by(node: NodeProcess, prompt: str = "hello") -> str:
    res = node.cli("query", "chat", prompt, "--max-tokens", "8", "--seed", "1", timeout=90)
    assert res.stdout.strip(), res.stderr
    line = next((x for x in res.stderr.splitlines() if "answered by" in x), "")
    assert line, res.stderr
    return line.split("answered by", 1)[1].split()[0]


def test_lan_of_three_hosts_on_default_listen_addresses(net: tuple[tb.Testbed, Federation]) -> None:
    bed, fed = net
    lan = bed.network("lan", "10.10.0.0/24")
    ha, hb, hc = bed.host("a", lan), bed.host("b", lan), bed.host("c", lan)
    settings = {"p2p.mdns": "false"}
    a = start(fed, ha, "A", serve="none", settings=settings).wait_ready()
    # What A tells others is its LAN address, never 0.0.0.0 or loopback.
    assert a.addr.startswith(f"/ip4/{ha.addr}/tcp/4001/p2p/"), a.log()
    status = a.cli_json("status")
    assert all("0.0.0.0" not in x and "/127." not in x for x in status["addrs"]), status
    b = start(fed, hb, "B", serve="none", bootstrap=(a.addr,), settings=settings)
    c = start(fed, hc, "C", serve="chat", bootstrap=(a.addr,), settings={**settings, **CHAT})
    b.wait_ready(), c.wait_ready()
    b.wait_for(rf"peer {c.peer_id} is live \(serves: chat\)", 30)
    assert answered_by(b) == c.peer_id
    peer_c = b.peer(c.peer_id)
    assert peer_c is not None and peer_c["connected"] and peer_c["path"] == "direct", peer_c
    assert peer_c["verified_addrs"][0].startswith(f"/ip4/{hc.addr}/tcp/4001"), peer_c
    # Peers on the LAN dialed A back on its own address: it says so, and how a friend joins.
    a.wait_for(r"reachability: public at /ip4/" + ha.addr.replace(".", r"\.") + "/tcp/4001", 30)
    text = a.cli("status").stdout
    assert f"public at /ip4/{ha.addr}/tcp/4001" in text, text
    assert f"--bootstrap /ip4/{ha.addr}/tcp/4001/p2p/{a.peer_id}" in text, text


def test_lan_without_any_bootstrap_list_finds_peers_by_mdns(net: tuple[tb.Testbed, Federation]) -> None:
    bed, fed = net
    lan = bed.network("lan", "10.11.0.0/24")
    hosts = [bed.host(n, lan) for n in ("a", "b", "c")]
    a = start(fed, hosts[0], "A", serve="none")
    b = start(fed, hosts[1], "B", serve="none")
    c = start(fed, hosts[2], "C", serve="chat", settings=CHAT)
    for n in (a, b, c):
        n.wait_ready()
    # Nobody typed an address: B finds a LAN peer by mDNS (C itself, or A, who then gossips
    # C's record), and C's query path is a direct LAN connection.
    b.wait_for(r"mdns: found \S+ at /ip4/10\.11\.0\.1[0-2]/tcp/4001", 30)
    b.wait_for(rf"peer {c.peer_id} is live \(serves: chat\)", 30)
    assert answered_by(b) == c.peer_id
    assert any("mdns" in p["sources"] for p in b.cli_json("peers"))
    assert b.peer(c.peer_id)["path"] == "direct"


def two_homes(bed: tb.Testbed, fed: Federation, *, symmetric: bool = False,
              serve2: str = "none") -> tuple[tb.Host, NodeProcess, NodeProcess, NodeProcess]:
    """A public node P (serving nothing) and two homes behind NATs with the same private range;
    home 1 serves chat. Returns (P's host, P, home 1, home 2)."""
    wan = bed.network("wan", "10.20.0.0/24")
    hp = bed.host("pub", wan)
    _, h1 = bed.home("h1", wan, symmetric=symmetric)
    _, h2 = bed.home("h2", wan, symmetric=symmetric)
    p = start(fed, hp, "P", serve="none").wait_ready()
    n1 = start(fed, h1, "H1", serve="chat", bootstrap=(p.addr,), settings=CHAT)
    n2 = start(fed, h2, "H2", serve=serve2, bootstrap=(p.addr,), settings=CHAT if serve2 != "none" else {})
    n1.wait_ready(), n2.wait_ready()
    return hp, p, n1, n2


def test_two_homes_behind_nats_reach_each_other_through_a_relay_then_directly(
    net: tuple[tb.Testbed, Federation],
) -> None:
    bed, fed = net
    hp, p, n1, n2 = two_homes(bed, fed)
    p.wait_for(r"relay: serving as a circuit relay", 60)
    for n in (n1, n2):
        n.wait_for(r"reachability: private", 60)
        n.wait_for(rf"relay: reserved a slot on {p.peer_id}", 60)
    status = n1.cli_json("status")
    reach = status["reachability"]
    assert reach["state"] == "relayed", reach
    assert reach["text"].startswith(f"behind NAT, reachable via relay /ip4/{hp.addr}/tcp/4001/p2p/{p.peer_id}/p2p-circuit"), reach
    assert reach["bootstrap"].endswith(f"/p2p-circuit/p2p/{n1.peer_id}"), reach
    # Home 2 hears of home 1 by gossip; its private address is no use, the relay is.
    n2.wait_for(rf"peer {n1.peer_id} is live \(serves: chat\)", 60)
    assert answered_by(n2) == n1.peer_id
    # DCUtR: the NATs keep the port, so a direct connection appears beside the relayed one.
    deadline_plan = None
    for _ in range(60):
        plan = n2.cli_json("route", "chat")
        first = plan["candidates"][0]
        if first["executor"] == n1.peer_id and first["note"] == "direct":
            deadline_plan = plan
            break
        n2.wait_for(r"connection up|$", 1)  # let a second pass (a log line or the timeout)
    assert deadline_plan is not None, n2.log()
    assert answered_by(n2, "again") == n1.peer_id
    explained = n2.cli("route", "chat", "--explain").stdout
    assert f"{n1.peer_id}  score" in explained and "(direct)" in explained, explained
