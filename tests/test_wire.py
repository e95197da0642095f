"""Tests for the sans-IO query-protocol codec (rentahal.p2p.wire)."""

from __future__ import annotations

import itertools
import tracemalloc
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rentahal.p2p import wire
from rentahal.p2p.wire import (
    DEFAULT_MAX_FRAME,
    PROTOCOL_ID,
    PROTOCOL_VERSION,
    Accepted,
    Cancel,
    Error,
    FrameDecoder,
    FrameTooLarge,
    InvalidField,
    MalformedFrame,
    Progress,
    QueryRequest,
    Result,
    Token,
    TruncatedFrame,
    UnknownMessageType,
    UnsupportedVersion,
    WireError,
    decode_body,
    encode,
    error_for,
)
from rentahal.realms.events import Code

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- helpers -----------------------------------------------------------------------------------


def frame(obj: Any) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return len(body).to_bytes(4, "big") + body


def raw_frame(body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + body


def decode_one(data: bytes, max_frame: int = DEFAULT_MAX_FRAME) -> wire.Message | None:
    dec = FrameDecoder(max_frame)
    dec.feed(data)
    return dec.next_message()


def nested(depth: int) -> dict[str, Any]:
    """A map whose container depth (the map itself included) is exactly ``depth``."""
    v: Any = 1
    for _ in range(depth - 1):
        v = [v]
    return {"k": v}


VALID: dict[str, dict[str, Any]] = {
    "req": {
        "t": "req",
        "v": 2,
        "id": "q-1",
        "realm": "chat",
        "payload": {"prompt": "hi"},
        "deadline_ms": 30_000,
        "origin": "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N",
    },
    "accepted": {"t": "accepted", "id": "q-1", "position": 0, "eta_ms": None},
    "progress": {"t": "progress", "id": "q-1", "stage": "load", "done": 1, "total": 3},
    "token": {"t": "token", "id": "q-1", "text": "hel", "index": 0},
    "result": {
        "t": "result",
        "id": "q-1",
        "output": {"text": "hello"},
        "stats": {"tokens": 5, "secs": 0.5, "model": "x", "gpu": None},
    },
    "error": {"t": "error", "id": "q-1", "code": "busy", "message": "try later"},
    "cancel": {"t": "cancel", "id": "q-1"},
}


def with_(t: str, /, **changes: Any) -> dict[str, Any]:
    m = dict(VALID[t])
    m.update(changes)
    return m


def expect(exc_type: type[WireError], data: bytes, code: Code | None = None) -> WireError:
    with pytest.raises(exc_type) as info:
        decode_one(data)
    err = info.value
    assert isinstance(err, WireError)
    assert err.code is (code or exc_type.code)
    assert "\n" not in str(err)
    return err


# --- strategies --------------------------------------------------------------------------------

ids = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)
realms = st.from_regex(r"[a-z0-9_-]{1,32}", fullmatch=True)
origins = st.from_regex(r"[1-9A-HJ-NP-Za-km-z]{1,128}", fullmatch=True)
counts = st.integers(0, 2**63 - 1)
leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=12)
    | st.binary(max_size=12)
)


def values(depth_left: int) -> st.SearchStrategy[Any]:
    """Msgpack values using at most ``depth_left`` further container levels."""
    if depth_left == 0:
        return leaves
    inner = st.deferred(lambda: values(depth_left - 1))
    return leaves | st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)


trees = st.dictionaries(st.text(max_size=8), values(wire.MAX_DEPTH - 1), max_size=4)
stats = st.dictionaries(
    st.text(max_size=8),
    st.none() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text(),
    max_size=4,
)

messages = st.one_of(
    st.builds(QueryRequest, st.just(PROTOCOL_VERSION), ids, realms, trees, st.integers(1, 86_400_000), origins),
    st.builds(Accepted, ids, counts, st.none() | counts),
    st.builds(Progress, ids, st.text(min_size=1, max_size=64), counts, st.none() | counts),
    st.builds(Token, ids, st.text(max_size=200), counts),
    st.builds(Result, ids, trees, stats),
    st.builds(
        Error,
        st.just("") | ids,
        st.sampled_from([c for c in Code if c.on_wire]),
        st.text(max_size=1000),
        st.none() | st.integers(0, 86_400_000),
    ),
    st.builds(Cancel, ids),
)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


