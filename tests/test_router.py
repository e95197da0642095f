"""Tests for the realm router (rentahal.realms.router) and the local realm queue (rentahal.realms.queue).

The router is pure logic over two interfaces, so the executors here are small in-test stand-ins;
the peer table is the real one, fed with real signed and verified health records, on trio's
MockClock (``autojump_clock`` is pytest-trio's own fixture).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from rentahal.p2p.health import HealthRecord, RealmStatus, sign_record, verify_record
from rentahal.p2p.identity import Identity
from rentahal.p2p.peers import FailureKind, PeerTable
from rentahal.realms.router import (
    LOCAL,
    Emit,
    Event,
    ExecutorError,
    Query,
    QueryFailed,
    RealmRouter,
)

SELF = Identity(Ed25519PrivateKey.generate())
PEERS = [Identity(Ed25519PrivateKey.generate()) for _ in range(4)]
P1, P2, P3, P4 = (p.peer_id for p in PEERS)
NOT_SERVED = "not served here (serve = false)"

Behaviour = Callable[[str, Query, Emit], Awaitable[Event]]


# --- stand-ins ----------------------------------------------------------------------------------


class FakeLocal:
    def __init__(self, *, serves: bool = True, depth: int = 0, behaviour: Behaviour | None = None) -> None:
        self._serves = serves
        self.depth = depth
        self.behaviour = behaviour or answer("local")
        self.calls = 0

    def serves(self, realm: str) -> bool:
        return self._serves

    def queue_depth(self, realm: str) -> int:
        return self.depth

    def not_served_reason(self, realm: str) -> str:
        return NOT_SERVED

    async def execute(self, query: Query, emit: Emit) -> Event:
        self.calls += 1
        return await self.behaviour(LOCAL, query, emit)


class FakeRemote:
    """Per-peer behaviours; records each call with the hang timeout it was given."""

    def __init__(self, behaviours: dict[str, Behaviour] | None = None) -> None:
        self.behaviours = behaviours or {}
        self.calls: list[tuple[str, float]] = []

    async def execute(self, peer_id: str, query: Query, emit: Emit, *, hang_timeout: float) -> Event:
        self.calls.append((peer_id, hang_timeout))
        return await self.behaviours.get(peer_id, answer(peer_id))(peer_id, query, emit)

    @property
    def called(self) -> list[str]:
        return [p for p, _ in self.calls]


def answer(text: str, *, tokens: int = 2, delay: float = 0.0) -> Behaviour:
    async def run(who: str, query: Query, emit: Emit) -> Event:
        await trio.sleep(delay)
        for i in range(tokens):
            await emit({"type": "token", "text": f"{text}{i}", "index": i})
        return {"type": "result", "output": text, "stats": {"by": who}}

    return run


def fail(kind: FailureKind, code: str, message: str = "boom", *, tokens: int = 0) -> Behaviour:
    async def run(who: str, query: Query, emit: Emit) -> Event:
        for i in range(tokens):
            await emit({"type": "token", "text": f"partial{i}", "index": i})
        raise ExecutorError(kind, code, f"{who}: {message}")

    return run


async def hang(who: str, query: Query, emit: Emit) -> Event:
    await emit({"type": "accepted", "position": 0, "eta_ms": None})
    await trio.sleep_forever()
    raise AssertionError("unreachable")


class Events:
    def __init__(self) -> None:
        self.events: list[Event] = []

    async def __call__(self, event: Event) -> None:
        self.events.append(event)

    def of(self, type_: str) -> list[Event]:
        return [e for e in self.events if e["type"] == type_]


# --- fixtures -----------------------------------------------------------------------------------


def make_table() -> PeerTable:
    return PeerTable(
        SELF.peer_id,
        stale_after=10.0,
        breaker_failures=3,
        breaker_backoff=30.0,
        breaker_backoff_max=300.0,
        half_life=300.0,
        clock=trio.current_time,
    )


_seq = iter(range(1, 10**9))


def announce(table: PeerTable, identity: Identity, *, realm: str = "chat", depth: int = 0) -> None:
    """Gossip ``identity``'s signed health record into ``table``, as the node does."""
    record = HealthRecord(
        peer_id=identity.peer_id,
        seq=next(_seq),
        timestamp=1_750_000_000.0,
        realms=(RealmStatus(realm, "tiny", False, depth, 1, 100.0, False),),
        success_ratio=1.0,
    )
    verified = verify_record(sign_record(record, identity), author=identity.peer_id)
    table.set_connected(identity.peer_id, True)  # the node routes only to peers it is connected to
    assert table.apply_record(verified)


