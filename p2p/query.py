"""The query protocol on libp2p streams: the executor's side and the requester's side.

The stream code only moves bytes between the socket and the sans-IO codec in ``wire``. Every
wait on a peer has a deadline: a frozen peer never closes its stream, so "no frame for
hang_timeout" is how a hung executor is detected (the executor sends keepalives while it works).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from . import wire

log = logging.getLogger("rentahal.p2p.query")

KEEPALIVE_INTERVAL = 0.5
FIRST_FRAME_TIMEOUT = 10.0
READ_CHUNK = 64 * 1024

Event = dict[str, Any]
Emit = Callable[[Event], Awaitable[None]]


class ServiceRefusal(Exception):
    """Raised by the executor's handler to answer with an error frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class PeerQueryError(Exception):
    """A remote attempt failed: ``kind`` is dead | hung | refused | protocol."""

    def __init__(self, kind: str, code: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.code = code
        self.message = message


@dataclass(frozen=True)
class IncomingQuery:
    request: wire.QueryRequest
    peer_id: str


Handler = Callable[[IncomingQuery, Emit], Awaitable[Event]]
Abandon = Callable[[], "tuple[str, str] | None"]  # () -> (failure kind, reason) once an attempt is lost
ABANDON_POLL = 0.1
ABANDON_QUIET = 2 * KEEPALIVE_INTERVAL  # no frame for this long before a verdict counts
ViolationHook = Callable[[str, str], None]


def _stream_errors() -> tuple[type[BaseException], ...]:
    from libp2p.exceptions import BaseLibp2pError

    return (BaseLibp2pError, OSError, trio.BrokenResourceError, trio.ClosedResourceError)


async def _messages(stream: Any, decoder: wire.FrameDecoder) -> AsyncIterator[wire.Message]:
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


def event_to_message(query_id: str, event: Event) -> wire.Message | None:
    kind = event.get("type")
    if kind == "token":
        return wire.Token(query_id=query_id, text=event["text"], index=event["index"])
    if kind == "progress":
        return wire.Progress(
            query_id=query_id, stage=event["stage"], done=event["done"], total=event.get("total")
        )
    if kind == "accepted":
        return wire.Accepted(
            query_id=query_id, position=event["position"], eta_ms=event.get("eta_ms")
        )
    return None


def message_to_event(msg: wire.Message) -> Event | None:
    if isinstance(msg, wire.Token):
        return {"type": "token", "text": msg.text, "index": msg.index}
    if isinstance(msg, wire.Progress):
        if msg.stage == "keepalive":
            return None
        return {"type": "progress", "stage": msg.stage, "done": msg.done, "total": msg.total}
    if isinstance(msg, wire.Accepted):
        return {"type": "accepted", "position": msg.position, "eta_ms": msg.eta_ms}
    return None


class QueryService:
    """The executor's side: one task per incoming stream."""

    def __init__(
        self,
        handler: Handler,
        *,
        on_violation: ViolationHook | None = None,
        max_frame: int = wire.DEFAULT_MAX_FRAME,
    ) -> None:
        self.handler = handler
        self.on_violation = on_violation
        self.max_frame = max_frame

    async def handle_stream(self, stream: Any) -> None:
        """Serve one request; whatever happens ends this stream only (libp2p runs handlers in
        the connection's own task group: an escaping error would take the connection down)."""
        try:
            await self._handle(stream)
        except Exception as exc:  # stream errors arrive wrapped in an ExceptionGroup from trio
            log.info("query stream ended abnormally: %s", type(exc).__name__)
            with trio.move_on_after(1):
                try:
                    await stream.reset()
                except Exception:
                    pass

    async def _handle(self, stream: Any) -> None:
        peer_id = stream.muxed_conn.peer_id.to_base58()
        decoder = wire.FrameDecoder(max_frame=self.max_frame)
        send_lock = trio.Lock()
        last_sent = [trio.current_time()]

        async def send(msg: wire.Message) -> None:
            data = wire.encode(msg, max_frame=self.max_frame)
            async with send_lock:
                await stream.write(data)
                last_sent[0] = trio.current_time()

        messages = _messages(stream, decoder)
        try:
            with trio.fail_after(FIRST_FRAME_TIMEOUT):
                first = await messages.__anext__()
            if not isinstance(first, wire.QueryRequest):
                raise wire.InvalidField("t", f"first frame must be a request, got {type(first).__name__}")
        except (wire.WireError, StopAsyncIteration, trio.TooSlowError) as exc:
            await self._reject(stream, peer_id, exc, send)
            return
        except _stream_errors():
            return
        qid = first.query_id

        async def emit(event: Event) -> None:
            msg = event_to_message(qid, event)
            if msg is not None:
                await send(msg)

        async def keepalive() -> None:
            while True:
                await trio.sleep(KEEPALIVE_INTERVAL)
                if trio.current_time() - last_sent[0] >= KEEPALIVE_INTERVAL:
                    await send(wire.Progress(query_id=qid, stage="keepalive", done=0, total=None))

        async def watch_requester(cancel: trio.CancelScope) -> None:
            # Any frame after the request is a Cancel (or a violation); EOF means the requester
            # is gone: either way the work stops.
            try:
                async for msg in messages:
                    if not isinstance(msg, wire.Cancel):
                        self._violation(peer_id, f"unexpected {type(msg).__name__} frame")
                    break
            except wire.WireError as exc:
                self._violation(peer_id, str(exc))
            except _stream_errors():
                pass
            cancel.cancel()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(keepalive)
                nursery.start_soon(watch_requester, nursery.cancel_scope)
                try:
                    with trio.fail_after(first.deadline_ms / 1000.0):
                        result = await self.handler(IncomingQuery(first, peer_id), emit)
                    try:
                        answer: wire.Message = wire.Result(
                            query_id=qid, output=result.get("output", {}), stats=result.get("stats", {})
                        )
                        wire.encode(answer, max_frame=self.max_frame)
                    except wire.WireError as exc:  # e.g. a result larger than a frame
                        log.error("query %s: result cannot be sent: %s", qid, exc)
                        answer = wire.Error(query_id=qid, code=wire.ErrorCode.INTERNAL, message=f"result cannot be sent: {exc}"[:1000])
                    await send(answer)
                except ServiceRefusal as exc:
                    await send(wire.Error(query_id=qid, code=wire.ErrorCode(exc.code), message=exc.message[:1000]))
                except trio.TooSlowError:
                    await send(
                        wire.Error(
                            query_id=qid,
                            code=wire.ErrorCode.DEADLINE_EXCEEDED,
                            message=f"deadline of {first.deadline_ms} ms passed",
                        )
                    )
                nursery.cancel_scope.cancel()
            with trio.move_on_after(2):
                await stream.close()
        except _stream_errors() as exc:
            log.info("query %s from %s: stream lost (%s)", qid, peer_id, type(exc).__name__)

    def _violation(self, peer_id: str, reason: str) -> None:
        log.warning("protocol violation by %s: %s", peer_id, reason)
        if self.on_violation is not None:
            self.on_violation(peer_id, reason)

    async def _reject(self, stream: Any, peer_id: str, exc: BaseException, send: Any) -> None:
        if isinstance(exc, wire.WireError):
            reason = str(exc)
            err = wire.error_for(exc)
        elif isinstance(exc, trio.TooSlowError):
            reason = "no request within the first-frame timeout"
            err = wire.Error(query_id="", code=wire.ErrorCode.BAD_REQUEST, message=reason)
        else:
            reason = "stream closed before a request"
            err = None
        self._violation(peer_id, reason)
        with trio.move_on_after(1):
            try:
                if err is not None and not isinstance(exc, wire.FrameTooLarge):
                    await send(err)
                await stream.reset()
            except _stream_errors():
                pass


class QueryClient:
    """The requester's side: send one request to a peer and relay its events."""

    def __init__(self, host: Any, origin: str, *, dial_timeout: float, max_frame: int = wire.DEFAULT_MAX_FRAME) -> None:
        self.host = host
        self.origin = origin
        self.dial_timeout = dial_timeout
        self.max_frame = max_frame

    async def execute(
        self,
        peer_id: str,
        *,
        query_id: str,
        realm: str,
        payload: dict[str, Any],
        deadline_s: float,
        emit: Emit,
        hang_timeout: float,
        abandon: Abandon | None = None,
    ) -> Event:
        """Run a query on ``peer_id``. ``abandon``, polled while waiting for the next frame,
        returns (kind, reason) once the attempt is known lost (the peer went stale or its
        connection closed): the attempt then ends at once instead of at ``hang_timeout``."""
        from libp2p.peer.id import ID

        request = wire.QueryRequest(
            version=wire.PROTOCOL_VERSION,
            query_id=query_id,
            realm=realm,
            payload=payload,
            deadline_ms=max(1, int(deadline_s * 1000)),
            origin=self.origin,
        )
        try:
            frame = wire.encode(request, max_frame=self.max_frame)
        except wire.WireError as exc:
            raise PeerQueryError("refused", "bad_request", f"request cannot be sent: {exc}") from None
        try:
            with trio.fail_after(self.dial_timeout):
                stream = await self.host.new_stream(ID.from_base58(peer_id), [wire.PROTOCOL_ID])
            with trio.fail_after(hang_timeout):
                await stream.write(frame)
        except trio.TooSlowError:
            raise PeerQueryError("hung", "busy", f"could not open a stream within {self.dial_timeout:g}s") from None
        except _stream_errors() as exc:
            raise PeerQueryError("dead", "busy", f"could not open a stream: {exc or type(exc).__name__}") from None
        try:
            answer = await self._read_answer(stream, query_id, emit, hang_timeout, abandon)
        except BaseException:
            # Cancelled, hung or broken: tell the executor (best effort) and drop the stream.
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                try:
                    await stream.write(wire.encode(wire.Cancel(query_id=query_id)))
                except _stream_errors():
                    pass
                try:
                    await stream.reset()
                except _stream_errors():
                    pass
            raise
        with trio.move_on_after(1):  # done with this stream: don't leave it half-open
            try:
                await stream.close()
            except _stream_errors():
                pass
        return answer

    async def _read_answer(
        self, stream: Any, query_id: str, emit: Emit, hang_timeout: float, abandon: Abandon | None
    ) -> Event:
        decoder = wire.FrameDecoder(max_frame=self.max_frame)
        messages = _messages(stream, decoder)
        waiting: list[trio.CancelScope] = []  # the current read, the only thing the watcher cancels
        lost: list[tuple[str, str]] = []

        last_frame = [trio.current_time()]

        async def watch() -> None:
            assert abandon is not None
            while not lost:
                await trio.sleep(ABANDON_POLL)
                # Frames still arriving outrank what anyone says about the executor.
                if trio.current_time() - last_frame[0] < ABANDON_QUIET:
                    continue
                try:
                    verdict = abandon()
                except Exception as exc:  # a bug in the check must not fail the query
                    log.debug("abandon check failed: %s", exc)
                    continue
                if verdict is not None:
                    lost.append(verdict)
                    for scope in waiting:
                        scope.cancel()

        failure: Exception | None = None
        async with trio.open_nursery() as nursery:
            if abandon is not None:
                nursery.start_soon(watch)
            try:
                answer = await self._read_loop(messages, query_id, emit, hang_timeout, waiting, lost, last_frame)
            except Exception as exc:  # raised outside the nursery: not wrapped in a group
                failure = exc
            finally:
                nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure
        return answer

    async def _read_loop(
        self, messages: Any, query_id: str, emit: Emit, hang_timeout: float,
        waiting: list[trio.CancelScope], lost: list[tuple[str, str]], last_frame: list[float],
    ) -> Event:
        while True:
            try:
                with trio.CancelScope() as scope:
                    if lost:
                        scope.cancel()
                    waiting[:] = [scope]
                    with trio.fail_after(hang_timeout):
                        msg = await messages.__anext__()
                waiting.clear()
                last_frame[0] = trio.current_time()
                if scope.cancelled_caught:
                    kind, reason = lost[0]
                    raise PeerQueryError(kind, "deadline_exceeded", f"attempt abandoned: {reason}")
            except trio.TooSlowError:
                raise PeerQueryError("hung", "deadline_exceeded", f"no frame for {hang_timeout:g}s") from None
            except StopAsyncIteration:
                raise PeerQueryError("dead", "backend_failed", "stream ended before a result") from None
            except wire.WireError as exc:
                raise PeerQueryError("protocol", exc.code.value, f"malformed answer: {exc}") from None
            except _stream_errors() as exc:
                raise PeerQueryError("dead", "backend_failed", f"stream lost ({type(exc).__name__})") from None
            if msg.query_id != query_id and not (isinstance(msg, wire.Error) and msg.query_id == ""):
                raise PeerQueryError("protocol", "bad_request", f"answer for another query {msg.query_id!r}")
            if isinstance(msg, wire.Result):
                return {"output": msg.output, "stats": msg.stats}
            if isinstance(msg, wire.Error):
                raise PeerQueryError("refused", msg.code.value, msg.message)
            event = message_to_event(msg)
            if event is not None:
                await emit(event)
