"""Tests for the peer table (rentahal.p2p.peers): states, circuit breaker, scoring, candidates."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from rentahal.p2p.health import HealthRecord, RealmStatus
from rentahal.p2p.identity import Identity
from rentahal.p2p.peers import FailureKind, PeerState, PeerTable

SELF = "12D3KooWSelf"
A = "12D3KooWPeerA"
B = "12D3KooWPeerB"
C = "12D3KooWPeerC"


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


class ConnectedTable(PeerTable):
    """A table for peers this node is connected to (as the node's own are, before routing):
    every peer whose record it takes is marked connected. Tests of the record logic use it."""

    def apply_record(self, record: HealthRecord) -> bool:
        if record.peer_id != self.self_id:
            self.set_connected(record.peer_id, True)
        return super().apply_record(record)


def make_table(clock: FakeClock, **overrides: Any) -> PeerTable:
    params: dict[str, Any] = dict(
        stale_after=5.0,
        breaker_failures=3,
        breaker_backoff=10.0,
        breaker_backoff_max=35.0,
        half_life=60.0,
        clock=clock,
    )
    params.update(overrides)
    return ConnectedTable(SELF, **params)


def rec(
    peer: str,
    seq: int = 1,
    realms: tuple[str, ...] = ("chat",),
    *,
    depth: int = 0,
    slots: int = 1,
    service_ms: float = 0.0,
    smoke: bool = False,
    gpu: bool = False,
    ok: float = 1.0,
) -> HealthRecord:
    return HealthRecord(
        peer_id=peer,
        seq=seq,
        timestamp=1_750_000_000.0,
        realms=tuple(RealmStatus(r, "m", smoke, depth, slots, service_ms, gpu) for r in realms),
        success_ratio=ok,
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def state_of(table: PeerTable, peer: str) -> PeerState:
    entry = table.get(peer)
    assert entry is not None
    return table.state(entry)


def reasons(table: PeerTable, realm: str = "chat") -> dict[str, str]:
    return {x.peer_id: x.reason for x in table.candidates(realm)[1]}


def ranked(table: PeerTable, realm: str = "chat") -> list[str]:
    return [c.peer_id for c in table.candidates(realm)[0]]


# --- liveness -----------------------------------------------------------------------------------


def test_unknown_live_stale_live(clock: FakeClock) -> None:
    table = make_table(clock)
    table.hear_of(A, ("/ip4/10.0.0.1/tcp/4001",), source="dht")
    assert state_of(table, A) is PeerState.UNKNOWN
    assert table.get(A).sources == {"dht"}

    assert table.apply_record(rec(A, seq=1)) is True
    assert state_of(table, A) is PeerState.LIVE
    assert "gossip" in table.get(A).sources
    assert ranked(table) == [A]

    clock.advance(5.0)  # exactly stale_after: still live
    assert state_of(table, A) is PeerState.LIVE
    clock.advance(0.01)
    assert state_of(table, A) is PeerState.STALE
    assert table.record_age(table.get(A)) == pytest.approx(5.01)
    assert ranked(table) == []
    assert reasons(table)[A].startswith("stale")

    assert table.apply_record(rec(A, seq=2)) is True
    assert state_of(table, A) is PeerState.LIVE
    assert table.record_age(table.get(A)) == 0.0
    assert ranked(table) == [A]


@pytest.mark.parametrize("old_seq", [1, 2])
def test_record_with_old_or_same_seq_is_ignored(clock: FakeClock, old_seq: int) -> None:
    table = make_table(clock)
    newer = rec(A, seq=2, depth=1)
    assert table.apply_record(newer)
    clock.advance(4.0)
    assert table.apply_record(rec(A, seq=old_seq, depth=9, realms=("vision",))) is False
    entry = table.get(A)
    assert entry.record is newer
    assert entry.record_at == 1000.0  # not refreshed by the replay
    clock.advance(1.5)
    assert state_of(table, A) is PeerState.STALE  # a replayed record does not keep a peer alive


def test_record_addrs_replace_known_addrs(clock: FakeClock) -> None:
    table = make_table(clock)
    table.hear_of(A, ("/ip4/1.1.1.1/tcp/1",))
    record = HealthRecord(A, 1, 0.0, addrs=tuple(f"/ip4/10.0.0.{i}/tcp/1" for i in range(20)))
    table.apply_record(record)
    assert table.get(A).addrs == record.addrs[:16]


def test_own_record_is_ignored(clock: FakeClock) -> None:
    table = make_table(clock)
    assert table.apply_record(rec(SELF, seq=1)) is False
    assert table.get(SELF) is None
    assert len(table) == 0
    assert ranked(table) == []


# --- circuit breaker ----------------------------------------------------------------------------


def test_breaker_opens_after_exactly_n_failures(clock: FakeClock) -> None:
    table = make_table(clock, stale_after=1e6)
    table.apply_record(rec(A))
    table.apply_record(rec(B))
    assert table.record_failure(A, FailureKind.DEAD, "stream reset") is False
    assert table.record_failure(A, FailureKind.REFUSED) is False
    assert state_of(table, A) is PeerState.LIVE
    assert table.record_failure(A, FailureKind.DEAD, "stream reset") is True
    assert state_of(table, A) is PeerState.CIRCUIT_OPEN
    assert ranked(table) == [B]
    reason = reasons(table)[A]
    assert "circuit" in reason and "10.0s" in reason and "dead: stream reset" in reason


def test_breaker_half_open_doubles_and_caps(clock: FakeClock) -> None:
    table = make_table(clock, stale_after=1e6)
    table.apply_record(rec(A))
    for _ in range(3):
        opened = table.record_failure(A, FailureKind.DEAD)
    assert opened is True

    for backoff in (10.0, 20.0, 35.0, 35.0):  # doubled on each re-open, capped at 35
        entry = table.get(A)
        assert entry.breaker_backoff == backoff
        assert entry.breaker_until == pytest.approx(clock() + backoff)
        clock.advance(backoff - 0.01)
        assert state_of(table, A) is PeerState.CIRCUIT_OPEN
        assert A not in ranked(table)
        clock.advance(0.01)
        assert state_of(table, A) is PeerState.LIVE  # half-open: eligible for one more try
        assert ranked(table) == [A]
        assert table.record_failure(A, FailureKind.DEAD) is True  # the try fails: re-opened


def test_success_resets_the_breaker(clock: FakeClock) -> None:
    table = make_table(clock, stale_after=1e6)
    table.apply_record(rec(A))
    for _ in range(3):
        table.record_failure(A, FailureKind.REFUSED, "queue_full")
    clock.advance(10.0)
    table.record_failure(A, FailureKind.DEAD)  # re-opened, backoff 20
    clock.advance(20.0)
    table.record_success(A, latency_ms=40.0)
    entry = table.get(A)
    assert (entry.consecutive_failures, entry.breaker_backoff, entry.breaker_until) == (0, 0.0, 0.0)
    assert state_of(table, A) is PeerState.LIVE
    # The count starts over, and so does the backoff.
    assert table.record_failure(A, FailureKind.DEAD) is False
    assert table.record_failure(A, FailureKind.DEAD) is False
    assert table.record_failure(A, FailureKind.DEAD) is True
    assert table.get(A).breaker_backoff == 10.0


def test_protocol_failures_count_violations(clock: FakeClock) -> None:
    table = make_table(clock)
    table.record_failure(A, FailureKind.PROTOCOL, "bad frame")
    table.record_failure(A, FailureKind.DEAD)
    entry = table.get(A)
    assert entry.violations == 1
    assert entry.last_failure == "dead"


# --- scores -------------------------------------------------------------------------------------


def score(table: PeerTable, peer: str, realm: str = "chat") -> float:
    return table.score(table.get(peer), realm)


def test_lower_queue_depth_scores_higher(clock: FakeClock) -> None:
    table = make_table(clock)
    table.apply_record(rec(A, depth=4))
    table.apply_record(rec(B, depth=0))
    table.apply_record(rec(C, depth=4, slots=4))  # load is depth per slot
    assert score(table, B) > score(table, C) > score(table, A) > 0
    assert ranked(table) == [B, C, A]
    cands = table.candidates("chat")[0]
    assert [c.score for c in cands] == sorted((c.score for c in cands), reverse=True)


def test_failures_lower_the_score(clock: FakeClock) -> None:
    table = make_table(clock, breaker_failures=100)
    table.apply_record(rec(A))
    table.apply_record(rec(B))
    before = score(table, A)
    assert before == score(table, B)
    table.record_failure(A, FailureKind.DEAD)
    after_one = score(table, A)
    table.record_failure(A, FailureKind.DEAD)
    assert score(table, A) < after_one < before
    assert ranked(table) == [B, A]
    table.record_success(B)
    assert score(table, B) > before


def test_self_reported_success_ratio_counts_once_observations_back_it(clock: FakeClock) -> None:
    table = make_table(clock)
    table.apply_record(rec(A, ok=1.0))
    table.apply_record(rec(B, ok=0.2))
    assert score(table, A) == score(table, B)  # a stranger's word about itself weighs nothing
    for _ in range(4):
        table.record_success(A)
        table.record_success(B)
    assert score(table, A) > score(table, B)


def test_a_stranger_starts_low_and_ranks_behind_a_proven_peer(clock: FakeClock) -> None:
    """Twelve strangers claiming a GPU, a real model and 64 idle slots do not outrank one peer
    that has answered, however modest its own record."""
    table = make_table(clock)
    table.apply_record(rec(A, depth=3, service_ms=2000.0, smoke=True))
    table.record_success(A, latency_ms=1500.0)
    strangers = [Identity(Ed25519PrivateKey.generate()).peer_id for _ in range(12)]
    for s in strangers:
        table.apply_record(rec(s, depth=0, slots=64, gpu=True, ok=1.0))
    assert table.observed_success(table.get(strangers[0])) == pytest.approx(0.25)
    assert ranked(table)[0] == A
    assert set(ranked(table)[1:]) == set(strangers)
    # A failed dial is a real failure: it lowers the stranger's observed success.
    table.set_connected(strangers[0], False)
    table.set_unreachable(strangers[0], "connection refused")
    assert table.observed_success(table.get(strangers[0])) < 0.25


def test_old_failures_decay(clock: FakeClock) -> None:
    table = make_table(clock, breaker_failures=100, half_life=60.0)
    table.apply_record(rec(A))
    table.apply_record(rec(B))
    for _ in range(5):
        table.record_failure(A, FailureKind.DEAD)
    fresh_gap = score(table, B) - score(table, A)
    assert fresh_gap > 5.0
    clock.advance(60.0)  # one half-life: the failures count half
    assert table.get(A).failures == 5.0  # decayed lazily, when next read or updated
    table.observed_success(table.get(A))
    assert table.get(A).failures == pytest.approx(2.5)
    clock.advance(60.0 * 30)  # many half-lives
    assert abs(score(table, B) - score(table, A)) < 0.01
    assert table.get(A).failures < 1e-6


def test_smoke_test_model_halves_the_score_and_a_real_model_counts_once_observed(clock: FakeClock) -> None:
    table = make_table(clock)
    table.apply_record(rec(A, depth=1, service_ms=300.0))
    table.apply_record(rec(B, depth=1, service_ms=300.0, smoke=True))
    assert score(table, B) == pytest.approx(score(table, A), abs=1e-3)  # "a real model": a claim
    for _ in range(1000):
        table.record_success(A)
        table.record_success(B)
    assert score(table, B) == pytest.approx(score(table, A) / 2, rel=0.01)
    assert ranked(table) == [A, B]


def test_gpu_bonus_and_slow_service_penalty(clock: FakeClock) -> None:
    table = make_table(clock)
    table.apply_record(rec(A, service_ms=0.0, depth=1))
    table.apply_record(rec(B, service_ms=0.0, depth=1, gpu=True))
    table.apply_record(rec(C, service_ms=20_000.0, depth=1))
    assert score(table, B) == pytest.approx(score(table, A), abs=1e-3)  # a claimed GPU: a claim
    for _ in range(1000):
        table.record_success(A)
        table.record_success(B)
    assert score(table, B) == pytest.approx(score(table, A) * 1.2, rel=0.01)
    assert score(table, C) < score(table, A)
    for p in (A, B, C):
        assert 0.0 <= score(table, p) <= 100.0


def test_measured_latency_overrides_reported_service_time(clock: FakeClock) -> None:
    table = make_table(clock)
    table.apply_record(rec(A, service_ms=50_000.0))
    table.apply_record(rec(B, service_ms=50_000.0))
    table.record_success(A, latency_ms=100.0)
    table.record_success(B)  # no latency measured: the reported 50 s counts
    assert score(table, A) > score(table, B)
    table.record_success(A, latency_ms=200.0)
    assert table.get(A).latency_ms == pytest.approx(0.7 * 100.0 + 0.3 * 200.0)


def test_score_of_a_realm_not_served_is_zero(clock: FakeClock) -> None:
    table = make_table(clock)
    table.apply_record(rec(A, realms=("vision",)))
    assert score(table, A, "chat") == 0.0
    assert score(table, A, "vision") > 0.0


def test_candidates_exclude_each_with_its_own_reason(clock: FakeClock) -> None:
    table = make_table(clock, stale_after=5.0)
    stale, blocked, unknown, other_realm, broken, good = (f"12D3KooW{n}" for n in "STUVWX")
    table.apply_record(rec(stale))
    clock.advance(6.0)
    table.apply_record(rec(blocked))
    table.set_blocked(blocked, True)
    table.hear_of(unknown, source="bootstrap")
    table.apply_record(rec(other_realm, realms=("vision", "speech")))
    table.apply_record(rec(broken))
    for _ in range(3):
        table.record_failure(broken, FailureKind.HUNG, "no frame")
    table.apply_record(rec(good, depth=2))

    cands, excluded = table.candidates("chat")
    assert [c.peer_id for c in cands] == [good]
    why = {x.peer_id: x.reason for x in excluded}
    assert set(why) == {stale, blocked, unknown, other_realm, broken}
    assert why[stale] == "stale: no health record for 6.0s"
    assert "blocked" in why[blocked]
    assert why[unknown] == "no health record yet"
    assert why[other_realm] == "does not serve chat"
    assert "circuit" in why[broken] and "hung: no frame" in why[broken]
    assert len(set(why.values())) == 5
    assert table.live_count("chat") == 1
    assert table.live_count("vision") == 1  # other_realm

    table.set_blocked(blocked, False)
    assert blocked in ranked(table)


def test_a_record_alone_does_not_make_a_peer_routable(clock: FakeClock) -> None:
    """Records are signed claims; a peer is routed to once this node holds a connection to it."""
    table = PeerTable(
        SELF,
        stale_after=5.0,
        breaker_failures=3,
        breaker_backoff=10.0,
        breaker_backoff_max=35.0,
        half_life=60.0,
        clock=clock,
    )
    table.apply_record(rec(A, seq=1))
    assert state_of(table, A) is PeerState.PENDING
    ranked, excluded = table.candidates("chat")
    assert ranked == [] and excluded[0].reason == "not connected yet (being dialed)"
    table.set_connected(A, True)
    assert state_of(table, A) is PeerState.LIVE
    table.set_connected(A, False)  # the connection closed (a killed peer): out of routing at once
    assert state_of(table, A) is PeerState.PENDING


def test_an_attempt_without_frames_makes_a_peer_unresponsive_until_its_next_record(clock: FakeClock) -> None:
    table = make_table(clock, stale_after=1e6)
    table.apply_record(rec(A))
    table.apply_record(rec(B))
    assert table.record_failure(A, FailureKind.HUNG, "no frame for 1.5s") is False
    assert state_of(table, A) is PeerState.UNRESPONSIVE
    assert ranked(table) == [B]
    assert reasons(table)[A] == "unresponsive: no frame for 1.5s"
    table.apply_record(rec(A, seq=2))  # it signed a record since: alive
    assert state_of(table, A) is PeerState.LIVE
    table.mark_unresponsive(A, "ping unanswered for 0.5s")
    assert state_of(table, A) is PeerState.UNRESPONSIVE


def test_keepalives_without_progress_open_the_circuit_at_once(clock: FakeClock) -> None:
    table = make_table(clock, stale_after=1e6)
    table.apply_record(rec(A))
    assert table.record_failure(A, FailureKind.STALLED, "no progress within 5s") is True
    assert state_of(table, A) is PeerState.CIRCUIT_OPEN


def test_failures_while_the_circuit_is_open_do_not_stretch_it(clock: FakeClock) -> None:
    """Ten attempts started before the breaker opened fail together: one open period, not
    a backoff doubled ten times."""
    table = make_table(clock, stale_after=1e6)
    table.apply_record(rec(A))
    opened = [table.record_failure(A, FailureKind.DEAD) for _ in range(12)]
    assert opened.count(True) == 1
    assert table.get(A).breaker_backoff == 10.0
    assert table.get(A).breaker_until == pytest.approx(clock() + 10.0)


def test_a_penalized_peer_is_blocked_for_a_while_with_its_reason(clock: FakeClock) -> None:
    table = make_table(clock, stale_after=1e6)
    table.apply_record(rec(A))
    table.penalize(A, 600.0, "20 protocol violations in 60s")
    assert table.is_blocked(A) and state_of(table, A) is PeerState.BLOCKED
    assert reasons(table)[A] == "blocked for 600s more: 20 protocol violations in 60s"
    clock.advance(600.01)
    table.apply_record(rec(A, seq=2))
    assert not table.is_blocked(A) and state_of(table, A) is PeerState.LIVE
