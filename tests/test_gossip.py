"""The health topic's validator: what GossipSub may relay onward. Pure logic, no sockets."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from rentahal.p2p.gossip import MAX_AUTHORS, SENDER_RECORD_RECHECK, GossipBudget, RecordCheck, verified_once
from rentahal.p2p.health import HealthRecord, sign_record
from rentahal.p2p.identity import Identity

ALICE = Identity(Ed25519PrivateKey.generate())
MALLORY = Identity(Ed25519PrivateKey.generate())


def signed(who: Identity, seq: int, ts: float = 1000.0) -> bytes:
    return sign_record(HealthRecord(peer_id=who.peer_id, seq=seq, timestamp=ts), who)


def checker() -> RecordCheck:
    return RecordCheck("me", clock=lambda: 1000.0)


def test_fresh_record_passes_once_and_its_replay_is_rejected() -> None:
    c = checker()
    assert c.check(ALICE.peer_id, signed(ALICE, 5)) is not None
    assert c.check(ALICE.peer_id, signed(ALICE, 5)) is None  # the same record again
    assert c.check(ALICE.peer_id, signed(ALICE, 4)) is None  # an older one
    assert c.check(ALICE.peer_id, signed(ALICE, 6)) is not None
    assert c.rejected == 2


def test_record_relayed_under_another_author_is_rejected() -> None:
    c = checker()
    assert c.check(MALLORY.peer_id, signed(ALICE, 1)) is None  # Mallory republishes Alice's record
    assert c.check(ALICE.peer_id, b"\x00garbage") is None


def test_old_or_future_timestamp_is_rejected() -> None:
    c = checker()
    assert c.check(ALICE.peer_id, signed(ALICE, 1, ts=1000.0 - 600)) is None
    assert c.last_reason == ""  # old: replayed late by pubsub, or the author's clock; no forwarder's fault
    assert c.check(ALICE.peer_id, signed(ALICE, 2, ts=1000.0 + 600)) is None
    assert "ahead of this clock" in c.last_reason  # no honest forwarder relays that
    assert c.check(ALICE.peer_id, signed(ALICE, 3, ts=1000.0 + 60)) is not None
    assert c.check(ALICE.peer_id, signed(ALICE, 4, ts=1000.0 - 60)) is not None


def test_memory_of_authors_is_bounded() -> None:
    c = checker()
    ids = [Identity(Ed25519PrivateKey.generate()) for _ in range(3)]
    for _i, who in enumerate(ids):
        assert c.check(who.peer_id, signed(who, 1)) is not None
    assert len(c._last_seq) == 3
    c._last_seq.update({f"fake{i}": 1 for i in range(MAX_AUTHORS)})
    c.check(ids[0].peer_id, signed(ids[0], 2))
    assert len(c._last_seq) == MAX_AUTHORS


def test_record_checked_by_pubsub_is_not_verified_again_but_must_be_the_authors() -> None:
    """Strict signing verified the message's signature by its author already: a record inside
    it is parsed, not verified a second time; its key must still be the author's."""
    c = checker()
    body = signed(ALICE, 1)
    tampered = bytearray(body)
    tampered[-1] ^= 1  # the record's own signature broken
    assert c.check(ALICE.peer_id, bytes(tampered)) is None
    assert c.check(ALICE.peer_id, bytes(tampered), author_signed=True) is not None
    assert c.check(MALLORY.peer_id, signed(ALICE, 2), author_signed=True) is None  # not Mallory's key
    assert "published by" in c.last_reason


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_flooding_forwarder_is_cut_to_its_budget_and_reported_once_a_second() -> None:
    clock = Clock()
    reports: list[tuple[str, str]] = []
    budget = GossipBudget(100.0, 60.0, on_violation=lambda p, r: reports.append((p, r)), clock=clock)
    admitted = sum(budget.admit("flooder") for _ in range(100_000))
    assert admitted == 200  # the burst: twice the per-second budget
    assert budget.dropped == 100_000 - 200
    assert len(reports) == 1 and reports[0][0] == "flooder" and "budget" in reports[0][1]
    assert budget.admit("honest")  # another forwarder's budget is its own
    clock.now += 1.0
    assert sum(budget.admit("flooder") for _ in range(1000)) == 100  # refilled at 100/s
    assert len(reports) == 2


