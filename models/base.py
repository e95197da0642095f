"""What every model backend shares: the event sink and the payload checks.

A backend takes a request payload and produces the query events of
``realms.events`` (``Token``, ``Progress``, a final ``Result``); it knows
nothing of peers, sockets or the federation. Streaming output goes through an
`EventSink` (an async callable the backend awaits for each event, which gives
natural backpressure). It fails with ``BadRequest`` (the payload is at fault)
or ``ModelFailure`` (the model or the engine is).

The checks at the end (`show_value`, `check_object`, `reject_unknown_keys`,
`check_string`, `check_int_range`, ...) are the pieces every backend's payload
parser builds on, so a given mistake reads the same in every realm.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Collection, Mapping

from ..realms.events import BadRequest, ModelFailure, Progress, Result, Token

__all__ = ["BadRequest", "EventSink", "ModelFailure", "ModelLoadError", "Progress", "Result", "Token"]

EventSink = Callable[[Token | Progress], Awaitable[None]]


class ModelLoadError(ModelFailure):
    """The model file could not be loaded; the message is one clear line,
    e.g. "chat model /x/y.gguf: file not found"."""


# --------------------------------------------------------------------------
# checks on hostile payloads, shared by every backend's payload parser


def show_value(value: object) -> str:
    """A short repr of a hostile value for an error message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def is_int(value: object) -> bool:
    """An int and not a bool (True is an int to Python, not to a payload)."""
    return isinstance(value, int) and not isinstance(value, bool)


def require_positive_int(name: str, value: object) -> None:
    """Raise ValueError unless the setting `name` is an int >= 1 (a node's own
    configuration, not a payload: a programming or config error)."""
    if not is_int(value) or value < 1:  # type: ignore[operator]
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_object(value: object, where: str = "payload") -> None:
    """BadRequest("<where>: expected an object, ...") unless `value` is a Mapping."""
    if not isinstance(value, Mapping):
        raise BadRequest(f"{where}: expected an object, got {type(value).__name__}")


def reject_unknown_keys(mapping: Mapping[object, object], allowed: Collection[object], where: str = "payload") -> None:
    """BadRequest naming every key of `mapping` that is not in `allowed`."""
    unknown = [k for k in mapping if k not in allowed]
    if unknown:
        names = ", ".join(sorted(show_value(k) for k in unknown))
        raise BadRequest(f"{where}: unknown field(s) {names}")


def check_text(field: str, value: str) -> None:
    """BadRequest unless `value` encodes as UTF-8 (no lone surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"{field}: not valid Unicode (contains a lone surrogate)") from None


def check_string(field: str, value: object, max_chars: int) -> str:
    """`value` as a string of 1..max_chars characters of valid Unicode, or
    BadRequest naming `field`."""
    if not isinstance(value, str):
        raise BadRequest(f"{field}: expected a string, got {type(value).__name__}")
    if not 1 <= len(value) <= max_chars:
        raise BadRequest(f"{field}: expected 1..{max_chars} characters, got {len(value)}")
    check_text(field, value)
    return value


def check_int_range(field: str, value: object, lo: int, hi: int) -> int:
    """`value` as an integer (not a bool) in lo..hi, or BadRequest naming `field`."""
    if not (is_int(value) and lo <= value <= hi):  # type: ignore[operator]
        raise BadRequest(f"{field}: expected an integer {lo}..{hi}, got {show_value(value)}")
    return value  # type: ignore[return-value]


def check_number_range(field: str, value: object, lo: float, hi: float) -> float:
    """`value` as a finite int or float (not a bool) in lo..hi, or BadRequest
    naming `field`; the bounds are shown with format spec "g" (2.0 -> 2)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not lo <= value <= hi
    ):
        raise BadRequest(f"{field}: expected a number {lo:g}..{hi:g}, got {show_value(value)}")
    return float(value)