# --- round trips -------------------------------------------------------------------------------


def test_constants() -> None:
    assert PROTOCOL_ID == "/rentahal/query/2.0.0"
    assert PROTOCOL_VERSION == 2
    assert DEFAULT_MAX_FRAME == 8 * 1024 * 1024


@FAST
@given(msgs=st.lists(messages, min_size=1, max_size=3), cuts=st.lists(st.integers(0, 10**6)))
def test_round_trip_in_random_chunks(msgs: list[wire.Message], cuts: list[int]) -> None:
    stream = b"".join(encode(m) for m in msgs)
    dec = FrameDecoder()
    got: list[wire.Message] = []
    for piece in chunked(stream, cuts):
        dec.feed(piece)
        got.extend(dec.messages())
    assert got == msgs
    assert dec.next_message() is None
    dec.eof()  # nothing left over


@FAST
@given(msg=messages)
def test_decode_body_matches_encode(msg: wire.Message) -> None:
    data = encode(msg)
    assert int.from_bytes(data[:4], "big") == len(data) - 4
    assert decode_body(data[4:]) == msg


@pytest.mark.parametrize("t", sorted(VALID))
def test_each_type_decodes_from_plain_map(t: str) -> None:
    msg = decode_one(frame(VALID[t]))
    assert msg is not None
    assert encode(msg) == frame(VALID[t])


def test_error_code_is_enum_and_str_codes_normalise() -> None:
    msg = decode_one(frame(VALID["error"]))
    assert isinstance(msg, Error) and msg.code is Code.BUSY
    made = Error("q-1", "busy", "try later")  # type: ignore[arg-type]
    assert made.code is Code.BUSY and made == msg and hash(made) == hash(msg)


def test_partial_frames_need_more_bytes() -> None:
    data = encode(Cancel("abc"))
    dec = FrameDecoder()
    for b in data[:-1]:
        dec.feed(bytes([b]))
        assert dec.next_message() is None
    dec.feed(data[-1:])
    assert dec.next_message() == Cancel("abc")


def test_empty_strings_where_allowed() -> None:
    assert decode_one(encode(Token("q", "", 0))) == Token("q", "", 0)
    anonymous = Error("", Code.INTERNAL, "")
    assert decode_one(encode(anonymous)) == anonymous


# --- framing rejections ------------------------------------------------------------------------


def test_eof_mid_frame_is_truncated() -> None:
    data = encode(Cancel("abc"))
    for cut in (1, 3, 4, len(data) - 1):
        dec = FrameDecoder()
        dec.feed(data[:cut])
        assert dec.next_message() is None
        with pytest.raises(TruncatedFrame) as info:
            dec.eof()
        assert info.value.code is Code.BAD_REQUEST
    dec = FrameDecoder()
    dec.feed(data)
    assert dec.next_message() == Cancel("abc")
    dec.eof()
    dec.close()


def test_oversized_header_rejected_before_body() -> None:
    dec = FrameDecoder(max_frame=1024)
    dec.feed((1025).to_bytes(4, "big"))  # header only, no body yet
    assert dec.buffered == 4
    with pytest.raises(FrameTooLarge) as info:
        dec.next_message()
    assert info.value.code is Code.FRAME_TOO_LARGE
    ok = FrameDecoder(max_frame=1024)
    ok.feed((1024).to_bytes(4, "big"))
    assert ok.next_message() is None  # at the cap: waits for the body


def test_default_cap_rejects_huge_header() -> None:
    with pytest.raises(FrameTooLarge):
        decode_one((DEFAULT_MAX_FRAME + 1).to_bytes(4, "big"))
    dec = FrameDecoder()
    dec.feed(DEFAULT_MAX_FRAME.to_bytes(4, "big"))
    assert dec.next_message() is None  # exactly the cap is allowed, body pending


