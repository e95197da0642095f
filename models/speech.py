"""The speech realm backend: whisper.cpp (pywhispercpp) for speech to text,
espeak-ng for text to speech.

`parse_speech_payload` validates a request from an untrusted peer or
websocket client; `SpeechBackend` loads a whisper ggml model and serves both
directions. A payload carries either `audio` (transcribe it) or `text` (speak
it), never both.

Audio in. WAV, WebM/Opus (what browsers record), OGG, MP3 and FLAC are
recognised by their magic bytes. 16 kHz mono 16-bit PCM WAV is read directly;
everything else is converted by an ffmpeg subprocess (input on stdin, raw
16 kHz mono s16le on stdout, no shell, a time limit). ffmpeg is told to stop
a quarter second past `max_audio_s` (`-t`), so a small file that decodes to
hours of audio cannot make the node buffer hours of PCM; anything longer than
`max_audio_s` is refused. Clips shorter than one second are padded with
silence (whisper.cpp skips input under 1 s).

Threading model. whisper.cpp calls block (pywhispercpp releases the GIL
inside them), so loading and transcribing run in worker threads
(`trio.to_thread.run_sync`, never abandoned: a whisper context runs one
transcription at a time, so it must be over before the lock is released).
whisper.cpp calls back into Python on that worker thread: once per new
segment (the backend forwards a Progress with `trio.from_thread.run`,
which blocks the worker until the sink has taken it) and, many times a
second, an abort callback, which polls trio for cancellation. A cancelled
request makes the abort callback return True: whisper.cpp stops within one
graph computation, and the worker re-raises trio.Cancelled. The one stage
that cannot be interrupted is the log-mel spectrogram, which whisper.cpp
computes for the whole input before the first window (about 0.5 % of the
audio duration on one core). Exceptions never propagate into whisper.cpp:
the callbacks catch everything and stop the run instead.

Loading. The backend drives pywhispercpp's binding module `_pywhispercpp`
directly rather than `pywhispercpp.model.Model`, which downloads a model from
the internet when its path is not a file, ignores whisper_full's return code
and frees the context in `__del__`. `whisper_init_from_file_with_params`
returns a wrapper even when whisper.cpp returned NULL (using it would crash
the process), and whisper.cpp loads a file that ends right after its vocabulary
as an "empty model" with uninitialised weights. So before whisper.cpp sees a
file, the backend walks its whole structure (header, mel filters, vocabulary,
every tensor's name, shape, type and size, the exact end of file) and refuses
anything whisper.cpp would refuse or crash on; whisper.cpp's own error log
lines during init are captured as a second guard. whisper.cpp's log goes to
the `rentahal.models.speech` logger at DEBUG level (pywhispercpp's own
option to silence it redirects file descriptor 2 for the whole process).

Speech out: `espeak-ng --stdout -v VOICE -s SPEED` with the text on stdin.
espeak-ng writes a streaming WAV header (sizes 0x7ffff000); the backend fixes
the sizes so any WAV reader accepts the result. Without espeak-ng the backend
still transcribes (`tts_available` is False and text payloads fail with
"backend_failed").
"""

from __future__ import annotations

import atexit
import io
import logging
import os
import shutil
import struct
import threading
import time
import wave
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import msgspec
import numpy as np
import trio
from msgspec import Meta

from ..node.limits import AUDIO_CONVERT_TIMEOUT as CONVERT_TIMEOUT_S
from ..node.limits import DEFAULT_MAX_AUDIO_BYTES
from ..node.limits import TTS_TIMEOUT as TTS_TIMEOUT_S
from .base import (
    BadRequest,
    EventSink,
    ModelFailure,
    ModelLoadError,
    Progress,
    Result,
    parse_payload,
)
from .smoke import SMOKE_TEST_MODEL_NAME, is_tiny_whisper_hparams

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000  # whisper.cpp's WHISPER_SAMPLE_RATE
MIN_SPEED, MAX_SPEED, DEFAULT_SPEED = 80, 450, 175
DEFAULT_VOICE = "en"
_MIN_SAMPLES = SAMPLE_RATE + SAMPLE_RATE // 20  # whisper.cpp skips input under 1 s
VOICE_PATTERN = r"^[a-z0-9+-]{1,32}$"
FORMAT_NAMES = {"wav": "WAV", "webm": "WebM", "ogg": "OGG", "mp3": "MP3", "flac": "FLAC"}

