"""The chat realm backend: llama.cpp (llama-cpp-python) over a GGUF file.

`parse_chat_payload` validates a request from an untrusted peer or websocket
client; `ChatBackend` loads the model and streams a chat completion.

Threading model. llama.cpp calls block, so they run in a worker thread
(`trio.to_thread.run_sync`, never abandoned: the Llama instance is not
thread-safe, so a generation must be over before the lock is released). The
worker hands each piece of text to a `TokenPipe` without waiting: it appends
the piece and, if the trio side is not already due to look, wakes it with
`TrioToken.run_sync_soon`. A pump task on the trio side sends what has piled up
as one Token (at most one event per 20 ms), so the worker samples the next
token while the node publishes the last ones, and a slow sink gets fewer, larger
events instead of slowing the generation (what piles up is text, at most
max_tokens pieces).

Per-token control. llama-cpp-python streams *text chunks*, not tokens: it
holds text back while a multi-byte UTF-8 character or a possible stop string
is incomplete, so chunks and tokens do not line up. The backend therefore
installs its own logits processor, which llama.cpp calls exactly once per
sampled token. It counts tokens, applies `ignore_eos` (a -inf logit bias on
every end-of-generation token), polls trio for cancellation, and enforces
max_tokens exactly. To stop a generation from inside llama.cpp (where Python
exceptions cannot propagate: the processor runs as a ctypes callback) it
forces the next token to be an end-of-generation token.

User stop strings are matched here rather than in llama-cpp-python, so that
the only way llama.cpp ends a generation with finish_reason "stop" is an
end-of-generation token (which is not part of the output): that keeps the
token count exact.
"""

from __future__ import annotations

import math
import os
import re
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import msgspec
import numpy as np
import outcome
import trio
from msgspec import Meta

from ..node.limits import MIN_TOKEN_EVENT_INTERVAL
from .base import (
    BadRequest,
    EventSink,
    ModelFailure,
    ModelLoadError,
    Result,
    Token,
    parse_payload,
    require_positive_int,
)
from .smoke import SMOKE_TEST_MODEL_NAME

MAX_PROMPT_CHARS = 100_000
MAX_MESSAGES = 256
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 64
MAX_SEED = 2**31 - 1
ROLES = ("system", "user", "assistant")
DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_P = 0.95  # llama.cpp's own default
_GGUF_MAGIC = b"GGUF"


# --------------------------------------------------------------------------
# payload validation


