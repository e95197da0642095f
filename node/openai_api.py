"""The OpenAI-compatible API on the UI port: ``/v1/...`` for any OpenAI client.

Each request becomes a query of this node's own users exactly like one from the web UI: stored
first, routed to the best executor (this node or a peer), failed over, answered once. The
request is shaped into a realm payload here (:func:`chat_request` and its siblings, pure
functions), and the query's events are shaped back into OpenAI's answers, whole or as
server-sent events.

=============================  ===========================================================
``POST /v1/chat/completions``  chat; with an image part (a ``data:`` URL) the vision realm
``POST /v1/completions``       chat, the prompt as one user message
``GET  /v1/models``            every model served here or by a live peer, with its realm
``POST /v1/images/generations``  imagine (``b64_json``)
``POST /v1/audio/transcriptions``  speech to text (multipart upload)
``POST /v1/audio/speech``      text to speech (wav or pcm)
=============================  ===========================================================

``model`` picks executors serving that model (``"any"``, ``"rentahal"`` or no model: any).
A streamed chat answer survives a failover: when the executor dies mid-answer the query moves
on, and the replacement's text is sent from where the client's copy ends. The seed is fixed
before the query is stored (the client's, or one picked here), so the same model answers the
same text; should a replacement ever answer differently, the stream ends with an error rather
than splicing two answers.

Keys: clients off loopback (``[api] keys = "remote"``, the default) must send
``Authorization: Bearer <key>`` (``rentahal-node keys create``); each key is a user of its own.
A client that hangs up cancels its query. Errors are OpenAI's shape:
``{"error": {"message", "type", "param", "code"}}`` with the matching HTTP status.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import email.parser
import email.policy
import json
import logging
import math
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal, Protocol

import msgspec
import trio
from msgspec import Meta

from ..models.speech import DEFAULT_SPEED, MAX_SPEED, MIN_SPEED
from ..p2p.ratelimit import client_network
from ..realms.catalog import CATALOG, MAX_MODEL_NAME
from ..realms.events import Code, QueryError
from ..realms.schema import Int64, check
from .apikeys import KEY_RE
from .config import _is_ip
from .control import is_loopback, origin_allowed
from .http import BadHead, Exchange

if TYPE_CHECKING:
    from ..p2p.ratelimit import RateLimiter
    from .apikeys import ApiKeys
    from .config import Config
    from .metrics import Metrics
    from .queries import QueryManager
    from .reports import Reports

log = logging.getLogger("rentahal.api")

ANY_MODEL = frozenset({"", "any", "rentahal", "default"})
MAX_SEED = 2**31 - 1
OPENAI_VOICES = frozenset(
    {"alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse"}
)
LOCAL_API_GUID = uuid.uuid5(uuid.NAMESPACE_URL, "rentahal:local-api-user").hex  # unkeyed loopback clients
SPEECH_FORMATS = {"wav": "audio/wav", "pcm": "audio/pcm"}
JSON = "application/json"


class ApiError(Exception):
    """An answer in OpenAI's error shape."""

    def __init__(
        self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
        param: str | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# code -> (HTTP status, OpenAI error type)
_STATUS: dict[Code, tuple[int, str]] = {
    Code.BAD_REQUEST: (400, "invalid_request_error"),
    Code.TOO_LARGE: (413, "invalid_request_error"),
    Code.TOO_MANY: (429, "rate_limit_error"),
    Code.RATE_LIMITED: (429, "rate_limit_error"),
    Code.BANNED: (403, "permission_error"),
    Code.FORBIDDEN: (403, "permission_error"),
    Code.NOT_FOUND: (404, "not_found_error"),
    Code.REALM_NOT_SERVED: (503, "service_unavailable"),
    Code.QUEUE_FULL: (503, "service_unavailable"),
    Code.BUSY: (503, "service_unavailable"),
    Code.DEADLINE_EXCEEDED: (504, "timeout"),
    Code.BACKEND_FAILED: (502, "server_error"),
    Code.UNREACHABLE: (502, "server_error"),
}


def error_for(code: str, message: str, *, model: str | None = None) -> ApiError:
    """The API error for a query that ended with ``code``."""
    try:
        c = Code(code)
    except ValueError:
        c = Code.INTERNAL
    if c is Code.REALM_NOT_SERVED and model is not None:
        return ApiError(404, message, "invalid_request_error", "model_not_found", "model")
    status, kind = _STATUS.get(c, (500, "server_error"))
    return ApiError(status, message, kind, c.value)


# --- shaping requests into realm payloads (pure) -----------------------------------------------
@dataclass
class Shaped:
    realm: str
    payload: dict[str, Any]
    model: str | None  # the model asked for (None: any)
    stream: bool = False
    include_usage: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # what shapes the answer


def _bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", None, param)


def _refused(line: str) -> ApiError:
    """realms/schema.py's one line about a request body as OpenAI's 400, ``param`` the field."""
    field_path = line.partition(":")[0]
    return _bad(line, field_path if field_path and " " not in field_path else None)


# --- request bodies: msgspec structs, checked by realms/schema.py ------------------------------
# Fields OpenAI defines that are not served here are ignored, as OpenAI-compatible servers do
# (clients send many by default); a served field with a bad value is a 400 naming it.

ModelName = Annotated[str, Meta(max_length=MAX_MODEL_NAME)]
OneChoice = Annotated[int, Meta(ge=1, le=1, description="1 (one choice per request is served)")]


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class TextPart(msgspec.Struct, tag_field="type", tag="text"):
    text: str


class ImageURL(msgspec.Struct):
    url: str


class ImagePart(msgspec.Struct, tag_field="type", tag="image_url"):
    image_url: ImageURL | str


class Message(msgspec.Struct):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart | ImagePart] | None = None


