"""The vision backend against real llama.cpp (mtmd) and the tiny model pair.

No mocks: the tiny llama and its tiny random-weight CLIP projector are written
with the gguf package into a temp dir and loaded through the same
llama_cpp.Llama + mtmd path real LLaVA-class weights take. threads=1: on a
busy two-core machine ggml's spinning worker threads can stall for seconds.
"""

from __future__ import annotations

import base64
import io
import struct
import zlib
from pathlib import Path

import pytest
import trio
from PIL import Image

from rentahal.models.base import (
    BadRequest,
    ModelFailure,
    Progress,
    Result,
    Token,
)
from rentahal.models.smoke.tiny_llama import SMOKE_TEST_MODEL_NAME, write_gguf_atomically, write_tiny_llama
from rentahal.models.smoke.tiny_vision import write_tiny_mmproj, write_tiny_vision
from rentahal.models.vision import (
    VisionBackend,
    VisionParams,
    parse_vision_payload,
    prepare_image,
)

from .backend_helpers import Collector, loaded
from .backend_helpers import load_error as _load_error

QUESTION = "What is in this picture?"
LIMITS = {"max_bytes": 20 * 1024 * 1024, "max_pixels": 4096 * 4096, "resize_to": 672}
TINY_IMAGE_TOKENS = 16  # 32x32 input, 8x8 patches


def encode(im: Image.Image, fmt: str, **kw: object) -> bytes:
    out = io.BytesIO()
    im.save(out, fmt, **kw)
    return out.getvalue()


def png(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (80, 60)) -> bytes:
    return encode(Image.new("RGB", size, color), "PNG")


def decoded(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_tiny_vision(tmp_path_factory.mktemp("tiny-vision"), seed=0)


@pytest.fixture
async def backend(tiny_pair: tuple[Path, Path]):
    async with loaded(VisionBackend(*tiny_pair, n_ctx=1024, threads=1)) as b:
        yield b


def ask(image: bytes | None = None, **kw: object) -> dict[str, object]:
    return {"prompt": QUESTION, "image": png() if image is None else image, **kw}


# ---------------------------------------------------------------- the files


def test_tiny_files_are_small_and_deterministic(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    model, mmproj = tiny_pair
    assert (model.name, mmproj.name) == ("model.gguf", "mmproj.gguf")  # the node relies on it
    assert mmproj.stat().st_size < 300_000
    again = write_tiny_vision(tmp_path / "again", seed=0)
    assert again[0].read_bytes() == model.read_bytes()
    assert again[1].read_bytes() == mmproj.read_bytes()
    other = write_tiny_vision(tmp_path / "other", seed=1)
    assert other[1].read_bytes() != mmproj.read_bytes()
    assert not [p for p in (tmp_path / "again").iterdir() if p.suffix == ".tmp"]


async def test_tiny_pair_loads_as_smoke_test(backend: VisionBackend) -> None:
    assert backend.realm == "vision"
    assert backend.model_name == SMOKE_TEST_MODEL_NAME
    assert backend.is_smoke_test is True
    assert backend.gpu is False
    assert backend.prompt_format == "chat_template"  # the tiny llama has one


# ------------------------------------------------------------ generation


async def test_stream_concatenation_equals_result(backend: VisionBackend) -> None:
    sink = Collector()
    result = await backend.generate(ask(max_tokens=30, seed=3), sink)
    assert isinstance(result, Result)
    assert sink.tokens, "no tokens were streamed"
    assert [e.index for e in sink.tokens] == list(range(len(sink.tokens)))
    assert all(e.text for e in sink.tokens)
    assert sink.text == result.output["text"]
    assert result.output["model"] == SMOKE_TEST_MODEL_NAME
    stats = result.stats
    assert 1 <= stats["tokens"] <= 30
    assert stats["prompt_tokens"] > TINY_IMAGE_TOKENS  # the image's tokens and the text's
    assert stats["finish_reason"] in ("stop", "length")
    assert (stats["image_width"], stats["image_height"]) == (80, 60)
    assert all(isinstance(v, (int, float, str)) for v in stats.values())


async def test_token_counts_match_llama_cpp(backend: VisionBackend) -> None:
    # The same request through llama-cpp-python's own non-streaming path
    # (our handler, the image as an OpenAI-style data URI) gives the same
    # text and the same completion token count, whichever way it ends.
    image = png((20, 120, 220))
    uri = "data:image/png;base64," + base64.b64encode(image).decode()
    endings = set()
    for req in (
        {"max_tokens": 25, "temperature": 0, "seed": 1},
        *({"max_tokens": 300, "temperature": 0.7, "seed": s} for s in range(8)),
    ):
        result = await backend.generate(ask(image, **req), Collector())
        reference = backend._loaded.llm.create_chat_completion(
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": QUESTION}],
                }
            ],
            **req,
        )
        assert reference["choices"][0]["message"]["content"] == result.output["text"]
        assert reference["usage"]["completion_tokens"] == result.stats["tokens"]
        assert reference["usage"]["prompt_tokens"] == result.stats["prompt_tokens"]
        endings.add(result.stats["finish_reason"])
        if endings == {"stop", "length"}:
            break
    assert endings == {"stop", "length"}
    assert result.stats["tokens"] < 300