def make_router(
    table: PeerTable,
    local: FakeLocal,
    remote: FakeRemote,
    *,
    local_queue_limit: int = 2,
    max_attempts: int = 3,
    discover: Callable[[str], Awaitable[None]] | None = None,
) -> RealmRouter:
    return RealmRouter(
        table,
        local,
        remote,
        local_queue_limit=local_queue_limit,
        max_attempts=max_attempts,
        hang_timeout=7.5,
        discover=discover,
    )


def query(deadline_s: float = 60.0, realm: str = "chat") -> Query:
    return Query("q1", realm, {"prompt": "hello"}, deadline_s, SELF.peer_id)


def ranked_peers(table: PeerTable, realm: str = "chat") -> list[str]:
    return [c.peer_id for c in table.candidates(realm)[0]]


# --- planning -----------------------------------------------------------------------------------


async def test_local_first_when_served_and_queue_short(autojump_clock: trio.testing.MockClock) -> None:
    table = make_table()
    announce(table, PEERS[0])
    local, remote = FakeLocal(depth=1), FakeRemote()
    router = make_router(table, local, remote, local_queue_limit=2)

    plan = router.plan("chat")
    assert [c.executor for c in plan.candidates] == [LOCAL, P1]
    assert plan.excluded == []
    assert "1 queued" in plan.candidates[0].note

    events = Events()
    result = await router.run(query(), events)
    assert result["executor"] == LOCAL and result["output"] == "local"
    assert result["attempt"] == 1 and result["failovers"] == []
    assert local.calls == 1 and remote.calls == []
    assert events.of("executor") == [{"type": "executor", "executor": LOCAL, "attempt": 1}]
    assert [e["attempt"] for e in events.of("token")] == [1, 1]
    # A local answer says nothing about peers.
    assert table.get(P1).successes == 0.0


async def test_peers_first_when_local_queue_at_limit(autojump_clock: trio.testing.MockClock) -> None:
    table = make_table()
    announce(table, PEERS[0], depth=0)
    announce(table, PEERS[1], depth=3)
    local, remote = FakeLocal(depth=2), FakeRemote()
    router = make_router(table, local, remote, local_queue_limit=2)

    plan = router.plan("chat")
    assert [c.executor for c in plan.candidates] == [P1, P2, LOCAL]
    assert "limit 2" in plan.candidates[-1].note
    assert plan.to_json()["candidates"][-1]["executor"] == LOCAL

    result = await router.run(query(), Events())
    assert result["executor"] == P1
    assert remote.called == [P1] and local.calls == 0
    assert remote.calls[0][1] == 7.5  # the router passes its hang timeout on


async def test_local_is_the_last_resort_when_overloaded(autojump_clock: trio.testing.MockClock) -> None:
    table = make_table()
    announce(table, PEERS[0])
    local = FakeLocal(depth=5)
    remote = FakeRemote({P1: fail(FailureKind.DEAD, "backend_failed")})
    result = await make_router(table, local, remote).run(query(), Events())
    assert result["executor"] == LOCAL
    assert result["failovers"] == [P1]
    assert local.calls == 1


async def test_local_excluded_with_reason_when_not_served(autojump_clock: trio.testing.MockClock) -> None:
    table = make_table()
    announce(table, PEERS[0])
    local, remote = FakeLocal(serves=False), FakeRemote()
    router = make_router(table, local, remote)

    plan = router.plan("chat")
    assert [c.executor for c in plan.candidates] == [P1]
    assert plan.excluded[0].executor == LOCAL
    assert plan.excluded[0].note == NOT_SERVED
    assert plan.to_json()["excluded"][0] == {"executor": LOCAL, "reason": NOT_SERVED}

    result = await router.run(query(), Events())
    assert result["executor"] == P1
    assert local.calls == 0


