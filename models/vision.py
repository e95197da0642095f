"""The vision realm backend: an image and a question in, streamed text out.

Runs LLaVA / Qwen-VL class models the way llama.cpp does at home: a GGUF
language model plus its multimodal projector GGUF ("mmproj", architecture
"clip": a vision encoder and a projector into the language model's embedding
space), loaded by llama.cpp's `mtmd` library through llama-cpp-python.

Untrusted images. `parse_vision_payload` (cheap, safe on the event loop)
checks the image's type by its magic bytes and reads its dimensions from the
header with a small bounded parser of our own, so an image claiming too many
pixels (a decompression bomb) is refused before any decoder sees it.
`prepare_image` (in the worker thread) then decodes it with Pillow, restricted
to the one format the magic names, applies the EXIF orientation, flattens
transparency onto white, downscales it so the longer side is at most
`resize_to` and re-encodes it as PNG. llama.cpp never parses the untrusted
file: the bitmap it gets is built from our own RGB pixels
(`mtmd_bitmap_init`), not from its stb_image/ffmpeg-based helpers.

Generation reuses the chat backend's machinery (`chat.stream_chat_sync`):
llama-cpp-python's multimodal chat handlers evaluate the prompt (text chunks
and the image's embedding) inside `create_chat_completion`, then stream
through the same `create_completion` path as chat, so the per-token logits
processor (exact token counts, max_tokens, cancellation within a token) works
unchanged. The image encoding itself is one blocking llama.cpp call: a
cancellation during it takes effect when it returns.

Prompt format. A model whose GGUF carries a chat template is prompted through
it (as llama-cpp-python's `MTMDChatHandler` does), with the user message
flattened to a string: the media marker, a newline, the question (so that
templates written for string content work too); a BOS the template renders is
dropped, since mtmd's tokenizer adds the model's own. A model without a
template (most LLaVA-1.5 conversions) gets LLaVA v1's format through
`Llava15ChatHandler`, whose stock template loses its separators. Both
handlers are subclassed here to take the image from us (no URL fetching: the
stock handlers would `urlopen` any non-data URL, file:// included) and to
build the bitmap from our pixels.

Logging. mtmd/clip print to stderr by default; the first load routes them
through llama-cpp-python's logger (silent unless a Llama is verbose), and a
loading thread collects the error lines so a ModelLoadError can say what
llama.cpp objected to (e.g. a projector made for another model).
"""

from __future__ import annotations

import base64
import ctypes
import functools
import io
import os
import re
import secrets
import struct
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import msgspec
import numpy as np
import trio
from msgspec import Meta

from ..node.limits import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_PIXELS
from ..node.limits import IMAGE_HEADER_STEPS as _MAX_HEADER_STEPS
from .base import (
    BadRequest,
    EventSink,
    ModelFailure,
    ModelLoadError,
    Result,
    parse_payload,
    require_positive_int,
)
from .chat import (
    MAX_SEED,
    Completion,
    _one_line,
    completion_stats,
    gguf_file_problem,
    open_llama,
    parse_chat_payload,
    stream_chat_sync,
    stream_tokens,
)
from .smoke import SMOKE_TEST_MODEL_NAME

MAX_PROMPT_CHARS = 20_000
MEDIA_MARKER = "<__media__>"  # mtmd_default_marker(); checked at load
DEFAULT_RESIZE_TO = 672
_CHAT_KEYS = ("prompt", "max_tokens", "temperature", "seed")
_IMAGE_KEY_PREFIX = "rentahal-image://"

# --------------------------------------------------------------------------
# image headers (pure Python, bounded: safe to run on the event loop)

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


class _HeaderError(ValueError):
    pass


def image_format(data: bytes) -> str | None:
    """The format the magic bytes name ("PNG", "JPEG", "WEBP", "GIF"), or None."""
    if data.startswith(_PNG_MAGIC):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    return None


def _u16be(data: bytes, at: int) -> int:
    if at + 2 > len(data):
        raise _HeaderError("truncated header")
    return int(struct.unpack_from(">H", data, at)[0])


def _png_size(data: bytes) -> tuple[int, int]:
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise _HeaderError("no IHDR chunk")
    w, h = struct.unpack_from(">II", data, 16)
    return int(w), int(h)


