"""Tests for the realm router (rentahal.realms.router).

The router is pure logic over two interfaces, so the executors here are small in-test stand-ins
that stream and return the typed events of ``rentahal.realms.events``; the peer table is the real
one, fed with real signed and verified health records, on trio's MockClock (``autojump_clock`` is
pytest-trio's own fixture).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from rentahal.p2p.health import HealthRecord, RealmStatus, sign_record, verify_record
from rentahal.p2p.identity import Identity
from rentahal.p2p.peers import PeerTable
from rentahal.realms import events as ev
from rentahal.realms.events import Code, ExecutorFailure, FailureKind, Fault, QueryError
from rentahal.realms.router import LOCAL, Query, RealmRouter, StreamEmit

SELF = Identity(Ed25519PrivateKey.generate())
PEERS = [Identity(Ed25519PrivateKey.generate()) for _ in range(4)]
P1, P2, P3, P4 = (p.peer_id for p in PEERS)
NOT_SERVED = "not served here (serve = false)"

Behaviour = Callable[[str, Query, StreamEmit], Awaitable[ev.Result]]
E = TypeVar("E")


# --- stand-ins ----------------------------------------------------------------------------------


class FakeLocal:
    def __init__(
        self, *, serves: bool = True, depth: int = 0, behaviour: Behaviour | None = None, loading: bool = False
    ) -> None:
        self._serves = serves
        self._loading = loading
        self._loaded = trio.Event()
        self.depth = depth
        self.behaviour = behaviour or answer("local")
        self.calls = 0
        self.waited_for: list[str] = []

    def serves(self, realm: str) -> bool:
        return self._serves

    def model_name(self, realm: str) -> str:
        return "local-model"

    def queue_depth(self, realm: str) -> int:
        return self.depth

    def not_served_reason(self, realm: str) -> str:
        return "model still loading" if self._loading else NOT_SERVED

    def loading(self, realm: str) -> bool:
        return self._loading

    async def wait_loaded(self, realm: str) -> None:
        self.waited_for.append(realm)
        await self._loaded.wait()

    def finish_loading(self, *, serves: bool = True) -> None:
        self._loading = False
        self._serves = serves
        self._loaded.set()

    async def execute(self, query: Query, emit: StreamEmit) -> ev.Result:
        self.calls += 1
        return await self.behaviour(LOCAL, query, emit)


class FakeRemote:
    """Per-peer behaviours; records each call with the deadline the attempt was given."""

    def __init__(self, behaviours: dict[str, Behaviour] | None = None) -> None:
        self.behaviours = behaviours or {}
        self.calls: list[tuple[str, float]] = []

    async def execute(self, peer_id: str, query: Query, emit: StreamEmit) -> ev.Result:
        self.calls.append((peer_id, query.deadline_s))
        return await self.behaviours.get(peer_id, answer(peer_id))(peer_id, query, emit)

    @property
    def called(self) -> list[str]:
        return [p for p, _ in self.calls]


def answer(text: str, *, tokens: int = 2, delay: float = 0.0) -> Behaviour:
    async def run(who: str, query: Query, emit: StreamEmit) -> ev.Result:
        await trio.sleep(delay)
        for i in range(tokens):
            await emit(ev.Token(f"{text}{i}", i))
        return ev.Result({"text": text}, {"by": who})

    return run


def fail(
    kind: FailureKind, code: Code, message: str = "boom", *, tokens: int = 0, retry_after: float | None = None
) -> Behaviour:
    async def run(who: str, query: Query, emit: StreamEmit) -> ev.Result:
        for i in range(tokens):
            await emit(ev.Token(f"partial{i}", i))
        raise ExecutorFailure(f"{who}: {message}", code, kind=kind, retry_after=retry_after)

    return run


def busy_then(times: int, retry_after: float, then: Behaviour) -> Behaviour:
    """Answers busy (with a retry-after) ``times`` times, then behaves as ``then``."""
    left = [times]

    async def run(who: str, query: Query, emit: StreamEmit) -> ev.Result:
        if left[0] > 0:
            left[0] -= 1
            raise ExecutorFailure(
                f"{who}: all slots busy", Code.BUSY, kind=FailureKind.REFUSED, retry_after=retry_after
            )
        return await then(who, query, emit)

    return run


async def hang(who: str, query: Query, emit: StreamEmit) -> ev.Result:
    await emit(ev.Accepted(0))
    await trio.sleep_forever()
    raise AssertionError("unreachable")


class Events:
    def __init__(self) -> None:
        self.events: list[ev.Event] = []

    async def __call__(self, event: ev.Event) -> None:
        assert isinstance(event, (ev.Routed, ev.Failover, ev.Accepted, ev.Progress, ev.Token)), event
        self.events.append(event)

    def of(self, type_: type[E]) -> list[E]:
        return [e for e in self.events if isinstance(e, type_)]


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
        discover=discover,
    )


def query(deadline_s: float = 60.0, realm: str = "chat") -> Query:
    return Query("q1", realm, {"prompt": "hello"}, deadline_s, SELF.peer_id)


def ranked_peers(table: PeerTable, realm: str = "chat") -> list[str]:
    return [c.peer_id for c in table.candidates(realm)[0]]


def assert_no_failure(table: PeerTable, peer_id: str) -> None:
    entry = table.get(peer_id)
    assert entry is not None
    assert entry.failures == 0.0 and entry.consecutive_failures == 0
    assert entry.last_failure == "" and entry.unresponsive == ""
    assert entry.breaker_until == 0.0


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
    assert isinstance(result, ev.Result)
    assert result.executor == LOCAL and result.output == {"text": "local"}
    assert result.stats == {"by": LOCAL}
    assert result.attempt == 1 and result.failovers == ()
    assert local.calls == 1 and remote.calls == []
    # The attempt is announced once, then the executor's stream passes through untouched.
    assert events.events == [ev.Routed(LOCAL, 1), ev.Token("local0", 0), ev.Token("local1", 1)]
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

    result = await router.run(query(deadline_s=45.0), Events())
    assert result.executor == P1
    assert remote.called == [P1] and local.calls == 0
    assert remote.calls[0][1] == pytest.approx(45.0)  # the attempt carries the query's deadline


async def test_local_is_the_last_resort_when_overloaded(autojump_clock: trio.testing.MockClock) -> None:
    table = make_table()
    announce(table, PEERS[0])
    local = FakeLocal(depth=5)
    remote = FakeRemote({P1: fail(FailureKind.DEAD, Code.BACKEND_FAILED)})
    result = await make_router(table, local, remote).run(query(), Events())
    assert result.executor == LOCAL
    assert result.failovers == (P1,)
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
    assert result.executor == P1
    assert local.calls == 0 and local.waited_for == []


# --- failover -----------------------------------------------------------------------------------


async def test_failover_from_a_dead_peer(autojump_clock: trio.testing.MockClock) -> None:
    table = make_table()
    announce(table, PEERS[0], depth=0)
    announce(table, PEERS[1], depth=2)
    assert ranked_peers(table) == [P1, P2]
    remote = FakeRemote(
        {
            P1: fail(FailureKind.DEAD, Code.BACKEND_FAILED, "stream reset", tokens=3),
            P2: answer("second", delay=0.25),
        }
    )
    router = make_router(table, FakeLocal(serves=False), remote)
    events = Events()

    result = await router.run(query(), events)

    assert result.executor == P2
    assert result.output == {"text": "second"}
    assert result.failovers == (P1,)
    assert result.attempt == 2
    assert remote.called == [P1, P2]
    assert events.of(ev.Routed) == [ev.Routed(P1, 1), ev.Routed(P2, 2)]
    (failover,) = events.of(ev.Failover)
    assert failover.executor == P1 and failover.attempt == 1
    assert failover.kind is FailureKind.DEAD and failover.code is Code.BACKEND_FAILED
    assert "stream reset" in failover.message
    # Tokens pass through untouched; each follows the Routed of its attempt and the dead one's
    # partial answer ends with its Failover, so the client can drop it.
    assert events.events == [
        ev.Routed(P1, 1),
        ev.Token("partial0", 0), ev.Token("partial1", 1), ev.Token("partial2", 2),
        failover,
        ev.Routed(P2, 2),
        ev.Token("second0", 0), ev.Token("second1", 1),
    ]  # fmt: skip

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
    for _ in range(20):  # long proven: it stays first after a failure or two
        table.record_success(P1)
    remote = FakeRemote({P1: fail(FailureKind.HUNG, Code.DEADLINE_EXCEEDED, "no frame")})
    router = make_router(table, FakeLocal(serves=False), remote)
    for i in range(3):
        assert router.plan("chat").candidates[0].executor == P1
        result = await router.run(query(), Events())
        assert result.executor == P2
        assert table.get(P1).consecutive_failures == i + 1
        if i < 2:
            # A hung peer is out of routing at once, until it shows it is alive...
            plan = router.plan("chat")
            assert [c.executor for c in plan.candidates] == [P2]
            assert any(x.executor == P1 and "unresponsive" in x.note for x in plan.excluded)
        announce(table, PEERS[0], depth=0)  # ...with a fresh health record
    # The third failure in a row opened P1's breaker: even a fresh record does not bring it back.
    plan = router.plan("chat")
    assert [c.executor for c in plan.candidates] == [P2]
    assert any(x.executor == P1 and "circuit" in x.note for x in plan.excluded)
    remote.calls.clear()
    assert (await router.run(query(), Events())).failovers == ()
    assert remote.called == [P2]


async def test_query_deadline_cuts_a_hung_executor(autojump_clock: trio.testing.MockClock) -> None:
    table = make_table()
    announce(table, PEERS[0])
    announce(table, PEERS[1], depth=5)
    remote = FakeRemote({P1: hang})
    router = make_router(table, FakeLocal(serves=False), remote)
    events = Events()

    start = trio.current_time()
    with pytest.raises(QueryError) as info:
        await router.run(query(deadline_s=30.0), events)
    assert info.value.code is Code.DEADLINE_EXCEEDED
    assert "30s" in info.value.message
    assert trio.current_time() - start == pytest.approx(30.0)
    assert remote.called == [P1]  # the deadline is for the whole query, not per attempt
    assert events.events == [ev.Routed(P1, 1), ev.Accepted(0, None)]


async def test_deadline_spans_failovers(autojump_clock: trio.testing.MockClock) -> None:
    table = make_table()
    announce(table, PEERS[0])
    announce(table, PEERS[1], depth=5)

    async def slow_death(who: str, q: Query, emit: StreamEmit) -> ev.Result:
        await trio.sleep(20.0)
        raise ExecutorFailure("no frame for 20s", Code.DEADLINE_EXCEEDED, kind=FailureKind.HUNG)

    remote = FakeRemote({P1: slow_death, P2: hang})
    start = trio.current_time()
    with pytest.raises(QueryError) as info:
        await make_router(table, FakeLocal(serves=False), remote).run(query(deadline_s=30.0), Events())
    assert info.value.code is Code.DEADLINE_EXCEEDED
    assert trio.current_time() - start == pytest.approx(30.0)
    assert remote.called == [P1, P2]
    # Each attempt gets the time that is left, not the whole budget again.
    assert [d for _, d in remote.calls] == [pytest.approx(30.0), pytest.approx(10.0)]


async def test_non_retryable_failure_is_raised_without_failover(autojump_clock: trio.testing.MockClock) -> None:
    table = make_table()
    announce(table, PEERS[0])
    announce(table, PEERS[1], depth=5)
    # Neither the user's fault nor one another executor could fix: the peer's run was cancelled.
    remote = FakeRemote({P1: fail(FailureKind.REFUSED, Code.CANCELLED, "cancelled by its sysop")})
    local = FakeLocal(depth=10)
    events = Events()
    with pytest.raises(QueryError) as info:
        await make_router(table, local, remote, local_queue_limit=2).run(query(), events)
    assert not Code.CANCELLED.retryable and Code.CANCELLED.fault is not Fault.USER
    assert info.value.code is Code.CANCELLED
    assert "cancelled by its sysop" in info.value.message
    assert remote.called == [P1] and local.calls == 0
    assert events.of(ev.Failover) == []


async def test_local_bad_request_does_not_fail_over(autojump_clock: trio.testing.MockClock) -> None:
    table = make_table()
    announce(table, PEERS[0])
    remote = FakeRemote()
    local = FakeLocal(behaviour=fail(FailureKind.REFUSED, Code.BAD_REQUEST, "no prompt"))
    events = Events()
    with pytest.raises(QueryError) as info:
        await make_router(table, local, remote).run(query(), events)
    assert info.value.code is Code.BAD_REQUEST
    assert "no prompt" in info.value.message
    assert remote.calls == [] and local.calls == 1
    assert events.of(ev.Failover) == []
    assert_no_failure(table, P1)


async def test_queue_full_without_a_hint_fails_over(autojump_clock: trio.testing.MockClock) -> None:
    table = make_table()
    announce(table, PEERS[0])
    remote = FakeRemote()
    local = FakeLocal(behaviour=fail(FailureKind.REFUSED, Code.QUEUE_FULL, "chat queue is full"))
    events = Events()
    result = await make_router(table, local, remote).run(query(), events)
    assert result.executor == P1
    assert result.failovers == (LOCAL,)
    assert events.of(ev.Failover)[0].code is Code.QUEUE_FULL
    assert table.get(P1).successes == pytest.approx(1.0)


async def test_local_queue_full_with_a_hint_lets_a_peer_go_first(autojump_clock: trio.testing.MockClock) -> None:
    table = make_table()
    announce(table, PEERS[0])
    remote = FakeRemote()
    local = FakeLocal(behaviour=fail(FailureKind.REFUSED, Code.QUEUE_FULL, "chat queue is full", retry_after=2.0))
    events = Events()
    start = trio.current_time()
    result = await make_router(table, local, remote).run(query(), events)
    # Back-pressure is no failure: the ready peer runs at once, without a failover.
    assert result.executor == P1 and result.attempt == 2
    assert result.failovers == ()
    assert events.of(ev.Routed) == [ev.Routed(LOCAL, 1), ev.Routed(P1, 2)]
    assert events.of(ev.Failover) == []
    assert trio.current_time() - start == pytest.approx(0.0)
    assert local.calls == 1 and remote.called == [P1]


async def test_remote_queue_full_without_a_hint_counts_against_the_peer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    table = make_table()
    announce(table, PEERS[0])
    announce(table, PEERS[1], depth=5)
    remote = FakeRemote({P1: fail(FailureKind.REFUSED, Code.QUEUE_FULL)})
    result = await make_router(table, FakeLocal(serves=False), remote).run(query(), Events())
    assert result.executor == P2
    assert table.get(P1).consecutive_failures == 1
    assert table.get(P1).last_failure.startswith("refused")


async def test_max_attempts_caps_the_executors_tried(autojump_clock: trio.testing.MockClock) -> None:
    table = make_table()
    for depth, identity in enumerate(PEERS):
        announce(table, identity, depth=depth)
    assert ranked_peers(table) == [P1, P2, P3, P4]
    remote = FakeRemote(
        {
            P1: fail(FailureKind.DEAD, Code.BACKEND_FAILED),
            P2: fail(FailureKind.REFUSED, Code.BUSY, "too busy"),  # no retry-after: a failure
            P3: answer("never reached"),
        }
    )
    events = Events()
    with pytest.raises(QueryError) as info:
        await make_router(table, FakeLocal(serves=False), remote, max_attempts=2).run(query(), events)
    assert remote.called == [P1, P2]
    assert info.value.code is Code.BUSY  # the last (retryable) code
    assert "all 2 executor(s) failed" in info.value.message and "too busy" in info.value.message
    assert len(events.of(ev.Failover)) == 2


async def test_all_executors_failing(autojump_clock: trio.testing.MockClock) -> None:
    table = make_table()
    announce(table, PEERS[0])
    announce(table, PEERS[1], depth=1)
    remote = FakeRemote(
        {
            P1: fail(FailureKind.HUNG, Code.DEADLINE_EXCEEDED),
            P2: fail(FailureKind.PROTOCOL, Code.PROTOCOL_ERROR, "malformed answer"),
        }
    )
    local = FakeLocal(depth=9, behaviour=fail(FailureKind.DEAD, Code.BACKEND_FAILED, "model crashed"))
    with pytest.raises(QueryError) as info:
        await make_router(table, local, remote, max_attempts=5).run(query(), Events())
    assert remote.called == [P1, P2] and local.calls == 1
    assert info.value.code is Code.BACKEND_FAILED
    assert "all 3 executor(s) failed" in info.value.message and "model crashed" in info.value.message
    # A protocol error is a failure (not a refusal): it fails over, and counts as a violation.
    assert table.get(P2).violations == 1


# --- back-pressure, user faults and deadlines on a peer ------------------------------------------


async def test_busy_peer_is_waited_for_and_not_counted(autojump_clock: trio.testing.MockClock) -> None:
    table = make_table()
    announce(table, PEERS[0])
    remote = FakeRemote({P1: busy_then(2, 0.2, answer("patient"))})
    events = Events()
    start = trio.current_time()
    result = await make_router(table, FakeLocal(serves=False), remote).run(query(deadline_s=30.0), events)
    waited = trio.current_time() - start

    assert result.executor == P1 and result.output == {"text": "patient"}
    assert result.attempt == 3 and result.failovers == ()
    assert remote.called == [P1, P1, P1]
    assert 0.2 + 0.4 - 1e-9 <= waited <= 1.25 * (0.2 + 0.4)  # 0.2 s, then doubled, each spread by up to 25 %
    assert events.of(ev.Routed) == [ev.Routed(P1, 1), ev.Routed(P1, 2), ev.Routed(P1, 3)]
    assert events.of(ev.Failover) == []
    entry = table.get(P1)
    assert entry.failures == 0.0 and entry.consecutive_failures == 0 and entry.last_failure == ""
    assert entry.successes == pytest.approx(1.0)


async def test_busy_past_the_deadline_moves_on(autojump_clock: trio.testing.MockClock) -> None:
    table = make_table()
    announce(table, PEERS[0])
    announce(table, PEERS[1], depth=5)
    assert ranked_peers(table) == [P1, P2]
    remote = FakeRemote({P1: busy_then(1, 120.0, answer("too late"))})
    events = Events()
    start = trio.current_time()
    result = await make_router(table, FakeLocal(serves=False), remote).run(query(deadline_s=30.0), events)

    assert result.executor == P2 and result.attempt == 2
    assert result.failovers == (P1,)
    assert remote.called == [P1, P2]  # P1 is not asked again
    assert trio.current_time() - start == pytest.approx(0.0)  # nor waited for
    (failover,) = events.of(ev.Failover)
    assert failover.executor == P1 and failover.code is Code.BUSY


async def test_peer_bad_request_is_raised_at_once_and_not_held_against_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    table = make_table()
    announce(table, PEERS[0])
    announce(table, PEERS[1], depth=5)
    remote = FakeRemote({P1: fail(FailureKind.REFUSED, Code.BAD_REQUEST, "prompt too long")})
    local = FakeLocal(depth=10)  # overloaded: the last resort, after both peers
    router = make_router(table, local, remote, local_queue_limit=2)
    events = Events()
    start = trio.current_time()
    with pytest.raises(QueryError) as info:
        await router.run(query(), events)

    assert info.value.code is Code.BAD_REQUEST and info.value.fault is Fault.USER
    assert "prompt too long" in info.value.message
    assert trio.current_time() - start == pytest.approx(0.0)
    assert remote.called == [P1] and local.calls == 0  # no other executor would do better
    assert events.events == [ev.Routed(P1, 1)]
    assert_no_failure(table, P1)
    assert router.plan("chat").candidates[0].executor == P1  # still first in line


async def test_deadline_running_out_on_a_peer_counts_as_hung(autojump_clock: trio.testing.MockClock) -> None:
    table = make_table()
    announce(table, PEERS[0])
    announce(table, PEERS[1], depth=5)
    remote = FakeRemote({P1: hang})
    router = make_router(table, FakeLocal(serves=False), remote)
    with pytest.raises(QueryError) as info:
        await router.run(query(deadline_s=10.0), Events())

    assert info.value.code is Code.DEADLINE_EXCEEDED
    assert remote.called == [P1]
    entry = table.get(P1)
    assert entry.failures == pytest.approx(1.0) and entry.consecutive_failures == 1
    assert entry.last_failure.startswith("hung")
    assert entry.successes == 0.0
    # Out of routing until it shows it is alive; P2, never tried, has nothing against it.
    assert [c.executor for c in router.plan("chat").candidates] == [P2]
    assert_no_failure(table, P2)


async def test_busy_peer_that_then_hangs_is_blamed_for_the_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    table = make_table()
    announce(table, PEERS[0])
    remote = FakeRemote({P1: busy_then(1, 0.5, hang)})
    local = FakeLocal(depth=5, behaviour=busy_then(1, 0.9, answer("local")))
    # P1 is busy (back at 0.5 s) and then hangs; local is busy until 0.9 s and the query's
    # deadline is 0.7 s: the deadline runs out on P1's second attempt, not on a wait.
    with pytest.raises(QueryError) as info:
        await make_router(table, local, remote).run(query(deadline_s=0.7), Events())
    assert info.value.code is Code.DEADLINE_EXCEEDED
    assert remote.called == [P1, P1] and local.calls == 1
    assert table.get(P1).consecutive_failures == 1  # the hang, not the busy answer
    assert table.get(P1).last_failure.startswith("hung")


# --- discovery and loading ----------------------------------------------------------------------


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
    assert result.executor == P3
    assert remote.called == [P3]


async def test_discover_finding_nothing(autojump_clock: trio.testing.MockClock) -> None:
    table = make_table()
    table.hear_of(P4, source="dht")  # known, but never sent a record
    asked: list[str] = []

    async def discover(realm: str) -> None:
        asked.append(realm)

    remote = FakeRemote()
    with pytest.raises(QueryError) as info:
        await make_router(table, FakeLocal(serves=False), remote, discover=discover).run(query(), Events())
    assert asked == ["chat"]
    assert info.value.code is Code.REALM_NOT_SERVED
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
    with pytest.raises(QueryError) as info:
        await make_router(table, FakeLocal(serves=False), FakeRemote(), discover=discover).run(
            query(deadline_s=60.0), Events()
        )
    assert info.value.code is Code.REALM_NOT_SERVED
    assert asked == ["chat"]
    assert trio.current_time() - start == pytest.approx(5.0)


async def test_no_discover_hook_no_candidates(autojump_clock: trio.testing.MockClock) -> None:
    with pytest.raises(QueryError) as info:
        await make_router(make_table(), FakeLocal(serves=False), FakeRemote()).run(query(), Events())
    assert info.value.code is Code.REALM_NOT_SERVED
    assert "local" in info.value.message and NOT_SERVED in info.value.message


async def test_discover_not_called_when_there_is_a_candidate(autojump_clock: trio.testing.MockClock) -> None:
    asked: list[str] = []

    async def discover(realm: str) -> None:
        asked.append(realm)

    result = await make_router(make_table(), FakeLocal(), FakeRemote(), discover=discover).run(query(), Events())
    assert result.executor == LOCAL
    assert asked == []


async def test_query_deadline_includes_discovery(autojump_clock: trio.testing.MockClock) -> None:
    table = make_table()

    async def discover(realm: str) -> None:
        await trio.sleep(4.0)
        announce(table, PEERS[0], realm=realm)

    remote = FakeRemote({P1: hang})
    start = trio.current_time()
    with pytest.raises(QueryError) as info:
        await make_router(table, FakeLocal(serves=False), remote, discover=discover).run(
            query(deadline_s=10.0), Events()
        )
    assert info.value.code is Code.DEADLINE_EXCEEDED
    assert trio.current_time() - start == pytest.approx(10.0)
    assert remote.calls == [(P1, pytest.approx(6.0))]  # what discovery left of the deadline


async def test_waits_for_a_loading_local_model(autojump_clock: trio.testing.MockClock) -> None:
    table = make_table()
    local = FakeLocal(serves=False, loading=True)
    asked: list[str] = []

    async def discover(realm: str) -> None:
        asked.append(realm)

    router = make_router(table, local, FakeRemote(), discover=discover)
    assert router.plan("chat").candidates == []
    events = Events()
    start = trio.current_time()
    async with trio.open_nursery() as nursery:

        async def load() -> None:
            await trio.sleep(3.0)
            local.finish_loading()

        nursery.start_soon(load)
        result = await router.run(query(deadline_s=30.0), events)

    assert local.waited_for == ["chat"]
    assert trio.current_time() - start == pytest.approx(3.0)
    assert result.executor == LOCAL and result.output == {"text": "local"}
    assert local.calls == 1
    assert events.of(ev.Routed) == [ev.Routed(LOCAL, 1)]
    assert asked == []  # it had a candidate once loaded: no discovery


async def test_loading_local_model_is_waited_for_within_the_deadline(autojump_clock: trio.testing.MockClock) -> None:
    local = FakeLocal(serves=False, loading=True)  # never finishes loading
    start = trio.current_time()
    with pytest.raises(QueryError) as info:
        await make_router(make_table(), local, FakeRemote()).run(query(deadline_s=8.0), Events())
    assert info.value.code is Code.REALM_NOT_SERVED
    assert "model still loading" in info.value.message
    assert trio.current_time() - start == pytest.approx(8.0)
    assert local.calls == 0


async def test_a_peer_back_in_routing_meanwhile_is_tried_when_the_line_runs_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """P2 was out of routing (silent for a moment) when the query started; P1 fails; by then P2
    is a candidate again and answers, instead of the query failing with "all 1 failed"."""
    table = make_table()
    announce(table, PEERS[0])
    announce(table, PEERS[1])
    table.mark_unresponsive(P2, "a late record")

    async def p1_fails_once_p2_is_back(who: str, q: Query, emit: StreamEmit) -> ev.Result:
        await trio.sleep(1.0)
        announce(table, PEERS[1])  # P2's next record: alive after all
        raise ExecutorFailure("p1: stream lost", Code.BACKEND_FAILED, kind=FailureKind.DEAD)

    remote = FakeRemote({P1: p1_fails_once_p2_is_back})
    router = make_router(table, FakeLocal(serves=False), remote)
    assert ranked_peers(table) == [P1]
    result = await router.run(query(), Events())
    assert result.executor == P2 and result.failovers == (P1,) and remote.called == [P1, P2]


# --- executors that vanish and come back ----------------------------------------------------------


def dies_once(table: PeerTable, then: Behaviour) -> Behaviour:
    """Its stream dies under the first attempt (the process was killed: the connection goes
    too); later attempts behave as ``then``."""
    calls = [0]

    async def run(who: str, query: Query, emit: StreamEmit) -> ev.Result:
        calls[0] += 1
        if calls[0] == 1:
            table.set_connected(who, False)
            raise ExecutorFailure(
                f"{who}: stream lost (the executor closed the stream)", Code.BACKEND_FAILED, kind=FailureKind.DEAD
            )
        return await then(who, query, emit)

    return run


async def test_when_the_only_executor_dies_the_query_waits_for_one_to_come(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A soak with an executor killed every minute lost 2 of 5,854 queries: each ran on the
    executor being killed while the other was out of routing (breaker open, reconnecting)."""
    from rentahal.realms.router import REVIVE_WAIT

    table = make_table()
    announce(table, PEERS[0])
    remote = FakeRemote({P1: dies_once(table, answer("p1")), P2: answer("p2")})
    events = Events()

    async def other_comes_back() -> None:
        await trio.sleep(REVIVE_WAIT / 2)
        announce(table, PEERS[1])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other_comes_back)
        result = await make_router(table, FakeLocal(serves=False), remote).run(query(), events)
    assert result.executor == P2 and result.failovers == (P1,)
    assert trio.current_time() == pytest.approx(REVIVE_WAIT / 2, abs=0.2)