class Sampling(msgspec.Struct):
    """What chat and legacy completions requests share."""

    model: ModelName | None = None
    n: OneChoice | None = None
    max_tokens: Annotated[int, Meta(ge=1, le=1 << 20)] | None = None
    max_completion_tokens: Annotated[int, Meta(ge=1, le=1 << 20)] | None = None
    temperature: Annotated[float, Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, Meta(ge=0, le=1)] | None = None
    seed: Int64 | None = None
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = None  # an extension llama.cpp's server and vLLM also take


class ChatBody(Sampling, kw_only=True):
    messages: Annotated[list[Message], Meta(min_length=1)]
    tools: Any = None
    functions: Any = None


class CompletionBody(Sampling, kw_only=True):
    prompt: (
        Annotated[str, Meta(min_length=1)]
        | Annotated[list[Annotated[str, Meta(min_length=1)]], Meta(min_length=1, max_length=1)]
    )


class ImageBody(msgspec.Struct):
    prompt: Annotated[str, Meta(min_length=1)]
    model: ModelName | None = None
    n: OneChoice | None = None
    size: str | None = None
    seed: Annotated[int, Meta(ge=0, le=MAX_SEED)] | None = None
    response_format: str | None = None


class VoiceObject(msgspec.Struct):
    id: str | None = None


class SpeechBody(msgspec.Struct):
    input: Annotated[str, Meta(min_length=1)]
    model: ModelName | None = None
    voice: str | VoiceObject | None = None
    speed: Annotated[float, Meta(ge=0.25, le=4.0)] | None = None
    response_format: str | None = None


def _media_model(model: str | None, openai_names: tuple[str, ...]) -> str | None:
    """The model of an image or audio request: OpenAI's own names there ("tts-1", "whisper-1",
    "dall-e-3", "gpt-image-1", "gpt-4o-mini-tts"), which clients send by default, mean any."""
    model = _model(model)
    return None if model is not None and model.lower().startswith(openai_names) else model


def _model(model: str | None) -> str | None:
    if model is None:
        return None
    realm, sep, rest = model.partition(":")
    if sep and realm in CATALOG:  # "vision:<name>": how /v1/models names a model served in two realms
        model = rest
    return None if model.strip().lower() in ANY_MODEL else model


def _sampling(body: Sampling, payload: dict[str, Any], *, chat: bool) -> None:
    """max_tokens, temperature, seed (and for chat top_p, stop) into a chat or vision payload."""
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens is not None:
        payload["max_tokens"] = max_tokens
    if body.temperature is not None:
        payload["temperature"] = body.temperature
    # Fixed before the query is stored: a replacement executor after a failover answers alike.
    seed = body.seed
    payload["seed"] = (seed % (MAX_SEED + 1)) if seed is not None else secrets.randbelow(MAX_SEED + 1)
    if chat:
        if body.ignore_eos is not None:
            payload["ignore_eos"] = body.ignore_eos
        if body.top_p is not None:
            payload["top_p"] = body.top_p
        stops = [body.stop] if isinstance(body.stop, str) else body.stop
        if stops:
            payload["stop"] = stops