def test_oversized_frame_body_is_not_buffered() -> None:
    dec = FrameDecoder(max_frame=64)
    dec.feed((10_000).to_bytes(4, "big") + b"x" * 100)
    for _ in range(100):
        dec.feed(b"x" * 1000)
    assert dec.buffered <= 64 + 4
    with pytest.raises(FrameTooLarge):
        dec.next_message()


def test_encode_respects_max_frame() -> None:
    msg = Token("q", "x" * 200, 0)
    assert len(encode(msg, max_frame=1024)) > 200
    with pytest.raises(FrameTooLarge) as info:
        encode(msg, max_frame=100)
    assert info.value.code is Code.FRAME_TOO_LARGE
    with pytest.raises(FrameTooLarge):
        decode_body(encode(msg)[4:], max_frame=100)


def test_invalid_max_frame_is_a_programming_error() -> None:
    for bad in (0, -1, 2**32, True):
        with pytest.raises(ValueError):
            FrameDecoder(bad)


def test_zero_length_frame() -> None:
    expect(MalformedFrame, b"\x00\x00\x00\x00")
    with pytest.raises(MalformedFrame):
        decode_body(b"")


@pytest.mark.parametrize(
    "body",
    [
        b"\xc1",  # never-used msgpack byte
        b"\x82\xa1t",  # map cut short inside the frame
        b"\x81\xa1t\xa2\xff\xfe",  # invalid UTF-8 in a str
        msgpack.packb({1: "int key"}),  # strict_map_key
        msgpack.packb(VALID["cancel"]) + b"\x00",  # trailing bytes inside the frame
        msgpack.packb(VALID["cancel"]) + msgpack.packb(VALID["cancel"]),
    ],
)
def test_not_msgpack_or_trailing_bytes(body: bytes) -> None:
    expect(MalformedFrame, raw_frame(body))


@pytest.mark.parametrize("obj", [[1, 2], "req", None, 7, b"bytes", [VALID["cancel"]]])
def test_msgpack_non_map(obj: Any) -> None:
    expect(MalformedFrame, frame(obj))


@pytest.mark.parametrize(
    "body",
    [
        b"\x81\xa1t\xdb\xff\xff\xff\xff",  # str32 claiming 4 GiB
        b"\x81\xa1t\xc6\xff\xff\xff\xff",  # bin32 claiming 4 GiB
        b"\xdd\xff\xff\xff\xff",  # array32 claiming 4G items
        b"\xdf\xff\xff\xff\xff",  # map32 claiming 4G pairs
        b"\x81\xa1t\xdd\x00\x10\x00\x00",  # array32 of 1M items in an 8-byte frame
        b"\x81\xa1t\xc9\xff\xff\xff\xff\x01",  # ext32 claiming 4 GiB
    ],
)
def test_small_frame_claiming_huge_object(body: bytes) -> None:
    tracemalloc.start()
    try:
        expect(MalformedFrame, raw_frame(body))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024


# --- message-level rejections ------------------------------------------------------------------


def test_unknown_type() -> None:
    for t in ("bogus", "REQ", 5, None, b"req"):
        err = expect(UnknownMessageType, frame(with_("cancel", t=t)))
        assert err.code is Code.BAD_REQUEST
    missing = dict(VALID["cancel"])
    del missing["t"]
    assert expect(InvalidField, frame(missing)).field == "t"  # type: ignore[attr-defined]


@pytest.mark.parametrize(("t", "key"), [(t, k) for t, m in VALID.items() for k in m if k != "t"])
def test_missing_field(t: str, key: str) -> None:
    m = dict(VALID[t])
    del m[key]
    err = expect(InvalidField, frame(m))
    assert isinstance(err, InvalidField) and err.field == key
    assert "missing" in str(err)


@pytest.mark.parametrize("t", sorted(VALID))
def test_extra_field(t: str) -> None:
    err = expect(InvalidField, frame(with_(t, extra=1)))
    assert isinstance(err, InvalidField) and err.field == "extra"
    m = dict(VALID[t])
    m[b"id"] = "q-1"  # type: ignore[index]
    expect(InvalidField, frame(m))