# whisper.cpp's language codes (g_lang in src/whisper.cpp, ids 0..99).
LANGUAGES = frozenset(
    [
        "en",
        "zh",
        "de",
        "es",
        "ru",
        "ko",
        "fr",
        "ja",
        "pt",
        "tr",
        "pl",
        "ca",
        "nl",
        "ar",
        "sv",
        "it",
        "id",
        "hi",
        "fi",
        "vi",
        "he",
        "uk",
        "el",
        "ms",
        "cs",
        "ro",
        "da",
        "hu",
        "ta",
        "no",
        "th",
        "ur",
        "hr",
        "bg",
        "lt",
        "la",
        "mi",
        "ml",
        "cy",
        "sk",
        "te",
        "fa",
        "lv",
        "bn",
        "sr",
        "az",
        "sl",
        "kn",
        "et",
        "mk",
        "br",
        "eu",
        "is",
        "hy",
        "ne",
        "mn",
        "bs",
        "kk",
        "sq",
        "sw",
        "gl",
        "mr",
        "pa",
        "si",
        "km",
        "sn",
        "yo",
        "so",
        "af",
        "oc",
        "ka",
        "be",
        "tg",
        "sd",
        "gu",
        "am",
        "yi",
        "lo",
        "uz",
        "fo",
        "ht",
        "ps",
        "tk",
        "nn",
        "mt",
        "sa",
        "lb",
        "my",
        "bo",
        "tl",
        "mg",
        "as",
        "tt",
        "haw",
        "ln",
        "ha",
        "ba",
        "jw",
        "su",
        "yue",
    ]
)


# --------------------------------------------------------------------------
# payload validation


class SpeechPayload(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """What a speech query may say: audio to transcribe, or text to speak. The node's own
    max_audio_bytes and max_tts_chars apply after."""

    audio: bytes | None = None
    language: str | None = None
    text: Annotated[str, Meta(min_length=1)] | None = None
    voice: (
        Annotated[
            str, Meta(pattern=VOICE_PATTERN, description="an espeak-ng voice name ([a-z0-9+-], 1..32 characters)")
        ]
        | None
    ) = None
    speed: (
        Annotated[
            int, Meta(ge=MIN_SPEED, le=MAX_SPEED, description=f"an integer {MIN_SPEED}..{MAX_SPEED} (words per minute)")
        ]
        | None
    ) = None

    def __post_init__(self) -> None:
        if self.audio is not None and self.text is not None:
            raise ValueError("audio: give either 'audio' (to transcribe) or 'text' (to speak), not both")
        if self.audio is None and self.text is None:
            raise ValueError("audio: required (or 'text' to speak)")
        for key, only in (("language", "audio"), ("voice", "text"), ("speed", "text")):
            if getattr(self, key) is not None and getattr(self, only) is None:
                raise ValueError(f"{key}: only allowed with '{only}'")
        if self.audio is not None and not self.audio:
            raise ValueError("audio: empty")
        if self.language is not None and self.language != "auto" and self.language not in LANGUAGES:
            raise ValueError(f'language: expected "auto" or a language code such as "en", got {self.language[:60]!r}')
        if self.text is not None:
            if "\x00" in self.text:
                raise ValueError("text: contains a NUL character")
            if not self.text.strip():
                raise ValueError("text: nothing to speak (only whitespace)")


@dataclass(frozen=True)
class SpeechParams:
    """A validated request: `audio` (with its format and language) for
    transcription, or `text` (with voice and speed) for speech synthesis."""

    audio: bytes | None = None
    audio_format: str | None = None  # a key of FORMAT_NAMES
    language: str = "auto"
    text: str | None = None
    voice: str = DEFAULT_VOICE
    speed: int = DEFAULT_SPEED


def detect_audio_format(data: bytes) -> str | None:
    """The container/codec family from magic bytes, or None."""
    head = bytes(data[:12])
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"\x1a\x45\xdf\xa3":  # EBML: WebM (and Matroska)
        return "webm"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:3] == b"ID3":
        return "mp3"
    # An MPEG audio frame: 11 sync bits, a version that is not "reserved" and
    # a layer that is not 0 (layer 0 is AAC's ADTS, which is not accepted).
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:
        if head[1] & 0x18 != 0x08 and head[1] & 0x06 != 0:
            return "mp3"
    return None


