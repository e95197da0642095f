"""Addresses a peer can use, reachability verdicts and the peer table's 'unreachable' state:
pure logic, no sockets."""

from __future__ import annotations

import pytest

from rentahal.node.config import ConfigError, load_config
from rentahal.p2p import addrs
from rentahal.p2p.health import HealthRecord, RealmStatus
from rentahal.p2p.peers import PeerState, PeerTable
from rentahal.p2p.reachability import Reachability, Verdict

IFACES = ["127.0.0.1", "10.1.2.3", "192.168.1.7", "fe80::1", "::1", "2001:db8::5"]


def test_unspecified_listen_address_expands_to_interface_addresses() -> None:
    out = addrs.expand(["/ip4/0.0.0.0/tcp/4001", "/ip6/::/tcp/4002"], IFACES)
    assert "/ip4/10.1.2.3/tcp/4001" in out and "/ip4/192.168.1.7/tcp/4001" in out
    assert "/ip6/2001:db8::5/tcp/4002" in out
    assert not any("0.0.0.0" in a or "/::/" in a for a in out)


def test_never_advertise_unspecified_loopback_or_link_local_off_host() -> None:
    out = addrs.advertisable(["/ip4/0.0.0.0/tcp/4001", "/ip6/::/tcp/4001"], interfaces=IFACES)
    assert out, out
    assert all(addrs.scope(a) in ("private", "public") for a in out), out
    assert not any(a.startswith(("/ip4/127.", "/ip6/::1/", "/ip6/fe80")) for a in out)


def test_loopback_only_node_advertises_loopback() -> None:
    out = addrs.advertisable(["/ip4/127.0.0.1/tcp/5000"], interfaces=IFACES)
    assert out == ["/ip4/127.0.0.1/tcp/5000"]


def test_announce_comes_first_then_public_then_relays_then_private() -> None:
    out = addrs.advertisable(
        ["/ip4/0.0.0.0/tcp/4001"],
        interfaces=["10.0.0.2", "8.8.4.4"],
        announce=["/dns4/node.example.org/tcp/4001"],
        observed=["/ip4/1.2.3.4/tcp/4001", "/ip4/127.0.0.1/tcp/9"],
        relayed=["/ip4/1.1.1.1/tcp/4001/p2p/R/p2p-circuit"],
    )
    assert out == [
        "/dns4/node.example.org/tcp/4001",
        "/ip4/8.8.4.4/tcp/4001",
        "/ip4/1.2.3.4/tcp/4001",
        "/ip4/1.1.1.1/tcp/4001/p2p/R/p2p-circuit",
        "/ip4/10.0.0.2/tcp/4001",
    ]


def test_relay_addresses_survive_many_private_interfaces() -> None:
    ifaces = [f"172.17.{i}.1" for i in range(30)]
    relay = "/ip4/1.1.1.1/tcp/4001/p2p/R/p2p-circuit"
    out = addrs.advertisable(["/ip4/0.0.0.0/tcp/4001"], interfaces=ifaces, relayed=[relay])
    assert relay in out and len(out) <= addrs.MAX_ADVERTISED


@pytest.mark.parametrize(
    ("addr", "scope"),
    [
        ("/ip4/0.0.0.0/tcp/1", "unspecified"),
        ("/ip4/127.0.0.5/tcp/1", "loopback"),
        ("/ip6/fe80::2/tcp/1", "link-local"),
        ("/ip4/172.16.0.1/tcp/1", "private"),
        ("/ip4/100.64.0.1/tcp/1", "private"),  # carrier-grade NAT: not public
        ("/ip4/93.184.216.34/tcp/1", "public"),
        ("/dns6/x.example/tcp/1", "dns"),
        ("/ip4/1.2.3.4/tcp/1/p2p/Qm/p2p-circuit/p2p/Qx", "relay"),
        ("/ip4/999.1.1.1/tcp/1", "invalid"),
        ("garbage", "invalid"),
    ],
)
def test_scope(addr: str, scope: str) -> None:
    assert addrs.scope(addr) == scope


def test_a_peers_loopback_address_is_dialed_only_on_the_same_host() -> None:
    assert not addrs.usable_by("/ip4/127.0.0.1/tcp/4001/p2p/X", same_host=False)
    assert addrs.usable_by("/ip4/127.0.0.1/tcp/4001/p2p/X", same_host=True)
    assert not addrs.usable_by("/ip4/0.0.0.0/tcp/4001/p2p/X", same_host=True)
    assert addrs.usable_by("/ip4/10.0.0.1/tcp/4001/p2p/X", same_host=False)


def test_interface_addresses_include_loopback() -> None:
    assert "127.0.0.1" in addrs.interface_addresses()


