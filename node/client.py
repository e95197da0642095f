"""The one client of a running node: the CLI, the tests, the benchmarks and scripts/federation.py
all reach a node through this module.

- :func:`read_run_file`: where a node on a data dir listens (``node.run.json``, written once it
  is ready, by the process that holds the data dir's lock).
- :func:`health`: ``GET /healthz`` on its UI port, a plain HTTP answer a supervisor (or a test
  harness in synchronous code) can read: whether it is up and each realm's state.
- :func:`connect`: a websocket session that has said hello, as a :class:`NodeClient` whose
  ``call`` and ``stream`` speak the control protocol (node/control.py). The sysop token, when the
  caller can read it, rides in the request head: the node keeps places for it, so clients
  holding every ordinary place cannot lock the operator out.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from .datadir import RUN_FILE, SYSOP_TOKEN_FILE
from .limits import CLI_CONNECT_TIMEOUT as CONNECT_TIMEOUT

SYSOP_HEADER = b"X-Rentahal-Sysop"


class NodeError(Exception):
    """An ``error`` answer from a node: ``code`` and ``message`` as the node sent them."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def read_run_file(data_dir: Path) -> dict[str, Any] | None:
    """{"pid", "peer_id", "ui", "addrs"} of the node running on ``data_dir``, or None."""
    try:
        info = json.loads((data_dir / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and {"pid", "peer_id", "ui", "addrs"} <= set(info) else None


def health(ui_url: str, timeout: float = 2.0) -> dict[str, Any] | None:
    """The node's ``/healthz`` answer, or None if it does not answer (synchronous: for
    supervisors, and harness code that runs outside trio)."""
    import urllib.error
    import urllib.request

    url = ui_url.replace("ws://", "http://", 1).rstrip("/") + "/healthz"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            data = json.loads(resp.read())
    except (OSError, ValueError, urllib.error.URLError):
        return None
    return data if isinstance(data, dict) else None


def admission(data_dir: Path | None) -> list[tuple[bytes, bytes]]:
    """The sysop token for the request head, when this user can read it."""
    if data_dir is None:
        return []
    try:
        return [(SYSOP_HEADER, (data_dir / SYSOP_TOKEN_FILE).read_bytes().strip())]
    except OSError:
        return []


class NodeClient:
    """A session with a node's local websocket, speaking the protocol the CLI and the UI speak.

    A reader task hands each message to the request it answers (by ``rid``), so several
    requests and query streams can be in flight on one connection.
    """

    def __init__(self, ws: Any, welcome: dict[str, Any]) -> None:
        self.ws = ws
        self.welcome = welcome
        self._rids = itertools.count(1)
        self._routes: dict[int, trio.MemorySendChannel[dict[str, Any]]] = {}

    async def _read(self) -> None:
        from trio_websocket import ConnectionClosed

        try:
            while True:
                msg = json.loads(await self.ws.get_message())
                route = self._routes.get(msg.get("rid"))
                if route is not None:
                    route.send_nowait(msg)
        except ConnectionClosed:  # the node went away: every open request ends
            for route in self._routes.values():
                route.close()

    def _open(self) -> tuple[int, trio.MemoryReceiveChannel[dict[str, Any]]]:
        rid = next(self._rids)
        send, receive = trio.open_memory_channel[dict[str, Any]](float("inf"))
        self._routes[rid] = send
        return rid, receive

    async def call(self, op: str, **fields: Any) -> dict[str, Any]:
        """One request, one answer; NodeError for an ``error`` answer."""
        rid, receive = self._open()
        try:
            await self.ws.send_message(json.dumps({"op": op, "rid": rid, **fields}))
            msg = await receive.receive()
        finally:
            self._routes.pop(rid, None)
        if msg["op"] == "error":
            raise NodeError(msg["code"], msg["message"])
        return msg

    async def stream(self, op: str, **fields: Any) -> AsyncIterator[dict[str, Any]]:
        """Yield every message answering this request, up to its ``result`` or ``error``."""
        rid, receive = self._open()
        try:
            await self.ws.send_message(json.dumps({"op": op, "rid": rid, **fields}))
            while True:
                msg = await receive.receive()
                yield msg
                if msg["op"] in ("result", "error"):
                    return
        finally:
            self._routes.pop(rid, None)


@asynccontextmanager
async def connect(
    url: str,
    *,
    data_dir: Path | None = None,
    timeout: float = CONNECT_TIMEOUT,
    max_message_size: int = 256 * 1024 * 1024,
    **hello: Any,
) -> AsyncIterator[NodeClient]:
    """``async with connect(node.ui, guid=...) as client``: a NodeClient that has said hello
    (``hello`` fields: guid, nickname, sysop_token). A refused hello raises NodeError; a node
    that does not get that far within ``timeout`` raises trio.TooSlowError."""
    from trio_websocket import open_websocket_url

    async with open_websocket_url(
        url, extra_headers=admission(data_dir), connect_timeout=timeout, max_message_size=max_message_size
    ) as ws:
        with trio.fail_after(timeout):  # hello before the reader starts: a refusal is a plain NodeError
            await ws.send_message(json.dumps({"op": "hello", "rid": 0, **hello}))
            welcome = json.loads(await ws.get_message())
        if welcome["op"] == "error":
            raise NodeError(welcome["code"], welcome["message"])
        try:
            async with trio.open_nursery() as nursery:
                client = NodeClient(ws, welcome)
                nursery.start_soon(client._read)
                yield client
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:  # the caller's own exception, wrapped by the reader's nursery
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