def parse_speech_payload(payload: Mapping[str, object], *, max_audio_bytes: int, max_tts_chars: int) -> SpeechParams:
    """Validate a speech request payload; raise BadRequest naming the bad field."""
    p = parse_payload(payload, SpeechPayload)
    if p.audio is not None:
        if len(p.audio) > max_audio_bytes:
            raise BadRequest(f"payload.audio: {len(p.audio)} bytes; at most {max_audio_bytes}")
        fmt = detect_audio_format(p.audio)
        if fmt is None:
            raise BadRequest("payload.audio: unsupported format (expected WAV, WebM, OGG, MP3 or FLAC)")
        return SpeechParams(audio=p.audio, audio_format=fmt, language=p.language or "auto")
    text = str(p.text)
    if len(text) > max_tts_chars:
        raise BadRequest(f"payload.text: expected 1..{max_tts_chars} characters, got {len(text)}")
    return SpeechParams(
        text=text,
        voice=DEFAULT_VOICE if p.voice is None else p.voice,
        speed=DEFAULT_SPEED if p.speed is None else p.speed,
    )


def check_payload(payload: Mapping[str, object]) -> None:
    """The speech realm's rules with the widest limits any executor may set (realms/catalog.py)."""
    parse_speech_payload(payload, max_audio_bytes=1 << 30, max_tts_chars=1 << 30)


def canary(words: str, seed: int) -> dict[str, Any]:
    """A spot-check query (realms/spotcheck.py): the words spoken."""
    return {"text": words}


# --------------------------------------------------------------------------
# the ggml file, checked before whisper.cpp sees it


class _Corrupt(Exception):
    pass


# ggml_type id -> (block size, bytes per block)
_GGML_TYPES = {
    0: (1, 4),
    1: (1, 2),
    2: (32, 18),
    3: (32, 20),
    6: (32, 22),
    7: (32, 24),
    8: (32, 34),
    9: (32, 36),
    10: (256, 84),
    11: (256, 110),
    12: (256, 144),
    13: (256, 176),
    14: (256, 210),
    15: (256, 292),
    30: (1, 2),
}
# ggml_ftype (hparams.ftype % 1000) -> the ggml_type of the big matrices
_FTYPE_TO_TYPE = {
    0: 0,
    1: 1,
    2: 2,
    3: 3,
    4: 3,
    7: 8,
    8: 6,
    9: 7,
    10: 10,
    11: 11,
    12: 12,
    13: 13,
    14: 14,
}
_GGML_MAGIC = 0x67676D6C
_HPARAM_NAMES = (
    "n_vocab",
    "n_audio_ctx",
    "n_audio_state",
    "n_audio_head",
    "n_audio_layer",
    "n_text_ctx",
    "n_text_state",
    "n_text_head",
    "n_text_layer",
    "n_mels",
    "ftype",
)
_F32, _F16 = 0, 1


def _expected_tensors(hp: Mapping[str, int], wtype: int) -> dict[str, tuple[tuple[int, ...], int]]:
    """name -> (ne[0..3], ggml type) of every tensor whisper_model_load creates."""
    s, v, m = hp["n_audio_state"], hp["n_vocab"], hp["n_mels"]
    conv = _F32 if wtype == _F32 else _F16
    out: dict[str, tuple[tuple[int, ...], int]] = {}

    def put(name: str, ne: tuple[int, ...], t: int) -> None:
        out[name] = ((ne + (1, 1, 1, 1))[:4], t)

    def block(p: str, kind: str) -> None:
        put(f"{p}{kind}_ln.weight", (s,), _F32)
        put(f"{p}{kind}_ln.bias", (s,), _F32)
        put(f"{p}{kind}.query.weight", (s, s), wtype)
        put(f"{p}{kind}.query.bias", (s,), _F32)
        put(f"{p}{kind}.key.weight", (s, s), wtype)
        put(f"{p}{kind}.value.weight", (s, s), wtype)
        put(f"{p}{kind}.value.bias", (s,), _F32)
        put(f"{p}{kind}.out.weight", (s, s), wtype)
        put(f"{p}{kind}.out.bias", (s,), _F32)

    def mlp(p: str) -> None:
        put(p + "mlp_ln.weight", (s,), _F32)
        put(p + "mlp_ln.bias", (s,), _F32)
        put(p + "mlp.0.weight", (s, 4 * s), wtype)
        put(p + "mlp.0.bias", (4 * s,), _F32)
        put(p + "mlp.2.weight", (4 * s, s), wtype)
        put(p + "mlp.2.bias", (s,), _F32)

    put("encoder.positional_embedding", (s, hp["n_audio_ctx"]), _F32)
    put("encoder.conv1.weight", (3, m, s), conv)
    put("encoder.conv1.bias", (1, s), _F32)
    put("encoder.conv2.weight", (3, s, s), conv)
    put("encoder.conv2.bias", (1, s), _F32)
    put("encoder.ln_post.weight", (s,), _F32)
    put("encoder.ln_post.bias", (s,), _F32)
    for i in range(hp["n_audio_layer"]):
        block(f"encoder.blocks.{i}.", "attn")
        mlp(f"encoder.blocks.{i}.")
    put("decoder.positional_embedding", (s, hp["n_text_ctx"]), _F32)
    put("decoder.token_embedding.weight", (s, v), wtype)
    put("decoder.ln.weight", (s,), _F32)
    put("decoder.ln.bias", (s,), _F32)
    for i in range(hp["n_text_layer"]):
        block(f"decoder.blocks.{i}.", "attn")
        block(f"decoder.blocks.{i}.", "cross_attn")
        mlp(f"decoder.blocks.{i}.")
    return out


