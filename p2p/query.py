"""The query protocol on libp2p streams: a thin adapter around ``conversation``.

Queries between two peers share one long-lived stream (frames carry ``query_id``). Every stream
has exactly one writer task, fed by a channel: no task is ever cancelled inside a write, which
on py-libp2p 0.8.1's Noise would kill the whole connection (a cancelled write leaves a nonce
used). A broken stream fails only the queries it carried.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from ..node.limits import (
    ABANDON_POLL,
    DEFAULT_MAX_FRAME,
    FRAME_BUFFER_PER_PEER,
    FRAME_BUFFER_TOTAL,
    IDLE_CLOSE,
    MAX_ACTIVE_PER_STREAM,
    MAX_BUFFERED_EVENTS,
    MAX_STREAMS_PER_PEER,
    RESPONDER_QUEUE,
    WRITE_BATCH,
)
from ..node.limits import FRAME_FREE_BELOW as FREE_BELOW
from ..realms import events as ev
from ..realms.events import Code, ExecutorFailure, FailureKind
from . import conversation as conv
from . import wire
from .budget import ByteBudget, Counter
from .host import libp2p_id, quietly

log = logging.getLogger("rentahal.p2p.query")

READ_CHUNK = 64 * 1024
ABANDON_QUIET = 2 * conv.KEEPALIVE  # no frame for this long before an outside verdict counts

Emit = Callable[[ev.StreamEvent], Awaitable[None]]
Verdict = Callable[[str], "tuple[FailureKind, str] | None"]  # peer -> why its attempts are lost
ViolationHook = Callable[[str, str], None]
AsyncViolationHook = Callable[[str, str], Awaitable[None]]


def stream_errors() -> tuple[type[BaseException], ...]:
    from libp2p.exceptions import BaseLibp2pError

    return (BaseLibp2pError, OSError, trio.BrokenResourceError, trio.ClosedResourceError)


async def _messages(stream: Any, decoder: wire.FrameDecoder) -> Any:
    """Yield messages from ``stream`` until EOF; WireError propagates."""
    from libp2p.network.stream.exceptions import StreamEOF

    while True:
        msg = decoder.next_message()
        if msg is not None:
            yield msg
            continue
        try:
            data = await stream.read(READ_CHUNK)
        except StreamEOF:
            data = b""
        if not data:
            decoder.eof()
            return
        decoder.feed(data)


class FrameWriter:
    """The one task that writes to a stream. Others queue encoded frames; it writes whatever
    has queued up in one go. A write error marks the writer broken and ends ``run``."""

    def __init__(self, stream: Any, capacity: float, max_frame: int) -> None:
        self.stream = stream
        self.max_frame = max_frame
        self._send, self._receive = trio.open_memory_channel[bytes](capacity)
        self.broken: BaseException | None = None

    def encode(self, msg: wire.Message) -> bytes:
        try:
            return wire.encode(msg, max_frame=self.max_frame)
        except wire.WireError as exc:
            raise ev.LocalProtocolError(f"cannot send {type(msg).__name__}: {exc}", exc.code) from None

    async def send(self, msg: wire.Message) -> None:
        """Queue a frame, waiting while the queue is full (the peer reads slowly)."""
        await self._send.send(self.encode(msg))

    def send_nowait(self, msg: wire.Message, frame: bytes | None = None) -> bool:
        """Queue a frame if there is room; False if not (or the writer is gone)."""
        try:
            self._send.send_nowait(frame if frame is not None else self.encode(msg))
            return True
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            return False

    async def run(self) -> None:
        try:
            async for data in self._receive:
                batch = [data]
                size = len(data)
                while size < WRITE_BATCH:
                    try:
                        more = self._receive.receive_nowait()
                    except trio.WouldBlock:
                        break
                    batch.append(more)
                    size += len(more)
                await self.stream.write(b"".join(batch) if len(batch) > 1 else data)
        except stream_errors() as exc:
            self.broken = exc
        finally:
            self._receive.close()


# --- the executor's side -----------------------------------------------------------------------
@dataclass(frozen=True)
class IncomingQuery:
    request: wire.QueryRequest
    peer_id: str


Handler = Callable[[IncomingQuery, Emit], Awaitable[ev.Result]]


class QueryService:
    """Serves the queries peers send on their streams to this node."""

    def __init__(
        self,
        handler: Handler,
        *,
        on_violation: AsyncViolationHook | None = None,
        refuse: Callable[[str], bool] | None = None,
        max_frame: int = DEFAULT_MAX_FRAME,
        max_active: int = MAX_ACTIVE_PER_STREAM,
        max_streams_per_peer: int = MAX_STREAMS_PER_PEER,
        frame_budget: ByteBudget | None = None,
    ) -> None:
        self.handler = handler
        self.on_violation = on_violation  # counts, logs and, past a limit, drops the peer
        self.refuse = refuse  # a peer whose streams are reset unread (blocked)
        self.max_frame = max_frame
        self.max_active = max_active
        # Frames of FREE_BELOW bytes or more are buffered only once reserved here.
        self.budget = frame_budget or ByteBudget(FRAME_BUFFER_TOTAL, FRAME_BUFFER_PER_PEER)
        self.streams = Counter(max_streams_per_peer)

    async def handle_stream(self, stream: Any) -> None:
        """Serve one stream until the requester closes it; whatever happens ends this stream
        only (libp2p runs handlers in the connection's task group)."""
        peer_id = stream.muxed_conn.peer_id.to_base58()
        if self.refuse is not None and self.refuse(peer_id):
            await quietly(stream.reset)
            return
        if not self.streams.take(peer_id):
            await quietly(stream.reset)
            await self._violation(peer_id, f"more than {self.streams.per_key} query streams open at once")
            return
        try:
            await self._serve(stream, peer_id)
        except wire.WireError as exc:
            await self._violation(peer_id, str(exc))
            writer = FrameWriter(stream, 1, self.max_frame)
            if not isinstance(exc, wire.FrameTooLarge):
                with trio.move_on_after(1):
                    try:
                        await stream.write(writer.encode(wire.error_for(exc)))
                    except Exception:
                        pass
            await quietly(stream.reset)
        except Exception as exc:  # stream errors arrive wrapped in an ExceptionGroup from trio
            log.debug("query stream from %s ended: %s", peer_id, type(exc).__name__)
            await quietly(stream.reset)
        finally:
            self.streams.give(peer_id)

    async def _serve(self, stream: Any, peer_id: str) -> None:
        responder = conv.Responder(max_active=self.max_active)
        writer = FrameWriter(stream, RESPONDER_QUEUE, self.max_frame)
        scopes: dict[str, trio.CancelScope] = {}
        violation: list[str] = []
        failure: Exception | None = None
        decoder = wire.FrameDecoder(max_frame=self.max_frame, budget=self.budget, key=peer_id, free_below=FREE_BELOW)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write, writer, nursery.cancel_scope)
            started = [trio.Event()]
            nursery.start_soon(self._keepalives, responder, writer, started)
            try:
                async for msg in _messages(stream, decoder):
                    for action in responder.receive(msg, trio.current_time()):
                        if isinstance(action, conv.Start):
                            scopes[action.request.query_id] = scope = trio.CancelScope()
                            nursery.start_soon(self._run, action.request, peer_id, responder, writer, scope, scopes)
                            started[0].set()
                            started[0] = trio.Event()
                        elif isinstance(action, conv.Stop):
                            scopes[action.query_id].cancel()
                        elif isinstance(action, conv.Send):
                            writer.send_nowait(action.message)
                        elif isinstance(action, conv.Reset):
                            violation.append(action.reason)
                    if violation:
                        break
            except Exception as exc:  # raised outside the nursery, not wrapped in a group
                failure = exc
            finally:
                decoder.release()  # an unfinished frame's reservation, however the stream ended
            # EOF or a violation: the requester is gone or unwelcome; its queries stop.
            nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure
        if violation:
            await self._violation(peer_id, violation[0])
            await quietly(stream.reset)
        else:
            with trio.move_on_after(1):
                try:
                    await stream.close()
                except Exception:
                    pass

    @staticmethod
    async def _write(writer: FrameWriter, session: trio.CancelScope) -> None:
        await writer.run()
        session.cancel()  # the stream cannot carry answers any more

    @staticmethod
    async def _keepalives(responder: conv.Responder, writer: FrameWriter, started: list[trio.Event]) -> None:
        while True:
            due = responder.next_deadline()
            if due is None:  # an idle stream: nothing to keep alive until a query starts
                await started[0].wait()
                continue
            await trio.sleep_until(due)
            for action in responder.tick(trio.current_time()):
                if isinstance(action, conv.Send):
                    writer.send_nowait(action.message)  # a full queue is busy enough to need none

    async def _run(
        self,
        req: wire.QueryRequest,
        peer_id: str,
        responder: conv.Responder,
        writer: FrameWriter,
        scope: trio.CancelScope,
        scopes: dict[str, trio.CancelScope],
    ) -> None:
        qid = req.query_id

        async def emit(event: ev.StreamEvent) -> None:
            await writer.send(conv.to_message(qid, event))
            responder.sent(qid, trio.current_time())

        answer: wire.Message | None = None
        try:
            with scope:  # cancelled: the requester withdrew, no answer is wanted
                try:
                    with trio.fail_after(req.deadline_ms / 1000.0):
                        result = await self.handler(IncomingQuery(req, peer_id), emit)
                    answer = wire.Result(qid, result.output, result.stats)
                    writer.encode(answer)  # e.g. a result larger than a frame
                except ev.LocalProtocolError as exc:
                    log.error("query %s: result cannot be sent: %s", qid, exc)
                    answer = wire.Error(qid, Code.INTERNAL, f"result cannot be sent: {exc}"[:1000])
                except ev.QueryError as exc:
                    answer = conv.error_message(qid, exc)
                except trio.TooSlowError:
                    answer = wire.Error(qid, Code.DEADLINE_EXCEEDED, f"deadline of {req.deadline_ms} ms passed")
                await writer.send(answer)
        finally:
            responder.finished(qid)
            scopes.pop(qid, None)

    async def _violation(self, peer_id: str, reason: str) -> None:
        if self.on_violation is not None:
            await self.on_violation(peer_id, reason)
        else:
            log.warning("protocol violation by %s: %s", peer_id, reason)