def _jpeg_size(data: bytes) -> tuple[int, int]:
    i = 2
    for _ in range(_MAX_HEADER_STEPS):
        if i >= len(data) or data[i] != 0xFF:
            raise _HeaderError("no frame header")
        while i < len(data) and data[i] == 0xFF:  # marker, with optional fill bytes
            i += 1
        if i >= len(data):
            raise _HeaderError("no frame header")
        marker = data[i]
        i += 1
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # no payload
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before a frame
            raise _HeaderError("no frame header")
        length = _u16be(data, i)
        if length < 2:
            raise _HeaderError("bad segment length")
        if marker in _JPEG_SOF:
            h, w = _u16be(data, i + 3), _u16be(data, i + 5)
            if h == 0:
                raise _HeaderError("height defined later in the stream (DNL)")
            return w, h
        i += length
    raise _HeaderError("too many segments before the frame header")


def _webp_size(data: bytes) -> tuple[int, int]:
    if len(data) < 30:
        raise _HeaderError("truncated header")
    chunk = data[12:16]
    if chunk == b"VP8 ":
        if data[23:26] != b"\x9d\x01\x2a":
            raise _HeaderError("bad VP8 start code")
        w, h = struct.unpack_from("<HH", data, 26)
        return int(w) & 0x3FFF, int(h) & 0x3FFF
    if chunk == b"VP8L":
        if data[20] != 0x2F:
            raise _HeaderError("bad VP8L signature")
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        w = int.from_bytes(data[24:27], "little") + 1
        h = int.from_bytes(data[27:30], "little") + 1
        return w, h
    raise _HeaderError("unknown WebP chunk")


def _gif_size(data: bytes) -> tuple[int, int]:
    # The logical screen, grown to hold the first frame (as Pillow does).
    if len(data) < 13:
        raise _HeaderError("truncated header")
    w, h, flags = struct.unpack_from("<HHB", data, 6)
    i = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    steps = 0
    while i < len(data):
        block = data[i]
        if block == 0x2C:  # image descriptor
            if i + 9 > len(data):
                raise _HeaderError("truncated image descriptor")
            left, top, fw, fh = struct.unpack_from("<HHHH", data, i + 1)
            return max(w, left + fw), max(h, top + fh)
        if block != 0x21:  # only extensions may come before the first image
            raise _HeaderError("no image descriptor")
        i += 2  # introducer and label, then sub-blocks up to a 0 terminator
        while i < len(data):
            steps += 1
            if steps > _MAX_HEADER_STEPS:
                raise _HeaderError("too many blocks before the image")
            size = data[i]
            i += 1 + size
            if size == 0:
                break
    raise _HeaderError("no image descriptor")


_SIZE_READERS = {"PNG": _png_size, "JPEG": _jpeg_size, "WEBP": _webp_size, "GIF": _gif_size}


def _check_image(data: object, *, max_bytes: int, max_pixels: int) -> tuple[str, int, int]:
    """Type, size and header checks on untrusted image bytes, without
    decoding: returns (format, width, height) or raises BadRequest."""
    if isinstance(data, bytearray):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise BadRequest(f"payload.image: expected binary image data, got {type(data).__name__}")
    if not data:
        raise BadRequest("payload.image: empty")
    if len(data) > max_bytes:
        raise BadRequest(f"payload.image: {len(data)} bytes exceeds the limit of {max_bytes}")
    fmt = image_format(data)
    if fmt is None:
        raise BadRequest("payload.image: not a PNG, JPEG, WebP or GIF image")
    try:
        w, h = _SIZE_READERS[fmt](data)
    except (_HeaderError, struct.error, IndexError) as exc:
        raise BadRequest(f"payload.image: corrupt {fmt} header ({exc})") from None
    _check_pixels(fmt, w, h, max_pixels)
    return fmt, w, h


def _check_pixels(fmt: str, w: int, h: int, max_pixels: int) -> None:
    if w < 1 or h < 1:
        raise BadRequest(f"payload.image: {fmt} header gives an empty image ({w}x{h})")
    if w * h > max_pixels:
        raise BadRequest(f"payload.image: {w}x{h} is {w * h} pixels; the limit is {max_pixels}")


# --------------------------------------------------------------------------
# decoding (Pillow; run it off the event loop)


