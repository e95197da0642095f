"""Helpers shared by the model backend tests (chat, vision, imagine, speech)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from rentahal.models.base import ModelLoadError, Progress, Token


class Collector:
    """An event sink that keeps every event it is sent, in order."""

    def __init__(self) -> None:
        self.events: list[Token | Progress] = []

    async def __call__(self, ev: Token | Progress) -> None:
        self.events.append(ev)

    @property
    def tokens(self) -> list[Token]:
        return [e for e in self.events if isinstance(e, Token)]

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.tokens)


@asynccontextmanager
async def loaded(backend: Any) -> AsyncIterator[Any]:
    """`await backend.load()`, then the backend; `aclose()` it on the way out
    whatever happens (after a successful load)."""
    await backend.load()
    try:
        yield backend
    finally:
        await backend.aclose()


async def load_error(backend: Any) -> str:
    """The one-line ModelLoadError message `backend.load()` must raise (with
    code "backend_failed")."""
    with pytest.raises(ModelLoadError) as info:
        await backend.load()
    message = info.value.message
    assert "\n" not in message
    assert info.value.code == "backend_failed"
    return message
