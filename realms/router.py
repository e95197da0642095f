"""The realm router: where a query runs, and what happens when that executor fails.

Local first when this node serves the realm and its queue is short, else the best-scored live
peer; on a peer's death, hang or refusal the next candidate gets the query, so the user receives
one complete answer and sees the failover as an event. The router knows peers only through the
``RemoteExecutor`` interface and models only through ``LocalExecutor``: a router test needs
neither sockets nor models.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import trio

from ..p2p.peers import FailureKind, PeerTable

log = logging.getLogger("rentahal.router")

LOCAL = "local"
Event = dict[str, Any]
Emit = Callable[[Event], Awaitable[None]]

# Refusal codes after which another executor may well succeed.
RETRYABLE_CODES = frozenset(
    {"queue_full", "realm_not_served", "busy", "unreachable", "backend_failed", "deadline_exceeded",
     "internal"}
)


@dataclass(frozen=True)
class Query:
    query_id: str
    realm: str
    payload: dict[str, Any]
    deadline_s: float
    origin: str
    priority: int = 10  # realms.queue.Priority.NORMAL; lower runs first


class ExecutorError(Exception):
    """An attempt failed. ``kind`` says how, ``code`` is the wire error code where there is one."""

    def __init__(self, kind: FailureKind, code: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.code = code
        self.message = message


class QueryFailed(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class LocalExecutor(Protocol):
    def serves(self, realm: str) -> bool: ...

    def queue_depth(self, realm: str) -> int: ...

    def not_served_reason(self, realm: str) -> str: ...

    async def execute(self, query: Query, emit: Emit) -> Event: ...


class RemoteExecutor(Protocol):
    async def execute(
        self, peer_id: str, query: Query, emit: Emit, *, hang_timeout: float
    ) -> Event: ...


@dataclass(frozen=True)
class RouteEntry:
    executor: str  # LOCAL or a peer ID
    score: float
    note: str = ""


@dataclass(frozen=True)
class RoutePlan:
    realm: str
    candidates: list[RouteEntry]
    excluded: list[RouteEntry] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "realm": self.realm,
            "candidates": [
                {"executor": c.executor, "score": c.score, "note": c.note} for c in self.candidates
            ],
            "excluded": [{"executor": c.executor, "reason": c.note} for c in self.excluded],
        }


class RealmRouter:
    def __init__(
        self,
        table: PeerTable,
        local: LocalExecutor,
        remote: RemoteExecutor,
        *,
        local_queue_limit: int,
        max_attempts: int,
        hang_timeout: float,
        discover: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self.table = table
        self.local = local
        self.remote = remote
        self.local_queue_limit = local_queue_limit
        self.max_attempts = max_attempts
        self.hang_timeout = hang_timeout
        self.discover = discover

    def _path(self, peer_id: str) -> str:
        e = self.table.get(peer_id)
        if e is None or not e.connected:
            return "not connected yet: dialed on first use"
        return "via relay" if e.relayed else "direct"

    def plan(self, realm: str) -> RoutePlan:
        peers, excluded = self.table.candidates(realm)
        entries = [RouteEntry(c.peer_id, c.score, self._path(c.peer_id)) for c in peers]
        out = [RouteEntry(x.peer_id, 0.0, x.reason) for x in excluded]
        if self.local.serves(realm):
            depth = self.local.queue_depth(realm)
            if depth < self.local_queue_limit:
                entries.insert(0, RouteEntry(LOCAL, 100.0, f"served here, {depth} queued"))
            else:
                # Overloaded: peers first, this node as the last resort.
                entries.append(
                    RouteEntry(LOCAL, 0.0, f"served here but {depth} queued (limit {self.local_queue_limit})")
                )
        else:
            out.insert(0, RouteEntry(LOCAL, 0.0, self.local.not_served_reason(realm)))
        return RoutePlan(realm, entries, out)

    async def run(self, query: Query, emit: Emit) -> Event:
        """Run ``query`` on the best executor, failing over; return the result event."""
        deadline_at = trio.current_time() + query.deadline_s
        plan = self.plan(query.realm)
        if not plan.candidates and self.discover is not None:
            with trio.move_on_at(min(deadline_at, trio.current_time() + 5.0)):
                await self.discover(query.realm)
            plan = self.plan(query.realm)
        if not plan.candidates:
            reasons = "; ".join(f"{x.executor[:16]}: {x.note}" for x in plan.excluded) or "no peers known"
            raise QueryFailed("realm_not_served", f"no executor for realm {query.realm!r} ({reasons})")
        tried: list[str] = []
        last_error = ""
        last_code = "internal"
        with trio.move_on_at(deadline_at) as deadline:
            for entry in plan.candidates[: self.max_attempts]:
                attempt = len(tried) + 1
                # Each executor gets the time that is left, not the whole budget again.
                attempt_query = replace(query, deadline_s=max(deadline_at - trio.current_time(), 0.001))
                await emit({"type": "executor", "executor": entry.executor, "attempt": attempt})
                started = trio.current_time()
                first_event_at: list[float] = []

                async def relay(event: Event, _attempt: int = attempt) -> None:
                    if not first_event_at:
                        first_event_at.append(trio.current_time())
                    await emit({**event, "attempt": _attempt})

                try:
                    if entry.executor == LOCAL:
                        result = await self.local.execute(attempt_query, relay)
                    else:
                        result = await self.remote.execute(
                            entry.executor, attempt_query, relay, hang_timeout=self.hang_timeout
                        )
                except ExecutorError as exc:
                    tried.append(entry.executor)
                    last_error, last_code = exc.message, exc.code
                    if entry.executor != LOCAL:
                        opened = self.table.record_failure(entry.executor, exc.kind, exc.message)
                        if opened:
                            log.warning("circuit opened for %s after %s", entry.executor, exc.kind.value)
                    if exc.kind is FailureKind.REFUSED and exc.code not in RETRYABLE_CODES:
                        raise QueryFailed(exc.code, exc.message) from None
                    log.warning(
                        "query %s: executor %s failed (%s: %s); failing over",
                        query.query_id, entry.executor, exc.kind.value, exc.message,
                    )
                    await emit(
                        {
                            "type": "failover",
                            "executor": entry.executor,
                            "attempt": attempt,
                            "kind": exc.kind.value,
                            "code": exc.code,
                            "message": exc.message,
                        }
                    )
                    continue
                if entry.executor != LOCAL:
                    latency = (first_event_at[0] if first_event_at else trio.current_time()) - started
                    self.table.record_success(entry.executor, latency * 1000.0)
                return {**result, "executor": entry.executor, "attempt": attempt, "failovers": tried}
        if deadline.cancelled_caught:
            raise QueryFailed(
                "deadline_exceeded",
                f"query deadline of {query.deadline_s:g}s passed after trying {len(tried) + 1} executor(s)",
            )
        raise QueryFailed(
            last_code if last_code in RETRYABLE_CODES else "backend_failed",
            f"all {len(tried)} executor(s) failed; last: {last_error}",
        )
