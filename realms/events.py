"""One model of a query's life: the events it goes through and the ways it can fail.

Backends emit these events; the executor, the router and the query manager pass them on
untouched. Only the edges convert: the wire codec (``p2p/wire.py``), the websocket JSON edge
(:func:`to_dict`, sent with :func:`dumps`), storage and the CLI.

Failures are one :class:`Code` vocabulary. A code knows whether another executor may well
succeed (``retryable``), whose fault it is (``fault``: a user's bad request is never held
against an executor or a peer), and whether it may travel on the wire. Exceptions form one
tree under :class:`QueryError`, in families a caller catches at the level it cares about::

    QueryError
    ├── UserError            the request itself is wrong or not allowed (bad_request, banned, ...)
    ├── Cancelled            the requester withdrew or hung up: nobody's failure
    ├── ExecutorFailure      an executor failed an attempt (``kind``: dead, hung, refused, ...)
    │   └── ModelFailure     this node's model or engine failed (backend_failed)
    ├── ProtocolError
    │   ├── LocalProtocolError   this node was about to send something invalid (its bug)
    │   └── RemoteProtocolError  a peer sent something invalid (its fault)
    └── StorageFailure       this node's storage could not take a write (storage_full, ...)
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass, field
from typing import Any


class Fault(str, enum.Enum):
    NOBODY = "nobody"  # withdrawn by its requester
    USER = "user"  # the request or the user
    EXECUTOR = "executor"  # the executor that ran (or refused) the attempt
    PEER = "peer"  # a peer broke the protocol
    NODE = "node"  # this node: a bug, or its storage


class Code(str, enum.Enum):
    """Every error code a query can end with, on the wire, in storage and in the UI."""

    # the user's fault: never retried elsewhere, never held against an executor
    BAD_REQUEST = "bad_request"
    TOO_LARGE = "too_large"
    TOO_MANY = "too_many"
    RATE_LIMITED = "rate_limited"
    BANNED = "banned"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    NOT_RUNNING = "not_running"
    CANCELLED = "cancelled"
    # an executor's: another one may well succeed
    REALM_NOT_SERVED = "realm_not_served"
    QUEUE_FULL = "queue_full"
    BUSY = "busy"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    BACKEND_FAILED = "backend_failed"
    UNREACHABLE = "unreachable"
    # a protocol's
    UNSUPPORTED_VERSION = "unsupported_version"
    FRAME_TOO_LARGE = "frame_too_large"
    PROTOCOL_ERROR = "protocol_error"
    # this node's
    INTERNAL = "internal"
    STORAGE_FULL = "storage_full"
    STORAGE_ERROR = "storage_error"

    @property
    def fault(self) -> Fault:
        return _FAULT[self]

    @property
    def retryable(self) -> bool:
        """Whether another executor (or the same one later) may well succeed."""
        return self in _RETRYABLE

    @property
    def back_pressure(self) -> bool:
        """The executor is healthy but full: wait ``retry_after`` or ask another."""
        return self in (Code.QUEUE_FULL, Code.BUSY)

    @property
    def on_wire(self) -> bool:
        """Whether an executor may answer a peer with this code."""
        return self in _WIRE


_FAULT = {
    **{c: Fault.USER for c in (Code.BAD_REQUEST, Code.TOO_LARGE, Code.TOO_MANY, Code.RATE_LIMITED,
                               Code.BANNED, Code.FORBIDDEN, Code.NOT_FOUND, Code.NOT_RUNNING)},
    Code.CANCELLED: Fault.NOBODY,
    **{c: Fault.EXECUTOR for c in (Code.REALM_NOT_SERVED, Code.QUEUE_FULL, Code.BUSY,
                                   Code.DEADLINE_EXCEEDED, Code.BACKEND_FAILED, Code.UNREACHABLE)},
    **{c: Fault.PEER for c in (Code.UNSUPPORTED_VERSION, Code.FRAME_TOO_LARGE, Code.PROTOCOL_ERROR)},
    **{c: Fault.NODE for c in (Code.INTERNAL, Code.STORAGE_FULL, Code.STORAGE_ERROR)},
}  # fmt: skip
_RETRYABLE = frozenset({
    Code.REALM_NOT_SERVED, Code.QUEUE_FULL, Code.BUSY, Code.DEADLINE_EXCEEDED, Code.BACKEND_FAILED,
    Code.UNREACHABLE, Code.INTERNAL, Code.PROTOCOL_ERROR, Code.FRAME_TOO_LARGE,
    Code.UNSUPPORTED_VERSION,
})  # fmt: skip
_WIRE = frozenset({
    Code.BAD_REQUEST, Code.UNSUPPORTED_VERSION, Code.REALM_NOT_SERVED, Code.QUEUE_FULL,
    Code.DEADLINE_EXCEEDED, Code.BACKEND_FAILED, Code.CANCELLED, Code.FRAME_TOO_LARGE, Code.BUSY,
    Code.INTERNAL,
})  # fmt: skip


class FailureKind(str, enum.Enum):
    """How an attempt on an executor failed (what the peer table scores)."""

    DEAD = "dead"  # the connection or stream went away
    HUNG = "hung"  # no frame within the hang timeout: frozen, or its link is down
    STALLED = "stalled"  # alive (keepalives) but no progress within its first-progress budget
    REFUSED = "refused"  # it answered with an error
    PROTOCOL = "protocol"  # it sent something invalid
    UNREACHABLE = "unreachable"  # it could not be dialed


# --- exceptions ------------------------------------------------------------------------------
class QueryError(Exception):
    """Root of every failure of a query. ``code`` is a :class:`Code`; ``message`` one line."""

    default_code = Code.INTERNAL
    code: Code = Code.INTERNAL  # a class's code is its default_code; an instance may differ

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.code = cls.default_code

    def __init__(self, message: str, code: Code | str | None = None) -> None:
        super().__init__(message)
        self.code = Code(code) if code is not None else self.default_code
        self.message = message

    @property
    def fault(self) -> Fault:
        return self.code.fault

    @property
    def retryable(self) -> bool:
        return self.code.retryable


class UserError(QueryError):
    """The request is wrong or not allowed; the message names what to change."""

    default_code = Code.BAD_REQUEST


class BadRequest(UserError):
    """A payload field is invalid, e.g. "payload.max_tokens: expected an integer in 1..512, got 0"."""

    def __init__(self, message: str) -> None:
        super().__init__(message, Code.BAD_REQUEST)


class Cancelled(QueryError):
    default_code = Code.CANCELLED


class ExecutorFailure(QueryError):
    """An attempt failed on an executor. ``kind`` says how; ``retry_after`` (seconds) is the
    executor's hint for back-pressure codes."""

    default_code = Code.BACKEND_FAILED

    def __init__(
        self,
        message: str,
        code: Code | str | None = None,
        *,
        kind: FailureKind = FailureKind.REFUSED,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, code)
        self.kind = kind
        self.retry_after = retry_after