WRONG_TYPES = [
    ("req", "deadline_ms", "1000"),
    ("req", "deadline_ms", True),
    ("req", "deadline_ms", 1.0),
    ("req", "id", 5),
    ("req", "realm", 7),
    ("req", "origin", b"Qm"),
    ("req", "payload", [1]),
    ("req", "payload", "x"),
    ("accepted", "position", "0"),
    ("accepted", "position", False),
    ("accepted", "eta_ms", True),
    ("accepted", "eta_ms", 1.5),
    ("progress", "done", None),
    ("progress", "total", "3"),
    ("progress", "stage", 1),
    ("token", "text", b"bytes"),
    ("token", "index", True),
    ("result", "output", None),
    ("result", "stats", [1]),
    ("result", "stats", {"ok": True}),
    ("result", "stats", {"l": [1]}),
    ("result", "stats", {"m": {}}),
    ("result", "stats", {"b": b"x"}),
    ("error", "code", 3),
    ("error", "message", None),
    ("error", "id", None),
    ("cancel", "id", ["q"]),
]


@pytest.mark.parametrize(("t", "key", "value"), WRONG_TYPES)
def test_wrong_typed_fields(t: str, key: str, value: Any) -> None:
    err = expect(InvalidField, frame(with_(t, **{key: value})))
    assert isinstance(err, InvalidField) and err.field == key


OUT_OF_RANGE = [
    ("req", "deadline_ms", 0),
    ("req", "deadline_ms", 86_400_001),
    ("req", "deadline_ms", -5),
    ("accepted", "position", -1),
    ("accepted", "eta_ms", -1),
    ("progress", "done", -1),
    ("progress", "total", -1),
    ("token", "index", -1),
    ("token", "index", 2**64 - 1),
    ("progress", "stage", ""),
    ("progress", "stage", "s" * 65),
    ("token", "text", "x" * (64 * 1024 + 1)),
    ("token", "text", "é" * 40_000),
    ("error", "message", "m" * 1001),
    ("req", "id", "q" * 65),
    ("req", "id", ""),
    ("cancel", "id", ""),
    ("req", "realm", "r" * 33),
    ("req", "realm", ""),
    ("req", "origin", "z" * 129),
    ("req", "origin", ""),
]


@pytest.mark.parametrize(("t", "key", "value"), OUT_OF_RANGE)
def test_out_of_range_values(t: str, key: str, value: Any) -> None:
    err = expect(InvalidField, frame(with_(t, **{key: value})))
    assert isinstance(err, InvalidField) and err.field == key


def test_range_boundaries_accepted() -> None:
    for t, key, value in [
        ("req", "deadline_ms", 1),
        ("req", "deadline_ms", 86_400_000),
        ("req", "id", "Q" * 64),
        ("req", "realm", "r" * 32),
        ("req", "origin", "z" * 128),
        ("progress", "stage", "s" * 64),
        ("token", "text", "x" * 64 * 1024),
        ("error", "message", "m" * 1000),
        ("token", "text", "é" * 32 * 1024),
        ("accepted", "position", 2**63 - 1),
    ]:
        assert decode_one(frame(with_(t, **{key: value}))) is not None, (t, key)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("id", "a b"),
        ("id", "q!"),
        ("id", "é"),
        ("id", "q\n"),
        ("id", "q/1"),
        ("realm", "CHAT!"),
        ("realm", "Chat"),
        ("realm", "chat\n"),
        ("realm", "ch.at"),
        ("origin", "Qm0abc"),
        ("origin", "QmOabc"),
        ("origin", "QmIabc"),
        ("origin", "Qmlabc"),
        ("origin", "Qm+abc"),
    ],
)
def test_bad_characters(key: str, value: str) -> None:
    err = expect(InvalidField, frame(with_("req", **{key: value})))
    assert isinstance(err, InvalidField) and err.field == key


