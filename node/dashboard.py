"""Dashboards: one snapshot a second, built once and encoded once for every open dashboard.

The web UI's dashboard once asked four questions a second per tab, and every ``stats`` answer
sorted each realm's stored durations again: 512 open dashboards took 91 % of the node's CPU and
a p99 of 707 ms. Now a page subscribes once (the ``dashboard`` op) and the node pushes the same
text to every subscriber each second. A subscriber that has not taken the last snapshot yet
misses the next one (its queue holds one), so a slow tab costs the node nothing more.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ..realms.events import dumps
from .limits import DASHBOARD_INTERVAL as INTERVAL
from .limits import DASHBOARD_SUBSCRIBERS as MAX_SUBSCRIBERS

log = logging.getLogger("rentahal.dashboard")


class Dashboards:
    def __init__(self, build: Callable[[], Awaitable[dict[str, Any]]], *, interval: float = INTERVAL) -> None:
        self.build = build
        self.interval = interval
        self._subscribers: dict[int, trio.MemorySendChannel[str]] = {}
        self._ids = itertools.count()
        self._wanted = trio.Event()  # set while someone subscribes: no snapshots for nobody
        self.built = 0  # snapshots built (one a second while anyone watches)

    def __len__(self) -> int:
        return len(self._subscribers)

    def subscribe(self) -> tuple[int, trio.MemoryReceiveChannel[str]]:
        """A channel of snapshot texts (JSON: {"op": "dashboard", "snapshot": ...}), the newest
        only; refused (``OverflowError``) past MAX_SUBSCRIBERS."""
        if len(self._subscribers) >= MAX_SUBSCRIBERS:
            raise OverflowError(f"more than {MAX_SUBSCRIBERS} open dashboards")
        send, receive = trio.open_memory_channel[str](1)
        token = next(self._ids)
        self._subscribers[token] = send
        self._wanted.set()
        return token, receive

    def unsubscribe(self, token: int) -> None:
        send = self._subscribers.pop(token, None)
        if send is not None:
            send.close()
        if not self._subscribers:
            self._wanted = trio.Event()

    async def snapshot_text(self) -> str:
        return dumps({"op": "dashboard", "snapshot": await self.build()})

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self._wanted.wait()
            try:
                text = await self.snapshot_text()
            except Exception as exc:  # a snapshot that cannot be built is skipped, not fatal
                log.warning("dashboard snapshot failed: %s: %s", type(exc).__name__, exc)
            else:
                self.built += 1
                for send in list(self._subscribers.values()):
                    try:
                        send.send_nowait(text)
                    except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
                        pass  # it has not taken the last one yet: it gets the next
            await trio.sleep(self.interval)