async def test_a_restarted_executor_gets_the_query_it_dropped(autojump_clock: trio.testing.MockClock) -> None:
    table = make_table()
    announce(table, PEERS[0])
    remote = FakeRemote({P1: dies_once(table, answer("p1, restarted"))})

    async def restarts() -> None:
        await trio.sleep(1.0)
        announce(table, PEERS[0])  # the same peer ID on a new connection, with a new record

    async with trio.open_nursery() as nursery:
        nursery.start_soon(restarts)
        result = await make_router(table, FakeLocal(serves=False), remote).run(query(), Events())
    assert result.executor == P1 and result.attempt == 2 and remote.called == [P1, P1]


async def test_a_half_closed_connection_does_not_eat_every_attempt(autojump_clock: trio.testing.MockClock) -> None:
    """The hour-long soak lost 4 of 84,954 queries so: the only executor serving chat could not
    open a stream (its connection half-closed), and it was tried three times in 60 ms, using up
    max_attempts, while the other executor, just restarted, was 0.6 s from serving chat again."""
    table = make_table()
    announce(table, PEERS[0])
    announce(table, PEERS[1], realm="vision")  # restarted, its model still loading
    unreachable = fail(FailureKind.DEAD, Code.UNREACHABLE, "could not open a stream: failed to open a stream")
    remote = FakeRemote({P1: unreachable, P2: answer("p2")})

    async def serves_again() -> None:
        await trio.sleep(0.6)
        announce(table, PEERS[1])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serves_again)
        result = await make_router(table, FakeLocal(serves=False), remote).run(query(), Events())
    assert result.executor == P2 and result.failovers == (P1,)
    assert [who for who, _ in remote.calls] == [P1, P2]  # not P1, P1, P1 at once


async def test_nobody_comes_back_the_query_fails_after_the_wait_and_says_who_was_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from rentahal.realms.router import REVIVE_WAIT

    table = make_table()
    announce(table, PEERS[0])
    remote = FakeRemote({P1: dies_once(table, answer("never"))})
    with pytest.raises(QueryError) as info:
        await make_router(table, FakeLocal(serves=False), remote).run(query(), Events())
    assert trio.current_time() == pytest.approx(REVIVE_WAIT, abs=0.2)
    assert info.value.code is Code.BACKEND_FAILED
    assert "all 1 executor(s) failed" in info.value.message and "not tried" in info.value.message
    assert "not connected" in info.value.message


async def test_a_refusal_does_not_wait_for_revivals(autojump_clock: trio.testing.MockClock) -> None:
    table = make_table()
    announce(table, PEERS[0])
    remote = FakeRemote({P1: fail(FailureKind.REFUSED, Code.BACKEND_FAILED, "model crashed")})
    with pytest.raises(QueryError):
        await make_router(table, FakeLocal(serves=False), remote).run(query(), Events())
    assert trio.current_time() < 0.1