# --- the requester's side ----------------------------------------------------------------------
class _Session:
    """This node's stream to one peer, with the attempts running on it."""

    def __init__(self, peer_id: str, stream: Any, conversation: conv.Requester, max_frame: int) -> None:
        self.peer_id = peer_id
        self.stream = stream
        self.conv = conversation
        self.writer = FrameWriter(stream, math.inf, max_frame)
        self.waiters: dict[str, trio.MemorySendChannel[conv.Action]] = {}
        self.changed = trio.Event()
        self.idle_since = trio.current_time()
        self.done = False

    def dispatch(self, actions: list[conv.Action]) -> None:
        for action in actions:
            if isinstance(action, conv.Send):
                self.writer.send_nowait(action.message, action.frame)  # unbounded: never refused while open
            elif isinstance(action, conv.Reset):
                log.warning("protocol violation by executor %s: %s", self.peer_id, action.reason)
            else:
                waiter = self.waiters.get(action.query_id)  # type: ignore[union-attr]
                if waiter is not None:
                    try:
                        waiter.send_nowait(action)
                    except trio.WouldBlock:  # this node's consumer fell far behind
                        self.dispatch(self.conv.cancel(action.query_id))  # type: ignore[union-attr]
                        waiter.close()
        self.changed.set()
        self.changed = trio.Event()


