"""One way to check what comes from outside the node: msgspec types, one-line messages.

Everything a stranger or an operator hands the node — a query payload (from a websocket client,
an API client or a peer), a control request, a node.toml section — is described as a
``msgspec.Struct`` with its bounds in ``Annotated[..., Meta(...)]`` and checked by :func:`check`.
msgspec does the checking; this module only turns its error into the node's one line, the same
words whatever the source::

    payload.max_tokens: expected an integer in 1..1073741824, got 0
    router.hang_timeout: expected a number in 1..3600, got 'abc'
    submit_query.stream: expected true or false, got 1

A check msgspec cannot express (one of two fields, a magic number, a cross-field rule) goes in
the struct's ``__post_init__``, raising ``ValueError("<field>: <what>")``: the field is named
first, and the message comes out as ``<where>.<field>: <what>``. A ``Meta(description=...)``
replaces the generic wording of what was expected (a voice name's alphabet, say).
"""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Callable, Mapping
from typing import Annotated, Any, TypeVar

import msgspec
import msgspec.inspect as mi
from msgspec import Meta

T = TypeVar("T")

_AT = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_STEP = re.compile(r"\.([^.\[]+)|\[(\d+)\]")
_OWN = re.compile(r"^(?P<field>[A-Za-z_][\w.\[\]]*): (?P<what>.+)$", re.DOTALL)


