"""The life of a user's query on this node, from "queued" on disk to one stored result.

A query is written as ``queued`` before anything else happens, then runs in a task owned by
the node (not by the client's connection: a closed browser tab loses nothing). Status changes
are kept in memory with timestamps, executor and failovers, and stored with the query's end: a
query costs two write transactions. After a crash, ``run`` resumes every unfinished query;
``Storage.finish_query`` stores a result once, whatever happens. A full disk delays the end of
a query (the user is told ``storage_full``) and never stops the node.
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
from ..realms import events as ev
from ..realms.events import Code, QueryError, StorageFailure, StorageFull, UserError
from ..realms.queue import Priority
from ..realms.router import Query, RealmRouter
from .limits import MAX_BANS_CACHED, SUBSCRIBER_TIMEOUT
from .limits import QUERY_SUBSCRIBERS as MAX_SUBSCRIBERS
from .storage import QueryEvent

if TYPE_CHECKING:
    from .metrics import Metrics
    from .storage import Storage

log = logging.getLogger("rentahal.queries")


def _number(value: Any, default: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        return default
    return float(value)


Subscriber = Callable[[dict[str, Any]], Awaitable[None]]  # the event as JSON-ready data
STORAGE_RETRY = 2.0  # seconds between tries to store an answer while storage is full
GUID_RE = re.compile(r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}\Z")
NICKNAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.\-]{0,30}[A-Za-z0-9_.\-]?\Z")


class Refused(UserError):
    """A request this node will not take: ``code`` for programs, the message for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message, code)


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
    attempt: int = 0
    executor: str | None = None
    history: list[QueryEvent] = field(default_factory=list)  # stored when the query ends

    def note(self, status: str, executor: str | None = None, detail: str = "") -> None:
        self.status = status
        self.history.append(QueryEvent(status, time.time(), executor, detail[:500]))


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
        check_payload: Callable[[str, dict[str, Any]], None] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.storage = storage
        self.metrics = metrics
        self.router = router
        self.origin = origin
        self.query_deadline = query_deadline
        self.max_payload_bytes = max_payload_bytes
        self.max_active_per_user = max_active_per_user
        self.check_payload = check_payload
        self._bans: dict[str, tuple[bool, str]] = {}  # user -> (banned, reason), as stored
        self.active: dict[str, ActiveQuery] = {}
        self._storing: dict[str, int] = {}  # user -> submissions between the cap check and _start
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own every query task; first resume what a previous run left unfinished."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            unfinished = await self.storage.unfinished_queries()
            for row in unfinished:
                active = self._start(
                    row["id"], row["user_guid"], row["realm"], row["payload"], row["priority"], row["deadline_at"]
                )
                active.note("queued", detail="resumed after restart")
            if unfinished:
                log.info("resumed %d unfinished quer%s", len(unfinished), "y" if len(unfinished) == 1 else "ies")
            task_status.started()
            await trio.sleep_forever()

    async def submit(
        self,
        user_guid: str,
        realm: str,
        payload: dict[str, Any],
        *,
        sysop: bool = False,
        subscriber: Subscriber | None = None,
    ) -> str:
        ban = self._bans.get(user_guid)
        if ban is None:  # read once, then kept: the sysop's ban and unban update it
            user = await self.storage.get_user(user_guid)
            ban = self._remember_ban(user_guid, bool(user and user["banned"]), user["ban_reason"] if user else "")
        if ban[0]:
            raise Refused("banned", f"you are banned from this node{': ' + ban[1] if ban[1] else ''}")
        size = len(msgpack.packb(payload, use_bin_type=True))
        if size > self.max_payload_bytes:
            raise Refused("too_large", f"payload is {size} bytes; this node takes at most {self.max_payload_bytes}")
        # It must also travel to a peer: check it against the wire's own rules now, not mid-route.
        try:
            wire.encode(
                wire.QueryRequest(
                    version=wire.PROTOCOL_VERSION,
                    query_id="check",
                    realm=realm,
                    payload=payload,
                    deadline_ms=1,
                    origin=self.origin,
                )
            )
        except wire.WireError as exc:
            raise Refused("bad_request", f"payload cannot be sent to a peer: {exc}") from None
        if self.check_payload is not None:
            self.check_payload(realm, payload)  # BadRequest before anything is stored
        # Counted with the submissions still being stored: the cap holds under concurrent submits.
        mine = sum(1 for a in self.active.values() if a.user_guid == user_guid) + self._storing.get(user_guid, 0)
        if mine >= self.max_active_per_user:
            raise Refused("too_many", f"you already have {mine} queries running or queued here; wait for some")
        query_id = uuid.uuid4().hex
        priority = Priority.SYSOP if sysop else Priority.NORMAL
        deadline_at = time.time() + self.query_deadline
        self._storing[user_guid] = self._storing.get(user_guid, 0) + 1
        try:
            with trio.CancelScope(shield=True):  # stored means started: a client gone meanwhile changes nothing
                await self.storage.insert_query(
                    query_id=query_id,
                    user_guid=user_guid,
                    realm=realm,
                    payload=payload,
                    priority=int(priority),
                    deadline_at=deadline_at,
                )
                # Stored: from here on the query cannot be lost.
                self._start(query_id, user_guid, realm, payload, int(priority), deadline_at, subscriber)
        finally:
            self._storing[user_guid] -= 1
            if not self._storing[user_guid]:
                del self._storing[user_guid]
        return query_id

    def _remember_ban(self, guid: str, banned: bool, reason: str) -> tuple[bool, str]:
        if len(self._bans) >= MAX_BANS_CACHED:
            self._bans.clear()
        self._bans[guid] = (banned, reason)
        return banned, reason

    def ban_changed(self, guid: str, banned: bool, reason: str) -> None:
        """The sysop banned or unbanned a user (stored already)."""
        self._remember_ban(guid, banned, reason)

    def _start(
        self,
        query_id: str,
        user_guid: str,
        realm: str,
        payload: dict[str, Any],
        priority: int,
        deadline_at: float,
        subscriber: Subscriber | None = None,
    ) -> ActiveQuery:
        assert self._nursery is not None, "QueryManager.run() is not running"
        active = ActiveQuery(query_id, user_guid, realm)
        if subscriber is not None:
            active.subscribers.append(subscriber)
        self.active[query_id] = active
        self._nursery.start_soon(self._run, active, payload, priority, deadline_at)
        return active

    async def _publish(self, active: ActiveQuery, event: ev.Event) -> None:
        """Hand the event to every subscriber as JSON-ready data (the websocket edge's shape)."""
        if not active.subscribers:
            return
        data = ev.to_dict(event, query_id=active.query_id, attempt=active.attempt)
        for sub in list(active.subscribers):
            try:
                with trio.fail_after(SUBSCRIBER_TIMEOUT):
                    await sub(data)
            except (Exception, trio.TooSlowError):
                # A client that went away, or stopped reading, stops listening; the query goes on.
                if sub in active.subscribers:
                    active.subscribers.remove(sub)

    async def _run(self, active: ActiveQuery, payload: dict[str, Any], priority: int, deadline_at: float) -> None:
        qid = active.query_id
        started = time.time()
        first_token: list[float] = []

        async def emit(event: ev.Event) -> None:
            if isinstance(event, ev.Token) and not first_token:
                first_token.append(time.time() - started)
            if isinstance(event, ev.Failover) and self.metrics is not None:
                self.metrics.failover(event.kind.value)
            if isinstance(event, ev.Routed):
                active.attempt, active.executor = event.attempt, event.executor
                active.note("routed", event.executor)
            elif isinstance(event, ev.Failover):
                active.note("routed", event.executor, f"failover: {event.kind.value}: {event.message}")
            elif active.status != "running" and (
                isinstance(event, (ev.Token, ev.Progress)) or (isinstance(event, ev.Accepted) and event.position == 0)
            ):
                active.note("running", active.executor)
            await self._publish(active, event)

        try:
            with active.scope:
                await self._publish(active, ev.Queued(active.realm))
                left = deadline_at - time.time()
                if left <= 0:
                    raise QueryError("the query's deadline passed while the node was down", Code.DEADLINE_EXCEEDED)
                query = Query(qid, active.realm, payload, left, self.origin, priority=priority)
                result = await self.router.run(query, emit)
                with trio.CancelScope(shield=True):  # an answer in hand is stored and sent, cancel or not
                    await self._store_result(active, result, started)
                if self.metrics is not None:
                    ttft = first_token[0] if first_token else None
                    self.metrics.query_ended(
                        active.realm, "done", result.executor, time.time() - started, ttft, result.stats
                    )
            if active.scope.cancelled_caught and active.status != "done":
                self._count_end(active, "cancelled")
                await self._end(active, Code.CANCELLED, f"cancelled by {active.cancelled_by}", "cancelled")
                log.info("query %s cancelled by %s", qid, active.cancelled_by)
        except QueryError as exc:
            self._count_end(active, "cancelled" if exc.code is Code.CANCELLED else "failed")
            await self._end(active, exc.code, exc.message)
            level = logging.DEBUG if exc.fault in (ev.Fault.USER, ev.Fault.NOBODY) else logging.INFO
            log.log(level, "query %s (%s) failed: %s: %s", qid, active.realm, exc.code.value, exc.message)
        except Exception as exc:  # a bug or hostile data must end this query only, never the node
            log.error("query %s (%s) failed inside this node: %s: %s", qid, active.realm, type(exc).__name__, exc)
            self._count_end(active, "failed")
            await self._end(active, Code.INTERNAL, f"internal error ({type(exc).__name__})")
        finally:
            self.active.pop(qid, None)

    def _count_end(self, active: ActiveQuery, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.query_ended(active.realm, outcome, active.executor, 0.0, None)

    async def _store_result(self, active: ActiveQuery, result: ev.Result, started: float) -> None:
        stats = result.stats
        stored = await self._persist(
            active,
            lambda: self.storage.finish_query(
                active.query_id,
                active.user_guid,
                output=result.output,
                stats=stats,
                executor=result.executor,
                failovers=list(result.failovers),
                attempts=result.attempt,
                # a peer's stats are hostile input: numbers or nothing
                processing_ms=_number(stats.get("ms"), (time.time() - started) * 1000.0),
                cost=_number(stats.get("cost"), 0.0),
                events=active.history,
            ),
        )
        active.status = "done"
        if stored:
            log.log(  # one line per query is too many for a busy node: failovers only
                logging.INFO if result.failovers else logging.DEBUG,
                "query %s (%s) answered by %s%s",
                active.query_id,
                active.realm,
                result.executor,
                f" after failover from {', '.join(result.failovers)}" if result.failovers else "",
            )
        await self._publish(active, result)

    async def _end(self, active: ActiveQuery, code: Code, message: str, status: str = "failed") -> None:
        with trio.CancelScope(shield=True):
            await self._persist(
                active,
                lambda: self.storage.end_query(
                    active.query_id,
                    active.user_guid,
                    status,
                    error_code=code.value,
                    error_message=message[:1000],
                    executor=active.executor,
                    attempts=active.attempt or None,
                    events=active.history,
                ),
            )
            await self._publish(active, ev.Failed(code, message))

    async def _persist(self, active: ActiveQuery, write: Callable[[], Awaitable[bool]]) -> bool:
        """Store the end of a query, waiting for space if storage is full: the node stays up,
        the user is told, and the answer is stored (and delivered) once the disk has room."""
        told = False
        while True:
            try:
                return await write()
            except StorageFailure as exc:
                if not isinstance(exc, StorageFull):  # not a matter of waiting: give up on it
                    log.error("query %s: cannot store its end: %s", active.query_id, exc.message)
                    return False
                if not told:
                    told = True
                    log.warning(
                        "query %s: cannot store its end (%s); retrying every %gs",
                        active.query_id,
                        exc.message,
                        STORAGE_RETRY,
                    )
                    await self._publish(active, ev.Progress(exc.code.value, 0, None))
                await trio.sleep(STORAGE_RETRY)

    def subscribe(self, query_id: str, subscriber: Subscriber) -> bool:
        active = self.active.get(query_id)
        if active is None:
            return False
        if len(active.subscribers) >= MAX_SUBSCRIBERS:
            # The oldest is most likely a client that went away without a word: it makes room.
            active.subscribers.pop(0)
        active.subscribers.append(subscriber)
        return True

    # --- users and their stored queries, as a client asks for them --------------------------------
    async def hello(self, guid: str, nickname: str | None = None, *, sysop: bool = False) -> dict[str, Any]:
        """The user ``guid`` (created if new, nickname set if given); Refused if banned, unless
        the sysop's token came with it (the sysop is never locked out of their own node)."""
        user = await self.storage.ensure_user(guid)
        if nickname is not None:
            await self.storage.set_nickname(guid, check_nickname(nickname))
            user = await self.storage.get_user(guid) or user
        if user["banned"] and not sysop:
            reason = f": {user['ban_reason']}" if user["ban_reason"] else ""
            raise Refused("banned", f"you are banned from this node{reason}")
        return dict(user)

    async def set_nickname(self, guid: str, nickname: object) -> str:
        checked = check_nickname(nickname)
        await self.storage.ensure_user(guid)
        await self.storage.set_nickname(guid, checked)
        return checked

    async def owned(self, query_id: str, guid: str, *, sysop: bool) -> dict[str, Any]:
        """The stored query, if it is ``guid``'s (or the sysop asks); else not_found, whether it
        exists or not (a user learns nothing of others' queries)."""
        row = await self.storage.get_query(query_id)
        if row is None or (row["user_guid"] != guid and not sysop):
            raise Refused("not_found", f"no query {query_id} of yours")
        return dict(row)

    async def details(self, query_id: str, guid: str, *, sysop: bool) -> tuple[dict[str, Any], Any, list[Any]]:
        """(query, result, events) of a query of ``guid``'s: stored, with what is newer in
        memory while it runs."""
        row = await self.owned(query_id, guid, sysop=sysop)
        result = await self.storage.get_result(query_id, row["user_guid"])
        events = list(await self.storage.query_events(query_id, row["user_guid"]))
        live = self.live(query_id)
        if live is not None:  # running: its newest steps are in memory until it ends
            row["status"] = live.status
            row["executor"] = live.executor or row["executor"]
            events += [
                {"query_id": query_id, "status": e.status, "at": e.at, "executor": e.executor, "detail": e.detail}
                for e in live.history
            ]
        return row, result, events

    async def history(self, user: str | None, limit: int) -> list[dict[str, Any]]:
        """A user's queries, newest first (every user's for ``None``); running ones as they are."""
        rows = [dict(r) for r in await self.storage.history(user, limit=limit)]
        for r in rows:
            live = self.live(r["id"])
            if live is not None:  # running: its status is newer in memory than on disk
                r["status"], r["executor"] = live.status, live.executor or r["executor"]
        return rows

    def live(self, query_id: str) -> ActiveQuery | None:
        """A query running now: its status and history are newer than what is stored."""
        return self.active.get(query_id)

    def unsubscribe(self, query_id: str, subscriber: Subscriber) -> None:
        active = self.active.get(query_id)
        if active is not None and subscriber in active.subscribers:
            active.subscribers.remove(subscriber)

    async def cancel(self, query_id: str, *, by_guid: str | None, sysop: bool) -> bool:
        """Cancel a running or queued query; True if the sysop cancelled another user's."""
        active = self.active.get(query_id)
        if active is None:
            row = await self.storage.get_query(query_id)
            if row is None:
                raise Refused("not_found", f"no query {query_id}")
            raise Refused("not_running", f"query {query_id} is already {row['status']}")
        if not sysop and by_guid != active.user_guid:
            raise Refused("forbidden", "only the user who submitted a query, or the sysop, may cancel it")
        as_sysop = sysop and by_guid != active.user_guid
        active.cancelled_by = "the sysop" if as_sysop else "its user"
        active.scope.cancel()
        return as_sysop
