"""The health topic's validator: what GossipSub may relay onward. Pure logic, no sockets."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from rentahal.p2p.gossip import MAX_AUTHORS, RecordCheck
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
    assert c.check(ALICE.peer_id, signed(ALICE, 2, ts=1000.0 + 600)) is None
    assert c.check(ALICE.peer_id, signed(ALICE, 3, ts=1000.0 + 60)) is not None


def test_memory_of_authors_is_bounded() -> None:
    c = checker()
    ids = [Identity(Ed25519PrivateKey.generate()) for _ in range(3)]
    for i, who in enumerate(ids):
        assert c.check(who.peer_id, signed(who, 1)) is not None
    assert len(c._last_seq) == 3
    c._last_seq.update({f"fake{i}": 1 for i in range(MAX_AUTHORS)})
    c.check(ids[0].peer_id, signed(ids[0], 2))
    assert len(c._last_seq) == MAX_AUTHORS
