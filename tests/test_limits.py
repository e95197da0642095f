"""The per-client submission rate limit: the token bucket, the choice of bucket, and a real node
refusing a client past its burst while other users and the sysop go on."""

from __future__ import annotations

import uuid

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from rentahal.node.control import is_loopback, rate_key
from rentahal.p2p.ratelimit import RateLimiter
from rentahal.scripts.federation import Federation, connect


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_burst_then_refill_at_the_configured_rate() -> None:
    clock = Clock()
    rl = RateLimiter(per_minute=6, burst=3, clock=clock)  # one token every 10 s
    assert [rl.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert rl.take("a") == pytest.approx(10.0)
    assert rl.first_refusal("a") and not rl.first_refusal("a")  # one log line per client
    assert rl.take("b") == 0.0  # buckets are per key
    clock.now += 4
    assert rl.take("a") == pytest.approx(6.0)  # a refused attempt does not reset the refill
    clock.now += 6
    assert rl.take("a") == 0.0 and rl.take("a") == pytest.approx(10.0)
    clock.now += 3600  # a long pause refills to the burst, no further
    assert [rl.take("a") for _ in range(4)][-1] > 0


def test_zero_rate_means_no_limit() -> None:
    rl = RateLimiter(per_minute=0, burst=1)
    assert not rl.enabled and all(rl.take("a") == 0.0 for _ in range(1000)) and len(rl) == 0


@given(st.lists(st.tuples(st.integers(0, 50), st.floats(0, 30)), max_size=300))
def test_memory_stays_bounded_and_limits_hold_for_any_key_sequence(steps: list[tuple[int, float]]) -> None:
    clock = Clock()
    rl = RateLimiter(per_minute=60, burst=2, clock=clock, max_keys=8)
    allowed: dict[int, list[float]] = {}
    for key, dt in steps:
        clock.now += dt
        if rl.take(key) == 0.0:
            allowed.setdefault(key, []).append(clock.now)
        assert len(rl) <= 8
    for times in allowed.values():  # no key got more than burst + rate * elapsed, however pruned
        for i, t0 in enumerate(times):
            later = [t for t in times[i:] if t - t0 < 1.0 - 1e-9]
            assert len(later) <= 3


def test_which_bucket_a_submission_counts_against() -> None:
    for host in ("127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1", "localhost"):
        assert is_loopback(host), host
    for host in ("192.0.2.7", "10.0.0.1", "::ffff:192.0.2.7", "2001:db8::1"):
        assert not is_loopback(host), host
    g = uuid.uuid4().hex
    assert rate_key("127.0.0.1", g, sysop=False, limit_loopback=False) is None
    assert rate_key("127.0.0.1", g, sysop=False, limit_loopback=True) == ("user", g)
    assert rate_key("192.0.2.7", g, sysop=False, limit_loopback=False) == ("ip", "192.0.2.7")
    assert rate_key("192.0.2.7", g, sysop=True, limit_loopback=True) is None


async def test_a_node_refuses_a_client_past_its_burst(federation: Federation) -> None:
    node = federation.start(
        "N",
        serve="chat",
        settings={"limits.loopback": "true", "limits.queries_per_minute": "0.5", "limits.burst": "2"},
    )
    quick = {"prompt": "hi", "max_tokens": 2}
    async with connect(node.ui, guid=uuid.uuid4().hex) as alice:
        for _ in range(2):
            msgs = [m async for m in alice.stream("submit_query", realm="chat", payload=quick)]
            assert msgs[-1]["op"] == "result"
        msgs = [m async for m in alice.stream("submit_query", realm="chat", payload=quick)]
        assert [m["op"] for m in msgs] == ["error"] and msgs[0]["code"] == "rate_limited"
        assert "0.5 queries per minute" in msgs[0]["message"] and "try again in" in msgs[0]["message"]
        history = await alice.call("history")
        assert len(history["history"]) == 2  # the refused one was never stored
    async with connect(node.ui, guid=uuid.uuid4().hex) as bob:  # another user has a bucket of his own
        msgs = [m async for m in bob.stream("submit_query", realm="chat", payload=quick)]
        assert msgs[-1]["op"] == "result"
    token = (node.data_dir / "sysop.token").read_text().strip()
    async with connect(node.ui, sysop_token=token) as sysop:  # the sysop is never limited
        for _ in range(3):
            msgs = [m async for m in sysop.stream("submit_query", realm="chat", payload=quick)]
            assert msgs[-1]["op"] == "result"
    await trio.to_thread.run_sync(node.wait_for, r"rate-limited user [0-9a-f]{32} \(0.5 queries/min, burst 2\)", 10)


def test_remote_clients_are_counted_per_ipv4_address_or_ipv6_64() -> None:
    from rentahal.p2p.ratelimit import client_network

    assert client_network("192.0.2.7") == "192.0.2.7"
    assert client_network("::ffff:192.0.2.7") == "192.0.2.7"
    assert client_network("2001:db8:1:2::1") == client_network("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert client_network("2001:db8:1:3::1") != client_network("2001:db8:1:2::1")
    g = uuid.uuid4().hex
    clock = Clock()
    rl = RateLimiter(per_minute=30, burst=10, clock=clock)
    allowed = sum(
        rl.take(rate_key(f"2001:db8::{i:x}", g, sysop=False, limit_loopback=False)) == 0.0 for i in range(1000)
    )
    assert allowed == 10  # a thousand addresses of one /64 share one bucket


@pytest.mark.parametrize("per_minute", [7, 17, 30, 53, 59, 61, 1000])
def test_a_retry_after_the_advertised_wait_is_taken(per_minute: int) -> None:
    clock = Clock()
    rl = RateLimiter(per_minute=per_minute, burst=1, clock=clock)
    for _ in range(20):
        assert rl.take("a") == 0.0
        wait = rl.take("a")
        assert wait > 0
        clock.now += wait


async def test_a_peer_past_its_rate_is_told_busy_and_local_clients_are_not_affected(federation: Federation) -> None:
    b = federation.start(
        "B", serve="chat", settings={"limits.peer_queries_per_minute": "0.5", "limits.peer_burst": "2"}
    )
    a = federation.start("A", serve="none", bootstrap=(b.addr,), settings={"router.query_deadline": "20"})
    await trio.to_thread.run_sync(a.wait_for, rf"peer {b.peer_id} is live", 60)
    quick = {"prompt": "hi", "max_tokens": 2}
    async with connect(a.ui, guid=uuid.uuid4().hex) as client:
        for _ in range(2):
            msgs = [m async for m in client.stream("submit_query", realm="chat", payload=quick)]
            assert msgs[-1]["op"] == "result" and msgs[-1]["result"]["executor"] == b.peer_id
        msgs = [m async for m in client.stream("submit_query", realm="chat", payload=quick)]
        assert msgs[-1]["op"] == "error" and msgs[-1]["code"] == "busy", msgs[-1]
        assert "rate limited: more than 0.5 queries per minute from your node" in msgs[-1]["message"]
    await trio.to_thread.run_sync(b.wait_for, rf"rate-limited peer {a.peer_id} \(0.5 queries/min, burst 2\)", 10)
    async with connect(b.ui, guid=uuid.uuid4().hex) as local:  # B's own users are not peers
        msgs = [m async for m in local.stream("submit_query", realm="chat", payload=quick)]
        assert msgs[-1]["op"] == "result"