async def test_same_seed_same_text(backend: VisionBackend) -> None:
    greedy = ask(max_tokens=30, temperature=0, seed=42)
    a = await backend.generate(greedy, Collector())
    b = await backend.generate(greedy, Collector())
    assert a.output["text"] and a.output["text"] == b.output["text"]
    assert a.stats["tokens"] == b.stats["tokens"] == 30
    sampled = ask(max_tokens=30, temperature=0.9, seed=5)
    c = await backend.generate(sampled, Collector())
    d = await backend.generate(sampled, Collector())
    assert c.output["text"] == d.output["text"]


async def test_the_image_reaches_the_model(backend: VisionBackend) -> None:
    # Greedy answers to the same question about differently coloured images
    # differ: the pixels went through the projector into the language model.
    answers = set()
    for color in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]:
        r = await backend.generate(ask(png(color), max_tokens=20, temperature=0), Collector())
        answers.add(r.output["text"])
    assert len(answers) == 3


def assert_prompt(llm, before: str, after: str, n_prompt: int) -> None:
    """The evaluated prompt is `before`, the image, then `after`, tokenized as
    separate chunks (as mtmd does). The image's positions hold no token ids
    (uninitialised memory in llama-cpp-python's input_ids): never detokenize
    them, llama.cpp aborts on an out-of-range id."""
    ids = llm.input_ids[:n_prompt].tolist()
    head = llm.tokenize(before.encode(), add_bos=True, special=True)
    tail = llm.tokenize(after.encode(), add_bos=False, special=True)
    assert len(head) + TINY_IMAGE_TOKENS + len(tail) == n_prompt
    assert ids[: len(head)] == head
    assert ids[len(head) + TINY_IMAGE_TOKENS :] == tail


async def test_prompt_goes_through_the_chat_template_with_one_bos(
    backend: VisionBackend,
) -> None:
    result = await backend.generate(ask(max_tokens=3, temperature=0), Collector())
    llm = backend._loaded.llm
    # The tiny template: "{{ bos_token }}user: <content>\nassistant:", the
    # content being the image marker, a newline and the question.
    assert_prompt(llm, "user: ", "\nWhat is in this picture?\nassistant:", result.stats["prompt_tokens"])
    ids = llm.input_ids[:2].tolist()
    assert ids[0] == llm.token_bos() and ids[1] != llm.token_bos()  # one BOS


