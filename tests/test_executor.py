"""LocalRealms: the node's executor, with the real chat backend, and its watchdog."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from rentahal.models.base import BadRequest, Result
from rentahal.node import executor as executor_mod
from rentahal.node.config import load_config
from rentahal.node.executor import LocalRealms
from rentahal.realms import events as ev
from rentahal.realms.events import Code, ExecutorFailure, ModelFailure, QueryError
from rentahal.realms.queue import QueueFull
from rentahal.realms.router import Query


def make_local(tmp_path: Path, **overrides: str) -> LocalRealms:
    cfg = load_config(None, {"realms.chat.max_tokens": "100000", "realms.chat.n_ctx": "4096", **overrides})
    return LocalRealms(cfg, tmp_path)


def query(payload: dict[str, Any], deadline_s: float = 30.0, qid: str = "q1") -> Query:
    return Query(qid, "chat", payload, deadline_s, origin="")


def events_sink(events: list[ev.StreamEvent]):
    async def emit(event: ev.StreamEvent) -> None:
        assert isinstance(event, (ev.Accepted, ev.Progress, ev.Token)), event
        events.append(event)

    return emit


async def test_real_chat_backend_runs_and_a_deadline_stops_it_without_a_restart(tmp_path: Path) -> None:
    local = make_local(tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(local.run)
        await local.loaded.wait()
        assert local.serves("chat") and local.slots["chat"].smoke_test
        assert not local.loading("chat")
        await local.wait_loaded("chat")  # returns at once: loaded
        events: list[ev.StreamEvent] = []
        result = await local.execute(query({"prompt": "hi", "max_tokens": 8, "ignore_eos": True}), events_sink(events))
        assert isinstance(result, ev.Result)
        assert result.stats["tokens"] == 8 and "cost" in result.stats
        # Accepted at position 0 (running now: a free slot), then the backend's stream.
        assert events[0] == ev.Accepted(0, None)
        tokens = [e for e in events if isinstance(e, ev.Token)]
        # (pieces that arrive close together are batched into one Token event)
        assert 1 <= len(tokens) <= 8 and [t.index for t in tokens] == list(range(len(tokens)))
        assert not any(isinstance(e, ev.Accepted) for e in events[1:])

        with pytest.raises(ExecutorFailure) as err:
            await local.execute(
                query({"prompt": "hi", "max_tokens": 100000, "ignore_eos": True}, deadline_s=0.3, qid="q2"),
                events_sink([]),
            )
        assert err.value.code is Code.DEADLINE_EXCEEDED
        # The backend honoured the cancellation: it is not considered stuck.
        assert local.slots["chat"].status == "ready"
        result = await local.execute(
            query({"prompt": "again", "max_tokens": 4, "ignore_eos": True}, qid="q3"), events_sink([])
        )
        assert result.stats["tokens"] == 4
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

    async def generate(self, payload: Any, send: Any) -> Result:
        await trio.to_thread.run_sync(self.release.wait, abandon_on_cancel=False)
        return Result(output={"text": "late"}, stats={})

    async def aclose(self) -> None:
        pass


class QuickBackend(HungBackend):
    model_name = "fresh"

    async def generate(self, payload: Any, send: Any) -> Result:
        return Result(output={"text": "ok"}, stats={"tokens": 1})


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

    monkeypatch.setattr(executor_mod, "chat_backend", hung_backend)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(local.run)
            await local.loaded.wait()
            assert local.slots["chat"].model == "hung"
            monkeypatch.setattr(executor_mod, "chat_backend", fresh_backend)
            started = trio.current_time()
            with pytest.raises(ExecutorFailure) as err:
                await local.execute(query({"prompt": "x"}, deadline_s=0.2), events_sink([]))
            assert err.value.code is Code.DEADLINE_EXCEEDED
            assert trio.current_time() - started < 0.2 + 0.3 + 1.0  # deadline + grace, not forever
            # The stuck instance was dropped and a fresh one is loading in its place: the router
            # can see that and wait for it.
            assert local.loading("chat") or local.serves("chat")
            with trio.fail_after(5):
                await local.wait_loaded("chat")
            assert local.serves("chat") and not local.loading("chat")
            assert local.slots["chat"].model == "fresh"
            assert local.slots["chat"].queue.depth == 0
            result = await local.execute(query({"prompt": "x"}, qid="q9"), events_sink([]))
            assert result.output == {"text": "ok"}
            release.set()  # let the abandoned thread end so the nursery can close
            nursery.cancel_scope.cancel()
    finally:
        release.set()


class GateBackend(QuickBackend):
    """Holds each generation until its gate opens; fails as the payload asks."""

    model_name = "gate"
    gate: trio.Event

    async def generate(self, payload: Any, send: Any) -> Result:
        if payload.get("bad"):
            raise BadRequest("payload.bad: not allowed")
        if payload.get("crash"):
            raise RuntimeError("segfault, nearly")
        await type(self).gate.wait()
        await send(ev.Token("ok", 0))
        return Result(output={"text": "ok"}, stats={"tokens": 1})


class Outcomes:
    """Stands in for storage: ``record_outcome`` is synchronous."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def record_outcome(self, realm: str, **outcome: Any) -> None:
        self.calls.append({"realm": realm, **outcome})


