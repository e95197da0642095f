"""The query manager (rentahal.node.queries) on real SQLite files, with a router that waits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from rentahal.node.queries import MAX_SUBSCRIBERS, QueryManager, Refused
from rentahal.node.storage import Storage
from rentahal.realms import events as ev

USER, OTHER = "a" * 32, "b" * 32


class WaitingRouter:
    """Holds every query until ``release`` is set."""

    def __init__(self) -> None:
        self.release = trio.Event()

    async def run(self, query: Any, emit: Any) -> ev.Result:
        await self.release.wait()
        return ev.Result({"text": "ok"}, {}, executor="local", attempt=1)


async def manager(tmp_path: Path, nursery: trio.Nursery, router: WaitingRouter, **kw: Any) -> QueryManager:
    storage = await Storage.open(tmp_path, 2)
    m = QueryManager(storage, router, origin="12D3KooWQuerySource", query_deadline=60.0, max_payload_bytes=65536, **kw)  # type: ignore[arg-type]
    await nursery.start(m.run)
    return m


async def test_the_per_user_cap_holds_under_concurrent_submits(tmp_path: Path) -> None:
    """Each submission stores its query before it counts as active: without counting those in
    between, 40 submits at once all passed a cap of 4."""
    router = WaitingRouter()
    outcomes: list[str] = []
    async with trio.open_nursery() as nursery:
        m = await manager(tmp_path, nursery, router, max_active_per_user=4)

        async def submit() -> None:
            try:
                await m.submit(USER, "chat", {"prompt": "hi"})
                outcomes.append("accepted")
            except Refused as exc:
                outcomes.append(exc.code.value)

        async with trio.open_nursery() as submits:
            for _ in range(40):
                submits.start_soon(submit)
        assert outcomes.count("accepted") == 4 and outcomes.count("too_many") == 36
        await m.submit(OTHER, "chat", {"prompt": "another user is not capped by the first"})
        router.release.set()
        nursery.cancel_scope.cancel()
    await m.storage.aclose()


async def test_a_watch_always_gets_a_place_among_the_subscribers(tmp_path: Path) -> None:
    """Clients that went away without a word must not keep a new watcher out."""
    router = WaitingRouter()
    got: list[dict[str, Any]] = []

    async def gone(event: dict[str, Any]) -> None:
        raise AssertionError("a stale subscriber is not called")

    async def watcher(event: dict[str, Any]) -> None:
        got.append(event)

    async with trio.open_nursery() as nursery:
        m = await manager(tmp_path, nursery, router)
        qid = await m.submit(USER, "chat", {"prompt": "hi"})
        stale = [_stale(i) for i in range(MAX_SUBSCRIBERS)]
        for sub in stale:
            assert m.subscribe(qid, sub)
        assert m.subscribe(qid, watcher)
        router.release.set()
        while m.live(qid) is not None:
            await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert got and got[-1]["type"] == "result"
    await m.storage.aclose()


def _stale(i: int) -> Any:
    async def sub(event: dict[str, Any]) -> None:
        return None

    return sub


@pytest.mark.parametrize("cancel_as_sysop", [False, True])
async def test_cancel_by_its_user_is_not_a_sysop_action(tmp_path: Path, cancel_as_sysop: bool) -> None:
    router = WaitingRouter()
    async with trio.open_nursery() as nursery:
        m = await manager(tmp_path, nursery, router)
        qid = await m.submit(USER, "chat", {"prompt": "hi"})
        # The user's own query: never "the sysop", even holding the token.
        assert await m.cancel(qid, by_guid=USER, sysop=cancel_as_sysop) is False
        assert m.live(qid).cancelled_by == "its user"
        other = await m.submit(OTHER, "chat", {"prompt": "hi"})
        if cancel_as_sysop:
            assert await m.cancel(other, by_guid=USER, sysop=True) is True
        else:
            with pytest.raises(Refused) as info:
                await m.cancel(other, by_guid=USER, sysop=False)
            assert info.value.code.value == "forbidden"
        nursery.cancel_scope.cancel()
    await m.storage.aclose()