def test_error_message_names_the_problem() -> None:
    err = expect(InvalidField, frame(with_("req", realm="CHAT!")))
    assert str(err) == "field 'realm': expected 1..32 chars of [a-z0-9_-], got 'CHAT!'"
    assert err.query_id == "q-1"  # readable id is attached for the reply


def test_unsupported_version() -> None:
    for v in (0, 1, 3, 99):
        err = expect(UnsupportedVersion, frame(with_("req", v=v)))
        assert err.code is Code.UNSUPPORTED_VERSION
    # a newer peer's request with new fields still fails on version, not on shape
    expect(UnsupportedVersion, frame(with_("req", v=3, priority=1)))
    for v in (True, "1", 1.0, None):
        err = expect(InvalidField, frame(with_("req", v=v)))
        assert isinstance(err, InvalidField) and err.field == "v"


def test_unknown_error_code() -> None:
    for code in ("nope", "BUSY", ""):
        err = expect(InvalidField, frame(with_("error", code=code)))
        assert isinstance(err, InvalidField) and err.field == "code"


@pytest.mark.parametrize(("t", "key"), [("req", "payload"), ("result", "output")])
def test_nesting_limit(t: str, key: str) -> None:
    assert decode_one(frame(with_(t, **{key: nested(wire.MAX_DEPTH)}))) is not None
    err = expect(InvalidField, frame(with_(t, **{key: nested(wire.MAX_DEPTH + 1)})))
    assert isinstance(err, InvalidField) and err.field == key
    deep: Any = 0
    for _ in range(500):
        deep = {"d": deep}
    expect(InvalidField, frame(with_(t, **{key: deep})))


@pytest.mark.parametrize(
    "payload",
    [
        {b"k": 1},
        {"k": {b"k": 1}},
        {"k": msgpack.ExtType(5, b"x")},
        {"k": [msgpack.ExtType(1, b"")]},
    ],
)
def test_payload_keys_and_values(payload: dict[Any, Any]) -> None:
    err = expect(InvalidField, frame(with_("req", payload=payload)))
    assert isinstance(err, InvalidField) and err.field == "payload"


# --- outgoing validation -----------------------------------------------------------------------


REQ = QueryRequest(2, "q-1", "chat", {"p": 1}, 1000, "Qm1")


@pytest.mark.parametrize(
    "msg",
    [
        QueryRequest(2, "q-1", "CHAT!", {}, 1000, "Qm1"),
        QueryRequest(2, "q-1", "chat", {"p": (1, 2)}, 1000, "Qm1"),
        QueryRequest(2, "q-1", "chat", {"p": 2**64}, 1000, "Qm1"),
        QueryRequest(2, "q-1", "chat", {"p": "\ud800"}, 1000, "Qm1"),
        QueryRequest(2, "q-1", "chat", {1: "x"}, 1000, "Qm1"),  # type: ignore[dict-item]
        QueryRequest(2, "q-1", "chat", nested(wire.MAX_DEPTH + 1), 1000, "Qm1"),
        QueryRequest(2, "q-1", "chat", {}, 0, "Qm1"),
        QueryRequest(2, "", "chat", {}, 1, "Qm1"),
        Accepted("q", True),  # type: ignore[arg-type]
        Accepted("q", 0, -1),
        Progress("q", "", 0),
        Token("q", "x", -1),
        Token("q", "x" * (64 * 1024 + 1), 0),
        Result("q", {}, {"x": [1]}),  # type: ignore[dict-item]
        Error("q", "nope", "m"),  # type: ignore[arg-type]
        Error("q", Code.BUSY, "m" * 1001),
        Error("q q", Code.BUSY, "m"),
        Cancel(5),  # type: ignore[arg-type]
    ],
)
def test_encode_rejects_invalid_messages(msg: wire.Message) -> None:
    with pytest.raises(InvalidField):
        encode(msg)


def test_encode_rejects_wrong_version_and_non_messages() -> None:
    with pytest.raises(UnsupportedVersion):
        encode(QueryRequest(1, "q-1", "chat", {}, 1000, "Qm1"))
    with pytest.raises(UnknownMessageType):
        encode(object())  # type: ignore[arg-type]
    assert decode_one(encode(REQ)) == REQ


