"""A realm's local queue: bounded, priority classes, FIFO within a class, ``slots`` at a time.

Lower priority numbers go first: the sysop's queries, then everyone's (there is room between
them for credit-based classes later). A full queue refuses at once ("queue full"), which the
router takes as a reason to try a peer. A waiting query is told its position and an ETA from
measured service times, again whenever its position changes. A query cancelled while waiting
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

PositionReport = Callable[[int, "int | None"], Awaitable[None]]


class Priority(enum.IntEnum):
    SYSOP = 0
    NORMAL = 10


class QueueFull(Exception):
    pass


@dataclass(order=True)
class _Ticket:
    priority: int
    seq: int
    query_id: str = field(compare=False)
    granted: trio.Event = field(default_factory=trio.Event, compare=False)
    moved: trio.Event = field(default_factory=trio.Event, compare=False)


class RealmQueue:
    def __init__(self, realm: str, *, slots: int, limit: int) -> None:
        self.realm = realm
        self.slots = slots
        self.limit = limit
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

    def eta_ms(self, position: int) -> int | None:
        if not self._service_ms:
            return None
        return int(self.service_ms * (position // self.slots + 1))

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

    @asynccontextmanager
    async def admit(
        self, query_id: str, on_position: PositionReport, *, priority: int = Priority.NORMAL
    ) -> AsyncIterator[None]:
        """Wait for a slot, reporting the position; hold the slot for the body."""
        if self.running >= self.slots and len(self._waiting) >= self.limit:
            raise QueueFull(f"{self.realm} queue full ({len(self._waiting)} waiting, {self.slots} running)")
        ticket = _Ticket(int(priority), next(self._seq), query_id)
        self._waiting.append(ticket)
        self._waiting.sort()
        self._changed()
        self._grant()
        try:
            reported: int | None = None
            while not ticket.granted.is_set():
                position = self.position_of(query_id)
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
            if reported is None:
                await on_position(0, self.eta_ms(0))
        except BaseException:
            if ticket.granted.is_set():
                self._release(query_id)
            else:
                self._waiting.remove(ticket)
                self._changed()
            raise
        started = trio.current_time()
        outcome = "failed"
        try:
            yield
            outcome = "ok"
        except trio.Cancelled:
            outcome = "cancelled"
            raise
        finally:
            self._release(query_id)
            if outcome == "ok":
                self.completed += 1
                self._service_ms.append((trio.current_time() - started) * 1000.0)
            elif outcome == "failed":
                self.failed += 1

    def _release(self, query_id: str) -> None:
        self.running -= 1
        self.running_ids.discard(query_id)
        self._grant()
