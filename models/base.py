"""Backend-neutral event and error types shared by every model backend.

A backend takes a request payload and produces events; it knows nothing of
peers, sockets or the federation. Streaming output goes through an
`EventSink` (an async callable the backend awaits for each event, which gives
natural backpressure), and the final answer is returned as a `ResultEvent`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class TokenEvent:
    """A piece of streamed text. `index` counts events of one request from 0."""

    text: str
    index: int


@dataclass(frozen=True)
class ProgressEvent:
    """Progress of a long stage (e.g. "load", "prompt"); total None if unknown."""

    stage: str
    done: int
    total: int | None


@dataclass(frozen=True)
class ResultEvent:
    """The final result. `stats` values are int, float or str only."""

    output: dict
    stats: dict


EventSink = Callable[[TokenEvent | ProgressEvent], Awaitable[None]]


class BackendError(Exception):
    """A request failed. `code` is a stable machine-readable reason:

    "bad_request" (the payload is at fault), "backend_failed" (the model or
    the engine is at fault), "cancelled" (the request was withdrawn).
    """

    code: str = "backend_failed"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self)


class BadPayload(BackendError):
    """The request payload is invalid; the message names the offending field,
    e.g. "payload.max_tokens: expected an integer 1..512, got -3"."""

    code = "bad_request"

    def __init__(self, message: str) -> None:
        super().__init__(message, code="bad_request")


class ModelLoadError(BackendError):
    """The model file could not be loaded; the message is one clear line,
    e.g. "chat model /x/y.gguf: file not found"."""

    code = "backend_failed"

    def __init__(self, message: str) -> None:
        super().__init__(message, code="backend_failed")