class QueryClient:
    """Runs this node's attempts on peers, one shared stream per peer."""

    def __init__(
        self,
        host: Any,
        origin: str,
        *,
        dial_timeout: float,
        first_progress: float,
        hang_timeout: float,
        verdict: Verdict | None = None,
        on_broken: ViolationHook | None = None,
        max_frame: int = DEFAULT_MAX_FRAME,
    ) -> None:
        self.host = host
        self.origin = origin
        self.dial_timeout = dial_timeout
        self.first_progress = first_progress
        self.hang_timeout = hang_timeout
        self.verdict = verdict
        self.on_broken = on_broken  # (peer, reason): its stream broke (not closed by either side)
        self.max_frame = max_frame
        self.sessions: dict[str, _Session] = {}
        self.keep: set[str] = set()  # peers whose stream stays open while idle (see watch)
        self._opening: dict[str, trio.Lock] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the sessions' tasks."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    async def _session(self, peer_id: str) -> _Session:
        session = self.sessions.get(peer_id)
        if session is not None and not session.done:
            return session
        lock = self._opening.setdefault(peer_id, trio.Lock())
        async with lock:
            session = self.sessions.get(peer_id)
            if session is not None and not session.done:
                return session
            try:
                with trio.fail_after(self.dial_timeout):
                    stream = await self.host.new_stream(libp2p_id(peer_id), [wire.PROTOCOL_ID])
            except trio.TooSlowError:
                raise ExecutorFailure(
                    f"could not open a stream within {self.dial_timeout:g}s", Code.BUSY, kind=FailureKind.HUNG
                ) from None
            except stream_errors() as exc:
                raise ExecutorFailure(
                    f"could not open a stream: {exc or type(exc).__name__}", Code.UNREACHABLE, kind=FailureKind.DEAD
                ) from None
            finally:
                if not lock.statistics().tasks_waiting:
                    self._opening.pop(peer_id, None)
            session = _Session(
                peer_id,
                stream,
                conv.Requester(self.origin, self.first_progress, self.hang_timeout, self.max_frame),
                self.max_frame,
            )
            self.sessions[peer_id] = session
            assert self._nursery is not None, "QueryClient.run() is not running"
            self._nursery.start_soon(self._run_session, session)
            return session

    async def _run_session(self, session: _Session) -> None:
        reason = "closed"
        ended_by_peer = ""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_writer, session, nursery.cancel_scope)
                nursery.start_soon(self._timers, session, nursery.cancel_scope)
                try:
                    async for msg in _messages(session.stream, wire.FrameDecoder(max_frame=self.max_frame)):
                        session.dispatch(session.conv.receive(msg, trio.current_time()))
                        if session.conv.broken:
                            reason = session.conv.broken
                            break
                    else:
                        reason = ended_by_peer = "the executor closed the stream"
                except wire.WireError as exc:
                    reason = f"malformed answer: {exc}"
                    session.dispatch(session.conv.violation(reason))
                except stream_errors() as exc:
                    reason = f"{type(exc).__name__}"
                    ended_by_peer = f"its stream broke ({reason})"
                nursery.cancel_scope.cancel()
            # The connection is likely gone, and libp2p announces that ~0.2 s later: the node
            # need not wait for it.
            if ended_by_peer and self.on_broken is not None:
                self.on_broken(session.peer_id, ended_by_peer)
        finally:
            session.done = True
            if self.sessions.get(session.peer_id) is session:
                del self.sessions[session.peer_id]
                self.keep.discard(session.peer_id)  # watched again once it is live again
            session.dispatch(session.conv.lost(reason))
            await quietly(session.stream.reset)

    @staticmethod
    async def _watch_writer(session: _Session, scope: trio.CancelScope) -> None:
        await session.writer.run()
        scope.cancel()

    async def _timers(self, session: _Session, scope: trio.CancelScope) -> None:
        """Hang and first-progress budgets; outside verdicts on the peer; idle close."""
        c = session.conv
        while True:
            now = trio.current_time()
            if not c.active:
                if session.peer_id in self.keep:  # watched: held open while idle, however long
                    with trio.move_on_after(IDLE_CLOSE):  # (and `keep` looked at again now and then)
                        await session.changed.wait()
                    continue
                if now - session.idle_since >= IDLE_CLOSE:
                    scope.cancel()
                    return
                with trio.move_on_at(session.idle_since + IDLE_CLOSE):
                    await session.changed.wait()
                continue
            due = c.next_deadline()
            wake = now + ABANDON_POLL if self.verdict is not None else (due or now + 1.0)
            with trio.move_on_at(min(due, wake) if due is not None else wake):
                await session.changed.wait()
            now = trio.current_time()
            session.dispatch(c.tick(now))
            if self.verdict is not None and c.active:
                verdict = self.verdict(session.peer_id)
                if verdict is not None:
                    for qid in list(c.active):
                        # Frames still arriving outrank what anyone says about the executor.
                        if c.quiet_for(qid, now) >= ABANDON_QUIET:
                            session.dispatch(c.abandon(qid, *verdict))
            if not c.active:
                session.idle_since = now

    async def watch(self, peer_id: str) -> None:
        """Hold a stream open to ``peer_id`` while idle: the first sign of a dead connection is
        this stream breaking (reported through ``on_broken`` at once), and the next query to it
        needs no stream set-up. Errors are the caller's to ignore."""
        self.keep.add(peer_id)
        try:
            await self._session(peer_id)
        except ExecutorFailure:
            self.keep.discard(peer_id)
            raise

    async def execute(
        self,
        peer_id: str,
        *,
        query_id: str,
        realm: str,
        payload: dict[str, Any],
        deadline_s: float,
        emit: Emit,
    ) -> ev.Result:
        """Run one attempt on ``peer_id``: stream events to ``emit``, return its result or raise
        ExecutorFailure (LocalProtocolError if the request itself cannot be sent)."""
        session = await self._session(peer_id)
        send, receive = trio.open_memory_channel[conv.Action](MAX_BUFFERED_EVENTS)
        session.waiters[query_id] = send
        try:
            session.dispatch(session.conv.start(query_id, realm, payload, deadline_s, trio.current_time()))
            async for action in receive:
                if isinstance(action, conv.Deliver):
                    await emit(action.event)
                elif isinstance(action, conv.Complete):
                    return action.result
                elif isinstance(action, conv.Fail):
                    raise action.failure
            raise ev.QueryError("this node fell behind reading the answer", Code.INTERNAL)
        finally:
            if session.waiters.get(query_id) is send:
                del session.waiters[query_id]
            if query_id in session.conv.active:  # cancelled or given up here: tell the executor
                session.dispatch(session.conv.cancel(query_id))