def _stream_flags(body: Sampling) -> tuple[bool, bool]:
    options = body.stream_options or StreamOptions()
    return bool(body.stream), options.include_usage


def data_url_bytes(url: str, where: str) -> bytes:
    """The bytes of a ``data:...;base64,...`` URL; other URLs are refused (the node fetches
    nothing on a client's behalf)."""
    if not url.startswith("data:"):
        raise _bad(f"{where}: only data: URLs are taken (the node does not fetch URLs)", where)
    meta, sep, data = url[5:].partition(",")
    if not sep or not meta.endswith(";base64"):
        raise _bad(f"{where}: expected a base64 data: URL", where)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise _bad(f"{where}: invalid base64", where) from None


def _message_parts(msg: Message, i: int) -> tuple[str, list[bytes]]:
    """A chat message's text and images."""
    if msg.content is None:
        return "", []
    if isinstance(msg.content, str):
        return msg.content, []
    texts: list[str] = []
    images: list[bytes] = []
    for j, part in enumerate(msg.content):
        if isinstance(part, TextPart):
            texts.append(part.text)
        else:
            url = part.image_url.url if isinstance(part.image_url, ImageURL) else part.image_url
            images.append(data_url_bytes(url, f"messages[{i}].content[{j}].image_url"))
    return "\n".join(texts), images


def chat_request(raw: dict[str, Any]) -> Shaped:
    """``POST /v1/chat/completions`` -> a chat payload, or a vision payload when a message
    carries an image (the vision realm answers one prompt about one image: the conversation's
    texts are joined into that prompt)."""
    body = check(raw, ChatBody, "", _refused)
    if body.tools or body.functions:
        raise _bad("tools: function calling is not served by this federation", "tools")
    stream, include_usage = _stream_flags(body)
    shaped: list[dict[str, str]] = []
    images: list[bytes] = []
    for i, msg in enumerate(body.messages):
        text, imgs = _message_parts(msg, i)
        images += imgs
        shaped.append({"role": "system" if msg.role == "developer" else msg.role, "content": text})
    model = _model(body.model)
    if images:
        if len(images) > 1:
            raise _bad("messages: at most one image per request (the vision realm answers about one)", "messages")
        prompt = "\n\n".join(m["content"] for m in shaped if m["content"] and m["role"] != "assistant")
        payload: dict[str, Any] = {"prompt": prompt, "image": images[0]}
        _sampling(body, payload, chat=False)
        realm = "vision"
    else:
        payload = {"messages": shaped}
        _sampling(body, payload, chat=True)
        realm = "chat"
    if model is not None:
        payload["model"] = model
    return Shaped(realm, payload, model, stream, include_usage)


def completion_request(raw: dict[str, Any]) -> Shaped:
    """``POST /v1/completions``: the prompt is sent as one user message of the chat realm
    (llama.cpp's chat template applies: a chat model, not raw text continuation)."""
    body = check(raw, CompletionBody, "", _refused)
    stream, include_usage = _stream_flags(body)
    prompt = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
    payload: dict[str, Any] = {"prompt": prompt, "max_tokens": 16}  # OpenAI's default length
    _sampling(body, payload, chat=True)
    model = _model(body.model)
    if model is not None:
        payload["model"] = model
    return Shaped("chat", payload, model, stream, include_usage)


def image_request(raw: dict[str, Any]) -> Shaped:
    """``POST /v1/images/generations`` -> an imagine payload (one image, ``b64_json``)."""
    body = check(raw, ImageBody, "", _refused)
    if (body.response_format or "b64_json") != "b64_json":
        raise _bad("response_format: only b64_json is served (the node keeps no image URLs)", "response_format")
    payload: dict[str, Any] = {"prompt": body.prompt}
    if body.size not in (None, "auto"):
        try:
            w, _, h = str(body.size).partition("x")
            payload["width"], payload["height"] = int(w), int(h)
        except ValueError:
            raise _bad("size: expected WIDTHxHEIGHT, e.g. 512x512", "size") from None
    if body.seed is not None:
        payload["seed"] = body.seed
    model = _media_model(body.model, ("dall-e", "gpt-image"))
    if model is not None:
        payload["model"] = model
    return Shaped("imagine", payload, model)