# --- poisoning and error replies ---------------------------------------------------------------


def test_decoder_is_poisoned_after_error() -> None:
    dec = FrameDecoder()
    dec.feed(frame(with_("req", realm="CHAT!")) + encode(Cancel("ok")))
    with pytest.raises(InvalidField) as first:
        dec.next_message()
    for call in (dec.next_message, dec.eof, lambda: dec.feed(encode(Cancel("x")))):
        with pytest.raises(InvalidField) as again:
            call()
        assert again.value is first.value
    assert list(_safe_messages(dec)) == ["poisoned"]


def _safe_messages(dec: FrameDecoder) -> Any:
    try:
        yield from dec.messages()
    except WireError:
        yield "poisoned"


def test_decoder_poisoned_after_frame_too_large_and_truncation() -> None:
    dec = FrameDecoder(max_frame=16)
    dec.feed(b"\x00\x00\x01\x00")
    with pytest.raises(FrameTooLarge):
        dec.next_message()
    with pytest.raises(FrameTooLarge):
        dec.next_message()
    dec = FrameDecoder()
    dec.feed(b"\x00\x00")
    with pytest.raises(TruncatedFrame):
        dec.eof()
    with pytest.raises(TruncatedFrame):
        dec.next_message()


def test_error_for_builds_sendable_reply() -> None:
    dec = FrameDecoder()
    dec.feed(frame(with_("req", v=7, id="abc")))
    with pytest.raises(WireError) as info:
        dec.next_message()
    reply = error_for(info.value)
    assert reply == Error("abc", Code.UNSUPPORTED_VERSION, str(info.value))
    assert decode_one(encode(reply)) == reply
    assert error_for(FrameTooLarge("big"), "q9").query_id == "q9"
    assert error_for(FrameTooLarge("big"), "q9").code is Code.FRAME_TOO_LARGE
    assert error_for(MalformedFrame("bad"), "not valid!").query_id == ""
    long = error_for(InvalidField("x", "y" * 5000))
    assert len(long.message) == 1000
    encode(long)


# --- fuzz --------------------------------------------------------------------------------------


def drain(dec: FrameDecoder, chunks: list[bytes]) -> None:
    try:
        for c in chunks:
            dec.feed(c)
            for _ in dec.messages():
                pass
        dec.eof()
    except WireError as e:
        assert isinstance(e.code, Code)
        assert isinstance(error_for(e), Error)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=8), st.sampled_from([8, 64, 4096]))
def test_fuzz_arbitrary_bytes(chunks: list[bytes], max_frame: int) -> None:
    drain(FrameDecoder(max_frame), chunks)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=200))
def test_fuzz_framed_arbitrary_bodies(body: bytes) -> None:
    drain(FrameDecoder(), [raw_frame(body)])


fields = st.sampled_from(
    [
        "t",
        "v",
        "id",
        "realm",
        "payload",
        "deadline_ms",
        "origin",
        "position",
        "eta_ms",
        "stage",
        "done",
        "total",
        "text",
        "index",
        "output",
        "stats",
        "code",
        "message",
        "x",
    ]
)
types = st.sampled_from(sorted(VALID))


@settings(max_examples=200, deadline=None)
@given(types, st.dictionaries(fields, values(10), max_size=4), st.lists(fields, max_size=3))
def test_fuzz_mutated_maps(t: str, changes: dict[str, Any], drop: list[str]) -> None:
    m = with_(t, **changes)
    for k in drop:
        m.pop(k, None)
    drain(FrameDecoder(), [frame(m)])


@settings(max_examples=200, deadline=None)
@given(messages, st.integers(0, 10**6), st.integers(0, 255))
def test_fuzz_bit_flips(msg: wire.Message, pos: int, byte: int) -> None:
    data = bytearray(encode(msg))
    data[pos % len(data)] = byte
    drain(FrameDecoder(), [bytes(data)])
