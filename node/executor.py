"""This node as an executor: its model backends behind per-realm queues.

The router sees it through ``LocalExecutor`` (serves / queue_depth / execute); peers reach it
through the query protocol, whose handler calls the same ``execute``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from ..p2p.health import RealmStatus
from ..p2p.peers import FailureKind
from ..realms.queue import QueueFull, RealmQueue
from ..realms.router import Emit, Event, ExecutorError, Query
from .config import Config, RealmConfig

log = logging.getLogger("rentahal.node")

SMOKE_MODEL_FILE = "smoke-test-chat.gguf"


@dataclass
class RealmSlot:
    name: str
    config: RealmConfig
    queue: RealmQueue
    backend: Any = None
    model: str = ""
    smoke_test: bool = False
    status: str = "loading"  # loading | ready | failed | disabled


class LocalRealms:
    def __init__(self, config: Config, data_dir: Path) -> None:
        self.config = config
        self.data_dir = data_dir
        self.slots: dict[str, RealmSlot] = {}
        for name, rc in config.realms.items():
            slot = RealmSlot(name, rc, RealmQueue(name, slots=rc.slots, limit=rc.queue_limit))
            if not rc.serve:
                slot.status = "disabled"
            self.slots[name] = slot
        self.loaded = trio.Event()
        self.disabled: set[str] = set()  # by the sysop, at run time
        self.storage: Any = None  # set by the node once storage is open
        self.peer_id = ""

    # --- LocalExecutor -----------------------------------------------------------------------
    def serves(self, realm: str) -> bool:
        slot = self.slots.get(realm)
        return slot is not None and slot.status == "ready" and realm not in self.disabled

    def queue_depth(self, realm: str) -> int:
        slot = self.slots.get(realm)
        return slot.queue.depth if slot else 0

    def not_served_reason(self, realm: str) -> str:
        slot = self.slots.get(realm)
        if slot is None:
            return f"unknown realm {realm!r}"
        if realm in self.disabled:
            return "disabled by the sysop"
        return {
            "disabled": "not served here (serve = false)",
            "loading": "model still loading",
        }.get(slot.status, slot.status)

    async def execute(self, query: Query, emit: Emit) -> Event:
        slot = self.slots.get(query.realm)
        if slot is None or not self.serves(query.realm):
            raise ExecutorError(
                FailureKind.REFUSED, "realm_not_served", f"{query.realm}: {self.not_served_reason(query.realm)}"
            )
        from ..models.base import BackendError, ProgressEvent, TokenEvent

        async def accepted(position: int, eta_ms: int | None) -> None:
            await emit({"type": "accepted", "position": position, "eta_ms": eta_ms})

        for_peer = query.origin != self.peer_id
        started = trio.current_time()

        async def send(ev: TokenEvent | ProgressEvent) -> None:
            if isinstance(ev, TokenEvent):
                await emit({"type": "token", "text": ev.text, "index": ev.index})
            else:
                await emit({"type": "progress", "stage": ev.stage, "done": ev.done, "total": ev.total})

        try:
            with trio.fail_after(query.deadline_s):
                async with slot.queue.admit(query.query_id, accepted, priority=query.priority):
                    await emit({"type": "progress", "stage": "running", "done": 0, "total": None})
                    result = await slot.backend.generate(query.payload, send)
        except QueueFull as exc:
            raise ExecutorError(FailureKind.REFUSED, "queue_full", str(exc)) from None
        except BackendError as exc:
            await self._record(query.realm, for_peer=for_peer, ok=False)
            raise ExecutorError(FailureKind.REFUSED, exc.code, str(exc)) from None
        except trio.TooSlowError:
            await self._record(query.realm, for_peer=for_peer, ok=False)
            raise ExecutorError(
                FailureKind.REFUSED, "deadline_exceeded", f"deadline of {query.deadline_s:.1f}s passed"
            ) from None
        except trio.Cancelled:
            with trio.CancelScope(shield=True):
                await self._record(query.realm, for_peer=for_peer, ok=False, cancelled=True)
            raise
        ms = (trio.current_time() - started) * 1000.0
        cost = slot.config.cost_per_query + slot.config.cost_per_second * ms / 1000.0 + (
            slot.config.cost_per_token * float(result.stats.get("tokens", 0))
        )
        stats = {**result.stats, "cost": round(cost, 6)}
        await self._record(query.realm, for_peer=for_peer, ok=True, ms=ms, cost=cost)
        return {"type": "result", "output": result.output, "stats": stats}

    async def _record(self, realm: str, **outcome: Any) -> None:
        if self.storage is not None:
            await self.storage.record_outcome(realm, **outcome)

    # --- lifecycle ---------------------------------------------------------------------------
    async def load_all(self) -> None:
        """Load every served realm's model; a failure disables that realm only."""
        for slot in self.slots.values():
            if slot.status == "disabled":
                continue
            try:
                await self._load(slot)
            except Exception as exc:  # ModelLoadError and friends: the node keeps serving others
                slot.status = f"failed: {exc}"
                log.error("%s: not served: %s", slot.name, exc)
        self.loaded.set()

    async def _load(self, slot: RealmSlot) -> None:
        if slot.name != "chat":
            slot.status = f"no {slot.name} backend in this version"
            log.warning("%s: %s", slot.name, slot.status)
            return
        from ..models.chat import ChatBackend

        path = Path(slot.config.model).expanduser() if slot.config.model else await self._smoke_model()
        backend = ChatBackend(
            path,
            n_ctx=slot.config.n_ctx,
            n_gpu_layers=max(slot.config.n_gpu_layers, 0),
            threads=slot.config.threads,
            max_tokens_cap=slot.config.max_tokens,
        )
        await backend.load()
        slot.backend, slot.model, slot.smoke_test = backend, backend.model_name, backend.is_smoke_test
        slot.status = "ready"
        label = " (SMOKE-TEST MODEL: random weights, output is gibberish)" if slot.smoke_test else ""
        log.info("chat: serving %s from %s%s", slot.model, path, label)

    async def _smoke_model(self) -> Path:
        from ..models.tiny import write_tiny_llama

        path = self.data_dir / "models" / SMOKE_MODEL_FILE
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            await trio.to_thread.run_sync(write_tiny_llama, path)
            log.info("chat: no model configured; wrote the smoke-test model %s", path)
        return path

    async def aclose(self) -> None:
        for slot in self.slots.values():
            if slot.backend is not None:
                await slot.backend.aclose()

    # --- reporting ---------------------------------------------------------------------------
    def realm_statuses(self) -> tuple[RealmStatus, ...]:
        return tuple(
            RealmStatus(
                name=s.name,
                model=s.model[:256],
                smoke_test=s.smoke_test,
                queue_depth=s.queue.depth,
                slots=s.queue.slots,
                service_ms=round(s.queue.service_ms, 3),
                gpu=False,
            )
            for s in self.slots.values()
            if self.serves(s.name)
        )

    def success_ratio(self) -> float:
        ready = [s.queue for s in self.slots.values() if s.status == "ready"]
        done = sum(q.completed for q in ready)
        failed = sum(q.failed for q in ready)
        return 1.0 if done + failed == 0 else done / (done + failed)