def speech_request(raw: dict[str, Any]) -> Shaped:
    """``POST /v1/audio/speech`` -> a text-to-speech payload. OpenAI's voice names take the
    node's default voice; an espeak-ng voice name ("en", "de", ...) is used as it is. ``speed``
    (0.25..4) scales the default words per minute."""
    body = check(raw, SpeechBody, "", _refused)
    if not body.input.strip():
        raise _bad("input: expected the text to speak", "input")
    payload: dict[str, Any] = {"text": body.input}
    voice = body.voice.id if isinstance(body.voice, VoiceObject) else body.voice  # a custom voice: its id
    if isinstance(voice, str) and voice not in OPENAI_VOICES:
        payload["voice"] = voice
    if body.speed is not None:
        payload["speed"] = max(MIN_SPEED, min(MAX_SPEED, round(DEFAULT_SPEED * body.speed)))
    fmt = body.response_format or "wav"
    if fmt not in SPEECH_FORMATS:
        raise _bad(f"response_format: expected one of {', '.join(SPEECH_FORMATS)}", "response_format")
    model = _media_model(body.model, ("tts-", "gpt-4o-mini-tts", "gpt-4o-tts"))
    if model is not None:
        payload["model"] = model
    return Shaped("speech", payload, model, extra={"format": fmt})


MAX_PARTS = 16  # a transcription upload has a file and a handful of fields