class Message(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    role: Literal["system", "user", "assistant"]
    content: Annotated[str, Meta(max_length=MAX_PROMPT_CHARS)]


class ChatPayload(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """What a chat query may say (realms/schema.py checks it; the node's own cap on max_tokens
    is applied after)."""

    prompt: Annotated[str, Meta(min_length=1, max_length=MAX_PROMPT_CHARS)] | None = None
    messages: Annotated[tuple[Message, ...], Meta(min_length=1, max_length=MAX_MESSAGES)] | None = None
    max_tokens: Annotated[int, Meta(ge=1, le=1 << 30)] | None = None
    temperature: Annotated[float, Meta(ge=0, le=2)] = DEFAULT_TEMPERATURE
    top_p: Annotated[float, Meta(ge=0, le=1)] = DEFAULT_TOP_P
    # JSON clients often send "seed": null for "no seed"; it means absent.
    seed: Annotated[int, Meta(ge=0, le=MAX_SEED)] | None = None
    ignore_eos: bool = False
    stop: Annotated[
        tuple[Annotated[str, Meta(min_length=1, max_length=MAX_STOP_CHARS)], ...], Meta(max_length=MAX_STOP_STRINGS)
    ] = ()

    def __post_init__(self) -> None:
        if self.prompt is not None and self.messages is not None:
            raise ValueError("prompt: give either 'prompt' or 'messages', not both")
        if self.prompt is None and self.messages is None:
            raise ValueError("prompt: required (or 'messages')")
        if self.messages is not None:
            total = sum(len(m.content) for m in self.messages)
            if total > MAX_PROMPT_CHARS:
                raise ValueError(f"messages: total content exceeds {MAX_PROMPT_CHARS} characters")
            if total == 0:
                raise ValueError("messages: all message contents are empty")


@dataclass(frozen=True)
class ChatParams:
    messages: tuple[tuple[str, str], ...]  # (role, content)
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    ignore_eos: bool
    stop: tuple[str, ...]


def parse_chat_payload(payload: Mapping[str, object], *, max_tokens_cap: int) -> ChatParams:
    """Validate a chat request payload; raise BadRequest naming the bad field."""
    require_positive_int("max_tokens_cap", max_tokens_cap)
    p = parse_payload(payload, ChatPayload, {"max_tokens": (1, max_tokens_cap)})
    max_tokens = min(256, max_tokens_cap) if p.max_tokens is None else p.max_tokens
    if p.messages is None:
        messages: tuple[tuple[str, str], ...] = (("user", str(p.prompt)),)
    else:
        messages = tuple((m.role, m.content) for m in p.messages)
    return ChatParams(
        messages=messages,
        max_tokens=max_tokens,
        temperature=p.temperature,
        top_p=p.top_p,
        seed=p.seed,
        ignore_eos=p.ignore_eos,
        stop=p.stop,
    )


def check_payload(payload: Mapping[str, object]) -> None:
    """The chat realm's rules with the widest limits any executor may set (realms/catalog.py)."""
    parse_chat_payload(payload, max_tokens_cap=1 << 30)


def canary(words: str, seed: int) -> dict[str, Any]:
    """A spot-check query (realms/spotcheck.py): greedy, short, reproducible."""
    return {"prompt": f"Continue: {words}", "max_tokens": 8, "temperature": 0.0, "seed": seed}


# --------------------------------------------------------------------------
# the backend


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else ""
    line = f"{type(exc).__name__}: {line}" if line else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def gguf_file_problem(path: Path) -> str | None:
    """Why `path` cannot be a GGUF model file, or None if it looks like one
    (it exists, is a regular readable file and starts with the GGUF magic)."""
    try:
        if not path.exists():
            return "file not found"
        if not path.is_file():
            return "not a regular file"
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        return f"cannot read file ({exc.strerror or exc})"
    if magic != _GGUF_MAGIC:
        return "not a GGUF file or corrupt (no GGUF header)"
    return None


def eog_tokens(llm: Any) -> tuple[np.ndarray, int | None]:
    """The end-of-generation token ids of a loaded `llama_cpp.Llama`, and the
    one to force when a generation must stop (None if the vocabulary has none)."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    n_vocab = llm.n_vocab()
    eog = np.array(
        [t for t in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t)],
        dtype=np.intc,
    )
    eos = llm.token_eos()
    stop_token = eos if eos in eog else (int(eog[0]) if len(eog) else None)
    return eog, stop_token


def open_llama(
    model_path: Path,
    *,
    n_ctx: int,
    n_gpu_layers: int,
    threads: int,
    fail: Callable[[str], ModelLoadError],
) -> tuple[Any, np.ndarray, int | None]:
    """Load a GGUF language model with llama.cpp (llama_cpp must be importable)
    and read its end-of-generation tokens: (Llama, eog ids, token to force).
    Raises `fail(why)` if llama.cpp cannot load the file or its vocabulary
    cannot be read (the Llama is closed then)."""
    import llama_cpp

    try:
        llm = llama_cpp.Llama(
            model_path=str(model_path),
            n_ctx=n_ctx,
            n_gpu_layers=n_gpu_layers,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
    except Exception:
        raise fail("not a GGUF file or corrupt (llama.cpp could not load it)") from None
    try:
        eog, stop_token = eog_tokens(llm)
    except Exception as exc:
        llm.close()
        raise fail(f"cannot read the vocabulary ({_one_line(exc)})") from None
    except BaseException:
        llm.close()
        raise
    return llm, eog, stop_token


# llama-cpp-python's own message when a prompt does not fit, and the one its
# multimodal chat handlers raise while evaluating text and image chunks.
_CTX_OVERFLOW = re.compile(r"Requested tokens \((\d+)\) exceed context window of (\d+)")
_CTX_OVERFLOW_MM = re.compile(r"Prompt exceeds n_ctx: (\d+) > (\d+)")


def _overflow(exc: BaseException, field: str) -> BadRequest | None:
    m = _CTX_OVERFLOW.search(str(exc))
    if m:
        return BadRequest(f"payload.{field}: the prompt is {m[1]} tokens; this model's context holds {m[2]}")
    m = _CTX_OVERFLOW_MM.search(str(exc))
    if m:
        return BadRequest(
            f"payload.{field}: the prompt needs at least {m[1]} tokens; this model's context holds {m[2]}"
        )
    return None


class _Run:
    """State of one generation, touched only by its worker thread."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.limit = max_tokens  # lowered to what fits in the context on 1st sample
        self.samples = 0  # tokens sampled by llama.cpp (one processor call each)
        self.prompt_tokens = 0
        self.forced: str | None = None  # "cancel" | "length" once we force an EOG
        self.cancelled: trio.Cancelled | None = None


@dataclass(frozen=True)
class Completion:
    """What `stream_chat_sync` produced: the text (exactly what was streamed),
    the generated token count (end-of-generation tokens excluded), the prompt
    token count (image tokens included) and "stop" or "length"."""

    text: str
    tokens: int
    prompt_tokens: int
    finish_reason: str


def completion_stats(done: Completion, elapsed: float) -> dict[str, int | float | str]:
    """The Result stats of a completion that took `elapsed` seconds."""
    return {
        "tokens": done.tokens,
        "prompt_tokens": done.prompt_tokens,
        "ms": round(elapsed * 1000, 1),
        "tokens_per_s": round(done.tokens / elapsed, 1) if elapsed > 0 else 0.0,
        "finish_reason": done.finish_reason,
    }


T = TypeVar("T")
MAX_TOKEN_EVENT_CHARS = 8192  # a coalesced Token stays far below the wire's 64 KiB text cap


class TokenPipe:
    """Text pieces from a worker thread to an EventSink on the trio side; see the module docstring.

    `put` is the only method a worker thread may call. Events keep the order of the pieces,
    and `index` counts events from 0 as before. The first piece goes out at once; after an
    event, the next waits until MIN_TOKEN_EVENT_INTERVAL has passed (or the worker is done)
    and joins every piece that arrived meanwhile, up to MAX_TOKEN_EVENT_CHARS characters.
    """

    def __init__(self, send: EventSink) -> None:
        self._send = send
        self._lock = threading.Lock()
        self._pending: list[str] = []
        self._signalled = False  # a wake-up is on its way to the pump
        self._trio_token = trio.lowlevel.current_trio_token()
        self._wake = trio.Event()
        self._closed = False
        self._finished = trio.Event()
        self.events = 0
        self.error: Exception | None = None  # the sink's, if it raised
        self.worker_scope = trio.CancelScope()

    def put(self, text: str) -> None:
        """Called by the worker thread: queue a piece, never wait for the sink."""
        with self._lock:
            self._pending.append(text)
            if self._signalled:
                return
            self._signalled = True
        self._trio_token.run_sync_soon(self._set_wake)

    def _set_wake(self) -> None:
        self._wake.set()

    def close(self) -> None:
        """Trio side, once the worker has returned: the pump sends what is left and ends."""
        self._closed = True
        self._finished.set()
        self._wake.set()

    async def pump(self) -> None:
        next_at = -math.inf
        try:
            while True:
                await self._wake.wait()
                if not self._closed:  # let pieces gather for up to MIN_TOKEN_EVENT_INTERVAL
                    with trio.move_on_at(next_at):
                        await self._finished.wait()
                self._wake = trio.Event()
                last = self._closed  # read before taking: every piece was put before close()
                with self._lock:
                    pieces, self._pending = self._pending, []
                    self._signalled = False
                for text in _batches(pieces):
                    await self._send(Token(text, self.events))
                    self.events += 1
                next_at = trio.current_time() + MIN_TOKEN_EVENT_INTERVAL
                if last:
                    return
        except trio.Cancelled:
            # The worker's outcome carries the cancellation; raising it here too would turn
            # it into an ExceptionGroup for every caller.
            return
        except Exception as exc:  # the sink failed: stop the worker, report the sink's error
            self.error = exc
            self.worker_scope.cancel()


def _batches(pieces: list[str]) -> list[str]:
    groups: list[list[str]] = []
    size = 0
    for piece in pieces:
        if groups and size + len(piece) <= MAX_TOKEN_EVENT_CHARS:
            groups[-1].append(piece)
            size += len(piece)
        else:
            groups.append([piece])
            size = len(piece)
    return ["".join(g) for g in groups]


async def stream_tokens(send: EventSink, work: Callable[[TokenPipe], Awaitable[T]]) -> T:
    """Run `work(pipe)` (which runs a worker thread that calls `pipe.put`) with the pump
    beside it; return its result once every piece has been sent to `send` (unless the
    caller was cancelled meanwhile: then pieces may be left unsent).

    Exceptions come out as they are, never grouped: the worker's (trio.Cancelled included),
    or the sink's if the sink raised (the worker is then cancelled at its next token).
    """
    pipe = TokenPipe(send)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pipe.pump)
        with pipe.worker_scope:
            result = await outcome.acapture(work, pipe)
        pipe.close()
    if pipe.error is not None:
        if isinstance(result, outcome.Error) and not isinstance(result.error, trio.Cancelled):
            raise pipe.error from result.error
        raise pipe.error
    return result.unwrap()


def stream_chat_sync(
    llm: Any,
    messages: list[dict[str, Any]],
    *,
    max_tokens: int,
    temperature: float,
    seed: int | None,
    put: Callable[[str], None],
    top_p: float = DEFAULT_TOP_P,
    eog_ids: np.ndarray,
    stop_token: int | None,
    ignore_eos: bool = False,
    stops: tuple[str, ...] = (),
    field: str = "prompt",
    what: str = "chat",
) -> Completion:
    """Run `llm.create_chat_completion(messages, stream=True)` in the calling
    worker thread (started with `trio.to_thread.run_sync`), handing each piece
    of text to `put` (a TokenPipe's), and return the Completion.

    This is the per-token machinery described in the module docstring; it
    works for any chat handler of the Llama instance (the multimodal handlers
    included). Raises BadRequest (naming `payload.<field>`) when the prompt
    does not fit the context, ModelFailure("<what> generation failed: ...")
    when llama.cpp fails, and trio.Cancelled once the worker has stopped.
    """
    import llama_cpp

    run = _Run(max_tokens)
    n_ctx = llm.n_ctx()
    ignore_eos = ignore_eos and len(eog_ids) > 0

    def processor(input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        # Called by llama.cpp (ctypes callback) once per sampled token.
        # Exceptions raised here would be printed and swallowed by ctypes.
        run.samples += 1
        if run.samples == 1:
            run.prompt_tokens = len(input_ids)
            run.limit = max(1, min(run.max_tokens, n_ctx - run.prompt_tokens))
        if run.forced is None:
            try:
                trio.from_thread.check_cancelled()
            except trio.Cancelled as exc:
                run.cancelled, run.forced = exc, "cancel"
            else:
                if run.samples > run.limit:
                    run.forced = "length"  # llama-cpp-python can overshoot
        if run.forced is not None and stop_token is not None:
            scores[:] = -np.inf
            scores[stop_token] = 0.0
        elif ignore_eos:
            scores[eog_ids] = -np.inf
        return scores

    if seed is None:
        seed = secrets.randbelow(MAX_SEED + 1)
    pieces: list[str] = []
    pending = ""  # text received but held back: it may start a stop string
    finish = "stop"  # "length", "stop" (an EOG token ended it) or "stop_string"
    stream = None
    try:
        trio.from_thread.check_cancelled()
        try:
            # A multimodal handler evaluates the prompt (image included) here,
            # before returning the stream.
            stream = llm.create_chat_completion(
                messages=messages,
                max_tokens=max_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=seed,
                stop=[],
                stream=True,
                logits_processor=llama_cpp.LogitsProcessorList([processor]),
            )
        except Exception as exc:
            raise _overflow(exc, field) or ModelFailure(
                f"{what} generation failed: {_one_line(exc)}", code="backend_failed"
            ) from None
        while True:
            trio.from_thread.check_cancelled()  # raises Cancelled into this thread
            if run.cancelled is not None:
                raise run.cancelled
            try:
                chunk = next(stream)
            except StopIteration:
                break
            except Exception as exc:
                raise _overflow(exc, field) or ModelFailure(
                    f"{what} generation failed: {_one_line(exc)}", code="backend_failed"
                ) from None
            choice = chunk["choices"][0]
            if choice.get("finish_reason"):
                finish = "length" if choice["finish_reason"] == "length" else "stop"
            delta = choice.get("delta", {}).get("content")
            if not delta:
                continue
            if run.cancelled is not None:
                raise run.cancelled
            emit, pending, hit = _split_on_stop(pending + delta, stops)
            if emit:
                pieces.append(emit)
                put(emit)
            if hit:
                finish = "stop_string"
                break
        if run.cancelled is not None:
            raise run.cancelled
        if finish != "stop_string" and pending:
            pieces.append(pending)
            put(pending)
    finally:
        if stream is not None:
            stream.close()  # ends llama.cpp's generator if we stopped early
    # Every sampled token is in the output except a final end-of-generation
    # token: one llama.cpp sampled ("stop") or one we forced (max_tokens).
    ended_by_eog = finish == "stop" or run.forced is not None
    tokens = max(run.samples - (1 if ended_by_eog else 0), 0)
    if run.forced == "length" and finish != "stop_string":
        finish = "length"
    return Completion(
        text="".join(pieces),
        tokens=tokens,
        prompt_tokens=run.prompt_tokens,
        finish_reason="length" if finish == "length" else "stop",
    )


class ChatBackend:
    """A GGUF chat model served by llama.cpp. One generation at a time."""

    realm = "chat"

    def __init__(
        self,
        model_path: Path,
        *,
        n_ctx: int = 2048,
        n_gpu_layers: int = 0,
        threads: int = 0,
        max_tokens_cap: int = 512,
    ) -> None:
        if max_tokens_cap < 1:
            raise ValueError("max_tokens_cap must be >= 1")
        self.model_path = Path(model_path)
        self.n_ctx = n_ctx
        self.n_gpu_layers = n_gpu_layers
        self.threads = threads if threads > 0 else (os.cpu_count() or 1)
        self.max_tokens_cap = max_tokens_cap
        # Provisional until load() reads the GGUF metadata.
        self.model_name: str = self.model_path.stem
        self.is_smoke_test: bool = False
        self._llm: Any = None  # llama_cpp.Llama once loaded
        self._eog_ids: np.ndarray = np.zeros(0, dtype=np.intc)
        self._stop_token: int | None = None  # an EOG token we can force
        self._lock = trio.Lock()

    # ---------------------------------------------------------------- load

    def _fail(self, why: str) -> ModelLoadError:
        return ModelLoadError(f"chat model {self.model_path}: {why}")

    def _check_file(self) -> None:
        why = gguf_file_problem(self.model_path)
        if why is not None:
            raise self._fail(why)

    def _load_sync(self) -> tuple[Any, np.ndarray, int | None]:
        self._check_file()
        try:
            import llama_cpp  # noqa: F401 - heavy import: keep it off module import
        except ImportError as exc:
            raise self._fail(f"llama-cpp-python is not usable ({_one_line(exc)})") from None
        return open_llama(
            self.model_path,
            n_ctx=self.n_ctx,
            n_gpu_layers=self.n_gpu_layers,
            threads=self.threads,
            fail=self._fail,
        )

    async def load(self) -> None:
        """Load the model (in a worker thread). Raises ModelLoadError."""
        async with self._lock:
            if self._llm is not None:
                return
            llm, eog, stop_token = await trio.to_thread.run_sync(self._load_sync, abandon_on_cancel=False)
            self._llm, self._eog_ids, self._stop_token = llm, eog, stop_token
            name = llm.metadata.get("general.name", "").strip()
            self.model_name = name or self.model_path.stem
            self.is_smoke_test = name == SMOKE_TEST_MODEL_NAME

    async def aclose(self) -> None:
        """Free the model. Waits for a running generation to finish first."""
        async with self._lock:
            llm, self._llm = self._llm, None
            if llm is not None:
                await trio.to_thread.run_sync(llm.close, abandon_on_cancel=False)

    # ------------------------------------------------------------ generate

    async def generate(self, payload: Mapping[str, object], send: EventSink) -> Result:
        """Stream a chat completion to `send`; return the final Result.

        Raises BadRequest for an invalid payload, ModelFailure("backend_failed")
        if llama.cpp fails, and trio.Cancelled (after the worker has stopped,
        within a token) if the calling task is cancelled.
        """
        params = parse_chat_payload(payload, max_tokens_cap=self.max_tokens_cap)
        field = "prompt" if "prompt" in payload else "messages"
        async with self._lock:
            if self._llm is None:
                raise ModelFailure("chat model is not loaded", code="backend_failed")
            start = time.perf_counter()
            llm = self._llm
            done = await stream_tokens(
                send,
                lambda pipe: trio.to_thread.run_sync(
                    self._generate_sync, llm, params, field, pipe.put, abandon_on_cancel=False
                ),
            )
            elapsed = time.perf_counter() - start
        return Result(
            output={"text": done.text, "model": self.model_name},
            stats=completion_stats(done, elapsed),
        )

    def _generate_sync(self, llm: Any, params: ChatParams, field: str, put: Callable[[str], None]) -> Completion:
        """Worker thread body."""
        return stream_chat_sync(
            llm,
            [{"role": r, "content": c} for r, c in params.messages],
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            seed=params.seed,
            put=put,
            eog_ids=self._eog_ids,
            stop_token=self._stop_token,
            ignore_eos=params.ignore_eos,
            stops=params.stop,
            field=field,
        )


def _split_on_stop(text: str, stops: tuple[str, ...]) -> tuple[str, str, bool]:
    """Split streamed text into (emit now, hold back, stop string found)."""
    if not stops:
        return text, "", False
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    if cut >= 0:
        return text[:cut], "", True
    # Hold back the longest tail that could still grow into a stop string.
    keep = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), keep, -1):
            if text.endswith(s[:k]):
                keep = k
                break
    return text[: len(text) - keep], text[len(text) - keep :], False
