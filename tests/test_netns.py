"""Real networks: `rentahal-node run` processes on separate hosts (network namespaces), on one LAN
and behind home NAT routers (nftables masquerade), each node on its default listen address.

These need root, iproute2 and nftables (scripts/test.sh installs the tools; CI runs as root).
Where a testbed cannot be built the tests are skipped with the reason, never passed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from rentahal.cli import _short as short
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


def lan_of_three(bed: tb.Testbed, cidr: str) -> list[tb.Host]:
    lan = bed.network("lan", cidr)
    return [bed.host(name, lan) for name in ("a", "b", "c")]


def answered_by(node: NodeProcess, prompt: str = "hello") -> str:
    res = node.cli("query", "chat", prompt, "--max-tokens", "8", "--seed", "1", "--json", timeout=90)
    done = [m for m in map(json.loads, res.stdout.splitlines()) if m["op"] == "result"]
    assert done, res.stderr
    return str(done[-1]["result"]["executor"])


def test_lan_of_three_hosts_on_default_listen_addresses(net: tuple[tb.Testbed, Federation]) -> None:
    bed, fed = net
    ha, hb, hc = lan_of_three(bed, "10.10.0.0/24")
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
    hosts = lan_of_three(bed, "10.11.0.0/24")
    a = start(fed, hosts[0], "A", serve="none")
    b = start(fed, hosts[1], "B", serve="none")
    c = start(fed, hosts[2], "C", serve="chat", settings=CHAT)
    for n in (a, b, c):
        n.wait_ready()
    # Nobody typed an address: the nodes find each other by mDNS (whoever hears first dials),
    # and C's query path from B is a direct LAN connection.
    b.wait_for(rf"peer {c.peer_id} is live \(serves: chat\)", 30)
    assert answered_by(b) == c.peer_id
    found = [line for n in (a, b, c) for line in n.lines if "mdns: found" in line]
    assert found and all("/ip4/10.11.0.1" in line for line in found), found
    assert b.peer(c.peer_id)["path"] == "direct"


def two_homes(
    bed: tb.Testbed, fed: Federation, *, symmetric: bool = False, serve1: str = "chat", serve2: str = "none"
) -> tuple[tb.Host, NodeProcess, NodeProcess, NodeProcess]:
    """A public node P (serving nothing) and two homes behind NATs with the same private range;
    home 1 serves chat. Returns (P's host, P, home 1, home 2)."""
    wan = bed.network("wan", "10.20.0.0/24")
    hp = bed.host("pub", wan)
    _, h1 = bed.home("h1", wan, symmetric=symmetric)
    _, h2 = bed.home("h2", wan, symmetric=symmetric)
    p = start(fed, hp, "P", serve="none").wait_ready()
    n1 = start(fed, h1, "H1", serve=serve1, bootstrap=(p.addr,), settings={**CHAT, "realms.imagine.threads": "1"})
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
    assert reach["text"].startswith(
        f"behind NAT, reachable via relay /ip4/{hp.addr}/tcp/4001/p2p/{p.peer_id}/p2p-circuit"
    ), reach
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
    assert f"{short(n1.peer_id)}  score" in explained and "(direct)" in explained, explained


def test_symmetric_nats_on_both_sides_the_relay_carries_tokens_and_images(
    net: tuple[tb.Testbed, Federation],
    tmp_path: Path,
) -> None:
    from PIL import Image

    bed, fed = net
    _, _p, n1, n2 = two_homes(bed, fed, symmetric=True, serve1="chat,imagine")
    n2.wait_for(rf"peer {n1.peer_id} is live \(serves: chat,imagine\)", 60)
    assert answered_by(n2) == n1.peer_id
    peer = n2.peer(n1.peer_id)
    assert peer["connected"] and peer["path"] == "relayed", peer
    notes = {c["executor"]: c["note"] for c in n2.cli_json("route", "chat")["candidates"]}
    assert notes[n1.peer_id] == "via relay", notes
    assert answered_by(n2, "still relayed") == n1.peer_id
    out = tmp_path / "relayed.png"
    res = n2.cli(
        "query",
        "imagine",
        "a red square",
        "--out",
        str(out),
        "--param",
        "width=64",
        "--param",
        "height=64",
        "--param",
        "steps=2",
        timeout=120,
    )
    assert f"answered by {short(n1.peer_id)}" in res.stderr, res.stderr
    with Image.open(out) as img:
        assert img.size == (64, 64)


def test_cut_uplink_mid_answer_fails_over_once_and_the_home_comes_back(
    net: tuple[tb.Testbed, Federation],
) -> None:
    import json
    import time

    bed, fed = net
    wan = bed.network("wan", "10.30.0.0/24")
    hp = bed.host("pub", wan)
    homes = [bed.home(f"h{i}", wan) for i in (1, 2)]
    p = start(fed, hp, "P", serve="none", settings={"router.hang_timeout": "2"}).wait_ready()
    execs = [
        start(fed, h, f"H{i}", serve="chat", bootstrap=(p.addr,), settings=CHAT) for i, (_, h) in enumerate(homes, 1)
    ]
    for n in execs:
        n.wait_ready()
        p.wait_for(rf"peer {n.peer_id} is live \(serves: chat\)", 60)
    q = p.query_process("chat", "tell me a story", "--ignore-eos", "--max-tokens", "600")
    assert q.stdout is not None
    first = ""
    for line in q.stdout:  # wait for the first token, then unplug that executor's home
        msg = json.loads(line)
        if msg.get("op") == "event" and msg["event"]["type"] == "routed":
            first = msg["event"]["executor"]
        if msg.get("op") == "event" and msg["event"]["type"] == "token":
            break
    cut = next(i for i, n in enumerate(execs) if n.peer_id == first)
    router, _ = homes[cut]
    cut_mark = p.mark()
    router.cut()
    cut_at = time.monotonic()
    out, _ = q.communicate(timeout=300)
    events = [json.loads(x) for x in out.splitlines()]
    result = [m for m in events if m.get("op") == "result"]
    assert len(result) == 1, events[-3:]
    other = execs[1 - cut].peer_id
    assert result[0]["result"]["executor"] == other and result[0]["result"]["failovers"] == [first]
    # The home stays unplugged until P has given up on it, then the cable goes back: the home
    # is live again and serves again, within a bound we measure.
    p.wait_for(rf"peer {first} is stale", 45, after=cut_mark)  # p2p.stale_after: 25 s
    p.wait_for(rf"peer {first}: no health record for \d+s; closing its connection", 30, after=cut_mark)
    mark = p.mark()
    router.restore()
    restored_at = time.monotonic()
    p.wait_for(rf"peer {first} is live", 60, after=mark)
    back_s = time.monotonic() - restored_at
    execs[1 - cut].stop()
    assert answered_by(p, "welcome back") == first
    print(f"uplink cut {restored_at - cut_at:.1f}s; live again {back_s:.2f}s after restore")
    assert back_s < 20.0, back_s  # redial back-off (5 s) + a dial + a health record, under load


def test_relay_restart_homes_reserve_again_and_keep_serving(net: tuple[tb.Testbed, Federation]) -> None:
    bed, fed = net
    _, p, n1, n2 = two_homes(bed, fed, symmetric=True)
    for n in (n1, n2):
        n.wait_for(rf"relay: reserved a slot on {p.peer_id}", 60)
    n2.wait_for(rf"peer {n1.peer_id} is live \(serves: chat\)", 60)
    assert answered_by(n2) == n1.peer_id
    marks = [n1.mark(), n2.mark()]
    p.stop()
    p.launch().wait_ready()  # same data dir: same peer ID, same address
    for n, m in zip((n1, n2), marks, strict=True):
        n.wait_for(rf"relay: {p.peer_id} is gone", 60, after=m)
        n.wait_for(rf"relay: reserved a slot on {p.peer_id}", 90, after=m)
    mark = n2.mark()
    n2.wait_for(rf"peer {n1.peer_id} is live", 60, after=mark)
    assert answered_by(n2, "after the restart") == n1.peer_id


def test_restarted_node_rejoins_through_remembered_peers(net: tuple[tb.Testbed, Federation]) -> None:
    bed, fed = net
    ha, hb, hc = lan_of_three(bed, "10.40.0.0/24")
    off = {"p2p.mdns": "false"}
    a = start(fed, ha, "A", serve="none", settings=off).wait_ready()
    c = start(fed, hc, "C", serve="chat", bootstrap=(a.addr,), settings={**off, **CHAT}).wait_ready()
    b = start(fed, hb, "B", serve="none", bootstrap=(a.addr,), settings=off).wait_ready()
    b.wait_for(rf"peer {c.peer_id} is live \(serves: chat\)", 60)
    b.wait_for(r"remembered \d+ more peer\(s\) to rejoin through after a restart \(2 in all\)", 30)
    b.stop()
    a.stop()  # the bootstrap node is gone too: only B's memory can bring it back to C
    b.bootstrap = ()
    mark = b.mark()
    b.launch().wait_ready()
    b.wait_for(r"rejoining through 2 remembered peer\(s\)", 30, after=mark)
    b.wait_for(rf"peer {c.peer_id} is live \(serves: chat\)", 60, after=mark)
    assert answered_by(b) == c.peer_id


def test_without_a_relay_a_home_is_unreachable_not_busy(net: tuple[tb.Testbed, Federation]) -> None:
    """P refuses to relay: home 2 hears home 1's records (through P) but cannot dial it. Home 1
    is no routing candidate, `peers` and `route --explain` say why, and a query fails with
    'unreachable', never 'busy'."""
    bed, fed = net
    wan = bed.network("wan", "10.50.0.0/24")
    hp = bed.host("pub", wan)
    _, h1 = bed.home("h1", wan)
    _, h2 = bed.home("h2", wan)
    p = start(fed, hp, "P", serve="none", settings={"p2p.relay_service": "off"}).wait_ready()
    n1 = start(fed, h1, "H1", serve="chat", bootstrap=(p.addr,), settings=CHAT)
    n2 = start(fed, h2, "H2", serve="none", bootstrap=(p.addr,))
    n1.wait_ready(), n2.wait_ready()
    n1.wait_for(r"reachability: private", 60)
    n2.wait_for(rf"peer {n1.peer_id} is unreachable", 60)
    peer = n2.peer(n1.peer_id)
    assert peer["state"] == "unreachable" and peer["unreachable"] and not peer["connected"], peer
    row = next(x for x in n2.cli("peers").stdout.splitlines() if x.startswith(short(n1.peer_id)))
    assert " unreachable " in row and f"({peer['unreachable']})" in row, row
    explained = n2.cli("route", "chat", "--explain").stdout
    assert f"{short(n1.peer_id)}  excluded: unreachable: " in explained, explained
    res = n2.cli("query", "chat", "hello", "--max-tokens", "4", check=False, timeout=90)
    assert res.returncode == 1 and "busy" not in res.stderr, res.stderr
    assert "unreachable" in res.stderr, res.stderr
    assert n1.cli_json("status")["reachability"]["state"] == "private"


def test_a_home_holds_two_relays_and_keeps_serving_when_one_goes(net: tuple[tb.Testbed, Federation]) -> None:
    bed, fed = net
    wan = bed.network("wan", "10.70.0.0/24")
    hp1, hp2 = bed.host("pub1", wan), bed.host("pub2", wan)
    _, h1 = bed.home("h1", wan, symmetric=True)
    _, h2 = bed.home("h2", wan, symmetric=True)
    p1 = start(fed, hp1, "P1", serve="none").wait_ready()
    p2 = start(fed, hp2, "P2", serve="none", bootstrap=(p1.addr,)).wait_ready()
    n1 = start(fed, h1, "H1", serve="chat", bootstrap=(p1.addr,), settings=CHAT)
    n2 = start(fed, h2, "H2", serve="none", bootstrap=(p2.addr,))
    n1.wait_ready(), n2.wait_ready()
    for p in (p1, p2):
        n1.wait_for(rf"relay: reserved a slot on {p.peer_id}", 60)
    relays = n1.cli_json("status")["reachability"]["relays"]
    assert {r.split("/p2p/")[1].split("/")[0] for r in relays} == {p1.peer_id, p2.peer_id}, relays
    n2.wait_for(rf"peer {n1.peer_id} is live \(serves: chat\)", 60)
    assert answered_by(n2) == n1.peer_id
    # P1 goes for good: H1 is still reachable through P2, and H2 still gets answers.
    mark = n1.mark()
    p1.stop()
    n1.wait_for(rf"relay: {p1.peer_id} is gone", 30, after=mark)
    relays = n1.cli_json("status")["reachability"]["relays"]
    assert [r.split("/p2p/")[1].split("/")[0] for r in relays] == [p2.peer_id], relays
    assert answered_by(n2, "one relay left") == n1.peer_id