def parse_multipart(content_type: str, body: bytes) -> dict[str, str | bytes]:
    """The fields of a ``multipart/form-data`` body: text fields as str, files as bytes. At most
    MAX_PARTS parts (counted before parsing: the stdlib parser is slow on many tiny parts)."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise ApiError(415, "expected a multipart/form-data upload", "invalid_request_error")
    boundary = next(
        (
            p.split("=", 1)[1].strip().strip('"')
            for p in content_type.split(";")[1:]
            if p.strip().startswith("boundary=")
        ),
        "",
    )
    if not boundary or body.count(b"--" + boundary.encode("latin-1", "replace")) > MAX_PARTS + 1:
        raise _bad(f"the multipart body needs a boundary and at most {MAX_PARTS} parts")
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1", "replace")
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not msg.is_multipart():
        raise _bad("the multipart body could not be read")
    out: dict[str, str | bytes] = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            continue
        data = part.get_payload(decode=True) or b""
        out[name] = data if part.get_filename() is not None else data.decode("utf-8", "replace")
    return out


def transcription_request(form: dict[str, str | bytes]) -> Shaped:
    """``POST /v1/audio/transcriptions`` (multipart: file, model, language, response_format)."""
    audio = form.get("file")
    if not isinstance(audio, bytes) or not audio:
        raise _bad("file: expected an audio file upload", "file")
    payload: dict[str, Any] = {"audio": audio}
    language = form.get("language")
    if isinstance(language, str) and language:
        payload["language"] = language
    fmt = form.get("response_format") or "json"
    if fmt not in ("json", "text", "verbose_json"):
        raise _bad("response_format: expected json, text or verbose_json", "response_format")
    named = form.get("model")
    if isinstance(named, str) and len(named) > MAX_MODEL_NAME:
        raise _bad(f"model: expected a string of at most {MAX_MODEL_NAME} characters", "model")
    model = (
        _media_model(named, ("whisper-", "gpt-4o-transcribe", "gpt-4o-mini-transcribe"))
        if isinstance(named, str)
        else None
    )
    if model is not None:
        payload["model"] = model
    return Shaped("speech", payload, model, extra={"format": fmt})


# --- streamed text across failovers ------------------------------------------------------------
class Resumed:
    """The text a client has been sent, kept whole across failovers: a replacement executor's
    text is passed on only past what the client already has, and only while it agrees with it."""

    def __init__(self) -> None:
        self.sent = ""
        self.current = ""  # the text of the attempt now answering
        self.attempt: Any = None
        self.diverged = False

    def token(self, attempt: Any, text: str) -> str:
        if attempt != self.attempt:
            self.attempt, self.current = attempt, ""
        self.current += text
        return self.advance(self.current)

    def advance(self, text: str) -> str:
        """What of ``text`` (an answer so far) the client has not been sent yet."""
        if len(text) <= len(self.sent):
            self.diverged = self.diverged or not self.sent.startswith(text)
            return ""
        if not text.startswith(self.sent):
            self.diverged = True
            return ""
        new, self.sent = text[len(self.sent) :], text
        return new


# --- the API ---------------------------------------------------------------------------------
class ApiNode(Protocol):
    config: Config
    queries: QueryManager
    api_keys: ApiKeys
    submit_limiter: RateLimiter
    metrics: Metrics
    reports: Reports  # models_report: what /v1/models lists


@dataclass(frozen=True)
class Caller:
    user_guid: str
    key_id: str | None  # None: an unkeyed client on loopback
    client: str
    local: bool = False  # on this machine, not through a proxy


PROXY_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip")


def _on_this_machine(ex: Exchange) -> bool:
    """A client on loopback, and not one a reverse proxy on this machine passes on (which would
    make every client of the proxy look local: keyless and unlimited)."""
    return is_loopback(ex.client) and not any(h in ex.headers for h in PROXY_HEADERS)


def _host_name(host_header: str) -> str:
    """The name in a Host header, without its port ("[::1]:8765" -> "::1")."""
    h = host_header.strip()
    if h.startswith("["):
        return h[1:].split("]", 1)[0]
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def _finish_reason(stats: dict[str, Any]) -> str:
    return "length" if stats.get("finish_reason") == "length" else "stop"


def _usage(stats: dict[str, Any]) -> dict[str, int]:
    def n(name: str) -> int:
        v = stats.get(name)
        return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0

    prompt, completion = n("prompt_tokens"), n("tokens")
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


class OpenAIApi:
    def __init__(self, node: ApiNode) -> None:
        self.node = node
        self._parsing = trio.CapacityLimiter(1)  # multipart bodies parsed in a thread, one at a time
        self.routes: dict[tuple[str, str], Callable[[Exchange, Caller], Any]] = {
            ("POST", "/v1/chat/completions"): self.chat_completions,
            ("POST", "/v1/completions"): self.completions,
            ("GET", "/v1/models"): self.models,
            ("POST", "/v1/images/generations"): self.images,
            ("POST", "/v1/audio/transcriptions"): self.transcriptions,
            ("POST", "/v1/audio/speech"): self.speech,
        }

    # --- the edge ------------------------------------------------------------------------------
    async def handle(self, ex: Exchange) -> None:
        """Answer one request under /v1/; every failure in OpenAI's error shape."""
        try:
            self.check_origin(ex)
            caller = await self.authenticate(ex)
            path = ex.path.rstrip("/")
            route = self.routes.get((ex.method, path))
            if route is None and ex.method == "GET" and path.startswith("/v1/models/"):
                route = self.model
            if route is None:
                if any(p == path for _, p in self.routes):
                    raise ApiError(405, f"{ex.method} is not allowed on {path}", "invalid_request_error")
                raise ApiError(404, f"no route {ex.method} {path[:200]}", "invalid_request_error", "unknown_url")
            if ex.method == "POST":
                self._check_rate(caller)  # before the body is read: a refused client costs nothing
            await route(ex, caller)
        except ApiError as exc:
            await self._error(ex, exc)
        except BadHead as exc:
            await self._error(ex, ApiError(exc.status, str(exc)))
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
            pass  # the client hung up
        except Exception as exc:  # a bug must answer this request, never take the port down
            log.error("API request %s %s failed: %s: %s", ex.method, ex.path[:100], type(exc).__name__, exc)
            await self._error(ex, ApiError(500, f"internal error ({type(exc).__name__})", "server_error"))

    def check_origin(self, ex: Exchange) -> None:
        """A browser page may use the API only if it may use the websocket (the node's own page,
        or ``ui.allowed_origins``): another site the sysop visits cannot post queries through
        the sysop's browser. And a request by DNS name is refused unless it shows a key: a page
        of a name that resolves to this machine (DNS rebinding) is not this machine's client."""
        if not origin_allowed(ex.headers.get("origin"), ex.headers.get("host"), self.node.config.ui.allowed_origins):
            raise ApiError(403, "this web page's origin may not use the API (ui.allowed_origins)", "permission_error")
        host = _host_name(ex.headers.get("host", ""))
        keyed = ex.headers.get("authorization", "").lower().startswith("bearer rh-")
        if host and host != "localhost" and not _is_ip(host) and not keyed:
            raise ApiError(
                403, f"requests for host {host[:100]!r} need an API key (a DNS name is not trusted as this machine)",
                "permission_error",
            )  # fmt: skip

    async def metrics_endpoint(self, ex: Exchange) -> None:
        """``GET /metrics`` (Prometheus text format); a key is needed off loopback unless
        ``[api] metrics_need_key = false``."""
        try:
            self.check_origin(ex)
            if ex.method not in ("GET", "HEAD"):
                raise ApiError(405, "only GET /metrics")
            if ex.path.rstrip("/") != "/metrics":
                raise ApiError(404, f"no route {ex.path[:200]}", "invalid_request_error", "unknown_url")
            if self.node.config.api.metrics_need_key and (ex.headers.get("authorization") or not _on_this_machine(ex)):
                caller = await self.authenticate(ex)
                if caller.key_id is None and not _on_this_machine(ex):
                    raise ApiError(
                        401, "a key is needed for /metrics off loopback", "invalid_request_error", "invalid_api_key"
                    )
            body, content_type = self.node.metrics.exposition()
            await ex.send(200, body, content_type)
        except ApiError as exc:
            await self._error(ex, exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception as exc:
            log.error("/metrics failed: %s: %s", type(exc).__name__, exc)
            await self._error(ex, ApiError(500, f"internal error ({type(exc).__name__})", "server_error"))

    async def _error(self, ex: Exchange, exc: ApiError) -> None:
        self.node.metrics.api_error(exc.status)
        if ex.started:
            return
        extra: tuple[tuple[str, str], ...] = ()
        if exc.status == 401:
            extra = (("WWW-Authenticate", 'Bearer realm="rentahal"'),)
        with contextlib.suppress(Exception):  # a connection h11 can no longer answer on is just closed
            await ex.send(exc.status, json.dumps(exc.body()).encode(), JSON, extra)

    async def authenticate(self, ex: Exchange) -> Caller:
        auth = ex.headers.get("authorization", "")
        loopback = _on_this_machine(ex)
        mode = self.node.config.api.keys
        if auth and (loopback or mode == "none") and mode != "all" and not KEY_RE.match(auth.partition(" ")[2].strip()):
            # Clients insist on some key ("sk-no-key", "ollama"): on loopback, where none is
            # needed, a token that is not one of this node's keys is no key at all. A key of
            # this node's shape that is wrong or revoked is refused everywhere.
            auth = ""
        if auth:
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise ApiError(
                    401, "expected 'Authorization: Bearer <key>'", "invalid_request_error", "invalid_api_key"
                )
            user = await self.node.api_keys.check(token.strip())
            if user is None:
                raise ApiError(
                    401, "incorrect or revoked API key (the sysop makes keys with `rentahal-node keys create`)",
                    "invalid_request_error", "invalid_api_key",
                )  # fmt: skip
            return Caller(user.user_guid, user.key_id, ex.client, loopback)
        if mode == "all" or (mode == "remote" and not loopback):
            raise ApiError(
                401, "an API key is required (Authorization: Bearer <key>; the sysop makes keys with "
                "`rentahal-node keys create`)", "invalid_request_error", "invalid_api_key",
            )  # fmt: skip
        return Caller(LOCAL_API_GUID, None, ex.client, loopback)

    async def _json(self, ex: Exchange) -> dict[str, Any]:
        kind = ex.headers.get("content-type", "application/json").split(";", 1)[0].strip().lower()
        if kind != "application/json":  # also keeps a page's "simple" cross-site form posts out
            raise ApiError(415, f"expected Content-Type: application/json, got {kind[:60]!r}")
        raw = await ex.body(self.node.config.api.max_body_bytes)
        try:
            body = json.loads(raw, parse_constant=_no_constant)
        except (ValueError, RecursionError) as exc:
            raise _bad(f"the request body is not JSON: {str(exc)[:200]}") from None
        if not isinstance(body, dict):
            raise _bad("the request body must be a JSON object")
        return body

    def _check_rate(self, caller: Caller) -> None:
        limits = self.node.config.limits
        loopback = caller.local
        if loopback and not limits.loopback:
            return
        key = ("key", caller.key_id) if caller.key_id else ("ip", client_network(caller.client))
        wait = self.node.submit_limiter.take(key)
        if wait > 0:
            self.node.metrics.rate_limited("api")
            raise ApiError(
                429, f"more than {limits.queries_per_minute:g} queries per minute; try again in {max(wait, 0.1):.1f} s",
                "rate_limit_error", "rate_limit_exceeded",
            )  # fmt: skip

    # --- one query ----------------------------------------------------------------------------
    @asynccontextmanager
    async def _query(
        self, ex: Exchange, caller: Caller, shaped: Shaped
    ) -> AsyncIterator[trio.MemoryReceiveChannel[dict[str, Any]]]:
        """Submit the query; yield its events. A client that hangs up meanwhile cancels it."""
        send, receive = trio.open_memory_channel[dict[str, Any]](math.inf)
        try:
            query_id = await self.node.queries.submit(
                caller.user_guid, shaped.realm, shaped.payload, subscriber=send.send
            )
        except QueryError as exc:
            raise error_for(exc.code.value, exc.message, model=shaped.model) from None
        try:
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    await ex.wait_gone()
                    with trio.CancelScope(shield=True):
                        try:
                            await self.node.queries.cancel(query_id, by_guid=caller.user_guid, sysop=False)
                            log.debug("API client %s hung up: query %s cancelled", ex.client, query_id)
                        except QueryError:
                            pass  # already over
                    nursery.cancel_scope.cancel()

                nursery.start_soon(watch)
                try:
                    yield receive
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:  # the caller's own exception, wrapped by the watcher's nursery
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise

    async def _answer(self, ex: Exchange, caller: Caller, shaped: Shaped) -> dict[str, Any]:
        """The query's result event (whole answer), or the ApiError it ended with."""
        async with self._query(ex, caller, shaped) as events:
            async for event in events:
                if event["type"] == "result":
                    return event
                if event["type"] == "error":
                    raise error_for(event["code"], event["message"], model=shaped.model)
        raise trio.BrokenResourceError("client gone")  # cancelled by watch(): nobody to answer

    # --- routes -------------------------------------------------------------------------------
    async def models(self, ex: Exchange, caller: Caller) -> None:
        data = [
            {"id": m["id"], "object": "model", "created": 0, "owned_by": "rentahal", "realm": m["realm"],
             "executors": m["executors"]}
            for m in self.node.reports.models_report()
        ]  # fmt: skip
        await ex.send(200, json.dumps({"object": "list", "data": data}).encode(), JSON)

    async def model(self, ex: Exchange, caller: Caller) -> None:
        wanted = ex.path.rstrip("/")[len("/v1/models/") :]
        for m in self.node.reports.models_report():
            if m["id"] == wanted:
                body = {"id": m["id"], "object": "model", "created": 0, "owned_by": "rentahal", "realm": m["realm"]}
                await ex.send(200, json.dumps(body).encode(), JSON)
                return
        raise ApiError(
            404, f"no live executor serves model {wanted[:200]!r}", "invalid_request_error", "model_not_found"
        )

    async def chat_completions(self, ex: Exchange, caller: Caller) -> None:
        await self._text(ex, caller, chat_request(await self._json(ex)), chat=True)

    async def completions(self, ex: Exchange, caller: Caller) -> None:
        await self._text(ex, caller, completion_request(await self._json(ex)), chat=False)

    async def _text(self, ex: Exchange, caller: Caller, shaped: Shaped, *, chat: bool) -> None:
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        if not shaped.stream:
            result = await self._answer(ex, caller, shaped)
            text = str(result["output"].get("text", ""))
            model = shaped.model or str(result["output"].get("model", ""))
            stats = result.get("stats") or {}
            choice: dict[str, Any] = (
                {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None}
                if chat
                else {"index": 0, "text": text, "logprobs": None}
            )
            choice["finish_reason"] = _finish_reason(stats)
            body = {
                "id": f"{'chatcmpl' if chat else 'cmpl'}-{result['query_id']}", "object": kind, "created": created,
                "model": model, "choices": [choice], "usage": _usage(stats),
            }  # fmt: skip
            await ex.send(200, json.dumps(body).encode(), JSON)
            return

        kind += ".chunk" if chat else ""
        resumed = Resumed()
        head: dict[str, Any] = {}  # id, object, created, model: set once the query is stored

        def chunk(delta: str | None, finish: str | None = None, role: bool = False) -> dict[str, Any]:
            if chat:
                d: dict[str, Any] = (
                    {"role": "assistant", "content": ""} if role else ({"content": delta} if delta else {})
                )
                c: dict[str, Any] = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
            else:
                c = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
            return {**head, "choices": [c]}

        failed: ApiError | None = None
        async with self._query(ex, caller, shaped) as events:
            async for event in events:
                kind_ = event["type"]
                if kind_ == "error" and not head:  # nothing sent yet: a plain HTTP error
                    raise error_for(event["code"], event["message"], model=shaped.model)
                if kind_ not in ("token", "result", "error"):
                    continue  # queued, routed, accepted, failover: the client needs none of them
                if not head:  # the answer begins: open the stream
                    head.update(id=f"{'chatcmpl' if chat else 'cmpl'}-{event['query_id']}", object=kind,
                                created=created, model=shaped.model or "")  # fmt: skip
                    await ex.start(200, "text/event-stream", (("Cache-Control", "no-cache"),))
                    if chat:
                        await ex.write(_sse(chunk(None, role=True)))
                if kind_ == "token":
                    new = resumed.token(event.get("attempt"), str(event.get("text", "")))
                    if new:
                        await ex.write(_sse(chunk(new)))
                elif kind_ == "result":
                    output, stats = event["output"], event.get("stats") or {}
                    head["model"] = shaped.model or str(output.get("model", ""))
                    rest = resumed.advance(str(output.get("text", "")))
                    if resumed.diverged:
                        failed = ApiError(
                            502, "an executor failed mid-answer and its replacement answered differently; "
                            "the text streamed so far is incomplete: ask again", "server_error", "backend_failed",
                        )  # fmt: skip
                        break
                    if rest:
                        await ex.write(_sse(chunk(rest)))
                    await ex.write(_sse(chunk(None, _finish_reason(stats))))
                    if shaped.include_usage:
                        await ex.write(_sse({**head, "choices": [], "usage": _usage(stats)}))
                    await ex.write(_sse("[DONE]"))
                    break
                else:
                    failed = error_for(event["code"], event["message"], model=shaped.model)
                    break
        if not head:  # the client hung up before the answer began (watch() cancelled the query)
            raise trio.BrokenResourceError("the client hung up")
        if failed is not None:  # the stream has begun: the error goes in it
            self.node.metrics.api_error(failed.status)
            await ex.write(_sse(failed.body()))
            await ex.write(_sse("[DONE]"))
        await ex.finish()

    async def images(self, ex: Exchange, caller: Caller) -> None:
        shaped = image_request(await self._json(ex))
        result = await self._answer(ex, caller, shaped)
        image = result["output"].get("image", b"")
        if not isinstance(image, bytes):
            raise ApiError(502, "the executor answered without an image", "server_error", "backend_failed")
        b64 = base64.b64encode(image).decode()
        body = {"created": int(time.time()), "data": [{"b64_json": b64, "revised_prompt": None}]}
        await ex.send(200, json.dumps(body).encode(), JSON)

    async def transcriptions(self, ex: Exchange, caller: Caller) -> None:
        raw = await ex.body(self.node.config.api.max_body_bytes)
        form = await trio.to_thread.run_sync(
            parse_multipart, ex.headers.get("content-type", ""), raw, limiter=self._parsing
        )  # off the event loop, one at a time
        shaped = transcription_request(form)
        result = await self._answer(ex, caller, shaped)
        text = str(result["output"].get("text", ""))
        fmt = shaped.extra["format"]
        if fmt == "text":
            await ex.send(200, (text + "\n").encode(), "text/plain; charset=utf-8")
            return
        body: dict[str, Any] = {"text": text}
        if fmt == "verbose_json":
            body.update(task="transcribe", language=result["output"].get("language"),
                        duration=(result.get("stats") or {}).get("audio_s"))  # fmt: skip
        await ex.send(200, json.dumps(body).encode(), JSON)

    async def speech(self, ex: Exchange, caller: Caller) -> None:
        shaped = speech_request(await self._json(ex))
        result = await self._answer(ex, caller, shaped)
        wav = result["output"].get("audio", b"")
        if not isinstance(wav, bytes):
            raise ApiError(502, "the executor answered without audio", "server_error", "backend_failed")
        fmt = shaped.extra["format"]
        if fmt == "pcm":
            wav = _pcm_of(wav)
        await ex.send(200, wav, SPEECH_FORMATS[fmt])


def _pcm_of(wav: bytes) -> bytes:
    """The samples of a WAV file (OpenAI's "pcm": raw 16-bit little-endian)."""
    import io
    import wave

    try:
        with wave.open(io.BytesIO(wav)) as w:
            return w.readframes(w.getnframes())
    except (wave.Error, EOFError) as exc:
        raise ApiError(502, f"the executor's audio is not WAV: {exc}", "server_error", "backend_failed") from None
