"""The life of a user's query on this node, from "queued" on disk to one stored result.

A query is written as ``queued`` before anything else happens, then runs in a task owned by
the node (not by the client's connection: a closed browser tab loses nothing). Status changes
are recorded with timestamps, executor and failovers. After a crash, ``resume`` runs every
unfinished query again; ``Storage.finish_query`` stores a result once, whatever happens.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgpack
import trio

from ..p2p import wire
from ..realms.queue import Priority
from ..realms.router import Event, Query, QueryFailed, RealmRouter

if TYPE_CHECKING:
    from .storage import Storage

log = logging.getLogger("rentahal.queries")

SUBSCRIBER_TIMEOUT = 10.0  # a client that does not take an event within this stops listening
MAX_SUBSCRIBERS = 8


def _number(value: Any, default: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        return default
    return float(value)

Subscriber = Callable[[Event], Awaitable[None]]
GUID_RE = re.compile(r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}\Z")
NICKNAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.\-]{0,30}[A-Za-z0-9_.\-]?\Z")


class Refused(Exception):
    """A request this node will not take: ``code`` for programs, the message for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def check_guid(guid: object) -> str:
    if not isinstance(guid, str) or not GUID_RE.match(guid):
        raise Refused("bad_request", "guid must be a UUID (32 hex digits, dashes optional)")
    return guid.replace("-", "").lower()


def check_nickname(nickname: object) -> str:
    if not isinstance(nickname, str) or not NICKNAME_RE.match(nickname):
        raise Refused(
            "bad_request",
            "nickname must be 1-32 characters: letters, digits, space, '_', '.', '-', "
            "starting with a letter or digit and not ending with a space",
        )
    return nickname


@dataclass
class ActiveQuery:
    query_id: str
    user_guid: str
    realm: str
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    subscribers: list[Subscriber] = field(default_factory=list)
    cancelled_by: str = ""
    status: str = "queued"