async def test_positions_refusals_and_what_is_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    GateBackend.gate = trio.Event()

    async def gate_backend(_local: Any, _rc: Any) -> Any:
        return GateBackend(threading.Event())

    monkeypatch.setattr(executor_mod, "chat_backend", gate_backend)
    local = make_local(tmp_path, **{"realms.chat.slots": "1", "realms.chat.queue_limit": "1"})
    local.storage = outcomes = Outcomes()
    async with trio.open_nursery() as nursery:
        await nursery.start(local.run)
        await local.loaded.wait()
        assert local.serves("chat")

        # A user's bad request is raised as such and is no failure of this executor.
        with pytest.raises(QueryError) as err:
            await local.execute(query({"bad": True}, qid="bad"), events_sink([]))
        assert err.value.code is Code.BAD_REQUEST and not isinstance(err.value, ExecutorFailure)
        assert outcomes.calls == []

        first: list[ev.StreamEvent] = []
        second: list[ev.StreamEvent] = []
        results: dict[str, ev.Result] = {}

        async def run(qid: str, events: list[ev.StreamEvent]) -> None:
            results[qid] = await local.execute(query({"prompt": qid}, qid=qid), events_sink(events))

        nursery.start_soon(run, "a", first)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(run, "b", second)
        await trio.testing.wait_all_tasks_blocked()
        assert first == [ev.Accepted(0, None)]  # running now
        assert second == [ev.Accepted(1, None)]  # waiting: next in line

        # One running and one waiting fill this queue: a third is refused at once, with a hint.
        with pytest.raises(QueueFull) as full:
            await local.execute(query({"prompt": "c"}, qid="c"), events_sink([]))
        assert full.value.code is Code.QUEUE_FULL and full.value.code.back_pressure
        assert full.value.retry_after is not None and full.value.retry_after > 0
        assert outcomes.calls == []  # a refusal is no outcome

        GateBackend.gate.set()
        with trio.fail_after(5):
            while len(results) < 2:
                await trio.sleep(0.01)
        assert first[1:] == [ev.Token("ok", 0)]
        assert second[1:] == [ev.Accepted(0, second[1].eta_ms), ev.Token("ok", 0)]  # then it ran
        assert results["a"].output == {"text": "ok"} and "cost" in results["a"].stats

        # A crash inside the backend is this executor's failure, and is recorded as one.
        with pytest.raises(ModelFailure) as crash:
            await local.execute(query({"crash": True}, qid="d"), events_sink([]))
        assert crash.value.code is Code.INTERNAL

        assert [(c["ok"], c.get("cancelled", False)) for c in outcomes.calls] == [
            (True, False),
            (True, False),
            (False, False),
        ]
        assert all(c["realm"] == "chat" and c["for_peer"] is False for c in outcomes.calls)
        nursery.cancel_scope.cancel()


async def test_a_query_while_the_model_loads_is_busy_with_a_retry_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restarted executor is connected (and asked) before its model has loaded: it answers
    busy with a retry-after, so the asker waits a moment instead of giving the query up (the
    hour-long soak lost 9 of 54,979 queries to "realm_not_served: model still loading")."""
    loaded = trio.Event()

    async def slow_backend(_local: Any, _rc: Any) -> Any:
        await loaded.wait()
        return GateBackend(threading.Event())

    monkeypatch.setattr(executor_mod, "chat_backend", slow_backend)
    local = make_local(tmp_path)
    local.storage = Outcomes()
    async with trio.open_nursery() as nursery:
        await nursery.start(local.run)
        await trio.testing.wait_all_tasks_blocked()
        assert local.loading("chat")
        with pytest.raises(ExecutorFailure) as err:
            await local.execute(query({"prompt": "early"}), events_sink([]))
        assert err.value.code is Code.BUSY and err.value.retry_after == executor_mod.LOADING_RETRY_AFTER
        assert "loading" in err.value.message
        loaded.set()
        nursery.cancel_scope.cancel()