def _fit(w: int, h: int, resize_to: int) -> tuple[int, int]:
    """The size with the longer side at most resize_to, aspect kept."""
    if max(w, h) <= resize_to:
        return w, h
    scale = resize_to / max(w, h)
    return max(1, min(resize_to, round(w * scale))), max(1, min(resize_to, round(h * scale)))


def _to_rgb(im: Any) -> Any:
    from PIL import Image

    if im.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        arr = np.asarray(im)
        if arr.size and int(arr.max()) > 255:  # 16-bit samples
            arr = arr >> 8
        im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        im = im.convert("RGBA")
        flat = Image.new("RGB", im.size, (255, 255, 255))
        flat.paste(im, mask=im.getchannel("A"))
        return flat
    return im if im.mode == "RGB" else im.convert("RGB")


def _decode_rgb(data: bytes, *, max_bytes: int, max_pixels: int, resize_to: int) -> Any:
    """Validate and decode untrusted image bytes into a PIL RGB image whose
    longer side is at most resize_to. Raises BadRequest naming payload.image."""
    from PIL import Image, ImageOps

    if resize_to < 1:
        raise ValueError(f"resize_to must be >= 1, got {resize_to}")
    fmt, _w, _h = _check_image(data, max_bytes=max_bytes, max_pixels=max_pixels)
    try:
        # formats=[fmt]: no other Pillow plugin is ever tried on these bytes.
        with Image.open(io.BytesIO(bytes(data)), formats=[fmt]) as im:
            _check_pixels(fmt, *im.size, max_pixels)  # Pillow's view of the header too
            if fmt == "JPEG":  # let libjpeg decode at a reduced scale
                im.draft("RGB", _fit(*im.size, resize_to))
            im.load()  # the first frame only, for GIF and animated WebP
            im = ImageOps.exif_transpose(im) or im
            im = _to_rgb(im)
            size = _fit(*im.size, resize_to)
            if size != im.size:
                im = im.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
            return im
    except BadRequest:
        raise
    except Exception as exc:  # Pillow raises many types on hostile input
        raise BadRequest(f"payload.image: cannot decode the {fmt} image ({_one_line(exc)})") from None


def prepare_image(data: bytes, *, max_bytes: int, max_pixels: int, resize_to: int) -> bytes:
    """Validate untrusted image bytes and return them as a clean RGB PNG.

    PNG, JPEG, WebP and GIF (first frame) are accepted, recognised by their
    magic bytes; the pixel count is checked from the header before anything
    is decoded. The result is RGB (transparency flattened onto white, EXIF
    orientation applied), downscaled so the longer side is <= resize_to.
    Raises BadRequest naming payload.image on any failure.
    """
    im = _decode_rgb(data, max_bytes=max_bytes, max_pixels=max_pixels, resize_to=resize_to)
    out = io.BytesIO()
    im.save(out, "PNG", compress_level=1)
    return out.getvalue()


# --------------------------------------------------------------------------
# payload validation