class ModelFailure(ExecutorFailure):
    """This node's model or engine failed (a load error, a crash inside generation)."""


class ProtocolError(QueryError):
    default_code = Code.PROTOCOL_ERROR


class LocalProtocolError(ProtocolError):
    """This node was about to send something the protocol does not allow."""

    default_code = Code.INTERNAL


class RemoteProtocolError(ProtocolError):
    """A peer sent something the protocol does not allow."""


class StorageFailure(QueryError):
    default_code = Code.STORAGE_ERROR


class StorageFull(StorageFailure):
    default_code = Code.STORAGE_FULL


# --- events ----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Queued:
    realm: str


@dataclass(frozen=True, slots=True)
class Routed:
    executor: str  # "local" or a peer ID
    attempt: int


@dataclass(frozen=True, slots=True)
class Accepted:
    """The executor took the query: ``position`` in its queue (0 = running now)."""

    position: int
    eta_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Progress:
    """Progress of a long stage (e.g. "denoising"); ``total`` None if unknown."""

    stage: str
    done: int
    total: int | None = None


@dataclass(frozen=True, slots=True)
class Token:
    """A piece of streamed text; ``index`` counts a request's tokens from 0."""

    text: str
    index: int


@dataclass(frozen=True, slots=True)
class Failover:
    executor: str
    attempt: int
    kind: FailureKind
    code: Code
    message: str


@dataclass(frozen=True, slots=True)
class Result:
    """The answer. ``stats`` values are int, float, str or None. The router fills in who
    answered (``executor``), on which ``attempt``, and which executors failed before."""

    output: dict[str, Any]
    stats: dict[str, Any]
    executor: str = ""
    attempt: int = 0
    failovers: tuple[str, ...] = field(default=())


@dataclass(frozen=True, slots=True)
class Failed:
    code: Code
    message: str


StreamEvent = Accepted | Progress | Token  # what an executor streams while it works
Event = Queued | Routed | Accepted | Progress | Token | Failover | Result | Failed

_TYPE = {Queued: "queued", Routed: "routed", Accepted: "accepted", Progress: "progress",
         Token: "token", Failover: "failover", Result: "result", Failed: "error"}  # fmt: skip


def to_dict(event: Event, **extra: Any) -> dict[str, Any]:
    """The event as a JSON-ready mapping: ``{"type": ..., fields..., **extra}``."""
    out: dict[str, Any] = {"type": _TYPE[type(event)]}
    for name in event.__dataclass_fields__:
        value = getattr(event, name)
        out[name] = (
            value.value if isinstance(value, enum.Enum) else (list(value) if isinstance(value, tuple) else value)
        )
    out.update(extra)
    return out


def check_finite(value: Any) -> Any:
    """``value`` unchanged, or RemoteProtocolError if any number inside is NaN or infinite: a
    non-finite number from a peer is a lie (a NaN cost, an infinite duration), never shown."""
    if isinstance(value, float) and not math.isfinite(value):
        raise RemoteProtocolError(f"non-finite number {value!r} in an answer")
    if isinstance(value, dict):
        for v in value.values():
            check_finite(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            check_finite(v)
    return value


def dumps(message: Any, default: Any = None) -> str:
    """JSON for a browser: NaN and infinities are refused (``allow_nan=False``)."""
    return json.dumps(message, default=default, allow_nan=False)
