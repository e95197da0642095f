"""The peer table: every peer this node has heard of, how it says it is, and how it behaved.

Two sources feed a peer's score: its own signed health record (queue depth, service time,
success ratio: useful, but self-reported) and this node's observations (successes, failures,
latency), which decay exponentially so that old history fades. A peer with no fresh record is
stale; repeated failures open a circuit breaker whose open period doubles on each re-open.
Pure logic: the clock is injected (``trio.current_time`` in the node, a MockClock in tests).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ..realms.events import FailureKind
from .health import HealthRecord

__all__ = ["FailureKind", "PeerEntry", "PeerState", "PeerTable"]

PRIOR_SUCCESS = 0.25  # the success rate assumed of a peer never tried...
PRIOR_WEIGHT = 2.0  # ...worth this many observations


class PeerState(str, enum.Enum):
    LIVE = "live"
    STALE = "stale"
    CIRCUIT_OPEN = "circuit-open"
    UNKNOWN = "unknown"  # heard of (bootstrap, DHT) but no health record yet
    BLOCKED = "blocked"
    UNREACHABLE = "unreachable"  # its records arrive by gossip, but this node cannot dial it
    PENDING = "pending"  # a fresh record, but no connection yet: not routed to until there is one
    UNRESPONSIVE = "unresponsive"  # connected, but an attempt or a probe got no answer in time


@dataclass
class PeerEntry:
    peer_id: str
    first_seen: float
    addrs: tuple[str, ...] = ()
    record: HealthRecord | None = None
    record_at: float | None = None  # local clock when the last record arrived
    successes: float = 0.0  # exponentially decayed counts
    failures: float = 0.0
    answered: int = 0  # queries this node saw it answer (never decayed): proven once > 0
    spot_passed: bool = False  # its answer to a canary matched a reference (realms/spotcheck.py)
    caught: str = ""  # why it is known to answer wrong (a spot-check), "" if it is not
    reports: int = 0  # answers of its that this node's users reported as wrong
    decayed_at: float = 0.0
    latency_ms: float | None = None  # EWMA of time to first answer event
    rtt_ms: float | None = None
    consecutive_failures: int = 0
    breaker_until: float = 0.0
    breaker_backoff: float = 0.0
    violations: int = 0
    blocked: bool = False  # by the sysop
    penalty_until: float = 0.0  # blocked by this node itself until then (local clock)
    penalty_reason: str = ""
    last_failure: str = ""
    sources: set[str] = field(default_factory=set)
    introduced_by: str = ""  # the peer whose gossip first named it (if not itself)
    verified: tuple[str, ...] = ()  # addresses this node connected to it on (most recent last)
    connected: bool = False
    connected_at: float = 0.0  # local clock when the current connection opened
    relayed: bool = False  # the open connection goes through a relay
    unreachable: str = ""  # why the last dial failed; cleared by a connection
    unresponsive: str = ""  # why it is thought frozen; cleared by its next record or connection


@dataclass(frozen=True)
class Candidate:
    peer_id: str
    score: float


@dataclass(frozen=True)
class Exclusion:
    peer_id: str
    reason: str


class PeerTable:
    def __init__(
        self,
        self_id: str,
        *,
        stale_after: float,
        breaker_failures: int,
        breaker_backoff: float,
        breaker_backoff_max: float,
        half_life: float,
        clock: Callable[[], float],
    ) -> None:
        self.self_id = self_id
        self.stale_after = stale_after
        self.breaker_failures = breaker_failures
        self.breaker_backoff = breaker_backoff
        self.breaker_backoff_max = breaker_backoff_max
        self.half_life = half_life
        self.clock = clock
        self._peers: dict[str, PeerEntry] = {}

    # --- what we hear ------------------------------------------------------------------------
    def entry(self, peer_id: str, source: str = "") -> PeerEntry:
        e = self._peers.get(peer_id)
        if e is None:
            now = self.clock()
            e = self._peers[peer_id] = PeerEntry(peer_id, first_seen=now, decayed_at=now)
        if source:
            e.sources.add(source)
        return e

    def get(self, peer_id: str) -> PeerEntry | None:
        return self._peers.get(peer_id)

    def __iter__(self) -> Iterator[PeerEntry]:
        return iter(list(self._peers.values()))

    def __len__(self) -> int:
        return len(self._peers)

    def hear_of(self, peer_id: str, addrs: tuple[str, ...] = (), source: str = "") -> PeerEntry:
        e = self.entry(peer_id, source)
        if addrs:
            e.addrs = tuple(dict.fromkeys(e.addrs + addrs))[-8:]
        return e

    def verify_addr(self, peer_id: str, addr: str) -> None:
        """An address this node connected to ``peer_id`` on: dialed first from now on."""
        e = self.entry(peer_id)
        e.verified = tuple(a for a in e.verified if a != addr)[-7:] + (addr,)

    def set_connected(self, peer_id: str, connected: bool, *, relayed: bool = False) -> None:
        e = self.entry(peer_id)
        if connected and not e.connected:
            e.connected_at = self.clock()
            e.unresponsive = ""  # a new connection: judge it afresh
        e.connected = connected
        e.relayed = relayed and connected
        if connected:
            e.unreachable = ""

    def set_unreachable(self, peer_id: str, reason: str) -> None:
        """A dial failed: a real failure of the peer (it advertised an address that does not
        answer), counted in its observed success, though not towards the router's breaker."""
        e = self.entry(peer_id)
        if not e.connected:
            e.unreachable = reason or "dial failed"
            self._decay(e)
            e.failures += 1.0

    def dial_addrs(self, peer_id: str) -> tuple[str, ...]:
        """Addresses to dial: verified ones first (newest first), then what it claims."""
        e = self._peers.get(peer_id)
        if e is None:
            return ()
        return tuple(dict.fromkeys((*reversed(e.verified), *e.addrs)))

    def apply_record(self, record: HealthRecord) -> bool:
        """Take a verified record; False if it is ours or older than one already seen."""
        if record.peer_id == self.self_id:
            return False
        e = self.entry(record.peer_id, "gossip")
        if e.record is not None and record.seq <= e.record.seq:
            return False
        e.record = record
        e.record_at = self.clock()
        e.unresponsive = ""  # it signed a record a moment ago: not frozen
        if record.addrs:
            e.addrs = record.addrs[:16]
        return True

    # --- what we observe ---------------------------------------------------------------------
    def record_success(self, peer_id: str, latency_ms: float | None = None) -> None:
        e = self.entry(peer_id)
        self._decay(e)
        e.successes += 1.0
        e.answered += 1
        e.consecutive_failures = 0
        e.breaker_until = 0.0
        e.breaker_backoff = 0.0
        if latency_ms is not None:
            e.latency_ms = latency_ms if e.latency_ms is None else 0.7 * e.latency_ms + 0.3 * latency_ms

    def record_failure(self, peer_id: str, kind: FailureKind, detail: str = "") -> bool:
        """Count a failure; return True if it opened (or re-opened) the circuit breaker."""
        e = self.entry(peer_id)
        self._decay(e)
        e.failures += 1.0
        e.consecutive_failures += 1
        e.last_failure = f"{kind.value}: {detail}" if detail else kind.value
        if kind is FailureKind.PROTOCOL:
            e.violations += 1
        if kind is FailureKind.HUNG:  # out of routing until it shows it is alive
            e.unresponsive = detail or "an attempt got no frame in time"
        if e.breaker_until > self.clock():
            return False  # open already: failures of attempts begun before it opened change nothing
        # Keepalives without progress are no accident: its circuit opens at once.
        if e.consecutive_failures >= self.breaker_failures or kind is FailureKind.STALLED:
            e.breaker_backoff = (
                self.breaker_backoff
                if e.breaker_backoff == 0.0
                else min(e.breaker_backoff * 2, self.breaker_backoff_max)
            )
            e.breaker_until = self.clock() + e.breaker_backoff
            return True
        return False

    def record_rtt(self, peer_id: str, rtt_ms: float) -> None:
        e = self.entry(peer_id)
        e.rtt_ms = rtt_ms if e.rtt_ms is None else 0.7 * e.rtt_ms + 0.3 * rtt_ms

    def set_blocked(self, peer_id: str, blocked: bool) -> None:
        self.entry(peer_id).blocked = blocked

    def record_spot_pass(self, peer_id: str) -> None:
        """Its answer to a canary matched a reference: it counts as an answer, and as proven."""
        self.record_success(peer_id)
        self.entry(peer_id).spot_passed = True

    def record_caught(self, peer_id: str, seconds: float, reason: str) -> None:
        """It answered a canary wrong: blocked for ``seconds``, no longer proven."""
        e = self.entry(peer_id)
        e.caught, e.spot_passed, e.answered = reason, False, 0
        self._decay(e)
        e.failures += 5.0
        self.penalize(peer_id, seconds, reason)

    def record_report(self, peer_id: str, reason: str) -> None:
        """A user of this node says an answer of ``peer_id`` was wrong: a failure in its score
        (a spot-check, run at once, decides whether it is blocked)."""
        e = self.entry(peer_id)
        self._decay(e)
        e.failures += 1.0
        e.reports += 1
        e.last_failure = f"reported wrong by a user: {reason}" if reason else "reported wrong by a user"

    def penalize(self, peer_id: str, seconds: float, reason: str) -> None:
        """Block ``peer_id`` for ``seconds`` on this node's own judgement (repeated violations)."""
        e = self.entry(peer_id)
        e.penalty_until = max(e.penalty_until, self.clock() + seconds)
        e.penalty_reason = reason

    def is_blocked(self, peer_id: str) -> bool:
        e = self._peers.get(peer_id)
        return e is not None and (e.blocked or e.penalty_until > self.clock())

    def _decay(self, e: PeerEntry) -> None:
        now = self.clock()
        factor = 0.5 ** ((now - e.decayed_at) / self.half_life)
        e.successes *= factor
        e.failures *= factor
        e.decayed_at = now

    # --- what we conclude --------------------------------------------------------------------
    def state(self, e: PeerEntry) -> PeerState:
        now = self.clock()
        if e.blocked or e.penalty_until > now:
            return PeerState.BLOCKED
        if e.record_at is None:
            return PeerState.UNKNOWN
        if now - e.record_at > self.stale_after:
            return PeerState.STALE
        if not e.connected:
            # A record proves only that someone signed it: a peer is routed to once this node
            # has a connection to it (the maintenance service dials every fresh record).
            return PeerState.UNREACHABLE if e.unreachable else PeerState.PENDING
        if e.breaker_until > now:
            return PeerState.CIRCUIT_OPEN
        if e.unresponsive:
            return PeerState.UNRESPONSIVE
        return PeerState.LIVE

    def mark_unresponsive(self, peer_id: str, reason: str) -> None:
        """A probe on its open connection went unanswered: out of routing until it answers."""
        e = self._peers.get(peer_id)
        if e is not None and e.connected:
            e.unresponsive = reason

    def record_age(self, e: PeerEntry) -> float | None:
        return None if e.record_at is None else self.clock() - e.record_at

    def observed_success(self, e: PeerEntry) -> float:
        """Decayed success rate with a low prior (PRIOR_SUCCESS, PRIOR_WEIGHT): 0.25 for a peer
        never tried. Peer IDs cost nothing, so a stranger starts below anyone that has answered."""
        self._decay(e)
        return (e.successes + PRIOR_SUCCESS * PRIOR_WEIGHT) / (e.successes + e.failures + PRIOR_WEIGHT)

    def confidence(self, e: PeerEntry) -> float:
        """0..1: how far this node's own observations back the peer's claims about itself (its
        success ratio, GPU, real model): 0 for a stranger, 0.5 after two answered queries."""
        self._decay(e)
        return e.successes / (e.successes + 2.0)

    def proven(self, e: PeerEntry) -> bool:
        """It has answered a query of this node's, or a spot-check: ranked ahead of strangers."""
        return (e.answered > 0 or e.spot_passed) and not e.caught

    def score(self, e: PeerEntry, realm: str) -> float:
        """Higher is better; 0..100. Explained field by field in the README."""
        status = e.record.realm(realm) if e.record else None
        if status is None or e.record is None:
            return 0.0
        c = self.confidence(e)
        # What it says of itself weighs as much as what this node saw confirms it.
        reliability = (1.0 - 0.3 * c) * self.observed_success(e) + 0.3 * c * e.record.success_ratio
        load = status.queue_depth / max(status.slots, 1)
        latency_s = (e.latency_ms if e.latency_ms is not None else status.service_ms) / 1000.0
        score = 100.0 * reliability / (1.0 + load) / (1.0 + latency_s / 10.0)
        if status.smoke_test or c < 1.0:
            # A smoke-test model halves the score; "a real model" counts as observations confirm it.
            score *= 0.5 if status.smoke_test else 0.5 + 0.5 * c
        if status.gpu:
            score *= 1.0 + 0.2 * c
        return round(min(score, 100.0), 3) if math.isfinite(score) else 0.0

    def candidates(self, realm: str) -> tuple[list[Candidate], list[Exclusion]]:
        """Live peers serving ``realm``, best first, and why every other known peer is out."""
        ranked: list[Candidate] = []
        excluded: list[Exclusion] = []
        for e in self:
            state = self.state(e)
            serves = e.record is not None and e.record.realm(realm) is not None
            if state is PeerState.BLOCKED:
                excluded.append(
                    Exclusion(
                        e.peer_id,
                        "blocked by the sysop"
                        if e.blocked
                        else f"blocked for {e.penalty_until - self.clock():.0f}s more: {e.penalty_reason}",
                    )
                )
            elif state is PeerState.UNKNOWN:
                excluded.append(Exclusion(e.peer_id, "no health record yet"))
            elif not serves:
                excluded.append(Exclusion(e.peer_id, f"does not serve {realm}"))
            elif state is PeerState.STALE:
                age = self.record_age(e) or 0.0
                excluded.append(Exclusion(e.peer_id, f"stale: no health record for {age:.1f}s"))
            elif state is PeerState.UNREACHABLE:
                excluded.append(Exclusion(e.peer_id, f"unreachable: {e.unreachable}"))
            elif state is PeerState.PENDING:
                excluded.append(Exclusion(e.peer_id, "not connected yet (being dialed)"))
            elif state is PeerState.UNRESPONSIVE:
                excluded.append(Exclusion(e.peer_id, f"unresponsive: {e.unresponsive}"))
            elif state is PeerState.CIRCUIT_OPEN:
                left = e.breaker_until - self.clock()
                excluded.append(Exclusion(e.peer_id, f"circuit open for {left:.1f}s more ({e.last_failure})"))
            else:
                ranked.append(Candidate(e.peer_id, self.score(e, realm)))
        # Proven peers first: strangers, however good they claim to be, cannot crowd them out.
        proven = {e.peer_id for e in self if self.proven(e)}
        ranked.sort(key=lambda c: (c.peer_id not in proven, -c.score, c.peer_id))
        return ranked, excluded

    def prune(self, *, max_age: float, max_peers: int) -> int:
        """Forget peers that are not live and not blocked after ``max_age`` seconds without a
        record (or since first heard of), and the oldest such ones beyond ``max_peers``: peer IDs
        cost an attacker nothing, so the table must not grow without bound."""
        now = self.clock()

        def idle(e: PeerEntry) -> float:
            return now - (e.record_at if e.record_at is not None else e.first_seen)

        removable = [
            e
            for e in self._peers.values()
            if not e.blocked
            and not e.connected
            and self.state(e) in (PeerState.STALE, PeerState.UNKNOWN, PeerState.UNREACHABLE, PeerState.PENDING)
        ]
        removable.sort(key=idle, reverse=True)
        excess = max(0, len(self._peers) - max_peers)
        gone = [e for i, e in enumerate(removable) if i < excess or idle(e) > max_age]
        for e in gone:
            del self._peers[e.peer_id]
        return len(gone)

    def live_count(self, realm: str) -> int:
        return len(self.candidates(realm)[0])