async def test_model_without_chat_template_gets_llava_format(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    model = write_tiny_llama(tmp_path / "no-template.gguf", chat_template=None)
    async with loaded(VisionBackend(model, tiny_pair[1], n_ctx=1024, threads=1)) as b:
        assert b.prompt_format == "llava-1.5"
        sink = Collector()
        result = await b.generate(ask(max_tokens=12, temperature=0), sink)
        assert result.stats["tokens"] == 12 and sink.text == result.output["text"]
        # "<system> USER: <image>\n<question> ASSISTANT:", as LLaVA-1.5 was trained
        system = (
            "A chat between a curious human and an artificial intelligence assistant. "
            "The assistant gives helpful, detailed, and polite answers to the human's "
            "questions."
        )
        assert_prompt(
            b._loaded.llm, system + " USER: ", "\nWhat is in this picture? ASSISTANT:", result.stats["prompt_tokens"]
        )


async def test_generations_are_serialised(backend: VisionBackend) -> None:
    results: list[Result] = []

    async def one(seed: int) -> None:
        results.append(await backend.generate(ask(max_tokens=15, temperature=0, seed=seed), Collector()))

    async with trio.open_nursery() as nursery:
        for seed in range(3):
            nursery.start_soon(one, seed)
    assert [r.stats["tokens"] for r in results] == [15, 15, 15]
    assert len({r.output["text"] for r in results}) == 1  # greedy: seed-independent


async def test_cancellation_stops_the_worker(tiny_pair: tuple[Path, Path]) -> None:
    async with loaded(VisionBackend(*tiny_pair, n_ctx=4096, threads=1, max_tokens_cap=100_000)) as backend:
        seen = 0
        at_cancel: list[int] = []
        with trio.CancelScope() as scope:

            async def sink(ev: Token | Progress) -> None:
                nonlocal seen
                seen += 1
                if seen == 3:
                    at_cancel.append(backend._loaded.llm.n_tokens)
                    scope.cancel()

            # Greedy decoding of the tiny model loops on words and never ends
            # by itself: only the cancellation can stop it before 4096 tokens.
            await backend.generate(ask(max_tokens=100_000, temperature=0), sink)
        assert scope.cancelled_caught
        assert 3 <= seen <= 6
        llm = backend._loaded.llm
        assert llm.n_tokens - at_cancel[0] <= 10, (at_cancel, llm.n_tokens)  # stopped within a few tokens
        again = await backend.generate(ask(max_tokens=10, temperature=0), Collector())
        assert (again.stats["tokens"], again.stats["finish_reason"]) == (10, "length")


async def test_prompt_longer_than_context_is_bad_request(tiny_pair: tuple[Path, Path]) -> None:
    # n_ctx=256: llama.cpp's smallest
    async with loaded(VisionBackend(*tiny_pair, n_ctx=256, threads=1)) as b:
        with pytest.raises(BadRequest, match=r"^payload\.prompt: .*context holds 256$"):
            await b.generate(ask(prompt="a long prompt " * 100), Collector())
        ok = await b.generate(ask(prompt="hi", max_tokens=5, temperature=0), Collector())
        assert ok.stats["tokens"] == 5


async def test_generate_before_load_fails_cleanly(tiny_pair: tuple[Path, Path]) -> None:
    with pytest.raises(ModelFailure) as info:
        await VisionBackend(*tiny_pair).generate(ask(), Collector())
    assert info.value.code == "backend_failed"
    assert "not loaded" in str(info.value)


async def test_generate_rejects_bad_payload_before_touching_the_model(
    tiny_pair: tuple[Path, Path],
) -> None:
    b = VisionBackend(*tiny_pair)  # not loaded: validation comes first
    with pytest.raises(BadRequest, match="payload.image"):
        await b.generate(ask(b"not an image"), Collector())


async def test_undecodable_image_is_bad_request(backend: VisionBackend) -> None:
    # A valid header (so it passes validation) over a broken body fails when
    # the worker decodes it: a BadRequest, and the backend carries on.
    broken = png(size=(300, 200))[:120]
    with pytest.raises(BadRequest, match=r"^payload\.image: cannot decode the PNG image"):
        await backend.generate(ask(broken), Collector())
    ok = await backend.generate(ask(max_tokens=5, temperature=0), Collector())
    assert ok.stats["tokens"] == 5


async def test_handler_fetches_no_urls(backend: VisionBackend) -> None:
    # llama-cpp-python's stock handlers urlopen() any non-data image URL.
    for url in ("file:///etc/passwd", "http://127.0.0.1:1/x.png"):
        with pytest.raises(ValueError, match="only data: URIs"):
            backend._loaded.llm.create_chat_completion(
                messages=[
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"}],
                    }
                ],
                max_tokens=2,
            )


