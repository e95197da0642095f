"""LocalRealms: the node's executor, with the real chat backend, and its watchdog."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import trio

from rentahal.models.base import ResultEvent
from rentahal.node import executor as executor_mod
from rentahal.node.config import load_config
from rentahal.node.executor import LocalRealms
from rentahal.realms.router import ExecutorError, Query


def make_local(tmp_path: Path, **overrides: str) -> LocalRealms:
    cfg = load_config(None, {"realms.chat.max_tokens": "100000", "realms.chat.n_ctx": "4096", **overrides})
    return LocalRealms(cfg, tmp_path)


def query(payload: dict[str, Any], deadline_s: float = 30.0, qid: str = "q1") -> Query:
    return Query(qid, "chat", payload, deadline_s, origin="")


async def events_sink(events: list[dict[str, Any]]):
    async def emit(ev: dict[str, Any]) -> None:
        events.append(ev)

    return emit


async def test_real_chat_backend_runs_and_a_deadline_stops_it_without_a_restart(tmp_path: Path) -> None:
    local = make_local(tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(local.run)
        await local.loaded.wait()
        assert local.serves("chat") and local.slots["chat"].smoke_test
        events: list[dict[str, Any]] = []
        result = await local.execute(query({"prompt": "hi", "max_tokens": 8, "ignore_eos": True}), await events_sink(events))
        assert result["stats"]["tokens"] == 8
        assert [e["type"] for e in events[:2]] == ["accepted", "progress"]

        with pytest.raises(ExecutorError) as err:
            await local.execute(
                query({"prompt": "hi", "max_tokens": 100000, "ignore_eos": True}, deadline_s=0.3, qid="q2"),
                await events_sink([]),
            )
        assert err.value.code == "deadline_exceeded"
        # The backend honoured the cancellation: it is not considered stuck.
        assert local.slots["chat"].status == "ready"
        result = await local.execute(query({"prompt": "again", "max_tokens": 4, "ignore_eos": True}, qid="q3"), await events_sink([]))
        assert result["stats"]["tokens"] == 4
        nursery.cancel_scope.cancel()


class HungBackend:
    """Stands in for a native call that never returns (a hung GPU driver cannot be made here)."""

    model_name = "hung"
    is_smoke_test = False
    gpu = False

    def __init__(self, release: threading.Event) -> None:
        self.release = release

    async def load(self) -> None:
        pass

    async def generate(self, payload: Any, send: Any) -> ResultEvent:
        await trio.to_thread.run_sync(self.release.wait, abandon_on_cancel=False)
        return ResultEvent(output={"text": "late"}, stats={})

    async def aclose(self) -> None:
        pass


class QuickBackend(HungBackend):
    model_name = "fresh"

    async def generate(self, payload: Any, send: Any) -> ResultEvent:
        return ResultEvent(output={"text": "ok"}, stats={"tokens": 1})


async def test_watchdog_fails_a_stuck_query_and_restarts_the_backend(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    local = make_local(tmp_path)
    local.watchdog_grace = 0.3

    async def fresh_backend(_local: Any, _rc: Any) -> Any:
        return QuickBackend(release)

    async def hung_backend(_local: Any, _rc: Any) -> Any:
        return HungBackend(release)

    monkeypatch.setitem(executor_mod.BACKENDS, "chat", hung_backend)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(local.run)
            await local.loaded.wait()
            assert local.slots["chat"].model == "hung"
            monkeypatch.setitem(executor_mod.BACKENDS, "chat", fresh_backend)
            started = trio.current_time()
            with pytest.raises(ExecutorError) as err:
                await local.execute(query({"prompt": "x"}, deadline_s=0.2), await events_sink([]))
            assert err.value.code == "deadline_exceeded"
            assert trio.current_time() - started < 0.2 + 0.3 + 1.0  # deadline + grace, not forever
            # The stuck instance was dropped and a fresh one loaded; the slot was freed.
            with trio.fail_after(5):
                while not local.serves("chat"):
                    await trio.sleep(0.01)
            assert local.slots["chat"].model == "fresh"
            assert local.slots["chat"].queue.depth == 0
            result = await local.execute(query({"prompt": "x"}, qid="q9"), await events_sink([]))
            assert result["output"] == {"text": "ok"}
            release.set()  # let the abandoned thread end so the nursery can close
            nursery.cancel_scope.cancel()
    finally:
        release.set()
