"""The realm router: where a query runs, and what happens when that executor fails.

Local first when this node serves the realm and its queue is short, else the best-scored live
peer; on a peer's death, hang or refusal the next candidate gets the query, so the user receives
one complete answer and sees the failover as an event. The router knows peers only through the
``RemoteExecutor`` interface and models only through ``LocalExecutor``: a router test needs
neither sockets nor models.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Protocol

import trio

from ..node.limits import BACKOFF_CAP, MAX_BACKPRESSURE_RETRIES, RETRY_VANISHED, REVIVE_POLL, REVIVE_WAIT
from ..p2p.peers import PeerTable
from . import events as ev
from .catalog import wanted_model
from .events import Code, ExecutorFailure, FailureKind, Fault, QueryError

log = logging.getLogger("rentahal.router")

LOCAL = "local"
Emit = Callable[[ev.Event], Awaitable[None]]
StreamEmit = Callable[[ev.StreamEvent], Awaitable[None]]


@dataclass(frozen=True)
class Query:
    query_id: str
    realm: str
    payload: dict[str, Any]
    deadline_s: float
    origin: str
    priority: int = 10  # realms.queue.Priority.NORMAL; lower runs first


class LocalExecutor(Protocol):
    def serves(self, realm: str) -> bool: ...

    def model_name(self, realm: str) -> str: ...

    def queue_depth(self, realm: str) -> int: ...

    def not_served_reason(self, realm: str) -> str: ...

    def loading(self, realm: str) -> bool: ...

    async def wait_loaded(self, realm: str) -> None: ...

    async def execute(self, query: Query, emit: StreamEmit) -> ev.Result: ...


class RemoteExecutor(Protocol):
    async def execute(self, peer_id: str, query: Query, emit: StreamEmit) -> ev.Result: ...


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
            "candidates": [{"executor": c.executor, "score": c.score, "note": c.note} for c in self.candidates],
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
        discover: Callable[[str], Awaitable[None]] | None = None,
        trusted: Mapping[str, frozenset[str]] | None = None,
    ) -> None:
        self.table = table
        self.local = local
        self.remote = remote
        self.local_queue_limit = local_queue_limit
        self.max_attempts = max_attempts
        self.discover = discover
        self.trusted = dict(trusted or {})  # realm -> the only peers it may be routed to

    def _path(self, peer_id: str) -> str:
        e = self.table.get(peer_id)
        if e is None or not e.connected:
            return "not connected yet: dialed on first use"
        return "via relay" if e.relayed else "direct"

    def _peer_model(self, peer_id: str, realm: str) -> str:
        e = self.table.get(peer_id)
        status = e.record.realm(realm) if e is not None and e.record is not None else None
        return status.model if status is not None else ""

    def plan(self, realm: str, model: str | None = None) -> RoutePlan:
        """Every executor for ``realm``, best first, and why the others are out; with ``model``,
        only those serving that model (as their health records say: the executor checks)."""
        peers, excluded = self.table.candidates(realm)
        out = [RouteEntry(x.peer_id, 0.0, x.reason) for x in excluded]
        if model is not None:
            out += [
                RouteEntry(c.peer_id, 0.0, f"serves model {self._peer_model(c.peer_id, realm)!r}, not {model!r}")
                for c in peers
                if self._peer_model(c.peer_id, realm) != model
            ]
            peers = [c for c in peers if self._peer_model(c.peer_id, realm) == model]
        trusted = self.trusted.get(realm)
        if trusted:  # a private federation: only the peers named in realms.<realm>.trusted
            out += [
                RouteEntry(c.peer_id, 0.0, f"not trusted for {realm} (realms.{realm}.trusted)")
                for c in peers
                if c.peer_id not in trusted
            ]
            peers = [c for c in peers if c.peer_id in trusted]
        entries = [RouteEntry(c.peer_id, c.score, self._path(c.peer_id)) for c in peers]
        if self.local.serves(realm) and model is not None and self.local.model_name(realm) != model:
            out.insert(0, RouteEntry(LOCAL, 0.0, f"serves model {self.local.model_name(realm)!r}, not {model!r}"))
        elif self.local.serves(realm):
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

    async def run(self, query: Query, emit: Emit) -> ev.Result:
        """Run ``query`` on the best executor, failing over; return the answer. Raises
        QueryError: the last executor's failure, or ``deadline_exceeded``."""
        deadline_at = trio.current_time() + query.deadline_s
        try:
            model = wanted_model(query.payload)
        except ValueError as exc:
            raise QueryError(str(exc), Code.BAD_REQUEST) from None
        plan = self.plan(query.realm, model)
        if not plan.candidates and self.local.loading(query.realm):
            # Its model is loading here (a restart resumes queries before models are up): wait.
            with trio.move_on_at(deadline_at):
                await self.local.wait_loaded(query.realm)
            plan = self.plan(query.realm, model)
        if not plan.candidates and self.discover is not None:
            with trio.move_on_at(min(deadline_at, trio.current_time() + 5.0)):
                await self.discover(query.realm)
            plan = self.plan(query.realm, model)
        if not plan.candidates:
            reasons = "; ".join(f"{x.executor[:16]}: {x.note}" for x in plan.excluded) or "no peers known"
            what = f"realm {query.realm!r}" + (f" with model {model!r}" if model is not None else "")
            raise QueryError(f"no executor for {what} ({reasons})", Code.REALM_NOT_SERVED)
        # (not before, executor): an executor that answered busy comes back after its retry-after
        line: list[tuple[float, str]] = [(0.0, c.executor) for c in plan.candidates[: self.max_attempts]]
        tried: list[str] = []
        attempt = 0
        busy_count: dict[str, int] = {}  # executor -> back-pressure answers waited out
        gone: dict[str, float] = {}  # executor whose stream died under this query -> when (may come back)
        last: QueryError | None = None
        current = ""
        with trio.move_on_at(deadline_at) as deadline:
            while (
                line
                or self._refill(line, query.realm, tried, model=model)
                or await self._revived(line, query, tried, gone, last)
            ):
                line.sort(key=lambda x: x[0])  # stable: ranked order among the ready ones
                not_before, executor = line.pop(0)
                current = ""  # waiting out a retry-after is nobody's fault
                await trio.sleep_until(not_before)
                attempt += 1
                current = executor
                # Each executor gets the time that is left, not the whole budget again.
                attempt_query = replace(query, deadline_s=max(deadline_at - trio.current_time(), 0.001))
                await emit(ev.Routed(executor, attempt))
                started = trio.current_time()
                first_event_at: list[float] = []

                async def relay(event: ev.StreamEvent) -> None:
                    if not first_event_at:
                        first_event_at.append(trio.current_time())
                    await emit(event)

                try:
                    if executor == LOCAL:
                        result = await self.local.execute(attempt_query, relay)
                    else:
                        result = await self.remote.execute(executor, attempt_query, relay)
                except ExecutorFailure as exc:
                    last = exc
                    retry_at = self._retry_at(exc, deadline_at, busy_count.get(executor, 0))
                    if retry_at is not None and sum(busy_count.values()) < MAX_BACKPRESSURE_RETRIES:
                        # Healthy but full: back in line after its retry-after, not a failure.
                        busy_count[executor] = busy_count.get(executor, 0) + 1
                        line.append((retry_at, executor))
                        log.debug(
                            "query %s: %s is %s; back in line in %.2fs",
                            query.query_id,
                            executor,
                            exc.code.value,
                            retry_at - trio.current_time(),
                        )
                        continue
                    tried.append(executor)
                    if executor != LOCAL and exc.kind in (FailureKind.DEAD, FailureKind.UNREACHABLE):
                        gone[executor] = self.table.clock()
                    else:
                        gone.pop(executor, None)
                    if exc.fault in (Fault.USER, Fault.NOBODY):  # the request is wrong, or withdrawn
                        raise
                    if executor != LOCAL:
                        self._count_failure(executor, exc.kind, exc.message)
                    if not exc.retryable:
                        raise
                    log.info(
                        "query %s: executor %s failed (%s: %s); failing over",
                        query.query_id,
                        executor,
                        exc.kind.value,
                        exc.message,
                    )
                    await emit(ev.Failover(executor, attempt, exc.kind, exc.code, exc.message))
                    continue
                if executor != LOCAL:
                    latency = (first_event_at[0] if first_event_at else trio.current_time()) - started
                    self.table.record_success(executor, latency * 1000.0)
                return replace(result, executor=executor, attempt=attempt, failovers=tuple(tried))
        if deadline.cancelled_caught:
            if current and current != LOCAL:  # the deadline ran out on this peer: its failure
                self._count_failure(current, FailureKind.HUNG, f"spent the query's {query.deadline_s:g}s deadline")
            raise QueryError(
                f"query deadline of {query.deadline_s:g}s passed after {attempt} attempt(s)",
                Code.DEADLINE_EXCEEDED,
            )
        assert last is not None
        others = "; ".join(f"{x.executor[:16]}: {x.note}" for x in self.plan(query.realm, model).excluded[:3])
        raise QueryError(
            f"all {len(tried)} executor(s) failed; last: {last.message}"
            + (f" (not tried: {others})" if others else ""),
            last.code if last.retryable else Code.BACKEND_FAILED,
        )

    def _refill(
        self,
        line: list[tuple[float, str]],
        realm: str,
        tried: list[str],
        vanished: Mapping[str, float] = MappingProxyType({}),
        *,
        model: str | None = None,
    ) -> bool:
        """Every executor in line has failed: add any that became a candidate meanwhile (a peer
        back from a moment of silence), up to ``max_attempts`` attempts in all. An executor in
        ``vanished`` (its stream died under the query, at the time given) may be tried again
        once it is a candidate again on a new connection, or RETRY_VANISHED after it failed: not
        at once, where the same half-closed connection would fail every attempt left in a few
        milliseconds (a soak lost 4 of 84,954 queries so, while the other executor was a second
        from serving again)."""
        room = self.max_attempts - len(tried)
        now = self.table.clock()

        def back(executor: str) -> bool:
            failed_at = vanished.get(executor)
            if failed_at is None:
                return False
            entry = self.table.get(executor)
            reconnected = entry is not None and entry.connected and entry.connected_at > failed_at
            return reconnected or now - failed_at >= RETRY_VANISHED

        fresh = [c.executor for c in self.plan(realm, model).candidates if c.executor not in tried or back(c.executor)][
            : max(room, 0)
        ]
        line.extend((0.0, executor) for executor in fresh)
        return bool(fresh)

    async def _revived(
        self,
        line: list[tuple[float, str]],
        query: Query,
        tried: list[str],
        gone: Mapping[str, float],
        last: QueryError | None,
    ) -> bool:
        """The executors tried are gone (streams lost, dials failed) and no other is live: wait
        up to REVIVE_WAIT for one to become a candidate (a peer whose breaker closes, one that
        reconnects, the dead one restarted) rather than fail a query that could still be
        answered. Not after a refusal or a hang: those executors are there and said no."""
        if (
            not gone
            or not isinstance(last, ExecutorFailure)
            or last.kind not in (FailureKind.DEAD, FailureKind.UNREACHABLE)
        ):
            return False
        if len(tried) >= self.max_attempts:
            return False
        with trio.move_on_after(REVIVE_WAIT):
            while not self._refill(line, query.realm, tried, gone, model=wanted_model(query.payload)):
                await trio.sleep(REVIVE_POLL)
            return True
        return False

    @staticmethod
    def _retry_at(exc: ExecutorFailure, deadline_at: float, repeats: int) -> float | None:
        """When to ask a busy executor again, if its hint leaves time before the deadline: its
        retry-after, doubled on each repeat (to 5 s at most) and spread by a random quarter, so
        that the queries it turned away together do not all come back at the same moment."""
        if not exc.code.back_pressure or exc.retry_after is None:
            return None
        wait = min(max(exc.retry_after, 0.01) * 2 ** min(repeats, 10), max(exc.retry_after, BACKOFF_CAP))
        at = trio.current_time() + wait * random.uniform(1.0, 1.25)
        return at if at < deadline_at else None

    def _count_failure(self, peer_id: str, kind: FailureKind, message: str) -> None:
        if self.table.record_failure(peer_id, kind, message):
            log.warning("circuit opened for %s after %s", peer_id, kind.value)
