"""RealmQueue: bounded, priority classes, FIFO within a class, position reports, cancellation."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from rentahal.realms.queue import Priority, QueueFull, RealmQueue

# --- RealmQueue ---------------------------------------------------------------------------------


async def occupy(
    queue: RealmQueue,
    name: str,
    release: trio.Event,
    accepted: dict[str, tuple[int, int | None]],
    ran: list[str],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Enter the queue; report 'started' once accepted (and parked on a slot, if none is free)."""

    async def on_accepted(position: int, eta_ms: int | None) -> None:
        if name not in accepted:  # later reports are position updates
            accepted[name] = (position, eta_ms)
            task_status.started()

    async with queue.admit(name, on_accepted):
        ran.append(name)
        await release.wait()


async def test_queue_is_bounded_and_fifo(autojump_clock: trio.testing.MockClock) -> None:
    queue = RealmQueue("chat", slots=1, limit=2)
    accepted: dict[str, tuple[int, int | None]] = {}
    ran: list[str] = []
    releases = {n: trio.Event() for n in "abc"}
    async with trio.open_nursery() as nursery:
        for name in "abc":
            await nursery.start(occupy, queue, name, releases[name], accepted, ran)
        assert (queue.running, queue.waiting, queue.depth) == (1, 2, 3)
        assert ran == ["a"]
        # limit waiting + slots running: the next one is refused at once.
        with pytest.raises(QueueFull):
            async with queue.admit("x", _never_accepted):
                raise AssertionError("admitted past the limit")
        assert queue.depth == 3

        releases["a"].set()
        await trio.testing.wait_all_tasks_blocked()
        assert ran == ["a", "b"]
        assert (queue.running, queue.waiting) == (1, 1)
        # There is room again.
        releases["d"] = trio.Event()
        await nursery.start(occupy, queue, "d", releases["d"], accepted, ran)
        for name in "bcd":
            releases[name].set()
    assert ran == ["a", "b", "c", "d"]
    assert {n: p for n, (p, _) in accepted.items()} == {"a": 0, "b": 1, "c": 2, "d": 2}
    assert (queue.running, queue.waiting, queue.completed, queue.failed) == (0, 0, 4, 0)


async def _never_accepted(position: int, eta_ms: int | None) -> None:
    raise AssertionError("on_accepted called for a refused query")