def read_whisper_ggml(path: Path) -> dict[str, int]:
    """Walk a whisper ggml file end to end; return its hparams.

    Raises _Corrupt with the reason if whisper.cpp would refuse the file, load
    it half-empty, or crash on it.
    """
    size = path.stat().st_size
    with open(path, "rb", buffering=1 << 16) as f:

        def take(n: int, what: str) -> bytes:
            data = f.read(n)
            if len(data) != n:
                raise _Corrupt(f"truncated (the file ends inside the {what})")
            return data

        magic = take(4, "header")
        if magic == b"GGUF":
            raise _Corrupt("a GGUF file, not a whisper ggml .bin model")
        if struct.unpack("<I", magic)[0] != _GGML_MAGIC:
            raise _Corrupt("not a whisper ggml model (bad magic)")
        hp = dict(zip(_HPARAM_NAMES, struct.unpack("<11i", take(44, "header")), strict=False))
        _check_hparams(hp)
        wtype = _FTYPE_TO_TYPE[hp["ftype"] % 1000]

        n_mel, n_fft = struct.unpack("<ii", take(8, "mel filters"))
        if n_mel != hp["n_mels"] or n_fft != 201:
            raise _Corrupt(f"bad mel filterbank shape {n_mel}x{n_fft}")
        f.seek(n_mel * n_fft * 4, os.SEEK_CUR)

        (n_tokens,) = struct.unpack("<i", take(4, "vocabulary"))
        if not 0 <= n_tokens <= hp["n_vocab"]:
            raise _Corrupt(f"bad vocabulary size {n_tokens}")
        for _ in range(n_tokens):
            (length,) = struct.unpack("<I", take(4, "vocabulary"))
            if length > 1024:
                raise _Corrupt("bad vocabulary entry")
            take(length, "vocabulary")

        expected = _expected_tensors(hp, wtype)
        seen: set[str] = set()
        while True:
            head = f.read(12)
            if not head:
                break
            if len(head) != 12:
                raise _Corrupt("truncated (the file ends inside a tensor header)")
            n_dims, name_len, ttype = struct.unpack("<3i", head)
            if not 1 <= n_dims <= 4 or not 1 <= name_len <= 256 or ttype not in _GGML_TYPES:
                raise _Corrupt("bad tensor header")
            ne = struct.unpack(f"<{n_dims}i", take(4 * n_dims, "tensor header"))
            try:
                name = take(name_len, "tensor header").decode("ascii")
            except UnicodeDecodeError:
                raise _Corrupt("bad tensor name") from None
            if name not in expected or name in seen:
                raise _Corrupt(f"unexpected tensor {name!r}")
            seen.add(name)
            want_ne, want_type = expected[name]
            if (ne + (1, 1, 1, 1))[:4] != want_ne:
                raise _Corrupt(f"tensor {name!r} has the wrong shape {list(ne)}")
            nelements = int(np.prod(want_ne, dtype=np.int64))
            blck, tsize = _GGML_TYPES[want_type]
            if nelements % blck:
                raise _Corrupt(f"tensor {name!r} does not fit its type")
            nbytes = nelements // blck * tsize
            # whisper_model_load's own size check, then it reads nbytes.
            fblck, fsize = _GGML_TYPES[ttype]
            if (fblck != 1 and nelements % fblck) or nelements * fsize // blck != nbytes:
                raise _Corrupt(f"tensor {name!r} has the wrong type")
            if f.tell() + nbytes > size:
                raise _Corrupt(f"truncated (the file ends inside tensor {name!r})")
            f.seek(nbytes, os.SEEK_CUR)
        if len(seen) != len(expected):
            raise _Corrupt(f"truncated or incomplete ({len(seen)} of {len(expected)} tensors)")
    return hp


