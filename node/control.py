"""The node's local websocket: the channel of the CLI and of the web UI.

JSON text messages. A request is ``{"op": ..., "rid": <any>}``; every answer echoes ``rid``.
``submit_query`` answers with a stream of ``{"op": "event"}`` messages and then one ``result``
or ``error``. Input is validated like peer input; a bad message gets an ``error`` naming what is
wrong and the connection stays up. Browsers may only connect from a local origin, so a web page
elsewhere cannot drive the node through the user's browser.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

from ..realms.router import QueryFailed
from .config import REALMS

if TYPE_CHECKING:
    from .daemon import Node

log = logging.getLogger("rentahal.control")

MAX_MESSAGE = 4 * 1024 * 1024
MAX_INFLIGHT_PER_CONNECTION = 16
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


class BadRequest(Exception):
    pass


def origin_allowed(origin: str | None) -> bool:
    if origin is None:
        return True  # not a browser: the CLI or a local script
    host = urlsplit(origin).hostname
    return host in LOCAL_HOSTS


async def serve_control(node: Node, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    cfg = node.config.ui

    async def handler(request: WebSocketRequest) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in request.headers}
        if not origin_allowed(headers.get("origin")):
            log.warning("refused websocket from origin %s", headers.get("origin"))
            await request.reject(403, body=b"origin not allowed\n")
            return
        ws = await request.accept()
        try:
            await ControlSession(node, ws).run()
        except Exception as exc:  # one client's trouble must never take the node down
            log.error("websocket session failed: %s: %s", type(exc).__name__, exc)

    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            lambda task_status: serve_websocket(
                handler, cfg.host, cfg.port, None, max_message_size=MAX_MESSAGE, task_status=task_status
            )
        )
        host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
        task_status.started(f"ws://{host}:{server.port}/")


class ControlSession:
    def __init__(self, node: Node, ws: WebSocketConnection) -> None:
        self.node = node
        self.ws = ws
        self.send_lock = trio.Lock()
        self.inflight = 0

    async def send(self, message: dict[str, Any]) -> None:
        async with self.send_lock:
            await self.ws.send_message(json.dumps(message, default=_json_default))

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            try:
                while True:
                    raw = await self.ws.get_message()
                    try:
                        req = parse_request(raw)
                    except BadRequest as exc:
                        await self.send({"op": "error", "rid": None, "code": "bad_request", "message": str(exc)})
                        continue
                    if self.inflight >= MAX_INFLIGHT_PER_CONNECTION:
                        await self.send(
                            {"op": "error", "rid": req.get("rid"), "code": "busy",
                             "message": f"more than {MAX_INFLIGHT_PER_CONNECTION} requests in flight"}
                        )
                        continue
                    nursery.start_soon(self.dispatch, req)
            except ConnectionClosed:
                nursery.cancel_scope.cancel()

    async def dispatch(self, req: dict[str, Any]) -> None:
        rid = req.get("rid")
        op = req["op"]
        self.inflight += 1
        try:
            if op == "status":
                await self.send({"op": "status", "rid": rid, "status": self.node.status_report()})
            elif op == "peers":
                await self.send({"op": "peers", "rid": rid, "peers": self.node.peers_report()})
            elif op == "realms":
                await self.send({"op": "realms", "rid": rid, "realms": self.node.realms_report()})
            elif op == "route":
                plan = self.node.router.plan(req["realm"])
                await self.send({"op": "route", "rid": rid, "route": plan.to_json()})
            elif op == "submit_query":
                await self.submit(rid, req["realm"], req["payload"])
        except ConnectionClosed:
            pass
        finally:
            self.inflight -= 1

    async def submit(self, rid: Any, realm: str, payload: dict[str, Any]) -> None:
        async def emit(event: dict[str, Any]) -> None:
            await self.send({"op": "event", "rid": rid, "event": event})

        try:
            result = await self.node.submit(realm, payload, emit)
        except QueryFailed as exc:
            await self.send({"op": "error", "rid": rid, "code": exc.code, "message": exc.message})
            return
        await self.send({"op": "result", "rid": rid, "result": result})


def parse_request(raw: str | bytes) -> dict[str, Any]:
    """Validate one client message; BadRequest names what is wrong."""
    if isinstance(raw, bytes):
        raise BadRequest("expected a JSON text message, got binary")
    try:
        req = json.loads(raw)
    except ValueError as exc:
        raise BadRequest(f"not JSON: {exc}") from None
    if not isinstance(req, dict):
        raise BadRequest("a request is a JSON object")
    op = req.get("op")
    known = {"status": set(), "peers": set(), "realms": set(), "route": {"realm"}, "submit_query": {"realm", "payload"}}
    if op not in known:
        raise BadRequest(f"unknown op {op!r}; expected one of {sorted(known)}")
    extra = set(req) - known[op] - {"op", "rid"}
    if extra:
        raise BadRequest(f"{op}: unknown field(s) {sorted(extra)}")
    missing = known[op] - set(req)
    if missing:
        raise BadRequest(f"{op}: missing field(s) {sorted(missing)}")
    if "realm" in req and req["realm"] not in REALMS:
        raise BadRequest(f"{op}: realm must be one of {list(REALMS)}, got {req['realm']!r}")
    if "payload" in req and not isinstance(req["payload"], dict):
        raise BadRequest(f"{op}: payload must be a JSON object")
    return req


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"bytes": len(value)}
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
