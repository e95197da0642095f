"""Dashboards subscribe once and the node pushes one snapshot a second, built once for all of
them: 512 tabs once asked four questions a second each (p99 707 ms, 91 % of the node's CPU)."""

from __future__ import annotations

import json
import time

import trio
from trio_websocket import open_websocket_url

from rentahal.scripts.federation import Federation, connect

DASHBOARDS = 48  # one address may hold 64 connections (node/http.py)


async def watch(url: str, pushes: int, got: list[float], ready: trio.Semaphore) -> None:
    async with open_websocket_url(url) as ws:
        await ws.send_message(json.dumps({"op": "dashboard", "rid": 1}))
        first = json.loads(await ws.get_message())
        assert first["op"] == "dashboard" and first["rid"] == 1
        assert {"status", "realms", "stats", "peers"} <= set(first["snapshot"])
        ready.release()
        for _ in range(pushes):
            msg = json.loads(await ws.get_message())
            assert msg["op"] == "dashboard" and "rid" not in msg and msg["snapshot"]["status"]["peer_id"]
            got.append(time.monotonic())


def test_many_dashboards_share_one_snapshot_a_second(federation: Federation) -> None:
    node = federation.start("dash", serve="none")

    async def main() -> tuple[int, int, float]:
        got: list[float] = []
        ready = trio.Semaphore(0)
        async with connect(node.ui) as c:
            before = (await c.call("status"))["status"]["dashboards"]["snapshots_built"]
            started = time.monotonic()
            async with trio.open_nursery() as nursery:
                for _ in range(DASHBOARDS):
                    nursery.start_soon(watch, node.ui, 3, got, ready)
            seconds = time.monotonic() - started
            after = (await c.call("status"))["status"]
        assert after["dashboards"]["open"] == 0  # every one unsubscribed as its connection ended
        return len(got), after["dashboards"]["snapshots_built"] - before, seconds

    pushes, built, seconds = trio.run(main)
    assert pushes == 3 * DASHBOARDS
    # One snapshot a second for all of them (not one per dashboard, not four per second).
    assert built <= seconds + 2, (built, seconds)