# --- failover -----------------------------------------------------------------------------------


async def test_failover_from_a_dead_peer(autojump_clock: trio.testing.MockClock) -> None:
    table = make_table()
    announce(table, PEERS[0], depth=0)
    announce(table, PEERS[1], depth=2)
    assert ranked_peers(table) == [P1, P2]
    remote = FakeRemote(
        {
            P1: fail(FailureKind.DEAD, "backend_failed", "stream reset", tokens=3),
            P2: answer("second", delay=0.25),
        }
    )
    router = make_router(table, FakeLocal(serves=False), remote)
    events = Events()

    result = await router.run(query(), events)

    assert result["executor"] == P2
    assert result["output"] == "second"
    assert result["failovers"] == [P1]
    assert result["attempt"] == 2
    assert remote.called == [P1, P2]
    assert [e["executor"] for e in events.of("executor")] == [P1, P2]
    (failover,) = events.of("failover")
    assert failover["executor"] == P1 and failover["attempt"] == 1
    assert failover["kind"] == "dead" and failover["code"] == "backend_failed"
    assert "stream reset" in failover["message"]
    # Tokens are tagged with their attempt, so the client can drop the dead one's partial answer.
    assert [(e["text"], e["attempt"]) for e in events.of("token")] == [
        ("partial0", 1), ("partial1", 1), ("partial2", 1), ("second0", 2), ("second1", 2),
    ]
    types = [e["type"] for e in events.events]
    assert types.index("failover") < types.index("executor", 1)

    first, second = table.get(P1), table.get(P2)
    assert first.failures == pytest.approx(1.0) and first.consecutive_failures == 1
    assert first.successes == 0.0
    assert first.last_failure.startswith("dead")
    assert second.successes == pytest.approx(1.0) and second.failures == 0.0
    assert second.latency_ms == pytest.approx(250.0)  # time to its first event, virtual clock


async def test_repeated_failures_open_the_circuit_and_reorder(autojump_clock: trio.testing.MockClock) -> None:
    table = make_table()
    announce(table, PEERS[0], depth=0)
    announce(table, PEERS[1], depth=1)
    remote = FakeRemote({P1: fail(FailureKind.HUNG, "deadline_exceeded", "no frame")})
    router = make_router(table, FakeLocal(serves=False), remote)
    for i in range(3):
        assert router.plan("chat").candidates[0].executor == P1
        result = await router.run(query(), Events())
        assert result["executor"] == P2
    # Third failure opened P1's breaker: it is no longer tried at all.
    plan = router.plan("chat")
    assert [c.executor for c in plan.candidates] == [P2]
    assert any(x.executor == P1 and "circuit" in x.note for x in plan.excluded)
    remote.calls.clear()
    assert (await router.run(query(), Events()))["failovers"] == []
    assert remote.called == [P2]


async def test_query_deadline_cuts_a_hung_executor(autojump_clock: trio.testing.MockClock) -> None:
    table = make_table()
    announce(table, PEERS[0])
    announce(table, PEERS[1], depth=5)
    remote = FakeRemote({P1: hang})
    router = make_router(table, FakeLocal(serves=False), remote)
    events = Events()

    start = trio.current_time()
    with pytest.raises(QueryFailed) as info:
        await router.run(query(deadline_s=30.0), events)
    assert info.value.code == "deadline_exceeded"
    assert "30s" in info.value.message
    assert trio.current_time() - start == pytest.approx(30.0)
    assert remote.called == [P1]  # the deadline is for the whole query, not per attempt
    assert events.of("accepted") == [{"type": "accepted", "position": 0, "eta_ms": None, "attempt": 1}]