def test_verdict_counts_votes_per_address_seen() -> None:
    v = Verdict()
    assert v.state is Reachability.UNKNOWN
    v.add("10.0.0.1", False, "1.2.3.4", 4001, 0.0)
    assert v.state is Reachability.PRIVATE and v.public_addrs == []
    v.add("10.0.0.2", True, "1.2.3.4", 4001, 0.0)  # one liar's yes against one no
    assert v.state is Reachability.PRIVATE
    v.add("10.0.0.3", True, "1.2.3.4", 4001, 0.0)
    assert v.state is Reachability.PUBLIC and v.public_addrs == ["/ip4/1.2.3.4/tcp/4001"]
    v.add("10.0.0.3", False, "1.2.3.4", 4001, 0.0)  # the same witness changed its mind
    assert v.state is Reachability.PRIVATE


def test_lan_neighbours_cannot_outvote_the_internet() -> None:
    """Two LAN peers dial a home node on its LAN address; the public peer cannot dial its NAT's
    address: the node is behind NAT (it needs a relay), not public."""
    v = Verdict()
    v.add("192.168.1.20", True, "192.168.1.10", 4001, 0.0)
    v.add("192.168.1.21", True, "192.168.1.10", 4001, 0.0)
    v.add("203.0.113.9", False, "198.51.100.7", 4001, 0.0)
    assert v.state is Reachability.PRIVATE


def test_one_witness_alone_does_not_get_an_address_advertised() -> None:
    v = Verdict()
    v.add("10.0.0.1", True, "6.6.6.6", 4001, 0.0)  # a liar naming a victim's address
    assert v.state is Reachability.PUBLIC and v.public_addrs == []


def test_old_answers_expire() -> None:
    v = Verdict()
    v.add("10.0.0.1", False, "1.2.3.4", 4001, 0.0)
    v.expire(10_000.0)
    assert v.state is Reachability.UNKNOWN


def test_verdict_memory_is_bounded() -> None:
    v = Verdict()
    for i in range(100):
        v.add(f"10.0.{i}.1", True, "1.2.3.4", 1, 0.0)
    assert len(v.answers) == 16


def _record(peer: str) -> HealthRecord:
    return HealthRecord(peer_id=peer, seq=1, timestamp=0.0, realms=(RealmStatus("chat"),))


def test_gossiping_peer_that_cannot_be_dialed_is_not_a_candidate() -> None:
    now = [0.0]
    t = PeerTable(
        "me",
        stale_after=3.0,
        breaker_failures=3,
        breaker_backoff=5.0,
        breaker_backoff_max=60.0,
        half_life=60.0,
        clock=lambda: now[0],
    )
    t.apply_record(_record("P"))
    assert t.candidates("chat")[0] == []  # a record, but no connection yet: pending
    t.set_unreachable("P", "no connection within 10s")
    e = t.get("P")
    assert e is not None and t.state(e) is PeerState.UNREACHABLE
    ranked, excluded = t.candidates("chat")
    assert ranked == [] and excluded[0].reason == "unreachable: no connection within 10s"
    t.set_connected("P", True, relayed=True)  # reached through a relay: a candidate again
    assert t.state(e) is PeerState.LIVE and e.relayed
    t.verify_addr("P", "/ip4/10.0.0.9/tcp/4001")
    t.hear_of("P", ("/ip4/127.0.0.1/tcp/4001",))
    assert t.dial_addrs("P")[0] == "/ip4/10.0.0.9/tcp/4001"


