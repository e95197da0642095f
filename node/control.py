"""The node's local websocket: the channel of the CLI and of the web UI.

JSON text messages. A request is ``{"op": ..., "rid": <any>}``; every answer echoes ``rid``.
``submit_query`` answers with a stream of ``{"op": "event"}`` messages and then one ``result``
or ``error``. Input is validated like peer input; a bad message gets an ``error`` naming what is
wrong and the connection stays up. Browsers may only connect from a local origin, so a web page
elsewhere cannot drive the node through the user's browser.
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import ipaddress
import json
import logging
import uuid
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol
from urllib.parse import urlsplit

import msgspec
import trio
from msgspec import UNSET, Meta, UnsetType
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest

from ..p2p.ratelimit import client_network
from ..realms.catalog import CATALOG
from ..realms.events import Code, QueryError, UserError, dumps
from ..realms.schema import INT64_RANGE, Int64, check
from .client import SYSOP_HEADER as _SYSOP_HEADER
from .config import REALMS
from .http import MessageRefused, serve_ui
from .limits import WS_INFLIGHT_PER_CONNECTION as MAX_INFLIGHT_PER_CONNECTION
from .limits import WS_MEDIA_SLACK as MEDIA_SLACK
from .queries import Refused, check_guid

if TYPE_CHECKING:
    from ..p2p.ratelimit import RateLimiter
    from ..realms.router import RealmRouter
    from .apikeys import ApiKeys
    from .config import Config
    from .dashboard import Dashboards
    from .metrics import Metrics
    from .queries import QueryManager
    from .reports import Reports
    from .sysop import Sysop


class ControlAPI(Protocol):
    """What the control protocol needs of a node: its services and its reports. ``Node``
    provides it; nothing here reaches past it (into storage, the peer table, the host)."""

    config: Config
    sysop_token: str
    queries: QueryManager  # users, their queries and their history
    sysop: Sysop  # the sysop's audited actions
    router: RealmRouter
    dashboards: Dashboards
    submit_limiter: RateLimiter
    metrics: Metrics
    api_keys: ApiKeys
    reports: Reports  # status, health, peers, realms, models, stats, the dashboard's snapshot

    def report_answer(self, row: dict[str, Any], reason: str) -> dict[str, Any]: ...
    def caught_reason(self, peer_id: str) -> str: ...


log = logging.getLogger("rentahal.control")

SYSOP_HEADER = _SYSOP_HEADER.decode().lower()  # the sysop token in a request head: a reserved place


class BadRequest(UserError):
    """A client message this node will not take; ``rid`` is echoed when it could be read."""

    def __init__(self, message: str, rid: Any = None) -> None:
        super().__init__(message, Code.BAD_REQUEST)
        self.rid = rid


def origin_allowed(origin: str | None, host_header: str | None = None, allowed: tuple[str, ...] = ()) -> bool:
    """No Origin (not a browser: the CLI, a script), the page this node served itself (same
    origin as the Host the browser connected to: the UI as localhost, or opened over the LAN by
    IP address), or an origin the operator allowed (``ui.allowed_origins``). A page on another
    port of this machine is another site: it may not drive the node."""
    if origin is None:
        return True
    if origin.lower() in allowed:
        return True
    try:
        parts = urlsplit(origin)
        host = parts.hostname
    except ValueError:  # e.g. "http://[::1": not an origin we allow
        return False
    if host_header is None or parts.scheme != "http" or parts.netloc.lower() != host_header.lower():
        return False
    # Same origin counts only for an IP address or localhost: a page on a DNS name could be a
    # DNS-rebinding attack (evil.example resolving to this node), whose Origin matches its Host too.
    if host == "localhost":
        return True
    try:
        ipaddress.ip_address((host or "").strip("[]"))
    except ValueError:
        return False
    return True


async def serve_control(node: ControlAPI, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
    cfg = node.config.ui

    async def handler(request: WebSocketRequest, client: str, headers: dict[str, str]) -> None:
        try:  # one client's trouble, whatever it is, must never take the node down
            # The request head's own headers: wsproto takes Host out of those it hands on.
            if not origin_allowed(headers.get("origin"), headers.get("host"), cfg.allowed_origins):
                log.warning("refused websocket from origin %r", headers.get("origin", "")[:200])
                await request.reject(403, body=b"origin not allowed\n")
                return
            ws = await request.accept()
            try:
                await ControlSession(node, ws, client=client).run()
            finally:  # a close frame, not a dropped connection, however the session ended
                with trio.move_on_after(2):
                    await ws.aclose()
        except Exception as exc:
            log.error("websocket session failed: %s: %s", type(exc).__name__, exc)

    limits = node.config.limits
    token = node.sysop_token.encode()

    def is_sysop(headers: dict[str, str]) -> bool:
        """The CLI of the person running the node shows the token: it gets a reserved place."""
        return hmac.compare_digest(headers.get(SYSOP_HEADER, "").encode("latin-1", "replace"), token)

    async with trio.open_nursery() as nursery:
        port = await nursery.start(
            lambda task_status: serve_ui(
                handler,
                cfg.host,
                cfg.port,
                max_message_size=max(message_limits(node.config).values()),
                message_budget=limits.ws_buffer_bytes,
                routes={"/healthz": node.reports.health_report},
                api=api_routes(node),
                may_use_reserved=is_sysop,
                task_status=task_status,
            )
        )
        host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
        log.info("web UI at http://%s:%d/", host if cfg.host not in ("0.0.0.0", "::") else "127.0.0.1", port)
        task_status.started(f"ws://{host}:{port}/")


def api_routes(node: Any) -> dict[str, Any]:
    """The OpenAI-compatible API and /metrics, when [api] enabled."""
    if not node.config.api.enabled:
        return {}
    from .openai_api import OpenAIApi

    api = OpenAIApi(node)
    return {"/v1/": api.handle, "/v1": api.handle, "/metrics": api.metrics_endpoint}


def is_loopback(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host == "localhost"  # anything else unparsable is not known to be this machine
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def rate_key(client: str, guid: str, *, sysop: bool, limit_loopback: bool) -> tuple[str, str] | None:
    """The rate-limit bucket a submission counts against, or None when it is not limited.

    A remote client picks its own GUID, so it is counted by address; a local one by user (all
    local clients share 127.0.0.1), and only when [limits] loopback is on. The sysop is exempt.
    """
    if sysop:
        return None
    if is_loopback(client):
        return ("user", guid) if limit_loopback else None
    return ("ip", client_network(client))


def message_limits(config: Any) -> dict[str, int]:
    """Largest websocket message per realm of a query ("" for every other request): a text
    prompt needs far less room than an image or a recording (max_payload_bytes, as base64);
    the realm's catalog entry says whether its payloads carry media."""
    limits = config.limits
    media = 4 * -(-config.storage.max_payload_bytes // 3) + MEDIA_SLACK
    return {
        "": limits.ws_request_bytes,
        **{realm: media if CATALOG[realm].media else limits.ws_chat_bytes for realm in REALMS},
    }


def _size(raw: str | bytes) -> int:
    return len(raw) if isinstance(raw, bytes) or raw.isascii() else len(raw.encode("utf-8", "surrogatepass"))


class ControlSession:
    def __init__(self, node: ControlAPI, ws: WebSocketConnection, *, client: str = "127.0.0.1") -> None:
        self.node = node
        self.ws = ws
        self.client = client
        self.send_lock = trio.Lock()
        self.inflight = 0
        # Until the client says hello, it is an anonymous user of its own for this connection.
        self.guid = uuid.uuid4().hex
        self.sysop = False
        self.limits = message_limits(node.config)
        self.subscriptions: list[tuple[str, Any]] = []  # (query id, subscriber) to drop at the end

    async def send(self, message: dict[str, Any]) -> None:
        try:
            text = dumps(message, default=_json_default)
        except ValueError:  # NaN or an infinity (from a peer's answer): never shown as a number
            log.warning("refused to send a non-finite number to a client (op %s)", message.get("op"))
            text = dumps(
                {
                    "op": "error",
                    "rid": message.get("rid"),
                    "code": Code.PROTOCOL_ERROR.value,
                    "message": "the answer held a number that is not finite",
                }
            )
        async with self.send_lock:
            await self.ws.send_message(text)

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            try:
                while True:
                    raw = await self.ws.get_message()
                    # A large message holds room in the websocket budget until it is handled.
                    held = self.ws.take_reservation() if hasattr(self.ws, "take_reservation") else 0
                    try:
                        if isinstance(raw, MessageRefused):  # dropped as it arrived: never parsed
                            await self.send({"op": "error", "rid": None, "code": raw.code, "message": raw.reason})
                            continue
                        try:
                            req = parse_request(raw)
                        except BadRequest as exc:
                            await self.send({"op": "error", "rid": exc.rid, "code": "bad_request", "message": str(exc)})
                            continue
                        realm = req.get("realm", "") if req["op"] == "submit_query" else ""
                        limit = self.limits.get(realm, self.limits[""])
                        if _size(raw) > limit:
                            what = f"a {realm} query" if realm else f"a {req['op']} request"
                            await self.send(
                                {
                                    "op": "error",
                                    "rid": req.get("rid"),
                                    "code": "too_large",
                                    "message": f"{what} is at most {limit} bytes, got {_size(raw)}",
                                }
                            )
                            continue
                        if self.inflight >= MAX_INFLIGHT_PER_CONNECTION:
                            await self.send(
                                {
                                    "op": "error",
                                    "rid": req.get("rid"),
                                    "code": "busy",
                                    "message": f"more than {MAX_INFLIGHT_PER_CONNECTION} requests in flight",
                                }
                            )
                            continue
                        nursery.start_soon(self.dispatch, req, held)
                        held = 0  # dispatch gives it back
                    finally:
                        if held:
                            self.ws.release(held)
            except ConnectionClosed:
                nursery.cancel_scope.cancel()
            finally:  # a client gone is no subscriber: it must not hold one of a query's places
                for query_id, subscriber in self.subscriptions:
                    self.node.queries.unsubscribe(query_id, subscriber)

    async def dispatch(self, req: dict[str, Any], held: int = 0) -> None:
        rid = req.get("rid")
        op = req["op"]
        self.inflight += 1
        try:
            if op in SYSOP_OPS and not self.sysop:
                raise Refused("forbidden", f"{op} needs the sysop token (say hello with sysop_token)")
            answer = await getattr(self, "op_" + op)(req, rid)
            if answer is not None:
                await self.send({"op": op, "rid": rid, **answer})
        except QueryError as exc:
            await self.send({"op": "error", "rid": rid, "code": exc.code.value, "message": exc.message})
        except ConnectionClosed:
            pass
        except Exception as exc:  # a bug here must cost this request, not the session
            log.error("%s request failed: %s: %s", op, type(exc).__name__, exc)
            with contextlib.suppress(ConnectionClosed):
                await self.send(
                    {
                        "op": "error",
                        "rid": rid,
                        "code": Code.INTERNAL.value,
                        "message": f"{op} failed inside this node ({type(exc).__name__}); see its log",
                    }
                )
        finally:
            self.inflight -= 1
            if held:
                self.ws.release(held)

    # --- who is asking ---------------------------------------------------------------------------
    async def op_hello(self, req: dict[str, Any], rid: Any) -> dict[str, Any]:
        if "sysop_token" in req:
            if not hmac.compare_digest(str(req["sysop_token"]).encode(), self.node.sysop_token.encode()):
                log.warning("refused a wrong sysop token")
                raise Refused("forbidden", "wrong sysop token")
            self.sysop = True
        if "guid" in req:
            self.guid = check_guid(req["guid"])
        user = await self.node.queries.hello(self.guid, req.get("nickname"), sysop=self.sysop)
        return {"guid": self.guid, "nickname": user["nickname"], "sysop": self.sysop}

    async def op_set_nickname(self, req: dict[str, Any], rid: Any) -> dict[str, Any]:
        return {"nickname": await self.node.queries.set_nickname(self.guid, req["nickname"])}

    # --- what the node knows -----------------------------------------------------------------
    async def op_status(self, req: dict[str, Any], rid: Any) -> dict[str, Any]:
        return {"status": self.node.reports.status_report()}

    async def op_peers(self, req: dict[str, Any], rid: Any) -> dict[str, Any]:
        return {"peers": self.node.reports.peers_report()}

    async def op_realms(self, req: dict[str, Any], rid: Any) -> dict[str, Any]:
        return {"realms": self.node.reports.realms_report()}

    async def op_catalog(self, req: dict[str, Any], rid: Any) -> dict[str, Any]:
        """Every realm this node knows, with its payload's form (fields, bounds, this node's
        caps): the web UI builds a form for any realm it has no panel of its own for."""
        realms = self.node.config.realms
        return {"realms": [spec.form(realms.get(name)) for name, spec in CATALOG.items()]}

    async def op_route(self, req: dict[str, Any], rid: Any) -> dict[str, Any]:
        return {"route": self.node.router.plan(req["realm"]).to_json()}

    async def op_stats(self, req: dict[str, Any], rid: Any) -> dict[str, Any]:
        return {"stats": await self.node.reports.stats_report()}

    async def op_dashboard(self, req: dict[str, Any], rid: Any) -> None:
        """Subscribe to the dashboard: the current snapshot now (with ``rid``), then the node's
        one-a-second snapshot (``{"op": "dashboard", "snapshot": ...}``, no rid) until the
        connection ends."""
        dashboards = self.node.dashboards
        try:
            token, snapshots = dashboards.subscribe()
        except OverflowError as exc:
            raise Refused("busy", f"{exc}; try again later") from None
        try:
            await self.send({"op": "dashboard", "rid": rid, "snapshot": await self.node.reports.dashboard_snapshot()})
            async for text in snapshots:
                async with self.send_lock:
                    await self.ws.send_message(text)
        finally:
            dashboards.unsubscribe(token)

    # --- queries ---------------------------------------------------------------------------------
    def _subscriber(self, rid: Any, *, tokens: bool = True) -> Any:
        async def deliver(event: dict[str, Any]) -> None:
            kind = event.get("type")
            if kind == "token" and not tokens:
                return
            if kind == "result":
                await self.send({"op": "result", "rid": rid, "result": event})
            elif kind == "error":
                await self.send(
                    {
                        "op": "error",
                        "rid": rid,
                        "code": event["code"],
                        "message": event["message"],
                        "query_id": event.get("query_id"),
                    }
                )
            else:
                await self.send({"op": "event", "rid": rid, "event": event})

        return deliver

    async def op_submit_query(self, req: dict[str, Any], rid: Any) -> None:
        stream = req.get("stream", True)
        if not isinstance(stream, bool):
            raise Refused("bad_request", "stream must be true or false")
        self._check_rate()
        subscriber = self._subscriber(rid, tokens=stream)
        query_id = await self.node.queries.submit(
            self.guid,
            req["realm"],
            req["payload"],
            sysop=self.sysop,
            subscriber=subscriber,
        )
        self._follow(query_id, subscriber)

    def _follow(self, query_id: str, subscriber: Any) -> None:
        if len(self.subscriptions) >= 64:  # forget those of queries that are over
            self.subscriptions = [(q, sub) for q, sub in self.subscriptions if self.node.queries.live(q)]
        self.subscriptions.append((query_id, subscriber))

    def _check_rate(self) -> None:
        """The per-client submission limit ([limits] in node.toml); the sysop is never limited."""
        limits = self.node.config.limits
        key = rate_key(self.client, self.guid, sysop=self.sysop, limit_loopback=limits.loopback)
        if key is None:
            return
        wait = self.node.submit_limiter.take(key)
        if wait > 0:
            self.node.metrics.rate_limited("websocket")
            if self.node.submit_limiter.first_refusal(key):  # one line per client, not per refusal
                who = f"user {self.guid}" if key[0] == "user" else f"client {self.client}"
                log.info("rate-limited %s (%g queries/min, burst %d)", who, limits.queries_per_minute, limits.burst)
            raise Refused(
                "rate_limited",
                f"more than {limits.queries_per_minute:g} queries per minute (burst {limits.burst}); "
                f"try again in {max(wait, 0.1):.1f} s",
            )

    async def op_watch(self, req: dict[str, Any], rid: Any) -> dict[str, Any] | None:
        """Follow a query (e.g. after reconnecting); a finished one answers from storage."""
        query_id = _query_id(req)
        await self.node.queries.owned(query_id, self.guid, sysop=self.sysop)
        subscriber = self._subscriber(rid)
        if self.node.queries.subscribe(query_id, subscriber):
            self._follow(query_id, subscriber)
            return None
        return await self.op_get_query(req, rid)

    async def op_get_query(self, req: dict[str, Any], rid: Any) -> dict[str, Any]:
        row, result, events = await self.node.queries.details(_query_id(req), self.guid, sysop=self.sysop)
        return {"query": self._flagged(_row(row)), "result": result, "events": events}

    async def op_report(self, req: dict[str, Any], rid: Any) -> dict[str, Any]:
        """ "This answer is wrong": held against the peer that gave it, which is spot-checked."""
        row = await self.node.queries.owned(_query_id(req), self.guid, sysop=self.sysop)
        return self.node.report_answer(row, req.get("reason", ""))

    async def op_cancel(self, req: dict[str, Any], rid: Any) -> dict[str, Any]:
        await self.node.sysop.cancel(_query_id(req), by_guid=self.guid, sysop=self.sysop)
        return {"query_id": req["query_id"], "cancelled": True}

    async def op_history(self, req: dict[str, Any], rid: Any) -> dict[str, Any]:
        user = req.get("user")
        if user is None:
            user = None if self.sysop and req.get("all") else self.guid
        else:
            user = check_guid(user)
            if user != self.guid and not self.sysop:
                raise Refused("forbidden", "only the sysop may read another user's history")
        limit = req.get("limit", 50)
        rows = await self.node.queries.history(user, limit)
        return {"history": [self._flagged(_row(r)) for r in rows]}

    def _flagged(self, row: dict[str, Any]) -> dict[str, Any]:
        """Tell the user when the peer that answered has since been caught answering wrong."""
        caught = self.node.caught_reason(row.get("executor") or "")
        if caught:
            row["suspect"] = f"answered by a peer since caught: {caught}"
        return row

    # --- sysop -----------------------------------------------------------------------------------
    async def op_users(self, req: dict[str, Any], rid: Any) -> dict[str, Any]:
        return {"users": await self.node.sysop.users()}

    async def op_ban(self, req: dict[str, Any], rid: Any) -> dict[str, Any]:
        await self.node.sysop.ban(req["guid"], True, req.get("reason", ""))
        return {"guid": req["guid"], "banned": True}

    async def op_unban(self, req: dict[str, Any], rid: Any) -> dict[str, Any]:
        await self.node.sysop.ban(req["guid"], False)
        return {"guid": req["guid"], "banned": False}

    async def op_set_realm(self, req: dict[str, Any], rid: Any) -> dict[str, Any]:
        await self.node.sysop.set_realm_enabled(req["realm"], req["enabled"])
        return {"realm": req["realm"], "enabled": req["enabled"]}

    async def op_set_peer(self, req: dict[str, Any], rid: Any) -> dict[str, Any]:
        await self.node.sysop.set_peer_blocked(req["peer_id"], req["blocked"])
        return {"peer_id": req["peer_id"], "blocked": req["blocked"]}

    async def op_audit(self, req: dict[str, Any], rid: Any) -> dict[str, Any]:
        return {"audit": await self.node.sysop.audit_log()}

    async def op_keys_create(self, req: dict[str, Any], rid: Any) -> dict[str, Any]:
        return await self.node.sysop.create_key(self.node.api_keys, req["name"])

    async def op_keys_list(self, req: dict[str, Any], rid: Any) -> dict[str, Any]:
        return {"keys": await self.node.api_keys.list()}

    async def op_keys_revoke(self, req: dict[str, Any], rid: Any) -> dict[str, Any]:
        if not await self.node.sysop.revoke_key(self.node.api_keys, req["key_id"]):
            raise Refused("not_found", f"no live key {req['key_id']}")
        return {"key_id": req["key_id"], "revoked": True}


# The JSON type of every request field (a bool is never taken for an integer), in
# realms/schema.py's terms: msgspec checks each request against its op's struct below.
QueryId = Annotated[str, Meta(pattern="^[0-9a-f]{32}$", description="32 lowercase hex digits")]
FIELDS: dict[str, Any] = {
    "guid": str,
    "nickname": str,
    "sysop_token": str,
    "realm": Literal[REALMS],  # type: ignore[valid-type]
    "payload": dict[str, Any],
    "stream": bool,
    "query_id": QueryId,
    "reason": Annotated[str, Meta(max_length=500)],
    "user": str,
    "limit": Annotated[int, Meta(ge=1, le=10000)],
    "all": bool,
    "enabled": bool,
    "peer_id": str,
    "blocked": bool,
    "name": str,
    "key_id": str,
}

# op -> (required fields, optional fields)
OPS: dict[str, tuple[set[str], set[str]]] = {
    "hello": (set(), {"guid", "nickname", "sysop_token"}),
    "set_nickname": ({"nickname"}, set()),
    "status": (set(), set()),
    "peers": (set(), set()),
    "realms": (set(), set()),
    "catalog": (set(), set()),
    "route": ({"realm"}, set()),
    "stats": (set(), set()),
    "dashboard": (set(), set()),
    "submit_query": ({"realm", "payload"}, {"stream"}),
    "watch": ({"query_id"}, set()),
    "get_query": ({"query_id"}, set()),
    "cancel": ({"query_id"}, set()),
    "report": ({"query_id"}, {"reason"}),
    "history": (set(), {"user", "limit", "all"}),
    "users": (set(), set()),
    "ban": ({"guid"}, {"reason"}),
    "unban": ({"guid"}, set()),
    "set_realm": ({"realm", "enabled"}, set()),
    "set_peer": ({"peer_id", "blocked"}, set()),
    "audit": (set(), set()),
    "keys_create": ({"name"}, set()),
    "keys_list": (set(), set()),
    "keys_revoke": ({"key_id"}, set()),
}
SYSOP_OPS = {"users", "ban", "unban", "set_realm", "set_peer", "audit", "keys_create", "keys_list", "keys_revoke"}


def _request_struct(op: str, required: set[str], optional: set[str]) -> type[msgspec.Struct]:
    """One op's request as a struct: an optional field may be absent, never null."""
    spec: list[tuple[str, Any] | tuple[str, Any, Any]] = [("op", str), ("rid", Int64 | str | UnsetType, UNSET)]
    spec += [(name, FIELDS[name]) for name in sorted(required)]
    spec += [(name, FIELDS[name] | UnsetType, UNSET) for name in sorted(optional)]
    return msgspec.defstruct(op, spec, forbid_unknown_fields=True, kw_only=True)


REQUESTS: dict[str, type[msgspec.Struct]] = {op: _request_struct(op, *fields) for op, fields in OPS.items()}


def _no_constant(name: str) -> Any:
    raise BadRequest(f"not JSON: {name} is not a number JSON allows")


def parse_request(raw: str | bytes) -> dict[str, Any]:
    """Validate one client message's shape; BadRequest names what is wrong."""
    if isinstance(raw, bytes):
        raise BadRequest("expected a JSON text message, got binary")
    try:
        req = json.loads(raw, parse_constant=_no_constant)
    except ValueError as exc:
        raise BadRequest(f"not JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("not JSON this node takes: nested too deep") from None
    if not isinstance(req, dict):
        raise BadRequest("a request is a JSON object")
    rid = req.get("rid")
    if not (rid is None or (isinstance(rid, (int, str)) and not isinstance(rid, bool))):
        raise BadRequest("rid must be an integer or a string")
    try:
        return _check_request(req)
    except BadRequest as exc:
        raise BadRequest(str(exc), rid) from None


def _check_request(req: dict[str, Any]) -> dict[str, Any]:
    op = req.get("op")
    if not isinstance(op, str) or op not in OPS:
        shown = repr(op) if isinstance(op, (str, int, float, type(None))) else f"a JSON {type(op).__name__}"
        raise BadRequest(f"unknown op {shown[:80]}; expected one of {sorted(OPS)}")
    check(req, REQUESTS[op], op, BadRequest)
    if "payload" in req:
        req["payload"] = decode_media(req["payload"])
    return req


def _query_id(req: dict[str, Any]) -> str:
    qid: str = req["query_id"]  # checked by its op's struct (QueryId)
    return qid


def _row(row: dict[str, Any]) -> dict[str, Any]:
    """A stored query for a client: the payload can hold media, so only its shape goes out."""
    out = dict(row)
    payload = out.pop("payload", None)
    if isinstance(payload, dict):
        out["prompt"] = payload.get("prompt") if isinstance(payload.get("prompt"), str) else None
    return out


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):  # media (a PNG, a WAV) travels as {"$bytes": base64}
        return {"$bytes": base64.b64encode(value).decode("ascii")}
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def decode_media(value: Any, path: str = "payload", depth: int = 0) -> Any:
    """Turn every {"$bytes": base64} in a client's payload into bytes; BadRequest if malformed."""
    if depth > 8:
        raise BadRequest(f"{path}: nested too deep")
    if isinstance(value, dict):
        if "$bytes" in value:
            if len(value) != 1 or not isinstance(value["$bytes"], str):
                raise BadRequest(f'{path}: a media value is {{"$bytes": "<base64>"}}')
            try:
                return base64.b64decode(value["$bytes"], validate=True)
            except ValueError:
                raise BadRequest(f"{path}: not valid base64") from None
        return {k: decode_media(v, f"{path}.{k}", depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_media(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
    if isinstance(value, int) and not isinstance(value, bool) and not INT64_RANGE[0] <= value <= INT64_RANGE[1]:
        raise BadRequest(f"{path}: integer out of range (at most 64 bits)")
    return value