def _check_hparams(hp: dict[str, int]) -> None:
    # whisper.cpp derives its special-token ids from n_vocab: only the three
    # real vocabularies (English-only, multilingual, large-v3) work.
    if hp["n_vocab"] not in (51864, 51865, 51866):
        raise _Corrupt(f"unsupported n_vocab {hp['n_vocab']}")
    if hp["n_mels"] not in (80, 128):
        raise _Corrupt(f"unsupported n_mels {hp['n_mels']}")
    if not 1 <= hp["n_audio_ctx"] <= 1500 or not 1 <= hp["n_text_ctx"] <= 448:
        raise _Corrupt("bad context sizes")
    state = hp["n_audio_state"]
    if state != hp["n_text_state"] or not 1 <= state <= 8192:
        raise _Corrupt("bad model width")
    for side in ("audio", "text"):
        heads, layers = hp[f"n_{side}_head"], hp[f"n_{side}_layer"]
        if not 1 <= heads <= state or state % heads or not 1 <= layers <= 128:
            raise _Corrupt(f"bad {side} heads/layers")
    if hp["ftype"] < 0 or hp["ftype"] % 1000 not in _FTYPE_TO_TYPE:
        raise _Corrupt(f"unsupported ftype {hp['ftype']}")


# --------------------------------------------------------------------------
# whisper.cpp's log: routed to logging; error lines captured during init

_log_lock = threading.Lock()
_log_routed = False
_capture: list[str] | None = None
_INIT_LOCK = threading.Lock()
_GGML_LOG_ERROR = 4


def _whisper_log(level: int, text: str, *_: Any) -> None:
    # Called by whisper.cpp from any thread: must never raise.
    try:
        line = str(text).rstrip()
        capture = _capture
        if capture is not None and level == _GGML_LOG_ERROR and line:
            capture.append(line)
        if line:
            log.debug("whisper.cpp: %s", line)
    except BaseException:
        pass


def _route_whisper_log(pw: Any) -> None:
    global _log_routed
    with _log_lock:
        if _log_routed:
            return
        pw.whisper_log_set(_whisper_log)
        # A Python log callback must be gone before the interpreter finalizes
        # (whisper.cpp may still log then, without a Python thread state).
        atexit.register(pw.whisper_log_set, None)
        _log_routed = True


# --------------------------------------------------------------------------
# audio helpers