def show(value: object) -> str:
    """A short rendering of a value someone sent, for an error message (true/false as JSON and
    TOML write them; at most 60 characters)."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif value is None:
        text = "null"
    elif isinstance(value, bytes | bytearray | memoryview):
        text = f"{len(value)} bytes"
    else:
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def number(x: float) -> str:
    """A bound or setting as people write it: 2 for 2.0, 0.5 as 0.5."""
    return str(int(x)) if float(x).is_integer() else str(x)


# A JSON integer the node can store and send to a peer (msgpack, SQLite: signed 64 bits).
INT64_RANGE = (-(2**63), 2**63 - 1)
Int64 = Annotated[int, Meta(ge=INT64_RANGE[0], le=INT64_RANGE[1], description="a 64-bit integer")]


def _bounds(t: Any) -> str:
    if t.ge is not None and t.le is not None:
        return f" in {number(t.ge)}..{number(t.le)}"
    parts = [f"{op} {number(v)}" for op, v in ((">=", t.ge), (">", t.gt), ("<=", t.le), ("<", t.lt)) if v is not None]
    return " " + " and ".join(parts) if parts else ""


def _length(t: Any, unit: str) -> str:
    lo, hi = t.min_length, t.max_length
    if lo is not None and hi is not None:
        return f" of {lo}..{hi} {unit}"
    if hi is not None:
        return f" of at most {hi} {unit}"
    if lo:
        return f" of at least {lo} {unit}"
    return ""


def describe(t: Any) -> str:
    """What a value of the msgspec type ``t`` (an ``msgspec.inspect`` type) is, in words."""
    if isinstance(t, mi.Metadata):
        wording = (t.extra_json_schema or {}).get("description")
        return str(wording) if wording else describe(t.type)
    if isinstance(t, mi.BoolType):
        return "true or false"
    if isinstance(t, mi.IntType):
        if t.multiple_of is not None:
            return f"a multiple of {t.multiple_of}{_bounds(t)}"
        return f"an integer{_bounds(t)}"
    if isinstance(t, mi.FloatType):
        return f"a number{_bounds(t)}"
    if isinstance(t, mi.StrType):
        if t.min_length == 1 and t.max_length is None:
            return "a non-empty string"
        return f"a string{_length(t, 'characters')}"
    if isinstance(t, mi.BytesType | mi.ByteArrayType | mi.MemoryViewType):
        return f"bytes{_length(t, 'bytes')}"
    if isinstance(t, mi.LiteralType):
        return "one of " + "|".join(str(v) for v in t.values)
    if isinstance(t, mi.ListType | mi.VarTupleType | mi.SetType | mi.FrozenSetType):
        items = _plural(describe(t.item_type))
        if t.min_length == 1 and t.max_length is None:
            return f"a non-empty list of {items}"
        return f"a list{_length(t, items)}" if t.min_length or t.max_length is not None else f"a list of {items}"
    if isinstance(t, mi.StructType | mi.DictType | mi.TypedDictType | mi.DataclassType):
        return "an object"
    if isinstance(t, mi.UnionType):
        kinds = [describe(x) for x in t.types if not isinstance(x, mi.NoneType)]
        return " or ".join(kinds) if kinds else "null"
    if isinstance(t, mi.NoneType):
        return "null"
    return "a value"


def _plural(kind: str) -> str:
    for one, many in (
        ("an integer", "integers"),
        ("a number", "numbers"),
        ("a string", "strings"),
        ("a non-empty string", "non-empty strings"),
        ("an object", "objects"),
    ):
        if kind.startswith(one):
            return many + kind[len(one) :]
    return kind


@functools.lru_cache(maxsize=256)
def _info(typ: Any) -> Any:
    return mi.type_info(typ)


def _steps(path: str) -> list[str | int]:
    return [m[1] if m[1] is not None else int(m[2]) for m in _STEP.finditer(path)]


def _value_at(raw: Any, steps: list[str | int]) -> tuple[bool, Any]:
    for step in steps:
        try:
            raw = raw[step]
        except (KeyError, IndexError, TypeError):
            return False, None
    return True, raw


def _unwrap(t: Any, want: type | tuple[type, ...] | None = None) -> Any:
    while True:
        if isinstance(t, mi.Metadata):
            t = t.type
        elif isinstance(t, mi.UnionType):
            members = [x for x in t.types if not isinstance(x, mi.NoneType)]
            picked = [x for x in members if want is None or isinstance(_unwrap(x), want)]
            if len(picked) != 1:
                return t
            t = picked[0]
        else:
            return t


def _type_at(t: Any, steps: list[str | int]) -> Any:
    for step in steps:
        if isinstance(step, str):
            t = _unwrap(t, mi.StructType)
            if isinstance(t, mi.StructType):
                t = next((f.type for f in t.fields if f.encode_name == step), None)
            elif isinstance(t, mi.DictType):
                t = t.value_type
            else:
                return None
        else:
            t = _unwrap(t, mi.ListType)
            if not isinstance(t, mi.ListType | mi.VarTupleType):
                return None
            t = t.item_type
        if t is None:
            return None
    return t


def explain(exc: msgspec.ValidationError, raw: Any, typ: Any, where: str) -> str:
    """msgspec's error about ``raw`` (checked against ``typ``) as one line naming the field."""
    m = _AT.match(str(exc))
    assert m is not None
    msg, path = m["msg"], m["path"] or ""
    steps = _steps(path)
    here = where + path if where else path.lstrip(".")
    known = _type_at(_info(typ), steps)
    if msg.startswith("Object contains unknown field `"):
        name = msg.split("`")[1]
        fields = [f.encode_name for f in getattr(_unwrap(known, mi.StructType), "fields", ())]
        close = difflib.get_close_matches(name, fields, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"{here}: unknown field {show(name)}{hint}"
    if msg.startswith("Object missing required field `"):
        name = msg.split("`")[1]
        return f"{here}.{name}: required" if here else f"{name}: required"
    if msg.startswith(("Expected `", "Invalid enum value", "Invalid base64")) and known is not None:
        found, value = _value_at(raw, steps)
        got = f", got {show(value)}" if found else ""
        return f"{here or 'value'}: expected {describe(known)}{got}"
    if msg.startswith("Invalid value") and steps and isinstance(steps[-1], str):
        parent = _unwrap(_type_at(_info(typ), steps[:-1]))
        members = getattr(parent, "types", ())
        tags = [str(t.tag) for t in members if isinstance(t, mi.StructType) and t.tag_field == steps[-1]]
        if tags:  # a tagged union: which kinds there are
            found, value = _value_at(raw, steps)
            return f"{here}: expected one of {'|'.join(tags)}, got {show(value)}"
    own = _OWN.match(msg)
    if own is not None:  # a struct's own check naming its field
        field = own["field"]
        joined = f"{here}.{field}" if here else field
        return f"{joined}: {own['what']}"
    return f"{here or 'value'}: {msg[:1].lower()}{msg[1:]}"


def check(
    raw: Any, typ: type[T], where: str = "payload", error: Callable[[str], Exception] = ValueError, **kw: Any
) -> T:
    """``raw`` (decoded JSON, msgpack or TOML) as a ``typ``; ``error(one line)`` is raised
    naming what is wrong. ``kw`` goes to ``msgspec.convert`` (``from_attributes``, ...)."""
    if isinstance(raw, Mapping):
        for name in _binary_fields(typ):  # type: ignore[arg-type]
            if isinstance(raw.get(name), str):  # msgspec would read it as base64
                raise error(f"{where}.{name}: expected bytes, got a string")
    try:
        converted: T = msgspec.convert(raw, typ, strict=True, **kw)
        return converted
    except msgspec.ValidationError as exc:
        raise error(explain(exc, raw, typ, where)) from None


@functools.lru_cache(maxsize=256)
def _binary_fields(typ: Any) -> tuple[str, ...]:
    """A struct's fields that hold bytes: media travels as bytes (msgpack) or {"$bytes": ...}
    (JSON, decoded before this check), never as a bare base64 string."""
    t = _info(typ)
    if not isinstance(t, mi.StructType):
        return ()
    binary = (mi.BytesType, mi.ByteArrayType, mi.MemoryViewType)
    return tuple(f.encode_name for f in t.fields if isinstance(_unwrap(f.type, binary), binary))


def no_lone_surrogates(value: Any, where: str, error: Callable[[str], Exception] = ValueError, depth: int = 0) -> None:
    """Every string in ``value`` encodes as UTF-8 (JSON's ``"\\ud800"`` escapes make strings
    that cannot be stored or sent to a peer); ``error`` names the first that does not."""
    if isinstance(value, str):
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise error(f"{where}: not valid Unicode (contains a lone surrogate)") from None
    elif isinstance(value, Mapping) and depth < 16:
        for k, v in value.items():
            no_lone_surrogates(v, f"{where}.{k}", error, depth + 1)
    elif isinstance(value, list | tuple) and depth < 16:
        for i, v in enumerate(value):
            no_lone_surrogates(v, f"{where}[{i}]", error, depth + 1)


def form(typ: Any) -> list[dict[str, Any]]:
    """The top-level fields of the struct ``typ`` for a client to build a form from: name, kind
    (text, integer, number, boolean, bytes, choice, list, object), whether required, and what
    bounds, default and wording apply. JSON-able, in the struct's field order."""
    info = _info(typ)
    out: list[dict[str, Any]] = []
    for f in getattr(info, "fields", ()):
        t = _unwrap(f.type)
        field: dict[str, Any] = {"name": f.encode_name, "required": bool(f.required), "what": describe(f.type)}
        if isinstance(t, mi.BoolType):
            field["kind"] = "boolean"
        elif isinstance(t, mi.IntType | mi.FloatType):
            field["kind"] = "integer" if isinstance(t, mi.IntType) else "number"
            lo = t.ge if t.ge is not None else t.gt
            hi = t.le if t.le is not None else t.lt
            field.update({k: v for k, v in (("min", lo), ("max", hi), ("step", t.multiple_of)) if v is not None})
        elif isinstance(t, mi.StrType):
            field["kind"] = "text"
            if t.max_length is not None:
                field["max_length"] = t.max_length
        elif isinstance(t, mi.LiteralType):
            field.update(kind="choice", choices=list(t.values))
        elif isinstance(t, mi.BytesType | mi.ByteArrayType | mi.MemoryViewType):
            field["kind"] = "bytes"
        elif isinstance(t, mi.ListType | mi.VarTupleType):
            field["kind"] = "list"
        else:
            field["kind"] = "object"
        default = f.default
        if isinstance(default, bool | int | float | str) and not f.required:
            field["default"] = default
        out.append(field)
    return out