class VisionPayload(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """What a vision query may say: one prompt about one image. prompt, max_tokens, temperature
    and seed mean what they mean for chat (checked by chat's rules, then the node's caps)."""

    prompt: Annotated[str, Meta(min_length=1, max_length=MAX_PROMPT_CHARS)]
    image: bytes
    max_tokens: Annotated[int, Meta(ge=1, le=1 << 30)] | None = None
    temperature: Annotated[float, Meta(ge=0, le=2)] | None = None
    seed: Annotated[int, Meta(ge=0, le=MAX_SEED)] | None = None

    def __post_init__(self) -> None:
        if MEDIA_MARKER in self.prompt:
            raise ValueError(f"prompt: must not contain {MEDIA_MARKER}")


@dataclass(frozen=True)
class VisionParams:
    prompt: str
    image: bytes  # as received; checked to the header, not decoded yet
    image_format: str  # "PNG" | "JPEG" | "WEBP" | "GIF"
    width: int
    height: int
    max_tokens: int
    temperature: float
    seed: int | None


def parse_vision_payload(
    payload: Mapping[str, object], *, max_tokens_cap: int, max_image_bytes: int, max_pixels: int
) -> VisionParams:
    """Validate a vision request payload; raise BadRequest naming the bad field.

    The image is checked (type by magic, byte size, header dimensions) but not
    decoded: `prepare_image` does that, off the event loop.
    """
    p = parse_payload(payload, VisionPayload)
    chat = parse_chat_payload(
        {k: getattr(p, k) for k in _CHAT_KEYS if getattr(p, k) is not None}, max_tokens_cap=max_tokens_cap
    )
    prompt = p.prompt
    image = p.image
    fmt, w, h = _check_image(image, max_bytes=max_image_bytes, max_pixels=max_pixels)
    return VisionParams(
        prompt=prompt,
        image=image,
        image_format=fmt,
        width=w,
        height=h,
        max_tokens=chat.max_tokens,
        temperature=chat.temperature,
        seed=chat.seed,
    )


def check_payload(payload: Mapping[str, object]) -> None:
    """The vision realm's rules with the widest limits any executor may set (realms/catalog.py)."""
    parse_vision_payload(payload, max_tokens_cap=1 << 30, max_image_bytes=1 << 30, max_pixels=1 << 30)


def canary(words: str, seed: int) -> dict[str, Any]:
    """A spot-check query (realms/spotcheck.py): a random picture, greedy, short."""
    from ..realms.spotcheck import canary_image

    prompt = f"Describe this picture of {words}."
    return {"prompt": prompt, "image": canary_image(seed), "max_tokens": 8, "temperature": 0.0, "seed": seed}


# --------------------------------------------------------------------------
# llama.cpp plumbing: mtmd logging, chat handlers


# ggml_log_level in this llama.cpp: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5
_GGML_ERROR, _GGML_CONT = 4, 5
# .errors: list[str] while this thread loads a projector; .in_error: the last
# line logged was an error (a CONT line continues it)
_log_state = threading.local()
_log_install_lock = threading.Lock()
_log_callback: Any = None  # kept alive: llama.cpp holds a pointer to it


def _install_mtmd_log() -> None:
    """Route mtmd/clip logging (by default printed straight to stderr) through
    llama-cpp-python's logger, which prints only when a Llama is verbose, and
    let a loading thread collect the error lines for its ModelLoadError."""
    global _log_callback
    with _log_install_lock:
        if _log_callback is not None:
            return
        import llama_cpp
        import llama_cpp.mtmd_cpp as mtmd
        from llama_cpp._logger import llama_log_callback as forward

        @llama_cpp.llama_log_callback  # type: ignore[misc]
        def callback(level: int, text: bytes, user_data: Any) -> None:
            errors = getattr(_log_state, "errors", None)
            if errors is None:
                forward(level, text, user_data)
                return
            if level == _GGML_ERROR:
                errors.append(text.decode("utf-8", "replace"))
            elif level == _GGML_CONT and _log_state.in_error:
                errors[-1] += text.decode("utf-8", "replace")
            if level != _GGML_CONT:
                _log_state.in_error = level == _GGML_ERROR

        mtmd.mtmd_log_set(callback, None)
        mtmd.mtmd_helper_log_set(callback, None)
        _log_callback = callback


_LOG_PREFIX = re.compile(r"^\w+: (?:error: )?")


def _loader_reason(errors: list[str]) -> str:
    """The loader's first error line (its most specific), cleaned up."""
    for text in errors:
        line = text.strip().splitlines()[0] if text.strip() else ""
        line = _LOG_PREFIX.sub("", line).strip()
        if line:
            return line if len(line) <= 200 else line[:197] + "..."
    return "no reason given"


@functools.cache
def _handler_classes() -> tuple[type, type]:
    """Our subclasses of llama-cpp-python's multimodal chat handlers (built on
    first use: importing llama_cpp is heavy)."""
    import llama_cpp.mtmd_cpp as mtmd
    from llama_cpp.llama_chat_format import Llava15ChatHandler, MTMDChatHandler

    class _ImagesFromUs:
        """Image plumbing shared by both handlers. `images` maps the opaque
        URL of the request being served to its prepared PNG bytes."""

        images: dict[str, bytes]
        limits: tuple[int, int, int]  # max_bytes, max_pixels, resize_to

        def load_image(self, image_url: str) -> bytes:
            if image_url in self.images:
                return self.images[image_url]
            if image_url.startswith("data:") and "," in image_url:
                try:
                    return base64.b64decode(image_url.split(",", 1)[1], validate=True)
                except ValueError:
                    raise ValueError("image data URI is not valid base64") from None
            # The stock handlers would urlopen() anything else (file://, http://).
            raise ValueError("only data: URIs are accepted as images")

        def _create_bitmap_from_bytes(self, image_bytes: bytes) -> Any:
            max_bytes, max_pixels, resize_to = self.limits
            im = _decode_rgb(image_bytes, max_bytes=max_bytes, max_pixels=max_pixels, resize_to=resize_to)
            w, h = im.size
            pixels = im.tobytes()
            buf = (ctypes.c_uint8 * len(pixels)).from_buffer_copy(pixels)
            bitmap = mtmd.mtmd_bitmap_init(w, h, buf)  # copies the pixels
            if not bitmap:
                raise ValueError("mtmd_bitmap_init failed")
            return bitmap

    class TemplateHandler(_ImagesFromUs, MTMDChatHandler):  # type: ignore[misc]
        """The model's own chat template, user content flattened to a string
        (marker, newline, text) so that templates expecting strings work."""

        strip_bos: str = ""  # a leading BOS the template renders and mtmd adds again

        def _get_template_messages(self, messages: Any, media_marker: str) -> list[Any]:
            out = []
            for message in messages:
                message = dict(message)
                content = message.get("content")
                if isinstance(content, list):
                    parts = [
                        media_marker if part.get("type") == "image_url" else part.get("text", "") for part in content
                    ]
                    message["content"] = "\n".join(parts)
                out.append(message)
            return out

        def _postprocess_template_text(self, text: str, image_urls: list[str], media_marker: str) -> str:
            # Image URLs never reach the text (see above): nothing to replace.
            if self.strip_bos and text.startswith(self.strip_bos):
                text = text[len(self.strip_bos) :]
            return text

    class LlavaHandler(_ImagesFromUs, Llava15ChatHandler):  # type: ignore[misc]
        """LLaVA-1.5's prompt format, for models without a chat template.

        The stock CHAT_FORMAT loses its separators to the handler's
        trim_blocks ("...questions.USER: <image>What is it?ASSISTANT: "); this
        is LLaVA v1's own: "<system> USER: <image>\\n<question> ASSISTANT:".
        """

        CHAT_FORMAT = (
            "{% for message in messages %}"
            "{% if message.role == 'system' %}{{ message.content }}{% endif %}"
            "{% if message.role == 'user' %}"
            "{{ ' USER: ' }}"
            "{% if message.content is string %}{{ message.content }}{% else %}"
            "{% for part in message.content %}{% if part.type == 'image_url' %}"
            "{{ part.image_url.url if part.image_url is mapping else part.image_url }}"
            "{{ '\\n' }}"
            "{% endif %}{% endfor %}"
            "{% for part in message.content %}{% if part.type == 'text' %}"
            "{{ part.text }}"
            "{% endif %}{% endfor %}"
            "{% endif %}"
            "{% endif %}"
            "{% if message.role == 'assistant' and message.content is not none %}"
            "{{ ' ASSISTANT: ' }}{{ message.content }}</s>"
            "{% endif %}"
            "{% endfor %}"
            "{% if add_generation_prompt %}{{ ' ASSISTANT:' }}{% endif %}"
        )

    return TemplateHandler, LlavaHandler


# --------------------------------------------------------------------------
# the backend


@dataclass
class _Loaded:
    llm: Any  # llama_cpp.Llama, with our handler as its chat_handler
    handler: Any
    eog_ids: np.ndarray
    stop_token: int | None
    projector_name: str
    gpu: bool
    prompt_format: str  # "chat_template" | "llava-1.5"


class VisionBackend:
    """A GGUF language model and its mmproj, served by llama.cpp's mtmd.
    One generation at a time."""

    realm = "vision"

    def __init__(
        self,
        model_path: Path,
        mmproj_path: Path,
        *,
        n_ctx: int = 4096,
        n_gpu_layers: int = 0,
        threads: int = 0,
        max_tokens_cap: int = 512,
        max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        resize_to: int = DEFAULT_RESIZE_TO,
    ) -> None:
        for name, value in (
            ("max_tokens_cap", max_tokens_cap),
            ("max_image_bytes", max_image_bytes),
            ("max_pixels", max_pixels),
            ("resize_to", resize_to),
        ):
            require_positive_int(name, value)
        self.model_path = Path(model_path)
        self.mmproj_path = Path(mmproj_path)
        self.n_ctx = n_ctx
        self.n_gpu_layers = n_gpu_layers
        self.threads = threads if threads > 0 else (os.cpu_count() or 1)
        self.max_tokens_cap = max_tokens_cap
        self.max_image_bytes = max_image_bytes
        self.max_pixels = max_pixels
        self.resize_to = resize_to
        # Provisional until load() reads the GGUF metadata.
        self.model_name: str = self.model_path.stem
        self.is_smoke_test: bool = False
        self.gpu: bool = False
        self.prompt_format: str = ""
        self._loaded: _Loaded | None = None
        self._lock = trio.Lock()

    # ---------------------------------------------------------------- load

    def _fail_model(self, why: str) -> ModelLoadError:
        return ModelLoadError(f"vision model {self.model_path}: {why}")

    def _fail_projector(self, why: str) -> ModelLoadError:
        return ModelLoadError(f"vision projector {self.mmproj_path}: {why}")

    def _check_projector(self) -> str:
        """Check the mmproj file's metadata; return its general.name."""
        why = gguf_file_problem(self.mmproj_path)
        if why is not None:
            raise self._fail_projector(why)
        try:
            from gguf import GGUFReader

            fields = GGUFReader(self.mmproj_path).fields

            def get(key: str) -> Any:
                field = fields.get(key)
                return None if field is None else field.contents()

            arch, name, vision = (get("general.architecture"), get("general.name"), get("clip.has_vision_encoder"))
        except Exception as exc:
            raise self._fail_projector(f"not a GGUF file or corrupt (cannot read it: {_one_line(exc, 120)})") from None
        if arch != "clip":
            raise self._fail_projector(
                f"not a multimodal projector (GGUF architecture {arch!r}; an mmproj file has 'clip')"
            )
        if vision is False:  # absent: left to mtmd_support_vision after loading
            raise self._fail_projector("has no vision encoder")
        return name.strip() if isinstance(name, str) else ""

    def _load_sync(self) -> _Loaded:
        why = gguf_file_problem(self.model_path)
        if why is not None:
            raise self._fail_model(why)
        projector_name = self._check_projector()
        try:
            import llama_cpp  # heavy import: keep it off module import
            import llama_cpp.mtmd_cpp as mtmd
        except ImportError as exc:
            raise self._fail_model(f"llama-cpp-python is not usable ({_one_line(exc)})") from None
        _install_mtmd_log()
        gpu = self.n_gpu_layers != 0 and bool(llama_cpp.llama_supports_gpu_offload())
        llm, eog, stop_token = open_llama(
            self.model_path,
            n_ctx=self.n_ctx,
            n_gpu_layers=self.n_gpu_layers,
            threads=self.threads,
            fail=self._fail_model,
        )
        try:
            marker = mtmd.mtmd_default_marker().decode("utf-8")
            if marker != MEDIA_MARKER:
                raise self._fail_model(f"unexpected llama.cpp media marker {marker!r}")
            params = mtmd.mtmd_context_params_default()
            params.use_gpu = gpu
            params.print_timings = False
            params.n_threads = self.threads
            _log_state.errors, _log_state.in_error = [], False
            try:
                ctx = mtmd.mtmd_init_from_file(str(self.mmproj_path).encode(), llm.model, params)
                errors = _log_state.errors
            finally:
                _log_state.errors = None
            if not ctx:
                raise self._fail_projector(f"llama.cpp could not load it ({_loader_reason(errors)})")
            # Freed with the Llama, before its model (as llama-cpp-python's
            # own handlers do).
            llm._stack.callback(mtmd.mtmd_free, ctx)
            if not mtmd.mtmd_support_vision(ctx):
                raise self._fail_projector("has no vision encoder")
            template_cls, llava_cls = _handler_classes()
            template = llm.metadata.get("tokenizer.chat_template")
            if template:
                handler = template_cls(clip_model_path=str(self.mmproj_path), verbose=False)
                prompt_format = "chat_template"
                vocab = llama_cpp.llama_model_get_vocab(llm.model)
                if llama_cpp.llama_vocab_get_add_bos(vocab):
                    bos = llm.detokenize([llm.token_bos()], special=True)
                    handler.strip_bos = bos.decode("utf-8", "ignore")
            else:
                handler = llava_cls(clip_model_path=str(self.mmproj_path), verbose=False)
                prompt_format = "llava-1.5"
            handler.mtmd_ctx = ctx  # initialised: the handler will not load it again
            handler.images = {}
            handler.limits = (self.max_image_bytes, self.max_pixels, self.resize_to)
            llm.chat_handler = handler
        except BaseException:
            llm.close()
            raise
        return _Loaded(llm, handler, eog, stop_token, projector_name, gpu, prompt_format)

    async def load(self) -> None:
        """Load the model and its projector (in a worker thread). Raises
        ModelLoadError, one line naming the file at fault."""
        async with self._lock:
            if self._loaded is not None:
                return
            loaded = await trio.to_thread.run_sync(self._load_sync, abandon_on_cancel=False)
            self._loaded = loaded
            name = loaded.llm.metadata.get("general.name", "").strip()
            self.model_name = name or self.model_path.stem
            self.is_smoke_test = SMOKE_TEST_MODEL_NAME in (name, loaded.projector_name)
            self.gpu = loaded.gpu
            self.prompt_format = loaded.prompt_format

    async def aclose(self) -> None:
        """Free the model. Waits for a running generation to finish first."""
        async with self._lock:
            loaded, self._loaded = self._loaded, None
            if loaded is not None:
                await trio.to_thread.run_sync(loaded.llm.close, abandon_on_cancel=False)

    # ------------------------------------------------------------ generate

    async def generate(self, payload: Mapping[str, object], send: EventSink) -> Result:
        """Answer a question about an image, streaming TokenEvents to `send`;
        return the final Result.

        Raises BadRequest for an invalid payload (the image included),
        ModelFailure("backend_failed") if llama.cpp fails, and trio.Cancelled
        (after the worker has stopped) if the calling task is cancelled.
        """
        params = parse_vision_payload(
            payload,
            max_tokens_cap=self.max_tokens_cap,
            max_image_bytes=self.max_image_bytes,
            max_pixels=self.max_pixels,
        )
        async with self._lock:
            loaded = self._loaded
            if loaded is None:
                raise ModelFailure("vision model is not loaded", code="backend_failed")
            start = time.perf_counter()
            done, size, prepare_s = await stream_tokens(
                send,
                lambda pipe: trio.to_thread.run_sync(
                    self._generate_sync, loaded, params, pipe.put, abandon_on_cancel=False
                ),
            )
            elapsed = time.perf_counter() - start
        stats = completion_stats(done, elapsed)
        stats["image_width"], stats["image_height"] = size
        stats["image_ms"] = round(prepare_s * 1000, 1)
        return Result(output={"text": done.text, "model": self.model_name}, stats=stats)

    def _generate_sync(
        self, loaded: _Loaded, params: VisionParams, put: Callable[[str], None]
    ) -> tuple[Completion, tuple[int, int], float]:
        """Worker thread body: decode the image, then stream the answer."""
        t0 = time.perf_counter()
        png = prepare_image(
            params.image,
            max_bytes=self.max_image_bytes,
            max_pixels=self.max_pixels,
            resize_to=self.resize_to,
        )
        w, h = struct.unpack_from(">II", png, 16)  # our own PNG's IHDR
        prepare_s = time.perf_counter() - t0
        trio.from_thread.check_cancelled()
        key = _IMAGE_KEY_PREFIX + secrets.token_hex(16)  # unguessable: not in any prompt
        loaded.handler.images = {key: png}
        try:
            done = stream_chat_sync(
                loaded.llm,
                [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": key}},
                            {"type": "text", "text": params.prompt},
                        ],
                    }
                ],
                max_tokens=params.max_tokens,
                temperature=params.temperature,
                seed=params.seed,
                put=put,
                eog_ids=loaded.eog_ids,
                stop_token=loaded.stop_token,
                field="prompt",
                what="vision",
            )
        finally:
            loaded.handler.images = {}
        return done, (int(w), int(h)), prepare_s


__all__ = [
    "MAX_PROMPT_CHARS",
    "MEDIA_MARKER",
    "VisionBackend",
    "VisionParams",
    "image_format",
    "parse_vision_payload",
    "prepare_image",
]
