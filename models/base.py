"""What every model backend shares: the event sink and the payload checks.

A backend takes a request payload and produces the query events of
``realms.events`` (``Token``, ``Progress``, a final ``Result``); it knows
nothing of peers, sockets or the federation. Streaming output goes through an
`EventSink` (an async callable the backend awaits for each event, which gives
natural backpressure). It fails with ``BadRequest`` (the payload is at fault)
or ``ModelFailure`` (the model or the engine is).

Each backend describes its payload as a msgspec Struct and reads it with
`parse_payload` (realms/schema.py), so a given mistake reads the same in every
realm.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from types import MappingProxyType
from typing import TypeVar

from ..realms.events import BadRequest, ModelFailure, Progress, Result, Token
from ..realms.schema import check, no_lone_surrogates, show

__all__ = ["BadRequest", "EventSink", "ModelFailure", "ModelLoadError", "Progress", "Result", "Token"]

P = TypeVar("P")
EventSink = Callable[[Token | Progress], Awaitable[None]]


class ModelLoadError(ModelFailure):
    """The model file could not be loaded; the message is one clear line,
    e.g. "chat model /x/y.gguf: file not found"."""


# --------------------------------------------------------------------------
# checks on hostile payloads: each realm's payload is a msgspec Struct (realms/schema.py)


def parse_payload(payload: object, typ: type[P], caps: Mapping[str, tuple[int, int]] = MappingProxyType({})) -> P:
    """``payload`` as the realm's payload struct ``typ``, or BadRequest naming the bad field in
    the same words for every realm ("payload.steps: expected an integer in 1..50, got 0").
    ``caps`` are this node's own bounds on integer fields ({"max_tokens": (1, 512)}), checked
    first so the message names the range this node takes."""
    if isinstance(payload, Mapping):
        for name, (lo, hi) in caps.items():
            v = payload.get(name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi):
                raise BadRequest(f"payload.{name}: expected an integer in {lo}..{hi}, got {show(v)}")
    no_lone_surrogates(payload, "payload", BadRequest)
    return check(payload, typ, "payload", BadRequest)


def require_positive_int(name: str, value: object) -> None:
    """Raise ValueError unless the setting `name` is an int >= 1 (a node's own
    configuration, not a payload: a programming or config error)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
