"""The chat realm served by an external model server instead of a local model.

Two APIs: any OpenAI-compatible server (``api = "openai"``: Ollama, llama.cpp's server, vLLM,
LocalAI, or a hosted endpoint) through ``POST <url>/chat/completions`` with ``stream: true``,
and Anthropic's messages API (``api = "anthropic"``: ``POST <url>/v1/messages``). To the node
it is a backend like the local ones: the same payload rules (``models/chat.parse_chat_payload``),
tokens streamed as ``Token`` events, a ``Result`` with the token counts, one query at a time
through the realm's queue. A cancelled query closes its HTTP stream, which stops the server's
generation. A server that cannot be reached, answers 5xx or breaks off fails the attempt with
``backend_failed``, so the router fails the query over to another executor.

The key comes from an environment variable or a file only its owner can read: never from
node.toml (which refuses one).
"""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import httpx

from ..node.limits import EXTERNAL_CONNECT_TIMEOUT as CONNECT_TIMEOUT
from ..node.limits import EXTERNAL_READ_TIMEOUT as READ_TIMEOUT
from ..realms.events import BadRequest, Code, ExecutorFailure, FailureKind, ModelFailure, Result, Token
from .base import EventSink, ModelLoadError
from .chat import ChatParams, parse_chat_payload

ANTHROPIC_VERSION = "2023-06-01"
MAX_ERROR_CHARS = 300


def read_key(key_env: str, key_file: str, realm: str) -> str:
    """The server's key from ``key_env`` or ``key_file`` ("" if neither is set); ModelLoadError
    names what is wrong (unset variable, missing file, a file others can read)."""
    if key_env:
        key = os.environ.get(key_env, "")
        if not key:
            raise ModelLoadError(f"realms.{realm}.key_env: the environment variable {key_env} is not set")
        return key.strip()
    if key_file:
        path = Path(key_file).expanduser()
        try:
            st = path.stat()
        except OSError as exc:
            raise ModelLoadError(f"realms.{realm}.key_file: {path}: {exc.strerror or exc}") from None
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ModelLoadError(
                f"realms.{realm}.key_file: {path} is readable by others (mode {stat.S_IMODE(st.st_mode):o}); "
                f"chmod 600 {path}"
            )
        return path.read_text().strip()
    return ""


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


def _server_error(status: int, body: str, where: str) -> Exception:
    """The failure for an HTTP error answer: the request's fault (400, 413, 422: the user's),
    a full server (429, 503: busy, retry), anything else the executor's."""
    detail = body
    try:
        parsed = json.loads(body)
        err = parsed.get("error") if isinstance(parsed, dict) else None
        detail = (err.get("message") if isinstance(err, dict) else err) or detail  # type: ignore[assignment]
    except ValueError:
        pass
    message = f"{where} answered {status}: {_short(str(detail))}"
    if status in (400, 413, 422):
        return BadRequest(message)
    if status in (429, 503):
        return ExecutorFailure(message, Code.BUSY, kind=FailureKind.REFUSED, retry_after=2.0)
    return ModelFailure(message, code="backend_failed")