def test_unreachable_peer_is_forgotten_after_a_while() -> None:
    now = [0.0]
    t = PeerTable(
        "me",
        stale_after=3.0,
        breaker_failures=3,
        breaker_backoff=5.0,
        breaker_backoff_max=60.0,
        half_life=60.0,
        clock=lambda: now[0],
    )
    t.apply_record(_record("P"))
    t.set_unreachable("P", "refused")
    now[0] = 10.0
    assert t.prune(max_age=100.0, max_peers=100) == 0
    now[0] = 200.0
    assert t.prune(max_age=100.0, max_peers=100) == 1 and t.get("P") is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('["/ip4/1.2.3.4/tcp/4001/p2p/12D3KooWA"]', "names no peer"),
        ('["/dns4/bad name/tcp/4001"]', "expected /ip4|ip6"),
        ('["/dns4/ok.example/tcp/0"]', "out of range"),
    ],
)
def test_bad_announce_address_is_one_clear_line(tmp_path, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        load_config(tmp_path / "none.toml", {"p2p.announce": value})
    assert "p2p.announce" in str(err.value) and "\n" not in str(err.value)


def test_announce_accepts_dns_and_ip() -> None:
    cfg = load_config(None, {"p2p.announce": '["/dns4/node.example.org/tcp/4001", "/ip6/2001:db8::1/tcp/4001"]'})
    assert cfg.p2p.announce == ("/dns4/node.example.org/tcp/4001", "/ip6/2001:db8::1/tcp/4001")


@pytest.mark.parametrize("realm", ["chat", "cafe", "beef", "vision", "deadbeef"])
def test_realm_provider_key_is_a_cidv1_a_standard_peer_can_parse(realm: str) -> None:
    import hashlib

    from cid import make_cid  # py-cid, an independent implementation of the CID spec
    from libp2p.kad_dht.kad_dht import _encode_key

    from rentahal.p2p.host import realm_cid

    cid = realm_cid(realm)
    assert cid.startswith("bafkrei")  # base32, CIDv1, raw codec, sha2-256: as go/js print it
    want = b"\x12\x20" + hashlib.sha256(f"/rentahal/realm/{realm}".encode()).digest()
    parsed = make_cid(cid)
    assert (parsed.version, parsed.codec, parsed.multihash) == (1, "raw", want)
    assert _encode_key(cid) == want  # the library keys the record by the multihash, never by hex


def test_malformed_relay_addresses_in_a_record_are_skipped_not_fatal() -> None:
    """A gossiped record may claim anything: a circuit address whose relay is no peer ID must
    not raise out of the maintenance service (it would stop the node)."""
    from rentahal.p2p.host import AddressBook, FederationHost
    from rentahal.p2p.maintenance import PeerMaintenance

    class Net:
        def get_connections(self, pid: object) -> list[object]:
            return []

    class Host:
        def get_network(self) -> Net:
            return Net()

    fh = FederationHost(Host(), None, None, None, AddressBook())  # type: ignore[arg-type]
    fh.local_only = lambda: False  # type: ignore[method-assign]
    assert fh.is_connected("/ip4/1.2.3.4") is False
    t = PeerTable(
        "me",
        stale_after=3.0,
        breaker_failures=3,
        breaker_backoff=5.0,
        breaker_backoff_max=60.0,
        half_life=60.0,
        clock=lambda: 0.0,
    )
    t.hear_of(
        "P",
        ("/ip4/1.2.3.4/tcp/1/p2p-circuit", "/ip4/1.2.3.4/tcp/1/p2p/not*base58/p2p-circuit", "/ip4/10.0.0.2/tcp/4001"),
    )
    m = PeerMaintenance(fh, t, dial_timeout=1.0)
    assert m.usable_addrs("P") == ["/ip4/10.0.0.2/tcp/4001"]


def test_connection_age_counts_for_a_peer_that_just_reconnected() -> None:
    now = [0.0]
    t = PeerTable(
        "me",
        stale_after=3.0,
        breaker_failures=3,
        breaker_backoff=5.0,
        breaker_backoff_max=60.0,
        half_life=60.0,
        clock=lambda: now[0],
    )
    t.apply_record(_record("P"))
    now[0] = 100.0  # its last record is old...
    t.set_connected("P", True)  # ...but it reconnected just now
    e = t.get("P")
    assert e is not None and e.connected_at == 100.0
    t.set_connected("P", True)  # another connection to the same peer: the first one's time stays
    assert e.connected_at == 100.0


def test_advertised_addresses_are_kept_but_a_new_relay_or_dial_back_shows_at_once() -> None:
    """pubsub reads the host's addresses for every message it sends: they are built once per
    ADDRS_TTL, but a relay reservation or a confirmed address is advertised as soon as it is set."""
    from rentahal.p2p.host import AddressBook

    class Id:
        def to_base58(self) -> str:
            return "12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo"

    class Host:
        reads = 0

        def get_id(self) -> Id:
            return Id()

        def get_transport_addrs(self) -> list[str]:
            Host.reads += 1
            return ["/ip4/192.0.2.7/tcp/4001"]

    book = AddressBook()
    book.host = Host()
    first = [str(a) for a in book.get_addrs()]
    assert first == [f"/ip4/192.0.2.7/tcp/4001/p2p/{Id().to_base58()}"]
    for _ in range(50):
        assert [str(a) for a in book.get_addrs()] == first
    assert Host.reads == 1
    relay = "/ip4/198.51.100.1/tcp/4001/p2p/12D3KooWJWoaqZhDaoEFshF7Rh1bpY9ohihFhzcW6d69Lr2NASuq/p2p-circuit"
    book.relayed = [relay]
    assert f"{relay}/p2p/{Id().to_base58()}" in [str(a) for a in book.get_addrs()]
    book.confirmed = ["/ip4/203.0.113.9/tcp/4001"]
    assert f"/ip4/203.0.113.9/tcp/4001/p2p/{Id().to_base58()}" in [str(a) for a in book.get_addrs()]
    assert Host.reads == 3