async def test_deadline_spans_failovers(autojump_clock: trio.testing.MockClock) -> None:
    table = make_table()
    announce(table, PEERS[0])
    announce(table, PEERS[1], depth=5)

    async def slow_death(who: str, q: Query, emit: Emit) -> Event:
        await trio.sleep(20.0)
        raise ExecutorError(FailureKind.HUNG, "deadline_exceeded", "no frame for 20s")

    remote = FakeRemote({P1: slow_death, P2: hang})
    start = trio.current_time()
    with pytest.raises(QueryFailed) as info:
        await make_router(table, FakeLocal(serves=False), remote).run(query(deadline_s=30.0), Events())
    assert info.value.code == "deadline_exceeded"
    assert trio.current_time() - start == pytest.approx(30.0)
    assert remote.called == [P1, P2]


async def test_non_retryable_refusal_does_not_fail_over(autojump_clock: trio.testing.MockClock) -> None:
    table = make_table()
    announce(table, PEERS[0])
    announce(table, PEERS[1], depth=5)
    remote = FakeRemote({P1: fail(FailureKind.REFUSED, "bad_request", "prompt too long")})
    local = FakeLocal(depth=10)
    events = Events()
    with pytest.raises(QueryFailed) as info:
        await make_router(table, local, remote, local_queue_limit=2).run(query(), events)
    assert info.value.code == "bad_request"
    assert "prompt too long" in info.value.message
    assert remote.called == [P1] and local.calls == 0
    assert events.of("failover") == []


async def test_local_bad_request_does_not_fail_over(autojump_clock: trio.testing.MockClock) -> None:
    table = make_table()
    announce(table, PEERS[0])
    remote = FakeRemote()
    local = FakeLocal(behaviour=fail(FailureKind.REFUSED, "bad_request", "no prompt"))
    with pytest.raises(QueryFailed) as info:
        await make_router(table, local, remote).run(query(), Events())
    assert info.value.code == "bad_request"
    assert remote.calls == []


async def test_queue_full_refusal_fails_over(autojump_clock: trio.testing.MockClock) -> None:
    table = make_table()
    announce(table, PEERS[0])
    remote = FakeRemote()
    local = FakeLocal(behaviour=fail(FailureKind.REFUSED, "queue_full", "chat queue is full"))
    events = Events()
    result = await make_router(table, local, remote).run(query(), events)
    assert result["executor"] == P1
    assert result["failovers"] == [LOCAL]
    assert events.of("failover")[0]["code"] == "queue_full"
    assert table.get(P1).successes == pytest.approx(1.0)


async def test_remote_queue_full_fails_over_and_counts_against_the_peer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    table = make_table()
    announce(table, PEERS[0])
    announce(table, PEERS[1], depth=5)
    remote = FakeRemote({P1: fail(FailureKind.REFUSED, "queue_full")})
    result = await make_router(table, FakeLocal(serves=False), remote).run(query(), Events())
    assert result["executor"] == P2
    assert table.get(P1).consecutive_failures == 1
    assert table.get(P1).last_failure.startswith("refused")


async def test_max_attempts_caps_the_executors_tried(autojump_clock: trio.testing.MockClock) -> None:
    table = make_table()
    for depth, identity in enumerate(PEERS):
        announce(table, identity, depth=depth)
    assert ranked_peers(table) == [P1, P2, P3, P4]
    remote = FakeRemote(
        {
            P1: fail(FailureKind.DEAD, "backend_failed"),
            P2: fail(FailureKind.REFUSED, "busy", "too busy"),
            P3: answer("never reached"),
        }
    )
    events = Events()
    with pytest.raises(QueryFailed) as info:
        await make_router(table, FakeLocal(serves=False), remote, max_attempts=2).run(query(), events)
    assert remote.called == [P1, P2]
    assert info.value.code == "busy"  # the last (retryable) code
    assert "all 2 executor(s) failed" in info.value.message and "too busy" in info.value.message
    assert len(events.of("failover")) == 2


