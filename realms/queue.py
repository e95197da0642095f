"""A realm's local queue: bounded, FIFO, as many running at once as the backend has slots.

A full queue refuses at once ("queue full"), which the router takes as a reason to try a peer.
Service times of finished queries give the ETA reported to waiting clients.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import trio


class QueueFull(Exception):
    pass


class RealmQueue:
    def __init__(self, realm: str, *, slots: int, limit: int) -> None:
        self.realm = realm
        self.slots = slots
        self.limit = limit
        self._slots = trio.Semaphore(slots)
        self.waiting = 0
        self.running = 0
        self._service_ms: deque[float] = deque(maxlen=50)
        self.completed = 0
        self.failed = 0

    @property
    def depth(self) -> int:
        return self.waiting + self.running

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

    @asynccontextmanager
    async def admit(
        self, on_accepted: Callable[[int, int | None], Awaitable[None]]
    ) -> AsyncIterator[None]:
        """Wait for a slot (reporting the position first), then hold it for the body."""
        if self.waiting + self.running >= self.limit + self.slots:
            raise QueueFull(f"{self.realm} queue is full ({self.limit} waiting)")
        position = self.waiting
        self.waiting += 1
        try:
            async with trio.open_nursery() as nursery:
                # Report the position while already in line: trio's semaphore is FIFO, and a
                # slow client must not let later arrivals overtake it. The body starts only
                # after the report went out.
                nursery.start_soon(on_accepted, position, self.eta_ms(position))
                await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        started = trio.current_time()
        ok = False
        try:
            yield
            ok = True
        finally:
            self.running -= 1
            self._slots.release()
            if ok:
                self.completed += 1
                self._service_ms.append((trio.current_time() - started) * 1000.0)
            else:
                self.failed += 1