# ------------------------------------------------------------ prepare_image


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_formats_are_accepted_and_downscaled(fmt: str) -> None:
    im = Image.new("RGB", (1000, 500), (10, 200, 30))
    out = decoded(prepare_image(encode(im, fmt), **LIMITS))
    assert out.format == "PNG" and out.mode == "RGB"
    assert out.size == (672, 336)
    small = decoded(prepare_image(encode(im, fmt), **{**LIMITS, "resize_to": 100}))
    assert small.size == (100, 50)
    r, g, b = small.getpixel((50, 25))
    assert abs(r - 10) < 12 and abs(g - 200) < 12 and abs(b - 30) < 12


def test_small_images_are_not_upscaled_and_tall_ones_fit() -> None:
    assert decoded(prepare_image(png(size=(40, 30)), **LIMITS)).size == (40, 30)
    tall = decoded(prepare_image(png(size=(300, 3000)), **LIMITS))
    assert tall.size == (67, 672)


def test_transparency_is_flattened_onto_white() -> None:
    im = Image.new("RGBA", (20, 20), (255, 0, 0, 0))
    im.paste((0, 0, 255, 255), (0, 0, 10, 20))
    out = decoded(prepare_image(encode(im, "PNG"), **LIMITS))
    assert out.mode == "RGB"
    assert out.getpixel((5, 5)) == (0, 0, 255)
    assert out.getpixel((15, 5)) == (255, 255, 255)
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    out = decoded(prepare_image(encode(pal, "PNG", transparency=0), **LIMITS))
    assert out.getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to view
    data = encode(Image.new("RGB", (40, 20), (0, 0, 0)), "JPEG", exif=exif)
    assert decoded(prepare_image(data, **LIMITS)).size == (20, 40)