async def test_all_executors_failing(autojump_clock: trio.testing.MockClock) -> None:
    table = make_table()
    announce(table, PEERS[0])
    announce(table, PEERS[1], depth=1)
    remote = FakeRemote(
        {
            P1: fail(FailureKind.HUNG, "deadline_exceeded"),
            P2: fail(FailureKind.PROTOCOL, "bad_request", "malformed answer"),
        }
    )
    local = FakeLocal(depth=9, behaviour=fail(FailureKind.DEAD, "backend_failed", "model crashed"))
    with pytest.raises(QueryFailed) as info:
        await make_router(table, local, remote, max_attempts=5).run(query(), Events())
    assert remote.called == [P1, P2] and local.calls == 1
    assert info.value.code == "backend_failed"
    assert "all 3 executor(s) failed" in info.value.message and "model crashed" in info.value.message
    # A protocol error is a failure (not a refusal): it fails over, and counts as a violation.
    assert table.get(P2).violations == 1


# --- discovery ----------------------------------------------------------------------------------


async def test_discover_fills_the_table(autojump_clock: trio.testing.MockClock) -> None:
    table = make_table()
    remote = FakeRemote()
    asked: list[str] = []

    async def discover(realm: str) -> None:
        asked.append(realm)
        await trio.sleep(1.0)  # a DHT lookup, then the peer's first health record
        announce(table, PEERS[2], realm=realm)

    router = make_router(table, FakeLocal(serves=False), remote, discover=discover)
    result = await router.run(query(realm="vision"), Events())
    assert asked == ["vision"]
    assert result["executor"] == P3
    assert remote.called == [P3]


async def test_discover_finding_nothing(autojump_clock: trio.testing.MockClock) -> None:
    table = make_table()
    table.hear_of(P4, source="dht")  # known, but never sent a record
    asked: list[str] = []

    async def discover(realm: str) -> None:
        asked.append(realm)

    remote = FakeRemote()
    with pytest.raises(QueryFailed) as info:
        await make_router(table, FakeLocal(serves=False), remote, discover=discover).run(query(), Events())
    assert asked == ["chat"]
    assert info.value.code == "realm_not_served"
    assert NOT_SERVED in info.value.message
    assert "no health record yet" in info.value.message
    assert remote.calls == []


async def test_discover_is_bounded(autojump_clock: trio.testing.MockClock) -> None:
    table = make_table()
    asked: list[str] = []

    async def discover(realm: str) -> None:
        asked.append(realm)
        await trio.sleep_forever()

    start = trio.current_time()
    with pytest.raises(QueryFailed) as info:
        await make_router(table, FakeLocal(serves=False), FakeRemote(), discover=discover).run(
            query(deadline_s=60.0), Events()
        )
    assert info.value.code == "realm_not_served"
    assert asked == ["chat"]
    assert trio.current_time() - start == pytest.approx(5.0)


async def test_no_discover_hook_no_candidates(autojump_clock: trio.testing.MockClock) -> None:
    with pytest.raises(QueryFailed) as info:
        await make_router(make_table(), FakeLocal(serves=False), FakeRemote()).run(query(), Events())
    assert info.value.code == "realm_not_served"
    assert "local" in info.value.message and NOT_SERVED in info.value.message


async def test_discover_not_called_when_there_is_a_candidate(autojump_clock: trio.testing.MockClock) -> None:
    asked: list[str] = []

    async def discover(realm: str) -> None:
        asked.append(realm)

    result = await make_router(make_table(), FakeLocal(), FakeRemote(), discover=discover).run(query(), Events())
    assert result["executor"] == LOCAL
    assert asked == []


async def test_query_deadline_includes_discovery(autojump_clock: trio.testing.MockClock) -> None:
    table = make_table()

    async def discover(realm: str) -> None:
        await trio.sleep(4.0)
        announce(table, PEERS[0], realm=realm)

    remote = FakeRemote({P1: hang})
    start = trio.current_time()
    with pytest.raises(QueryFailed) as info:
        await make_router(table, FakeLocal(serves=False), remote, discover=discover).run(
            query(deadline_s=10.0), Events()
        )
    assert info.value.code == "deadline_exceeded"
    assert trio.current_time() - start == pytest.approx(10.0)  # today: 14.0