def _wav_pcm16_mono16k(data: bytes) -> np.ndarray | None:
    """The samples of a 16 kHz mono 16-bit PCM WAV, or None for any other WAV."""
    try:
        with wave.open(io.BytesIO(data), "rb") as w:
            if (w.getframerate(), w.getnchannels(), w.getsampwidth()) != (SAMPLE_RATE, 1, 2):
                return None
            frames = w.readframes(w.getnframes())
    except Exception:
        return None
    return np.frombuffer(frames[: len(frames) // 2 * 2], dtype="<i2")


def _fix_streaming_wav(data: bytes) -> tuple[bytes, int, int]:
    """espeak-ng's --stdout WAV with true chunk sizes: (wav, sample_rate, frames)."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ModelFailure("speech: espeak-ng did not produce a WAV file")
    pos, fmt = 12, None
    while pos + 8 <= len(data):
        cid, csize = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        body = pos + 8
        if cid == b"fmt ":
            fmt = data[body : body + 16]
        elif cid == b"data":
            if fmt is None or len(fmt) < 16:
                break
            _channels, rate = struct.unpack("<HI", fmt[2:8])
            block = struct.unpack("<H", fmt[12:14])[0] or 1
            pcm = data[body:]
            pcm = pcm[: len(pcm) // block * block]
            head = bytearray(data[:body])
            struct.pack_into("<I", head, 4, len(head) - 8 + len(pcm))
            struct.pack_into("<I", head, pos + 4, len(pcm))
            return bytes(head) + pcm, int(rate), len(pcm) // block
        pos = body + csize + (csize & 1)
    raise ModelFailure("speech: espeak-ng produced a WAV file without audio")


def _last_line(raw: bytes) -> str:
    lines = [ln.strip() for ln in raw.decode("utf-8", "replace").splitlines() if ln.strip()]
    line = lines[-1] if lines else "no error message"
    return line if len(line) <= 200 else line[:197] + "..."


# --------------------------------------------------------------------------
# the backend


class _Run:
    """State of one transcription, shared by whisper.cpp's callbacks."""

    def __init__(self) -> None:
        self.stop: BaseException | None = None  # set once: whisper.cpp is told to abort


class SpeechBackend:
    """Speech to text with a whisper ggml model; text to speech with espeak-ng.

    One transcription at a time; speech synthesis runs alongside (a
    subprocess per request).
    """

    realm = "speech"
    gpu: bool = False  # pywhispercpp's wheel is CPU-only; the context never asks for a GPU

    def __init__(
        self,
        model_path: Path,
        *,
        threads: int = 0,
        max_audio_s: float = 600.0,
        max_tts_chars: int = 5000,
        max_audio_bytes: int = DEFAULT_MAX_AUDIO_BYTES,
    ) -> None:
        if not max_audio_s > 0:
            raise ValueError("max_audio_s must be > 0")
        if max_tts_chars < 1 or max_audio_bytes < 1:
            raise ValueError("max_tts_chars and max_audio_bytes must be >= 1")
        self.model_path = Path(model_path)
        # whisper.cpp's own default: all cores, at most 4.
        self.threads = threads if threads > 0 else min(4, os.cpu_count() or 1)
        self.max_audio_s = float(max_audio_s)
        self.max_tts_chars = max_tts_chars
        self.max_audio_bytes = max_audio_bytes
        self.model_name: str = self.model_path.stem
        self.is_smoke_test: bool = False
        self.multilingual: bool = True
        self._pw: Any = None  # the _pywhispercpp module once loaded
        self._ctx: Any = None
        self._ffmpeg: str | None = None
        self._espeak: str | None = None
        self._lock = trio.Lock()

    @property
    def tts_available(self) -> bool:
        """True when espeak-ng was found (and ran) at load time."""
        return self._espeak is not None

    @property
    def ffmpeg_available(self) -> bool:
        """True when ffmpeg was found at load time; without it only 16 kHz mono
        16-bit WAV can be transcribed."""
        return self._ffmpeg is not None

    # ---------------------------------------------------------------- load

    def _fail(self, why: str) -> ModelLoadError:
        return ModelLoadError(f"speech model {self.model_path}: {why}")

    def _load_sync(self) -> tuple[Any, Any, dict[str, int]]:
        path = self.model_path
        try:
            if not path.exists():
                raise self._fail("file not found")
            if not path.is_file():
                raise self._fail("not a regular file")
            hp = read_whisper_ggml(path)
        except _Corrupt as exc:
            raise self._fail(f"not a whisper ggml model or corrupt ({exc})") from None
        except OSError as exc:
            raise self._fail(f"cannot read file ({exc.strerror or exc})") from None
        try:
            import _pywhispercpp as pw  # the binding layer of pywhispercpp
        except ImportError as exc:
            raise self._fail(f"pywhispercpp is not usable ({exc}); install rentahal-node[speech]") from None
        _route_whisper_log(pw)
        global _capture
        cparams = pw.whisper_context_default_params()
        cparams.use_gpu = False
        with _INIT_LOCK:
            errors: list[str] = []
            _capture = errors
            try:
                ctx = pw.whisper_init_from_file_with_params(str(path), cparams)
            finally:
                _capture = None
        if ctx is None or errors:
            # The wrapper may hold NULL: never touch it.
            why = errors[-1] if errors else "whisper.cpp returned no context"
            raise self._fail(f"not a whisper ggml model or corrupt (whisper.cpp: {why})")
        return pw, ctx, hp

    async def load(self) -> None:
        """Load the model (in a worker thread) and look for ffmpeg and
        espeak-ng. Raises ModelLoadError; a missing espeak-ng or ffmpeg only
        disables what needs it (see `tts_available`, `ffmpeg_available`)."""
        async with self._lock:
            if self._ctx is not None:
                return
            pw, ctx, hp = await trio.to_thread.run_sync(self._load_sync, abandon_on_cancel=False)
            self._pw, self._ctx = pw, ctx
            self.multilingual = hp["n_vocab"] >= 51865
            self.is_smoke_test = is_tiny_whisper_hparams(hp)
            self.model_name = SMOKE_TEST_MODEL_NAME if self.is_smoke_test else self.model_path.stem
        self._ffmpeg = shutil.which("ffmpeg")
        if self._ffmpeg is None:
            log.warning("speech: ffmpeg not found: only 16 kHz mono 16-bit WAV can be transcribed")
        self._espeak = await self._find_espeak()
        if self._espeak is None:
            log.warning("speech: espeak-ng not usable: text to speech is disabled")

    @staticmethod
    async def _find_espeak() -> str | None:
        exe = shutil.which("espeak-ng")
        if exe is None:
            return None
        try:
            with trio.move_on_after(10):
                proc = await trio.run_process([exe, "--version"], capture_stdout=True, capture_stderr=True, check=False)
                return exe if proc.returncode == 0 else None
        except OSError:
            return None
        return None

    async def aclose(self) -> None:
        """Free the whisper context (after any running transcription)."""
        async with self._lock:
            ctx, self._ctx = self._ctx, None
            if ctx is not None:
                await trio.to_thread.run_sync(self._pw.whisper_free, ctx, abandon_on_cancel=False)

    # ------------------------------------------------------------ generate

    async def generate(self, payload: Mapping[str, object], send: EventSink) -> Result:
        """Transcribe `audio` or speak `text`; return the final Result.

        Transcription: output {"text", "language", "model"}, stats {"audio_s",
        "ms", "realtime_factor" (seconds of work per second of audio),
        "segments"}; a Progress("transcribing", segments so far, None)
        per segment. Speech: output {"audio" (WAV bytes), "format": "wav",
        "sample_rate"}, stats {"chars", "ms", "audio_s"}.

        Raises BadRequest for an invalid payload (including audio that does
        not decode or is too long), ModelFailure("backend_failed") if an
        engine fails or is missing, and trio.Cancelled if the calling task is
        cancelled (after whisper.cpp has stopped).
        """
        params = parse_speech_payload(payload, max_audio_bytes=self.max_audio_bytes, max_tts_chars=self.max_tts_chars)
        if self._ctx is None:
            raise ModelFailure("speech model is not loaded", code="backend_failed")
        if params.text is not None:
            return await self._speak(params)
        assert params.audio is not None and params.audio_format is not None

        language = params.language
        if not self.multilingual:
            if language not in ("auto", "en"):
                raise BadRequest(f'payload.language: this model is English-only; use "en" or "auto", not {language!r}')
            language = "en"
        start = time.perf_counter()
        pcm = await self._decode_audio(params.audio, params.audio_format)
        audio_s = len(pcm) / SAMPLE_RATE
        async with self._lock:
            ctx = self._ctx
            if ctx is None:
                raise ModelFailure("speech model is not loaded", code="backend_failed")
            text, lang, n_segments = await trio.to_thread.run_sync(
                self._transcribe_sync, ctx, pcm, language, send, abandon_on_cancel=False
            )
        elapsed = time.perf_counter() - start
        stats: dict[str, int | float | str] = {
            "audio_s": round(audio_s, 3),
            "ms": round(elapsed * 1000, 1),
            "realtime_factor": round(elapsed / audio_s, 4) if audio_s > 0 else 0.0,
            "segments": n_segments,
        }
        output = {"text": text, "language": lang, "model": self.model_name}
        return Result(output=output, stats=stats)

    async def _decode_audio(self, data: bytes, fmt: str) -> np.ndarray:
        """16 kHz mono int16 samples; BadRequest("payload.audio: ...") if the
        audio does not decode, is empty or is longer than max_audio_s."""
        limit = int(self.max_audio_s * SAMPLE_RATE)
        pcm = _wav_pcm16_mono16k(data) if fmt == "wav" else None
        if pcm is None:
            if self._ffmpeg is None:
                raise ModelFailure(
                    "speech: ffmpeg is not installed on this node: only 16 kHz mono 16-bit WAV can be transcribed",
                    code="backend_failed",
                )
            cmd = [
                self._ffmpeg,
                "-nostdin",
                "-hide_banner",
                "-loglevel",
                "error",
                "-i",
                "pipe:0",
                # stop a little past the limit: anything longer is refused,
                # and a tiny file cannot make ffmpeg write hours of PCM
                "-t",
                f"{self.max_audio_s + 0.25:.3f}",
                "-ar",
                str(SAMPLE_RATE),
                "-ac",
                "1",
                "-f",
                "s16le",
                "pipe:1",
            ]
            with trio.move_on_after(CONVERT_TIMEOUT_S) as scope:
                proc = await trio.run_process(cmd, stdin=data, capture_stdout=True, capture_stderr=True, check=False)
            if scope.cancelled_caught:
                raise BadRequest(f"payload.audio: could not be converted within {CONVERT_TIMEOUT_S:.0f} s")
            name = FORMAT_NAMES[fmt]
            if proc.returncode != 0:
                raise BadRequest(f"payload.audio: could not be decoded as {name} (ffmpeg: {_last_line(proc.stderr)})")
            out = proc.stdout
            pcm = np.frombuffer(out[: len(out) // 2 * 2], dtype="<i2")
        if len(pcm) == 0:
            raise BadRequest("payload.audio: contains no audio")
        if len(pcm) > limit:
            raise BadRequest(f"payload.audio: longer than the {self.max_audio_s:g} s this node transcribes")
        return pcm

    def _transcribe_sync(self, ctx: Any, pcm: np.ndarray, language: str, send: EventSink) -> tuple[str, str, int]:
        """Worker thread body: (text, language, number of segments)."""
        pw = self._pw
        audio = pcm.astype(np.float32) / 32768.0
        if len(audio) < _MIN_SAMPLES:
            audio = np.concatenate([audio, np.zeros(_MIN_SAMPLES - len(audio), np.float32)])
        audio = np.ascontiguousarray(audio)

        greedy = pw.whisper_sampling_strategy.WHISPER_SAMPLING_GREEDY
        params = pw.whisper_full_default_params(greedy)
        params.n_threads = self.threads
        params.print_progress = False
        params.print_realtime = False
        params.print_timestamps = False
        params.print_special = False
        params.no_context = True
        params.translate = False
        params.language = language

        run = _Run()
        worker = threading.get_ident()

        def on_segment(c: Any, n_new: int, user_data: Any = None) -> None:
            # whisper.cpp calls this on the worker thread; never raise.
            try:
                if run.stop is None:
                    done = pw.whisper_full_n_segments(c)
                    trio.from_thread.run(send, Progress("transcribing", done, None))
            except BaseException as exc:
                if run.stop is None:
                    run.stop = exc

        def should_abort() -> bool:
            try:
                if run.stop is None and threading.get_ident() == worker:
                    trio.from_thread.check_cancelled()
            except BaseException as exc:
                if run.stop is None:
                    run.stop = exc
            return run.stop is not None

        pw.assign_new_segment_callback(params, on_segment)
        pw.assign_abort_callback(params, should_abort)
        rc = pw.whisper_full(ctx, params, audio, audio.size)
        if run.stop is not None:
            raise run.stop
        if rc != 0:
            raise ModelFailure(f"speech: whisper.cpp failed (whisper_full returned {rc})", code="backend_failed")
        n = pw.whisper_full_n_segments(ctx)
        raw = b"".join(pw.whisper_full_get_segment_text(ctx, i) for i in range(n))
        lang_id = pw.whisper_full_lang_id(ctx)
        lang = (pw.whisper_lang_str(lang_id) if lang_id >= 0 else None) or language
        return raw.decode("utf-8", "replace").strip(), lang, n

    # --------------------------------------------------------- text to speech

    async def _speak(self, params: SpeechParams) -> Result:
        if self._espeak is None:
            raise ModelFailure(
                "speech: text to speech is not available on this node (espeak-ng is not installed)",
                code="backend_failed",
            )
        assert params.text is not None
        start = time.perf_counter()
        cmd = [self._espeak, "--stdout", "-v", params.voice, "-s", str(params.speed)]
        with trio.move_on_after(TTS_TIMEOUT_S) as scope:
            proc = await trio.run_process(
                cmd,
                stdin=params.text.encode("utf-8"),
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        if scope.cancelled_caught:
            raise ModelFailure(f"speech: espeak-ng took longer than {TTS_TIMEOUT_S:.0f} s", code="backend_failed")
        if proc.returncode != 0:
            err = _last_line(proc.stderr)
            if "voice" in err.lower():
                raise BadRequest(f"payload.voice: espeak-ng has no voice {params.voice!r}")
            raise ModelFailure(f"speech: espeak-ng failed ({err})", code="backend_failed")
        wav, rate, frames = _fix_streaming_wav(proc.stdout)
        elapsed = time.perf_counter() - start
        return Result(
            output={"audio": wav, "format": "wav", "sample_rate": rate},
            stats={
                "chars": len(params.text),
                "ms": round(elapsed * 1000, 1),
                "audio_s": round(frames / rate, 3) if rate else 0.0,
            },
        )