def test_a_forwarder_flooding_past_its_message_budget_has_its_stream_cut_and_a_slight_excess_does_not() -> None:
    clock = Clock()
    budget = GossipBudget(100.0, 60.0, clock=clock)
    for forwarder in ("flooder", "eager"):
        assert sum(budget.admit(forwarder) for _ in range(200)) == 200  # the burst
    # The flooder: more than a burst's worth (200) past its budget within a second.
    assert sum(budget.admit("flooder") for _ in range(201)) == 0
    assert budget.cooling("flooder")  # its stream is reset at its next read, new ones refused
    # The eager one: 150 a second for 10 s, 50 a second over its budget: dropped, never cut.
    for _ in range(100):
        clock.now += 0.1
        for _ in range(15):
            budget.admit("eager")
        assert not budget.cooling("eager")
    assert not budget.cooling("honest")


def test_a_forwarder_introduces_a_bounded_number_of_strangers() -> None:
    clock = Clock()
    reports: list[tuple[str, str]] = []
    budget = GossipBudget(100.0, 12.0, on_violation=lambda p, r: reports.append((p, r)), clock=clock)
    assert sum(budget.introduce("relay", f"sybil{i}") for i in range(1000)) == 12
    assert budget.refused_introductions == 1000 - 12
    assert reports and "new peers" in reports[0][1]
    clock.now += 60.0
    assert sum(budget.introduce("relay", f"later{i}") for i in range(100)) == 12


class _Rpc:
    def __init__(self, record: bytes | None) -> None:
        self.senderRecord = record

    def HasField(self, name: str) -> bool:
        return name == "senderRecord" and self.senderRecord is not None


class _Peer:
    def __init__(self, name: bytes) -> None:
        self.name = name

    def to_bytes(self) -> bytes:
        return self.name


def test_a_peer_record_is_verified_once_per_peer_and_bytes_and_a_bad_one_every_time() -> None:
    clock = Clock()
    checked: list[bytes] = []

    def check(rpc: _Rpc, host: object, peer: _Peer) -> bool:
        assert rpc.senderRecord is not None
        checked.append(rpc.senderRecord)
        return not rpc.senderRecord.startswith(b"bad")

    once = verified_once(check, clock=clock)
    alice, bob = _Peer(b"alice"), _Peer(b"bob")
    assert all(once(_Rpc(b"good"), None, alice) for _ in range(5))
    assert checked == [b"good"]
    assert once(_Rpc(b"good"), None, bob)  # the same bytes from another peer: checked for it
    assert once(_Rpc(b"good2"), None, alice)  # other bytes from the same peer: checked
    assert not any(once(_Rpc(b"bad"), None, alice) for _ in range(3))  # refused, every time checked
    assert checked == [b"good", b"good", b"good2", b"bad", b"bad", b"bad"]
    assert once(_Rpc(None), None, alice)  # no record: nothing to check
    clock.now += SENDER_RECORD_RECHECK
    assert once(_Rpc(b"good"), None, alice) and checked[-1] == b"good"  # checked (and stored) again


async def test_no_idontwant_work_for_a_router_that_speaks_gossipsub_1_1_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """IDONTWANT is GossipSub 1.2: a 1.1-only router (the node's) has no peer to send one to, so
    it skips the library's per-message search for such peers; a 1.2 router still sends them."""
    from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, PROTOCOL_ID_V12, GossipSub

    from rentahal.p2p.gossip import flood_publish_gossipsub_class

    searched: list[bytes] = []

    async def search(self: object, msg_id: bytes, topic_ids: object) -> None:
        searched.append(msg_id)

    monkeypatch.setattr(GossipSub, "_emit_idontwant_for_message", search)
    cls = flood_publish_gossipsub_class()
    await cls([PROTOCOL_ID_V11], 3, 2, 4)._emit_idontwant_for_message(b"m1", ["t"])
    assert searched == []
    await cls([PROTOCOL_ID_V12, PROTOCOL_ID_V11], 3, 2, 4)._emit_idontwant_for_message(b"m2", ["t"])
    assert searched == [b"m2"]
