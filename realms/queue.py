"""A realm's local queue: bounded, priority classes, FIFO within a class, ``slots`` at a time.

Lower priority numbers go first: the sysop's queries, then this node's users', then peers'
(there is room between them for credit-based classes later). A peer may hold at most
``per_peer`` places (waiting or running), and peers together at most ``limit`` waiting places of
their own: a flooding peer cannot keep this node's users waiting. A full queue refuses at once
("queue full", with a retry-after from measured service times), which the router takes as a
reason to try a peer or to come back later. A waiting query is told its position and an ETA from
measured service times, again whenever its position changes (1 = next in line), and position 0
when it starts to run. A query cancelled while waiting
leaves the line; one cancelled while running frees its slot on the way out.
"""

from __future__ import annotations

import enum
import itertools
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from .events import Code, ExecutorFailure, Fault, QueryError

PositionReport = Callable[[int, "int | None"], Awaitable[None]]


class Priority(enum.IntEnum):
    SYSOP = 0
    NORMAL = 10
    PEER = 20


class QueueFull(ExecutorFailure):
    default_code = Code.QUEUE_FULL


def outcome_of(failure: BaseException | None) -> str:
    """How a query ended, as this node's counters see it: ok; refused (a full queue); cancelled;
    rejected (a bad request or a withdrawn one: no failure of this node); failed."""
    if failure is None:
        return "ok"
    if isinstance(failure, QueueFull):
        return "refused"
    if isinstance(failure, trio.Cancelled):
        return "cancelled"
    if isinstance(failure, QueryError) and failure.fault in (Fault.USER, Fault.NOBODY):
        return "rejected"
    return "failed"


@dataclass(order=True)
class _Ticket:
    priority: int
    seq: int
    query_id: str = field(compare=False)
    owner: str = field(default="", compare=False)
    granted: trio.Event = field(default_factory=trio.Event, compare=False)
    moved: trio.Event = field(default_factory=trio.Event, compare=False)


class RealmQueue:
    def __init__(self, realm: str, *, slots: int, limit: int, per_peer: int = 0) -> None:
        self.realm = realm
        self.slots = slots
        self.limit = limit
        self.per_peer = per_peer or slots + 2
        self._held: dict[str, int] = {}  # peer -> places it holds, waiting or running
        self._waiting: list[_Ticket] = []  # kept sorted: (priority, arrival)
        self._seq = itertools.count()
        self.running = 0
        self.running_ids: set[str] = set()
        self._service_ms: deque[float] = deque(maxlen=50)
        self.completed = 0
        self.failed = 0

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def depth(self) -> int:
        return len(self._waiting) + self.running

    @property
    def service_ms(self) -> float:
        return sum(self._service_ms) / len(self._service_ms) if self._service_ms else 0.0

    def success_ratio(self) -> float:
        total = self.completed + self.failed
        return 1.0 if total == 0 else self.completed / total

    def retry_after(self) -> float:
        """Seconds until a place is likely to free up: one service time over the slots."""
        return max(self.service_ms / 1000.0 / self.slots, 0.05) if self._service_ms else 0.5

    def eta_ms(self, position: int) -> int | None:
        if not self._service_ms:
            return None
        return int(self.service_ms * (max(position - 1, 0) // self.slots + 1))

    def position_of(self, query_id: str) -> int | None:
        return next((i for i, t in enumerate(self._waiting) if t.query_id == query_id), None)

    def _changed(self) -> None:
        for t in self._waiting:
            t.moved.set()
            t.moved = trio.Event()

    def _grant(self) -> None:
        while self._waiting and self.running < self.slots:
            ticket = self._waiting.pop(0)
            self.running += 1  # the slot is the ticket's from here on, even before it wakes
            self.running_ids.add(ticket.query_id)
            ticket.granted.set()
        self._changed()

    def _refuse(self, priority: int, owner: str) -> str | None:
        if owner and self._held.get(owner, 0) >= self.per_peer:
            return f"{self.realm}: your node holds {self.per_peer} places here already"
        if self.running < self.slots:
            return None
        mine = sum(1 for t in self._waiting if (t.priority >= Priority.PEER) == (priority >= Priority.PEER))
        if mine >= self.limit:
            return f"{self.realm} queue full ({len(self._waiting)} waiting, {self.slots} running)"
        return None

    @asynccontextmanager
    async def admit(
        self,
        query_id: str,
        on_position: PositionReport,
        *,
        priority: int = Priority.NORMAL,
        owner: str = "",
    ) -> AsyncIterator[None]:
        """Wait for a slot, reporting the position; hold the slot for the body. ``owner`` is
        the peer a query is run for ("" for this node's own users)."""
        refusal = self._refuse(int(priority), owner)
        if refusal is not None:
            raise QueueFull(refusal, retry_after=self.retry_after())
        if owner:
            self._held[owner] = self._held.get(owner, 0) + 1
        ticket = _Ticket(int(priority), next(self._seq), query_id, owner)
        self._waiting.append(ticket)
        self._waiting.sort()
        self._changed()
        self._grant()
        try:
            reported: int | None = None
            while not ticket.granted.is_set():
                at = self.position_of(query_id)
                position = None if at is None else at + 1  # 1 = next in line; 0 = running
                if position is not None and position != reported:
                    reported = position
                    await on_position(position, self.eta_ms(position))
                    continue  # the report may have taken a while: look again before waiting
                moved = ticket.moved
                async with trio.open_nursery() as nursery:

                    async def until(ev: trio.Event) -> None:
                        await ev.wait()
                        nursery.cancel_scope.cancel()

                    nursery.start_soon(until, ticket.granted)
                    nursery.start_soon(until, moved)
            if reported != 0:  # position 0: running now
                await on_position(0, self.eta_ms(0))
        except BaseException:
            if ticket.granted.is_set():
                self._release(ticket)
            else:
                self._waiting.remove(ticket)
                self._unhold(owner)
                self._changed()
            raise
        started = trio.current_time()
        failure: BaseException | None = None
        try:
            yield
        except BaseException as exc:
            failure = exc
            raise
        finally:
            self._release(ticket)
            outcome = outcome_of(failure)
            if outcome == "ok":
                self.completed += 1
                self._service_ms.append((trio.current_time() - started) * 1000.0)
            elif outcome == "failed":
                self.failed += 1

    def _unhold(self, owner: str) -> None:
        if owner:
            left = self._held.pop(owner, 1) - 1
            if left:
                self._held[owner] = left

    def _release(self, ticket: _Ticket) -> None:
        self.running -= 1
        self.running_ids.discard(ticket.query_id)
        self._unhold(ticket.owner)
        self._grant()