class QueryManager:
    def __init__(
        self,
        storage: Storage,
        router: RealmRouter,
        *,
        origin: str,
        query_deadline: float,
        max_payload_bytes: int,
        max_active_per_user: int = 64,
    ) -> None:
        self.storage = storage
        self.router = router
        self.origin = origin
        self.query_deadline = query_deadline
        self.max_payload_bytes = max_payload_bytes
        self.max_active_per_user = max_active_per_user
        self.active: dict[str, ActiveQuery] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own every query task; first resume what a previous run left unfinished."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            unfinished = await self.storage.unfinished_queries()
            for row in unfinished:
                await self.storage.set_status(row["id"], row["user_guid"], "queued", detail="resumed after restart")
                self._start(row["id"], row["user_guid"], row["realm"], row["payload"], row["priority"], row["deadline_at"])
            if unfinished:
                log.info("resumed %d unfinished quer%s", len(unfinished), "y" if len(unfinished) == 1 else "ies")
            task_status.started()
            await trio.sleep_forever()

    async def submit(
        self, user_guid: str, realm: str, payload: dict[str, Any], *, sysop: bool = False,
        subscriber: Subscriber | None = None,
    ) -> str:
        user = await self.storage.ensure_user(user_guid)
        if user["banned"]:
            reason = f": {user['ban_reason']}" if user["ban_reason"] else ""
            raise Refused("banned", f"you are banned from this node{reason}")
        size = len(msgpack.packb(payload, use_bin_type=True))
        if size > self.max_payload_bytes:
            raise Refused("too_large", f"payload is {size} bytes; this node takes at most {self.max_payload_bytes}")
        # It must also travel to a peer: check it against the wire's own rules now, not mid-route.
        try:
            wire.encode(wire.QueryRequest(
                version=wire.PROTOCOL_VERSION, query_id="check", realm=realm, payload=payload,
                deadline_ms=1, origin=self.origin,
            ))
        except wire.WireError as exc:
            raise Refused("bad_request", f"payload cannot be sent to a peer: {exc}") from None
        mine = sum(1 for a in self.active.values() if a.user_guid == user_guid)
        if mine >= self.max_active_per_user:
            raise Refused("too_many", f"you already have {mine} queries running or queued here; wait for some")
        query_id = uuid.uuid4().hex
        priority = Priority.SYSOP if sysop else Priority.NORMAL
        deadline_at = time.time() + self.query_deadline
        await self.storage.insert_query(
            query_id=query_id, user_guid=user_guid, realm=realm, payload=payload,
            priority=int(priority), deadline_at=deadline_at,
        )
        # Stored: from here on the query cannot be lost.
        self._start(query_id, user_guid, realm, payload, int(priority), deadline_at, subscriber)
        return query_id

    def _start(
        self, query_id: str, user_guid: str, realm: str, payload: dict[str, Any], priority: int,
        deadline_at: float, subscriber: Subscriber | None = None,
    ) -> None:
        assert self._nursery is not None, "QueryManager.run() is not running"
        active = ActiveQuery(query_id, user_guid, realm)
        if subscriber is not None:
            active.subscribers.append(subscriber)
        self.active[query_id] = active
        self._nursery.start_soon(self._run, active, payload, priority, deadline_at)

    async def _publish(self, active: ActiveQuery, event: Event) -> None:
        for sub in list(active.subscribers):
            try:
                with trio.fail_after(SUBSCRIBER_TIMEOUT):
                    await sub(event)
            except (Exception, trio.TooSlowError):
                # A client that went away, or stopped reading, stops listening; the query goes on.
                if sub in active.subscribers:
                    active.subscribers.remove(sub)

    async def _run(self, active: ActiveQuery, payload: dict[str, Any], priority: int, deadline_at: float) -> None:
        qid, guid = active.query_id, active.user_guid
        started = time.time()

        async def emit(event: Event) -> None:
            kind = event.get("type")
            if kind == "executor":
                active.status = "routed"
                await self.storage.set_status(
                    qid, guid, "routed", executor=event["executor"], attempts=event["attempt"]
                )
            elif kind in ("token", "progress") and active.status != "running":
                active.status = "running"
                await self.storage.set_status(qid, guid, "running")
            elif kind == "failover":
                await self.storage.set_status(
                    qid, guid, "routed", executor=event["executor"],
                    detail=f"failover: {event['kind']}: {event['message']}"[:500],
                )
            await self._publish(active, {**event, "query_id": qid})

        try:
            with active.scope:
                await self._publish(active, {"type": "queued", "query_id": qid, "realm": active.realm})
                left = deadline_at - time.time()
                if left <= 0:
                    raise QueryFailed("deadline_exceeded", "the query's deadline passed while the node was down")
                query = Query(qid, active.realm, payload, left, self.origin, priority=priority)
                result = await self.router.run(query, emit)
                stats = result.get("stats", {})
                with trio.CancelScope(shield=True):  # an answer in hand is stored and sent, cancel or not
                    stored = await self.storage.finish_query(
                        qid, guid, output=result.get("output", {}), stats=stats,
                        executor=result["executor"], failovers=result["failovers"],
                        # a peer's stats are hostile input: numbers or nothing
                        processing_ms=_number(stats.get("ms"), (time.time() - started) * 1000.0),
                        cost=_number(stats.get("cost"), 0.0),
                    )
                    active.status = "done"
                    if stored:
                        log.info(
                            "query %s (%s) answered by %s%s", qid, active.realm, result["executor"],
                            f" after failover from {', '.join(result['failovers'])}" if result["failovers"] else "",
                        )
                    await self._publish(active, {"type": "result", "query_id": qid, **result})
            if active.scope.cancelled_caught and active.status != "done":
                with trio.CancelScope(shield=True):
                    await self.storage.set_status(qid, guid, "cancelled", detail=f"by {active.cancelled_by}")
                    await self._publish(active, {"type": "error", "query_id": qid, "code": "cancelled",
                                                 "message": f"cancelled by {active.cancelled_by}"})
                log.info("query %s cancelled by %s", qid, active.cancelled_by)
        except QueryFailed as exc:
            await self._fail(active, exc.code, exc.message)
            log.info("query %s (%s) failed: %s: %s", qid, active.realm, exc.code, exc.message)
        except Exception as exc:  # a bug or hostile data must end this query only, never the node
            log.error("query %s (%s) failed inside this node: %s: %s", qid, active.realm, type(exc).__name__, exc)
            await self._fail(active, "internal", f"internal error ({type(exc).__name__})")
        finally:
            self.active.pop(qid, None)

    async def _fail(self, active: ActiveQuery, code: str, message: str) -> None:
        with trio.CancelScope(shield=True):
            await self.storage.set_status(
                active.query_id, active.user_guid, "failed", error_code=code, error_message=message[:1000]
            )
            await self._publish(active, {"type": "error", "query_id": active.query_id, "code": code, "message": message})

    def subscribe(self, query_id: str, subscriber: Subscriber) -> bool:
        active = self.active.get(query_id)
        if active is None:
            return False
        if len(active.subscribers) >= MAX_SUBSCRIBERS:
            return False
        active.subscribers.append(subscriber)
        return True

    def unsubscribe(self, query_id: str, subscriber: Subscriber) -> None:
        active = self.active.get(query_id)
        if active is not None and subscriber in active.subscribers:
            active.subscribers.remove(subscriber)

    async def cancel(self, query_id: str, *, by_guid: str | None, sysop: bool) -> None:
        active = self.active.get(query_id)
        if active is None:
            row = await self.storage.get_query(query_id)
            if row is None:
                raise Refused("not_found", f"no query {query_id}")
            raise Refused("not_running", f"query {query_id} is already {row['status']}")
        if not sysop and by_guid != active.user_guid:
            raise Refused("forbidden", "only the user who submitted a query, or the sysop, may cancel it")
        active.cancelled_by = "the sysop" if sysop and by_guid != active.user_guid else "its user"
        active.scope.cancel()