def test_gif_first_frame_is_used() -> None:
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert decoded(prepare_image(data, **LIMITS)).getpixel((8, 8)) == (255, 0, 0)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bomb(w: int = 20000, h: int = 20000) -> bytes:
    """A 100-byte PNG whose header claims w x h pixels (400 million, ~1.2 GB
    of RGB, for the default), with an IDAT that is not even valid: decoding
    it would fail with a different error than the size check's."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", b"\x00" * 16) + _png_chunk(b"IEND", b"")
    )


def jpeg_bomb() -> bytes:
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, 30000, 30000, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + b"\xff\xe0\x00\x04ab" + sof + b"\xff\xd9"


def webp_bomb() -> bytes:
    body = b"VP8X" + struct.pack("<I", 10) + b"\x00" * 4 + (16383).to_bytes(3, "little") * 2
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WEBP" + body


def gif_bomb() -> bytes:
    # A 1x1 logical screen whose first frame is 60000x60000.
    return (
        b"GIF89a"
        + struct.pack("<HHBBB", 1, 1, 0, 0, 0)
        + b"\x21\xfe\x03abc\x00"  # a comment extension first
        + b"\x2c"
        + struct.pack("<HHHHB", 0, 0, 60000, 60000, 0)
        + b"\x02\x02\x44\x01\x00;"
    )


@pytest.mark.parametrize(
    ("bomb", "dims"),
    [
        (png_bomb(), "20000x20000"),
        (jpeg_bomb(), "30000x30000"),
        (webp_bomb(), "16384x16384"),
        (gif_bomb(), "60000x60000"),
    ],
    ids=["png", "jpeg", "webp", "gif"],
)
def test_decompression_bombs_are_refused_from_the_header(bomb: bytes, dims: str) -> None:
    assert len(bomb) < 200
    with pytest.raises(BadRequest) as info:
        prepare_image(bomb, **LIMITS)
    # The size check's message, not a decoder's: nothing was decoded.
    assert str(info.value).startswith(f"payload.image: {dims} is ")
    assert "the limit is 16777216" in str(info.value)
    with pytest.raises(BadRequest, match=f"^payload.image: {dims} is "):
        parse_vision_payload(ask(bomb), max_tokens_cap=512, max_image_bytes=2**20, max_pixels=4096 * 4096)


def test_pixel_limit_is_configurable() -> None:
    data = png(size=(100, 100))
    prepare_image(data, max_bytes=2**20, max_pixels=10_000, resize_to=64)
    with pytest.raises(
        BadRequest,
        match=r"^payload\.image: 100x100 is 10000 pixels; "
        r"the limit is 9999$",
    ):
        prepare_image(data, max_bytes=2**20, max_pixels=9_999, resize_to=64)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (bytes(range(256)) * 8, "not a PNG, JPEG, WebP or GIF image"),
        (b"", "empty"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "corrupt PNG header"),
        (b"\xff\xd8\xff\xe0\x00\x04ab\xff\xda", "corrupt JPEG header"),
        (b"GIF89a" + b"\x00" * 7 + b"!", "corrupt GIF header"),
        (png_bomb(0, 10), "empty image"),
        (png(size=(300, 200))[:120], "cannot decode the PNG image"),
        (b"BM" + b"\x00" * 100, "not a PNG, JPEG, WebP or GIF image"),  # BMP: not accepted
        ("data:image/png;base64,AAAA", "expected binary image data, got str"),
    ],
    ids=["random", "empty", "png-header", "jpeg-no-frame", "gif-no-image", "zero-width", "truncated", "bmp", "str"],
)
def test_bad_images_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(BadRequest) as info:
        prepare_image(data, **LIMITS)
    assert str(info.value).startswith("payload.image: ")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_oversized_bytes_are_refused() -> None:
    data = png(size=(300, 300))
    prepare_image(data, max_bytes=len(data), max_pixels=2**24, resize_to=64)
    with pytest.raises(
        BadRequest,
        match=rf"^payload\.image: {len(data)} bytes exceeds "
        rf"the limit of {len(data) - 1}$",
    ):
        prepare_image(data, max_bytes=len(data) - 1, max_pixels=2**24, resize_to=64)


# ---------------------------------------------------------------- payload


def parse(payload: dict, **kw: int) -> VisionParams:
    limits = {"max_tokens_cap": 512, "max_image_bytes": 1_000_000, "max_pixels": 4096 * 4096}
    return parse_vision_payload(payload, **{**limits, **kw})


def test_payload_defaults() -> None:
    image = png()
    p = parse({"prompt": "hi", "image": image}, max_tokens_cap=100)
    assert p == VisionParams(
        prompt="hi", image=image, image_format="PNG", width=80, height=60, max_tokens=100, temperature=0.7, seed=None
    )
    p = parse({"prompt": "x", "image": bytearray(image), "max_tokens": 3, "temperature": 0, "seed": 9})
    assert (p.image, p.max_tokens, p.temperature, p.seed) == (image, 3, 0.0, 9)


BAD_PAYLOADS = [
    ({"image": b"x"}, "payload.prompt"),
    ({"prompt": "a"}, "payload.image"),
    ({"prompt": "a", "image": None}, "payload.image"),
    ({"prompt": "a", "image": 5}, "payload.image"),
    ({"prompt": "a", "image": b"GIF89a"}, "payload.image"),
    ({"prompt": "a", "image": b"\x89PNG\r\n\x1a\n" + b"\x00" * 2_000_000}, "payload.image"),
    ({"prompt": "a", "bogus": 1}, "bogus"),
    ({"prompt": "a", "messages": []}, "messages"),
    ({"prompt": "a", "stop": ["x"]}, "stop"),
    ({"prompt": ""}, "payload.prompt"),
    ({"prompt": 5}, "payload.prompt"),
    ({"prompt": "x" * 20_001}, "payload.prompt"),
    ({"prompt": "\ud800"}, "payload.prompt"),
    ({"prompt": "look: <__media__>"}, "payload.prompt"),
    ({"prompt": "a", "max_tokens": 0}, "payload.max_tokens"),
    ({"prompt": "a", "max_tokens": 513}, "payload.max_tokens"),
    ({"prompt": "a", "max_tokens": True}, "payload.max_tokens"),
    ({"prompt": "a", "max_tokens": 5.0}, "payload.max_tokens"),
    ({"prompt": "a", "temperature": -0.1}, "payload.temperature"),
    ({"prompt": "a", "temperature": float("nan")}, "payload.temperature"),
    ({"prompt": "a", "temperature": "hot"}, "payload.temperature"),
    ({"prompt": "a", "seed": -1}, "payload.seed"),
    ({"prompt": "a", "seed": 2**31}, "payload.seed"),
    ({"prompt": "a", "seed": "1"}, "payload.seed"),
]


@pytest.mark.parametrize(("payload", "field"), BAD_PAYLOADS, ids=lambda v: repr(v)[:40])
def test_bad_payload_names_the_field(payload: dict, field: str) -> None:
    if "image" not in payload and field != "payload.image":
        payload = {**payload, "image": png()}
    with pytest.raises(BadRequest) as info:
        parse(payload)
    assert field in str(info.value)
    assert info.value.code == "bad_request"
    assert len(str(info.value)) < 200 and "\n" not in str(info.value)


def test_payload_must_be_a_mapping() -> None:
    with pytest.raises(BadRequest, match=r"^payload: expected an object, got \[\]$"):
        parse([])  # type: ignore[arg-type]


# ------------------------------------------------------------- load errors


async def load_error(model: Path, mmproj: Path) -> str:
    return await _load_error(VisionBackend(model, mmproj, threads=1))


async def test_missing_model(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    path = tmp_path / "nope.gguf"
    assert await load_error(path, tiny_pair[1]) == f"vision model {path}: file not found"


async def test_missing_projector(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    path = tmp_path / "nope-mmproj.gguf"
    assert await load_error(tiny_pair[0], path) == f"vision projector {path}: file not found"


async def test_corrupt_projector(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    data = tiny_pair[1].read_bytes()
    for name, content in [
        ("text.gguf", b"this is not a model\n"),
        ("head.gguf", data[:1000]),
        ("tail.gguf", data[:-100]),
    ]:
        path = tmp_path / name
        path.write_bytes(content)
        message = await load_error(tiny_pair[0], path)
        assert message.startswith(f"vision projector {path}: not a GGUF file or corrupt")


async def test_language_model_given_as_projector(tiny_pair: tuple[Path, Path]) -> None:
    model = tiny_pair[0]
    assert await load_error(model, model) == (
        f"vision projector {model}: not a multimodal projector (GGUF architecture 'llama'; an mmproj file has 'clip')"
    )


async def test_projector_without_vision_encoder(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    audio = write_gguf_atomically(
        tmp_path / "audio-mmproj.gguf",
        "clip",
        lambda w: (w.add_bool("clip.has_vision_encoder", False), w.add_bool("clip.has_audio_encoder", True)),
    )
    assert await load_error(tiny_pair[0], audio) == (f"vision projector {audio}: has no vision encoder")


async def test_projector_given_as_language_model(tiny_pair: tuple[Path, Path]) -> None:
    mmproj = tiny_pair[1]
    assert await load_error(mmproj, mmproj) == (
        f"vision model {mmproj}: not a GGUF file or corrupt (llama.cpp could not load it)"
    )


async def test_projector_for_another_model(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    # A projector whose output width (48) is not the language model's (64):
    # the reason is llama.cpp's own, captured from its log.
    other = write_tiny_mmproj(tmp_path / "other-mmproj.gguf", out_width=48)
    assert await load_error(tiny_pair[0], other) == (
        f"vision projector {other}: llama.cpp could not load it (mismatch between text "
        "model (n_embd = 64) and mmproj (n_embd = 48))"
    )


async def test_corrupt_model(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    path = tmp_path / "truncated.gguf"
    path.write_bytes(tiny_pair[0].read_bytes()[:1000])
    assert await load_error(path, tiny_pair[1]) == (
        f"vision model {path}: not a GGUF file or corrupt (llama.cpp could not load it)"
    )


def test_constructor_rejects_bad_limits(tiny_pair: tuple[Path, Path]) -> None:
    for kw in (
        {"resize_to": 0},
        {"max_pixels": -1},
        {"max_image_bytes": 0},
        {"max_tokens_cap": 0},
        {"resize_to": True},
    ):
        with pytest.raises(ValueError):
            VisionBackend(*tiny_pair, **kw)  # type: ignore[arg-type]
