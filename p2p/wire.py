"""Sans-IO codec for the federation query protocol ``/rentahal/query/1.0.0``.

A frame is a 4-byte big-endian body length followed by a msgpack map whose key ``"t"``
names the message type. Peer input is hostile: every field is validated, every failure
is a :class:`WireError`, and buffering is bounded by ``max_frame``. No I/O happens here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import msgpack

from ..node.limits import DEFAULT_MAX_FRAME, MAX_DEADLINE_MS, MAX_TOKEN_BYTES
from ..realms.events import Code, RemoteProtocolError

if TYPE_CHECKING:
    from .budget import ByteBudget

PROTOCOL_ID = "/rentahal/query/2.0.0"
PROTOCOL_VERSION = 2
REQUEST_OVERHEAD = 4096  # a query request's bytes besides its payload (ids, realm, origin: < 1 KiB)
MAX_PAYLOAD = DEFAULT_MAX_FRAME - REQUEST_OVERHEAD  # the largest payload a peer can be sent
MAX_DEPTH = 8  # container levels in payload/output, the top-level map included
MAX_ERROR_MESSAGE = 1000  # chars of Error.message
_HEADER = 4
_FRAME_LIMIT = 2**32 - 1  # what a 4-byte header can express
_COUNT_MAX = 2**63 - 1  # counters/positions must fit a signed int64
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1  # msgpack's integer range

_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_REALM_RE = re.compile(r"[a-z0-9_-]{1,32}")
_ORIGIN_RE = re.compile(r"[1-9A-HJ-NP-Za-km-z]{1,128}")


class WireError(RemoteProtocolError):
    """Base of every codec error; ``code`` is what to send back, ``query_id`` if readable."""

    default_code = Code.BAD_REQUEST

    def __init__(self, message: str, query_id: str = "") -> None:
        super().__init__(message)
        self.query_id = query_id


class FrameTooLarge(WireError):
    default_code = Code.FRAME_TOO_LARGE


class MalformedFrame(WireError):
    """Zero length, not msgpack, not a map, or trailing bytes inside the frame."""


class UnknownMessageType(WireError):
    pass


class InvalidField(WireError):
    def __init__(self, field: str, problem: str, query_id: str = "") -> None:
        super().__init__(f"field {field!r}: {problem}", query_id)
        self.field = field


class UnsupportedVersion(WireError):
    default_code = Code.UNSUPPORTED_VERSION


class TruncatedFrame(WireError):
    """The stream ended inside a frame."""


class OverBudget(WireError):
    """A frame announced more bytes than this node will buffer for the peer right now."""

    default_code = Code.BUSY


@dataclass(frozen=True, slots=True)
class QueryRequest:
    version: int
    query_id: str
    realm: str
    payload: dict[str, Any]
    deadline_ms: int  # relative time budget
    origin: str  # requesting peer id, base58 text


@dataclass(frozen=True, slots=True)
class Accepted:
    query_id: str
    position: int
    eta_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Progress:
    """Progress report; also used as a keepalive."""

    query_id: str
    stage: str
    done: int
    total: int | None = None


@dataclass(frozen=True, slots=True)
class Token:
    query_id: str
    text: str
    index: int


@dataclass(frozen=True, slots=True)
class Result:
    query_id: str
    output: dict[str, Any]
    stats: dict[str, int | float | str | None]


@dataclass(frozen=True, slots=True)
class Error:
    query_id: str  # "" when the failing frame had no readable id
    code: Code
    message: str
    retry_after_ms: int | None = None  # queue_full / busy: when capacity is expected back

    def __post_init__(self) -> None:  # a plain str code becomes Code: equal => same hash
        if isinstance(self.code, str) and self.code in Code._value2member_map_:
            object.__setattr__(self, "code", Code(self.code))


@dataclass(frozen=True, slots=True)
class Cancel:
    query_id: str


Message = QueryRequest | Accepted | Progress | Token | Result | Error | Cancel


def _show(v: object) -> str:
    """Short one-line rendering of a (possibly huge, hostile) value."""
    if isinstance(v, (dict, list)):
        return f"{type(v).__name__} of {len(v)}"
    if isinstance(v, int) and v.bit_length() > 64:
        return f"int of {v.bit_length()} bits"
    r = repr(v[:61] if isinstance(v, (str, bytes)) else v)
    return r if len(r) <= 60 else r[:57] + "..."


# --- field checks: (key, value) -> validated value, raising InvalidField --------------------

_Check = Callable[[str, Any], Any]


def _utf8_len(key: str, s: str) -> int:
    if s.isascii():
        return len(s)
    try:
        return len(s.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidField(key, "string is not encodable as UTF-8") from None


def _str(lo: int, hi: int, rx: re.Pattern[str] | None = None, what: str = "", max_bytes: int | None = None) -> _Check:
    def check(key: str, v: Any) -> str:
        if rx is not None:  # character-class fields: the pattern carries the length bounds
            if isinstance(v, str) and ((lo == 0 and v == "") or rx.fullmatch(v)):
                return v
            raise InvalidField(key, f"expected {what}, got {_show(v)}")
        if not isinstance(v, str):
            raise InvalidField(key, f"expected str, got {type(v).__name__}")
        if not lo <= len(v) <= hi:
            raise InvalidField(key, f"expected {lo}..{hi} chars, got {len(v)}")
        n = _utf8_len(key, v)
        if max_bytes is not None and n > max_bytes:
            raise InvalidField(key, f"expected at most {max_bytes} UTF-8 bytes, got {n}")
        return v

    return check


def _int(lo: int = 0, hi: int = _COUNT_MAX, optional: bool = False) -> _Check:
    def check(key: str, v: Any) -> int | None:
        if v is None and optional:
            return None
        if type(v) is bool or not isinstance(v, int):
            raise InvalidField(key, f"expected int, got {type(v).__name__}")
        if not lo <= v <= hi:
            raise InvalidField(key, f"expected {lo}..{hi}, got {_show(v)}")
        return int(v)

    return check


def _version(key: str, v: Any) -> int:
    if type(v) is bool or not isinstance(v, int):
        raise InvalidField(key, f"expected int, got {type(v).__name__}")
    if v != PROTOCOL_VERSION:
        raise UnsupportedVersion(f"protocol version {_show(v)} not supported (want {PROTOCOL_VERSION})")
    return int(v)


def _value(key: str, v: Any, depth: int) -> None:
    """Check one msgpack value that sits inside ``depth`` containers."""
    if isinstance(v, (list, dict)):
        if depth >= MAX_DEPTH:
            raise InvalidField(key, f"nested deeper than {MAX_DEPTH} levels")
        if isinstance(v, dict):
            for k in v:
                if not isinstance(k, str):
                    raise InvalidField(key, f"map keys must be str, got {type(k).__name__}")
                _utf8_len(key, k)
        for x in v.values() if isinstance(v, dict) else v:
            _value(key, x, depth + 1)
    elif isinstance(v, str):
        _utf8_len(key, v)
    elif isinstance(v, int) and not isinstance(v, bool):
        if not _INT_MIN <= v <= _INT_MAX:
            raise InvalidField(key, f"integer out of msgpack range: {_show(v)}")
    elif not (v is None or isinstance(v, (bool, float, bytes))):
        raise InvalidField(key, f"unsupported value type {type(v).__name__}")


def _tree(key: str, v: Any) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise InvalidField(key, f"expected map, got {type(v).__name__}")
    _value(key, v, 0)
    return v


def _stats(key: str, v: Any) -> dict[str, int | float | str | None]:
    _tree(key, v)
    for k, x in v.items():
        if x is not None and (type(x) is bool or not isinstance(x, (int, float, str))):
            raise InvalidField(key, f"stat {_show(k)} must be int/float/str/None")
    return cast("dict[str, int | float | str | None]", v)


def _code(key: str, v: Any) -> Code:
    if isinstance(v, str) and v in Code._value2member_map_ and Code(v).on_wire:
        return Code(v)
    raise InvalidField(key, f"unknown error code {_show(v)}")


_ID = _str(1, 64, _ID_RE, "1..64 chars of [A-Za-z0-9_-]")
_SPECS: dict[str, tuple[type, tuple[tuple[str, str, _Check], ...]]] = {
    "req": (QueryRequest, (
        ("version", "v", _version),
        ("query_id", "id", _ID),
        ("realm", "realm", _str(1, 32, _REALM_RE, "1..32 chars of [a-z0-9_-]")),
        ("payload", "payload", _tree),
        ("deadline_ms", "deadline_ms", _int(1, MAX_DEADLINE_MS)),
        ("origin", "origin", _str(1, 128, _ORIGIN_RE, "1..128 chars of base58")),
    )),
    "accepted": (Accepted, (
        ("query_id", "id", _ID), ("position", "position", _int()),
        ("eta_ms", "eta_ms", _int(optional=True)),
    )),
    "progress": (Progress, (
        ("query_id", "id", _ID), ("stage", "stage", _str(1, 64)),
        ("done", "done", _int()), ("total", "total", _int(optional=True)),
    )),
    "token": (Token, (
        ("query_id", "id", _ID),
        ("text", "text", _str(0, MAX_TOKEN_BYTES, max_bytes=MAX_TOKEN_BYTES)),
        ("index", "index", _int()),
    )),
    "result": (Result, (
        ("query_id", "id", _ID), ("output", "output", _tree), ("stats", "stats", _stats),
    )),
    "error": (Error, (
        ("query_id", "id", _str(0, 64, _ID_RE, '"" or 1..64 chars of [A-Za-z0-9_-]')),
        ("code", "code", _code),
        ("message", "message", _str(0, MAX_ERROR_MESSAGE)),
        ("retry_after_ms", "retry_after_ms", _int(0, MAX_DEADLINE_MS, optional=True)),
    )),
    "cancel": (Cancel, (("query_id", "id", _ID),)),
}  # fmt: skip
_OMITTED_IF_NONE = frozenset({"retry_after_ms"})  # added in version 2; absent means None
_BY_CLASS = {cls: (t, fields) for t, (cls, fields) in _SPECS.items()}


def _from_map(m: dict[Any, Any]) -> Message:
    qid = m.get("id")
    qid = qid if isinstance(qid, str) and _ID_RE.fullmatch(qid) else ""
    try:  # a readable id is attached to any error so the reply can name the query
        if "t" not in m:
            raise InvalidField("t", "missing field")
        t = m["t"]
        if not isinstance(t, str) or t not in _SPECS:
            raise UnknownMessageType(f"unknown message type {_show(t)}")
        cls, fields = _SPECS[t]
        if t == "req" and "v" in m:
            _version("v", m["v"])  # a newer peer's request fails on version, not on shape
        allowed = {"t", *(key for _, key, _ in fields)}
        for k in m:
            if k not in allowed:
                raise InvalidField(k if isinstance(k, str) else repr(k), "unexpected field")
        values: dict[str, Any] = {}
        for attr, key, check in fields:
            if key not in m:
                if key in _OMITTED_IF_NONE:
                    values[attr] = None
                    continue
                raise InvalidField(key, "missing field")
            values[attr] = check(key, m[key])
    except WireError as e:
        e.query_id = qid
        raise
    return cls(**values)  # type: ignore[no-any-return]


def _check_max_frame(max_frame: int) -> None:
    if type(max_frame) is not int or not 1 <= max_frame <= _FRAME_LIMIT:
        raise ValueError(f"max_frame must be 1..{_FRAME_LIMIT}, got {max_frame!r}")


def encode(msg: Message, *, max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    """Validate ``msg`` exactly as decoding would and return its length-prefixed frame."""
    _check_max_frame(max_frame)
    spec = _BY_CLASS.get(type(msg))
    if spec is None:
        raise UnknownMessageType(f"cannot encode {type(msg).__name__}")
    t, fields = spec
    m: dict[str, Any] = {"t": t}
    for attr, key, check in fields:
        v = check(key, getattr(msg, attr))
        if v is None and key in _OMITTED_IF_NONE:
            continue
        m[key] = v.value if isinstance(v, Code) else v
    body: bytes = msgpack.packb(m, use_bin_type=True)
    if len(body) > max_frame:
        raise FrameTooLarge(f"frame of {len(body)} bytes exceeds max_frame {max_frame}")
    return len(body).to_bytes(_HEADER, "big") + body


def decode_body(body: bytes, *, max_frame: int = DEFAULT_MAX_FRAME) -> Message:
    """Decode one frame body (no length prefix)."""
    n = len(body)
    if n == 0:
        raise MalformedFrame("zero-length frame")
    if n > max_frame:
        raise FrameTooLarge(f"frame of {n} bytes exceeds max_frame {max_frame}")
    # Limits from the body size: a small frame cannot announce a huge str/bin/array/map.
    unpacker = msgpack.Unpacker(
        raw=False,
        strict_map_key=True,
        max_buffer_size=n,
        max_str_len=n,
        max_bin_len=n,
        max_array_len=n,
        max_map_len=n // 2,
        max_ext_len=n,
    )
    try:
        unpacker.feed(body)
        obj = unpacker.unpack()
        consumed = unpacker.tell()
    except Exception as e:  # msgpack raises a zoo of ValueError/TypeError/... subclasses
        raise MalformedFrame(f"not valid msgpack ({type(e).__name__})") from None
    if consumed != n:
        raise MalformedFrame(f"{n - consumed} trailing bytes after the message")
    if not isinstance(obj, dict):
        raise MalformedFrame(f"expected a msgpack map, got {type(obj).__name__}")
    return _from_map(obj)


class FrameDecoder:
    """Incremental decoder: ``feed()`` bytes, then drain with ``next_message()``/``messages()``.

    Drained after each feed, it holds at most ``max_frame + 4`` bytes plus the last chunk.
    With a ``budget``, a frame of ``free_below`` bytes or more is buffered only once its
    announced size is reserved there under ``key`` (else :class:`OverBudget`); the reservation
    is released when the frame is complete, on any error and on :meth:`release`.
    After any error the decoder is poisoned and re-raises that error: reset the stream.
    """

    def __init__(
        self,
        max_frame: int = DEFAULT_MAX_FRAME,
        *,
        budget: ByteBudget | None = None,
        key: Hashable = "",
        free_below: int = 64 * 1024,
    ) -> None:
        _check_max_frame(max_frame)
        self.max_frame = max_frame
        self._buf = bytearray()
        self._error: WireError | None = None
        self.budget = budget
        self.key = key
        self.free_below = free_below
        self._reserved = 0  # bytes held in the budget for the frame being received

    def _fail(self, exc: WireError) -> WireError:
        self._error = exc
        self._buf.clear()
        self.release()
        return exc

    def release(self) -> None:
        """Give back what the unfinished frame holds in the budget (idempotent): call it when
        the stream ends, however it ends."""
        if self._reserved and self.budget is not None:
            self.budget.release(self.key, self._reserved)
        self._reserved = 0

    def _reserve(self, n: int) -> None:
        if self.budget is None or n < self.free_below or self._reserved:
            return
        if not self.budget.reserve(self.key, n):
            raise self._fail(OverBudget(f"frame of {n} bytes refused: {self.budget.why_not(self.key, n)}"))
        self._reserved = n

    def _announced(self) -> int | None:
        if len(self._buf) < _HEADER:
            return None
        return int.from_bytes(self._buf[:_HEADER], "big")

    def feed(self, data: bytes) -> None:
        """Append received bytes. Bytes behind an oversized header are not kept."""
        if self._error is not None:
            raise self._error
        n = self._announced()
        if n is None and len(self._buf) + len(data) >= _HEADER:
            n = int.from_bytes((bytes(self._buf) + data[:_HEADER])[:_HEADER], "big")
        if n is not None and n <= self.max_frame:
            self._reserve(n)  # before the bytes are kept
        self._buf += data
        if n is not None and n > self.max_frame:
            del self._buf[_HEADER:]

    def next_message(self) -> Message | None:
        """Return the next complete message, or None when more bytes are needed."""
        if self._error is not None:
            raise self._error
        n = self._announced()
        if n is None:
            return None
        if n > self.max_frame:
            raise self._fail(FrameTooLarge(f"header announces {n} bytes, max_frame is {self.max_frame}"))
        if n == 0:
            raise self._fail(MalformedFrame("zero-length frame"))
        if len(self._buf) < _HEADER + n:
            self._reserve(n)  # its header may have come with the previous frame's end
            return None
        body = bytes(self._buf[_HEADER : _HEADER + n])
        del self._buf[: _HEADER + n]
        self.release()
        try:
            return decode_body(body, max_frame=self.max_frame)
        except WireError as e:
            raise self._fail(e) from None

    def messages(self) -> Iterator[Message]:
        """Yield every complete message currently buffered."""
        while (msg := self.next_message()) is not None:
            yield msg

    def eof(self) -> None:
        """Signal end of stream; raises TruncatedFrame if a partial frame is buffered."""
        if self._error is not None:
            raise self._error
        if self._buf:
            raise self._fail(TruncatedFrame(f"stream ended with {len(self._buf)} bytes of an unfinished frame"))

    close = eof

    @property
    def buffered(self) -> int:
        """Bytes currently held."""
        return len(self._buf)


def error_for(exc: WireError, query_id: str = "") -> Error:
    """Build the Error frame answering ``exc`` (query_id falls back to ``exc.query_id``)."""
    qid = query_id or exc.query_id
    if not (isinstance(qid, str) and _ID_RE.fullmatch(qid)):
        qid = ""
    text = str(exc)
    if len(text) > MAX_ERROR_MESSAGE:
        text = text[: MAX_ERROR_MESSAGE - 3] + "..."
    return Error(query_id=qid, code=exc.code, message=text)