async def test_queue_runs_at_most_slots_at_once(autojump_clock: trio.testing.MockClock) -> None:
    queue = RealmQueue("chat", slots=2, limit=10)
    running = 0
    peak = 0
    positions: list[int] = []

    async def job(name: str, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        nonlocal running, peak
        first = True

        async def on_accepted(position: int, eta_ms: int | None) -> None:
            nonlocal first
            if first:
                first = False
                positions.append(position)
                task_status.started()

        async with queue.admit(name, on_accepted):
            running += 1
            peak = max(peak, running)
            assert queue.running <= queue.slots
            await trio.sleep(1.0)
            running -= 1

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for i in range(6):
            await nursery.start(job, f"q{i}")
    assert peak == 2
    assert positions == [0, 0, 1, 2, 3, 4]
    assert trio.current_time() - start == pytest.approx(3.0)
    assert queue.completed == 6
    assert queue.service_ms == pytest.approx(1000.0)


async def test_queue_eta(autojump_clock: trio.testing.MockClock) -> None:
    queue = RealmQueue("chat", slots=1, limit=5)
    assert queue.eta_ms(0) is None
    seen: list[int | None] = []

    async def on_accepted(position: int, eta_ms: int | None) -> None:
        seen.append(eta_ms)

    async with queue.admit("a", on_accepted):
        await trio.sleep(2.0)
    assert seen == [None]
    assert queue.eta_ms(0) == 2000  # running now: one service time
    assert queue.eta_ms(1) == 2000  # next in line: starts when the running one is done
    assert queue.eta_ms(2) == 4000  # one more ahead of it
    async with queue.admit("b", on_accepted):
        pass
    assert seen[1] is not None and seen[1] > 0


async def test_queue_counts_failures_and_frees_the_slot(autojump_clock: trio.testing.MockClock) -> None:
    queue = RealmQueue("chat", slots=1, limit=0)

    async def ok(position: int, eta_ms: int | None) -> None:
        pass

    with pytest.raises(RuntimeError):
        async with queue.admit("a", ok):
            raise RuntimeError("backend died")
    assert (queue.failed, queue.completed, queue.depth) == (1, 0, 0)
    assert queue.eta_ms(0) is None  # a failure is not a service time
    assert queue.success_ratio() == 0.0
    async with queue.admit("b", ok):  # the slot was released
        pass
    assert queue.success_ratio() == 0.5


async def test_cancelled_waiter_leaves_the_queue(autojump_clock: trio.testing.MockClock) -> None:
    queue = RealmQueue("chat", slots=1, limit=1)
    release = trio.Event()
    accepted: dict[str, tuple[int, int | None]] = {}
    ran: list[str] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(occupy, queue, "a", release, accepted, ran)
        with trio.move_on_after(1.0):
            await occupy(queue, "b", trio.Event(), accepted, ran)
        assert (queue.running, queue.waiting) == (1, 0)
        release.set()
    assert ran == ["a"]
    assert (queue.depth, queue.completed, queue.failed) == (0, 1, 0)


async def test_queue_order_matches_reported_positions_with_slow_clients(
    autojump_clock: trio.testing.MockClock,
) -> None:
    queue = RealmQueue("chat", slots=1, limit=5)
    release = trio.Event()
    ran: list[str] = []
    reported: dict[str, int] = {}

    async def client(name: str, delay: float, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async def on_accepted(position: int, eta_ms: int | None) -> None:
            if name in reported:
                return
            reported[name] = position
            task_status.started()
            if delay:
                await trio.sleep(delay)  # sending the "accepted" event to this client

        async with queue.admit(name, on_accepted):
            ran.append(name)
            if name == "holder":
                await release.wait()

    async with trio.open_nursery() as nursery:
        await nursery.start(client, "holder", 0.0)
        await nursery.start(client, "slow", 1.0)
        await nursery.start(client, "fast", 0.0)
        await trio.sleep(2.0)
        release.set()
    assert reported == {"holder": 0, "slow": 1, "fast": 2}  # as promised: slow before fast
    assert ran == ["holder", "slow", "fast"]


async def test_sysop_queries_overtake_normal_ones_and_positions_are_updated(
    autojump_clock: trio.testing.MockClock,
) -> None:
    queue = RealmQueue("chat", slots=1, limit=10)
    release = trio.Event()
    ran: list[str] = []
    reports: dict[str, list[int]] = {}

    async def client(
        name: str, priority: Priority, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async def on_position(position: int, eta_ms: int | None) -> None:
            first = name not in reports
            reports.setdefault(name, []).append(position)
            if first:
                task_status.started()

        async with queue.admit(name, on_position, priority=priority):
            ran.append(name)
            if name == "holder":
                await release.wait()

    async with trio.open_nursery() as nursery:
        await nursery.start(client, "holder", Priority.NORMAL)
        await nursery.start(client, "n1", Priority.NORMAL)
        await nursery.start(client, "n2", Priority.NORMAL)
        await nursery.start(client, "sysop", Priority.SYSOP)
        await trio.testing.wait_all_tasks_blocked()
        assert queue.position_of("sysop") == 0 and queue.position_of("n2") == 2
        release.set()
    assert ran == ["holder", "sysop", "n1", "n2"]
    # n1 was told 0, then pushed back to 1 by the sysop's query (then it got its slot).
    assert reports["n1"][:2] == [1, 2]
    assert reports["n2"][:2] == [2, 3]
    assert reports["sysop"] == [1, 0]  # next in line, then running


async def test_cancelled_running_query_frees_its_slot_and_is_not_a_failure(
    autojump_clock: trio.testing.MockClock,
) -> None:
    queue = RealmQueue("chat", slots=1, limit=1)

    async def quiet(position: int, eta_ms: int | None) -> None:
        pass

    with trio.move_on_after(1.0):
        async with queue.admit("a", quiet):
            assert queue.running_ids == {"a"}
            await trio.sleep_forever()
    assert (queue.running, queue.failed, queue.completed) == (0, 0, 0)
    assert queue.running_ids == set()
    async with queue.admit("b", quiet):
        assert queue.running == 1


async def test_a_flooding_peer_cannot_keep_local_users_waiting(autojump_clock: trio.testing.MockClock) -> None:
    """Peers queue behind this node's own users, hold at most per_peer places, and fill only
    their own share of the waiting line: a local user waits for the running query at most."""
    queue = RealmQueue("chat", slots=1, limit=3, per_peer=2)
    ran: list[str] = []
    release = trio.Event()

    async def job(
        name: str, priority: int, owner: str, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        started = False

        async def on_accepted(position: int, eta_ms: int | None) -> None:
            nonlocal started
            if not started:
                started = True
                task_status.started()

        async with queue.admit(name, on_accepted, priority=priority, owner=owner):
            ran.append(name)
            await release.wait()

    async with trio.open_nursery() as nursery:
        await nursery.start(job, "p1", Priority.PEER, "peerX")
        await nursery.start(job, "p2", Priority.PEER, "peerX")
        with pytest.raises(QueueFull) as info:  # peerX holds its 2 places
            async with queue.admit("p3", _never_accepted, priority=Priority.PEER, owner="peerX"):
                pass
        assert info.value.code.value == "queue_full" and info.value.retry_after is not None
        await nursery.start(job, "q1", Priority.PEER, "peerY")
        await nursery.start(job, "q2", Priority.PEER, "peerZ")
        with pytest.raises(QueueFull):  # peers' share of the line (3) is full
            async with queue.admit("q3", _never_accepted, priority=Priority.PEER, owner="peerW"):
                pass
        await nursery.start(job, "local", Priority.NORMAL, "")  # still room for this node's user
        release.set()
    assert ran[:2] == ["p1", "local"]


async def test_a_bad_request_is_not_counted_as_a_failure(autojump_clock: trio.testing.MockClock) -> None:
    from rentahal.realms.events import BadRequest, ModelFailure

    queue = RealmQueue("chat", slots=1, limit=2)

    async def ok(position: int, eta_ms: int | None) -> None:
        pass

    with pytest.raises(BadRequest):
        async with queue.admit("typo", ok):
            raise BadRequest("payload: unknown field(s) 'promt'")
    with pytest.raises(ModelFailure):
        async with queue.admit("crash", ok):
            raise ModelFailure("llama.cpp failed")
    assert (queue.completed, queue.failed, queue.running) == (0, 1, 0)