class ExternalChatBackend:
    """A chat backend answering through an external server's HTTP API."""

    is_smoke_test = False

    def __init__(
        self, url: str, *, api: str = "openai", remote_model: str = "", key: str = "", max_tokens_cap: int = 512,
    ) -> None:  # fmt: skip
        self.url = url.rstrip("/")
        self.api = api
        self.remote_model = remote_model
        self.key = key
        self.max_tokens_cap = max_tokens_cap
        self.model_name = remote_model or "external"
        self._client: httpx.AsyncClient | None = None

    def _headers(self) -> dict[str, str]:
        if self.api == "anthropic":
            return {"x-api-key": self.key, "anthropic-version": ANTHROPIC_VERSION} if self.key else {}
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    async def load(self) -> None:
        """Reach the server once (its model list), and learn the model to ask for if none is
        configured; ModelLoadError says why it cannot serve."""
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(READ_TIMEOUT, connect=CONNECT_TIMEOUT), headers=self._headers(), trust_env=False
        )
        if self.api == "anthropic":
            if not self.remote_model:
                raise ModelLoadError("realms.chat.remote_model: name the Anthropic model to ask for")
            return
        try:
            answer = await self._client.get(f"{self.url}/models")
        except httpx.HTTPError as exc:
            raise ModelLoadError(f"external server {self.url}: {type(exc).__name__}: {_short(str(exc))}") from None
        if answer.status_code != 200:
            raise ModelLoadError(f"external server {self.url}/models answered {answer.status_code}")
        try:
            ids = [
                m["id"] for m in answer.json().get("data", []) if isinstance(m, dict) and isinstance(m.get("id"), str)
            ]
        except (ValueError, AttributeError):
            ids = []
        if not self.remote_model:
            if not ids:
                raise ModelLoadError(f"external server {self.url} lists no model; set realms.chat.remote_model")
            self.remote_model = ids[0]
        self.model_name = self.remote_model[:256]

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def generate(self, payload: Mapping[str, object], send: EventSink) -> Result:
        params = parse_chat_payload(payload, max_tokens_cap=self.max_tokens_cap)
        if self._client is None:
            raise ModelFailure("external chat backend is not loaded", code="backend_failed")
        start = time.perf_counter()
        if self.api == "anthropic":
            url, body, pieces = f"{self.url}/v1/messages", self._anthropic_body(params), self._anthropic_pieces
        else:
            url, body, pieces = f"{self.url}/chat/completions", self._openai_body(params), self._openai_pieces
        text: list[str] = []
        usage: dict[str, Any] = {}
        finish = ""
        try:
            async with self._client.stream("POST", url, json=body) as answer:
                if answer.status_code != 200:
                    raise _server_error(answer.status_code, (await answer.aread()).decode("utf-8", "replace"), url)
                async for piece, done, counts in pieces(answer):
                    if piece:
                        await send(Token(piece, len(text)))
                        text.append(piece)
                    if done and not finish:
                        finish = done
                    usage.update(counts)
        except httpx.HTTPError as exc:
            raise ModelFailure(f"external server {self.url}: {type(exc).__name__}: {_short(str(exc))}") from None
        if not finish:  # the stream ended without saying the answer was done: it was cut off
            raise ModelFailure(f"external server {self.url}: the answer broke off after {len(text)} pieces")
        elapsed = time.perf_counter() - start
        tokens = int(usage.get("completion", len(text)))
        return Result(
            output={"text": "".join(text), "model": self.model_name},
            stats={
                "tokens": tokens,
                "prompt_tokens": int(usage.get("prompt", 0)),
                "ms": round(elapsed * 1000, 1),
                "tokens_per_s": round(tokens / elapsed, 1) if elapsed > 0 else 0.0,
                "finish_reason": finish,
            },
        )

    # --- OpenAI-compatible -----------------------------------------------------------------------
    def _openai_body(self, p: ChatParams) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.remote_model,
            "messages": [{"role": r, "content": c} for r, c in p.messages],
            "max_tokens": p.max_tokens,
            "temperature": p.temperature,
            "top_p": p.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if p.seed is not None:
            body["seed"] = p.seed
        if p.stop:
            body["stop"] = list(p.stop)
        if p.ignore_eos:
            body["ignore_eos"] = True  # llama.cpp's server and vLLM take it
        return body

    async def _openai_pieces(self, answer: httpx.Response) -> AsyncIterator[tuple[str, str, dict[str, int]]]:
        async for data in _sse_data(answer):
            if data == "[DONE]":
                yield "", "stop", {}  # the end, whether or not a finish_reason came first
                return
            chunk = _json_object(data, self.url)
            if "error" in chunk:
                raise ModelFailure(
                    f"external server {self.url}: {_short(json.dumps(chunk['error']))}", code="backend_failed"
                )
            counts: dict[str, int] = {}
            u = chunk.get("usage")
            if isinstance(u, dict):
                counts = {"prompt": _count(u.get("prompt_tokens")), "completion": _count(u.get("completion_tokens"))}
            for choice in chunk.get("choices") or ():
                if not isinstance(choice, dict):
                    continue
                piece = _obj(choice.get("delta")).get("content")
                reason = choice.get("finish_reason")
                yield (
                    (piece if isinstance(piece, str) else ""),
                    ("length" if reason == "length" else "stop" if reason else ""),
                    counts,
                )
                counts = {}
            if counts:
                yield "", "", counts

    # --- Anthropic messages ----------------------------------------------------------------------
    def _anthropic_body(self, p: ChatParams) -> dict[str, Any]:
        system = "\n\n".join(c for r, c in p.messages if r == "system")
        body: dict[str, Any] = {
            "model": self.remote_model,
            "messages": [{"role": r, "content": c} for r, c in p.messages if r != "system"],
            "max_tokens": p.max_tokens,
            "temperature": min(p.temperature, 1.0),  # Anthropic's range is 0..1
            "stream": True,
        }
        if system:
            body["system"] = system
        if p.stop:
            body["stop_sequences"] = list(p.stop)
        return body

    async def _anthropic_pieces(self, answer: httpx.Response) -> AsyncIterator[tuple[str, str, dict[str, int]]]:
        async for data in _sse_data(answer):
            event = _json_object(data, self.url)
            kind = event.get("type")
            if kind == "message_start":
                u = _obj(_obj(event.get("message")).get("usage"))
                yield "", "", {"prompt": _count(u.get("input_tokens"))}
            elif kind == "content_block_delta":
                delta = _obj(event.get("delta"))
                if delta.get("type") == "text_delta" and isinstance(delta.get("text"), str):
                    yield delta["text"], "", {}
            elif kind == "message_delta":
                reason = _obj(event.get("delta")).get("stop_reason")
                u = _obj(event.get("usage"))
                yield "", "length" if reason == "max_tokens" else "stop", {"completion": _count(u.get("output_tokens"))}
            elif kind == "error":
                raise ModelFailure(
                    f"external server {self.url}: {_short(json.dumps(event.get('error')))}", code="backend_failed"
                )
            elif kind == "message_stop":
                yield "", "stop", {}
                return


async def _sse_data(answer: httpx.Response) -> AsyncIterator[str]:
    """The data of each server-sent event (multi-line data joined)."""
    lines: list[str] = []
    async for line in answer.aiter_lines():
        if line.startswith("data:"):
            lines.append(line[5:].lstrip(" "))
        elif not line and lines:
            yield "\n".join(lines)
            lines = []
    if lines:
        yield "\n".join(lines)


def _json_object(data: str, url: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError:
        raise ModelFailure(
            f"external server {url} sent an event that is not JSON: {_short(data)}", code="backend_failed"
        ) from None
    if not isinstance(value, dict):
        raise ModelFailure(f"external server {url} sent an event that is not an object", code="backend_failed")
    return value


def _obj(value: object) -> dict[str, Any]:
    """A field that should be an object; anything else (a hostile or broken server) is empty."""
    return value if isinstance(value, dict) else {}


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 40 else 0
