"""The query conversation as sans-IO state machines, one per stream and side.

Both sides share one long-lived stream per peer pair; frames carry ``query_id``, so any number
of queries run on it at once. Nothing here touches a socket or a clock: the adapter in
``query.py`` feeds frames (``receive``) and time (``tick``) in, and carries out the actions
that come back — frames to send, events to deliver, queries to start, stop, complete or fail.

Requester rules (``Requester``):

* an attempt must show progress within ``first_progress`` seconds: an ``accepted``, a token or a
  progress report. Keepalives prove the peer is alive, not that it is working on the query;
* once it has, any frame at all must arrive at least every ``hang_timeout`` seconds (the
  executor sends a keepalive every ``KEEPALIVE`` seconds while it works);
* a frame for a query that this side never started is a protocol violation: every attempt on
  the stream fails and the stream must be reset. Frames for a query it finished or gave up
  moments ago are ignored (the executor may not have seen the cancel yet).

Executor rules (``Responder``): a request starts a query unless its id is in use or the stream
already carries ``max_active`` queries; a cancel stops one; anything else from the requester is
a violation; every running query that sent nothing for ``KEEPALIVE`` seconds gets a keepalive.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from ..node.limits import DEFAULT_MAX_FRAME, MAX_DEADLINE_MS
from ..realms import events as ev
from ..realms.events import Code, ExecutorFailure, FailureKind
from . import wire

KEEPALIVE = 0.5
KEEPALIVE_STAGE = "keepalive"
RECENTLY_DONE = 256  # finished query ids remembered, for their late frames


# --- actions ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Send:
    message: wire.Message
    frame: bytes | None = None  # the message already encoded (a request is checked by encoding it)


@dataclass(frozen=True, slots=True)
class Deliver:
    query_id: str
    event: ev.StreamEvent


@dataclass(frozen=True, slots=True)
class Complete:
    query_id: str
    result: ev.Result


@dataclass(frozen=True, slots=True)
class Fail:
    query_id: str
    failure: ExecutorFailure


@dataclass(frozen=True, slots=True)
class Reset:
    """The stream is unusable (a violation by the peer): close it hard."""

    reason: str


@dataclass(frozen=True, slots=True)
class Start:
    request: wire.QueryRequest


@dataclass(frozen=True, slots=True)
class Stop:
    query_id: str


Action = Send | Deliver | Complete | Fail | Reset | Start | Stop


def _stream_event(msg: wire.Message) -> ev.StreamEvent | None:
    if isinstance(msg, wire.Token):
        return ev.Token(msg.text, msg.index)
    if isinstance(msg, wire.Progress):
        return None if msg.stage == KEEPALIVE_STAGE else ev.Progress(msg.stage, msg.done, msg.total)
    if isinstance(msg, wire.Accepted):
        return ev.Accepted(msg.position, msg.eta_ms)
    return None


def to_message(query_id: str, event: ev.StreamEvent) -> wire.Message:
    if isinstance(event, ev.Token):
        return wire.Token(query_id, event.text, event.index)
    if isinstance(event, ev.Progress):
        return wire.Progress(query_id, event.stage, event.done, event.total)
    return wire.Accepted(query_id, event.position, event.eta_ms)


def error_message(query_id: str, exc: ev.QueryError) -> wire.Error:
    """The Error frame for a failure; codes that may not travel become ``internal``."""
    code = exc.code if exc.code.on_wire else Code.INTERNAL
    retry = getattr(exc, "retry_after", None)
    return wire.Error(
        query_id,
        code,
        exc.message[: wire.MAX_ERROR_MESSAGE],
        None if retry is None else max(0, min(int(retry * 1000), MAX_DEADLINE_MS)),
    )


# --- the requester's side ----------------------------------------------------------------------
@dataclass
class _Attempt:
    started: float
    last_frame: float
    progressed: bool = False


@dataclass
class Requester:
    """Queries this node runs on one peer over one stream."""

    origin: str
    first_progress: float
    hang_timeout: float
    max_frame: int = DEFAULT_MAX_FRAME
    active: dict[str, _Attempt] = field(default_factory=dict)
    _done: OrderedDict[str, None] = field(default_factory=OrderedDict)
    broken: str = ""

    def start(self, query_id: str, realm: str, payload: dict[str, Any], deadline_s: float, now: float) -> list[Action]:
        """Begin an attempt. Raises LocalProtocolError if the request cannot be sent."""
        if self.broken:
            return [
                Fail(
                    query_id, ExecutorFailure(f"stream lost: {self.broken}", Code.BACKEND_FAILED, kind=FailureKind.DEAD)
                )
            ]
        if query_id in self.active:
            raise ev.LocalProtocolError(f"query {query_id} is already running on this stream")
        request = wire.QueryRequest(
            version=wire.PROTOCOL_VERSION,
            query_id=query_id,
            realm=realm,
            payload=payload,
            deadline_ms=max(1, min(int(deadline_s * 1000), MAX_DEADLINE_MS)),
            origin=self.origin,
        )
        try:
            frame = wire.encode(request, max_frame=self.max_frame)
        except wire.WireError as exc:
            raise ev.LocalProtocolError(f"request cannot be sent: {exc}", exc.code) from None
        self.active[query_id] = _Attempt(now, now)
        return [Send(request, frame)]

    def _finish(self, query_id: str) -> None:
        self.active.pop(query_id, None)
        self._done[query_id] = None
        while len(self._done) > RECENTLY_DONE:
            self._done.popitem(last=False)

    def _fail(
        self, query_id: str, message: str, code: Code, kind: FailureKind, retry_after: float | None = None
    ) -> Fail:
        self._finish(query_id)
        return Fail(query_id, ExecutorFailure(message, code, kind=kind, retry_after=retry_after))

    def violation(self, reason: str) -> list[Action]:
        """The executor broke the protocol: every attempt on the stream fails; reset it."""
        self.broken = reason
        out: list[Action] = [
            self._fail(q, f"protocol violation: {reason}", Code.PROTOCOL_ERROR, FailureKind.PROTOCOL)
            for q in list(self.active)
        ]
        return out + [Reset(reason)]

    def receive(self, msg: wire.Message, now: float) -> list[Action]:
        qid = msg.query_id
        attempt = self.active.get(qid)
        if attempt is None:
            if qid in self._done:
                return []  # late news about a query that is over here
            if isinstance(msg, wire.Error) and qid == "":
                # The executor could not read our request's id: nothing on this stream can go on.
                return self.violation(f"the executor refused the stream: {msg.code.value}: {msg.message}")
            return self.violation(f"{type(msg).__name__} frame for unknown query {qid!r}")
        attempt.last_frame = now
        if isinstance(msg, wire.Result):
            try:
                ev.check_finite(msg.stats)
                ev.check_finite(msg.output)
            except ev.RemoteProtocolError as exc:
                return [self._fail(qid, f"malformed answer: {exc}", Code.PROTOCOL_ERROR, FailureKind.PROTOCOL)]
            self._finish(qid)
            return [Complete(qid, ev.Result(msg.output, msg.stats))]
        if isinstance(msg, wire.Error):
            retry = None if msg.retry_after_ms is None else msg.retry_after_ms / 1000.0
            return [self._fail(qid, msg.message, msg.code, FailureKind.REFUSED, retry)]
        if isinstance(msg, (wire.QueryRequest, wire.Cancel)):
            return self.violation(f"an executor sent a {type(msg).__name__} frame")
        event = _stream_event(msg)
        if event is None:
            return []
        attempt.progressed = True
        return [Deliver(qid, event)]

    def cancel(self, query_id: str) -> list[Action]:
        """This side gives up on an attempt (its deadline, a cancel, a verdict on the peer)."""
        if query_id not in self.active:
            return []
        self._finish(query_id)
        return [] if self.broken else [Send(wire.Cancel(query_id))]

    def abandon(self, query_id: str, kind: FailureKind, reason: str) -> list[Action]:
        """Fail an attempt on outside evidence (the peer went stale or disconnected)."""
        if query_id not in self.active:
            return []
        return self._give_up(query_id, f"attempt abandoned: {reason}", kind)

    def _give_up(self, query_id: str, reason: str, kind: FailureKind) -> list[Action]:
        """Tell the executor to stop, and fail the attempt here."""
        return [Fail(query_id, ExecutorFailure(reason, Code.DEADLINE_EXCEEDED, kind=kind)), *self.cancel(query_id)]

    def lost(self, reason: str) -> list[Action]:
        """The stream broke: every attempt on it fails; the stream is done."""
        self.broken = self.broken or reason
        return [
            self._fail(q, f"stream lost ({reason})", Code.BACKEND_FAILED, FailureKind.DEAD) for q in list(self.active)
        ]

    def quiet_for(self, query_id: str, now: float) -> float:
        attempt = self.active.get(query_id)
        return 0.0 if attempt is None else now - attempt.last_frame

    def next_deadline(self) -> float | None:
        times = [self._due(a) for a in self.active.values()]
        return min(times) if times else None

    def _due(self, a: _Attempt) -> float:
        return (
            a.last_frame + self.hang_timeout
            if a.progressed
            else min(a.started + self.first_progress, a.last_frame + self.hang_timeout)
        )

    def tick(self, now: float) -> list[Action]:
        out: list[Action] = []
        for qid, a in list(self.active.items()):
            if now < self._due(a):
                continue
            if not a.progressed and now >= a.started + self.first_progress and now - a.last_frame < self.hang_timeout:
                reason, kind = f"no progress within {self.first_progress:g}s (keepalives only)", FailureKind.STALLED
            else:
                reason, kind = f"no frame for {self.hang_timeout:g}s", FailureKind.HUNG
            out += self._give_up(qid, reason, kind)
        return out


# --- the executor's side -----------------------------------------------------------------------
@dataclass
class Responder:
    """Queries a peer runs on this node over one stream."""

    max_active: int
    keepalive: float = KEEPALIVE
    last_sent: dict[str, float] = field(default_factory=dict)  # running query -> last frame sent

    def receive(self, msg: wire.Message, now: float) -> list[Action]:
        if isinstance(msg, wire.QueryRequest):
            qid = msg.query_id
            if qid in self.last_sent:
                return [Send(wire.Error(qid, Code.BAD_REQUEST, f"query id {qid} is already in use"))]
            if len(self.last_sent) >= self.max_active:
                return [
                    Send(
                        wire.Error(
                            qid,
                            Code.BUSY,
                            f"more than {self.max_active} queries on one stream",
                            int(self.keepalive * 1000),
                        )
                    )
                ]
            self.last_sent[qid] = now
            return [Start(msg)]
        if isinstance(msg, wire.Cancel):
            return [Stop(msg.query_id)] if msg.query_id in self.last_sent else []
        return [Reset(f"unexpected {type(msg).__name__} frame from a requester")]

    def sent(self, query_id: str, now: float) -> None:
        if query_id in self.last_sent:
            self.last_sent[query_id] = now

    def finished(self, query_id: str) -> None:
        self.last_sent.pop(query_id, None)

    def next_deadline(self) -> float | None:
        return min(self.last_sent.values()) + self.keepalive if self.last_sent else None

    def tick(self, now: float) -> list[Action]:
        out: list[Action] = []
        for qid, at in self.last_sent.items():
            if now - at >= self.keepalive:
                self.last_sent[qid] = now
                out.append(Send(wire.Progress(qid, KEEPALIVE_STAGE, 0, None)))
        return out
