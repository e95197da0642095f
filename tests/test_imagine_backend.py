"""The imagine backend against real diffusers + torch (CPU) and the tiny pipeline.

No mocks: the tiny random-weight StableDiffusionPipeline is written with
diffusers into a temp dir once per module and loaded through the same
`DiffusionPipeline.from_pretrained(dir, local_files_only=True)` path real
weights take. Step counts are observed with real torch forward hooks on the
loaded UNet and VAE decoder.
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import PIL.Image as PIL_Image
import pytest
import torch
import trio

from rentahal.models.base import (
    BadRequest,
    ModelFailure,
    ModelLoadError,
    Progress,
    Result,
    Token,
)
from rentahal.models.imagine import (
    MAX_SEED,
    ImagineBackend,
    ImagineParams,
    parse_imagine_payload,
)
from rentahal.models.smoke import SMOKE_MARKER
from rentahal.models.smoke.tiny_diffusers import write_tiny_pipeline
from rentahal.models.smoke.tiny_llama import SMOKE_TEST_MODEL_NAME

from .backend_helpers import Collector, load_error, loaded

MAX_STEPS = 40
MAX_PIXELS = 256 * 256
SMALL = {"prompt": "a photo of a red fox in the forest", "steps": 4, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    # One torch thread: on a shared 2-core CI box, OpenMP's spin-waiting makes
    # two threads 10-40x slower than one when other processes want the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield write_tiny_pipeline(tmp_path_factory.mktemp("imagine") / "tiny", seed=0)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
async def backend(tiny_dir: Path):
    async with loaded(ImagineBackend(tiny_dir, device="cpu", max_steps=MAX_STEPS, max_pixels=MAX_PIXELS)) as b:
        yield b


def decode(png: bytes):
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    image = PIL_Image.open(io.BytesIO(png))
    image.load()
    return image


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------- the folder


def test_tiny_pipeline_folder_is_small_marked_and_deterministic(tiny_dir: Path, tmp_path: Path) -> None:
    size = sum(len(b) for b in files_of(tiny_dir).values())
    assert 2_000_000 < size < 12_000_000
    assert (tiny_dir / "model_index.json").is_file()
    assert json.loads((tiny_dir / SMOKE_MARKER).read_text())["name"] == SMOKE_TEST_MODEL_NAME
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (tiny_dir / "tokenizer" / name).is_file()

    again = write_tiny_pipeline(tmp_path / "again", seed=0)
    assert files_of(again) == files_of(tiny_dir)
    other = files_of(write_tiny_pipeline(tmp_path / "other", seed=1))
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert other[unet] != files_of(tiny_dir)[unet]
    # Built next to the target and renamed into place: no leftovers.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "other"]


def test_tiny_pipeline_replaces_only_a_smoke_test_folder(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (real / "model_index.json").write_text("{}")
    with pytest.raises(FileExistsError):
        write_tiny_pipeline(real)
    assert (real / "model_index.json").read_text() == "{}"  # untouched

    smoke = write_tiny_pipeline(tmp_path / "smoke", seed=1)
    write_tiny_pipeline(smoke, seed=0)  # an old smoke-test folder is replaced
    assert json.loads((smoke / SMOKE_MARKER).read_text())["seed"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["real", "smoke"]


# ------------------------------------------------------------------- load


async def test_tiny_pipeline_loads_as_smoke_test(backend: ImagineBackend) -> None:
    assert backend.realm == "imagine"
    assert backend.is_smoke_test is True
    assert backend.model_name == SMOKE_TEST_MODEL_NAME
    assert backend.gpu is False


async def test_pipeline_without_marker_is_not_a_smoke_test(tiny_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "my-sd-model"
    shutil.copytree(tiny_dir, folder)
    (folder / SMOKE_MARKER).unlink()
    # no GPU here: auto means the CPU
    async with loaded(ImagineBackend(folder, device="auto")) as b:
        assert b.is_smoke_test is False
        assert b.model_name == "my-sd-model"
        assert b.gpu is torch.cuda.is_available()
        result = await b.generate({**SMALL, "seed": 1}, Collector())
        assert result.output["model"] == "my-sd-model"


def _corrupt_unet(folder: Path) -> None:
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00garbage" * 512)


def _truncate_vae(folder: Path) -> None:
    f = folder / "vae" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _break_index(folder: Path) -> None:
    (folder / "model_index.json").write_text("{not json")


def _drop_unet(folder: Path) -> None:
    shutil.rmtree(folder / "unet")


@pytest.mark.parametrize(
    "damage, expect",
    [
        (_corrupt_unet, "corrupt"),
        (_truncate_vae, "corrupt"),
        (_break_index, "corrupt"),
        (_drop_unet, "corrupt"),
    ],
)
async def test_damaged_pipeline_is_a_load_error(tiny_dir: Path, tmp_path: Path, damage, expect: str) -> None:
    folder = tmp_path / "damaged"
    shutil.copytree(tiny_dir, folder)
    damage(folder)
    message = await load_error(ImagineBackend(folder, device="cpu"))
    assert expect in message and str(folder) in message


def _a_file(tmp: Path) -> Path:
    path = tmp / "model.safetensors"
    path.write_bytes(b"x")
    return path


@pytest.mark.parametrize(
    "make, expect",
    [
        (lambda tmp: tmp / "missing", "folder not found"),
        (lambda tmp: tmp, "no model_index.json"),  # an empty folder
        (_a_file, "not a folder"),
    ],
    ids=["missing", "empty", "a-file"],
)
async def test_not_a_pipeline_is_a_load_error(tmp_path: Path, make, expect: str) -> None:
    path = make(tmp_path)
    b = ImagineBackend(path)
    with pytest.raises(ModelLoadError) as info:
        await b.load()
    assert expect in info.value.message
    assert "\n" not in info.value.message
    with pytest.raises(ModelFailure, match="not loaded"):
        await b.generate(SMALL, Collector())


async def test_cuda_without_a_gpu_is_a_load_error(tiny_dir: Path) -> None:
    backend = ImagineBackend(tiny_dir, device="cuda")
    if torch.cuda.is_available():  # a GPU machine: the CUDA path loads for real
        await backend.load()
        assert backend.gpu
        await backend.aclose()
        return
    with pytest.raises(ModelLoadError, match="CUDA"):
        await backend.load()


def test_constructor_rejects_bad_settings(tiny_dir: Path) -> None:
    with pytest.raises(ValueError, match="device"):
        ImagineBackend(tiny_dir, device="tpu")
    with pytest.raises(ValueError, match="max_steps"):
        ImagineBackend(tiny_dir, max_steps=0)
    with pytest.raises(ValueError, match="max_pixels"):
        ImagineBackend(tiny_dir, max_pixels=100)


# ------------------------------------------------------------- generation


async def test_generate_64x64_in_4_steps(backend: ImagineBackend) -> None:
    sink = Collector()
    result = await backend.generate({**SMALL, "seed": 7}, sink)
    assert isinstance(result, Result)
    assert sink.events == [Progress("denoising", i, 4) for i in range(1, 5)]
    image = decode(result.output["image"])
    assert image.size == (64, 64) and image.mode == "RGB"
    out = result.output
    assert (out["width"], out["height"], out["seed"]) == (64, 64, 7)
    assert out["model"] == SMOKE_TEST_MODEL_NAME
    assert result.stats["steps"] == 4
    assert result.stats["ms"] > 0 and result.stats["images_per_s"] > 0
    assert all(isinstance(v, (int, float, str)) for v in result.stats.values())


async def test_non_square_image(backend: ImagineBackend) -> None:
    result = await backend.generate({**SMALL, "width": 96, "height": 64, "seed": 1}, Collector())
    assert decode(result.output["image"]).size == (96, 64)
    assert (result.output["width"], result.output["height"]) == (96, 64)


async def test_seed_makes_it_reproducible(backend: ImagineBackend) -> None:
    a = await backend.generate({**SMALL, "seed": 123}, Collector())
    b = await backend.generate({**SMALL, "seed": 123}, Collector())
    c = await backend.generate({**SMALL, "seed": 124}, Collector())
    assert a.output["image"] == b.output["image"]
    assert a.output["image"] != c.output["image"]
    # Without a seed one is drawn, reported, and reproduces the image.
    drawn = await backend.generate(SMALL, Collector())
    seed = drawn.output["seed"]
    assert isinstance(seed, int) and 0 <= seed <= MAX_SEED
    again = await backend.generate({**SMALL, "seed": seed}, Collector())
    assert again.output["image"] == drawn.output["image"]


async def test_negative_prompt_and_guidance_are_used(backend: ImagineBackend) -> None:
    base = await backend.generate({**SMALL, "seed": 5}, Collector())
    neg = await backend.generate({**SMALL, "seed": 5, "negative_prompt": "blurry"}, Collector())
    low = await backend.generate({**SMALL, "seed": 5, "guidance": 1}, Collector())
    assert neg.output["image"] != base.output["image"]
    assert low.output["image"] != base.output["image"]


async def test_cancel_stops_within_one_step(backend: ImagineBackend) -> None:
    pipe = backend._pipe
    unet_calls: list[int] = []
    decodes: list[int] = []
    hooks = [
        pipe.unet.register_forward_hook(lambda *a: unet_calls.append(1)),
        pipe.vae.decoder.register_forward_hook(lambda *a: decodes.append(1)),
    ]
    sink = Collector()
    raised = finished = False
    try:
        with trio.CancelScope() as scope:

            async def cancel_after_two(ev: Token | Progress) -> None:
                await sink(ev)
                if isinstance(ev, Progress) and ev.done == 2:
                    scope.cancel()

            try:
                await backend.generate({**SMALL, "steps": 30, "seed": 3}, cancel_after_two)
                finished = True
            except trio.Cancelled:
                raised = True
                raise
    finally:
        for h in hooks:
            h.remove()
    assert raised and scope.cancelled_caught and not finished
    assert sink.events == [Progress("denoising", 1, 30), Progress("denoising", 2, 30)]
    assert 2 <= len(unet_calls) <= 3  # stopped within one step of the cancel
    assert decodes == []  # and did not go on to decode a half-denoised image

    # The pipeline is fine afterwards.
    sink = Collector()
    result = await backend.generate({**SMALL, "seed": 3}, sink)
    assert [e.done for e in sink.events] == [1, 2, 3, 4]
    assert decode(result.output["image"]).size == (64, 64)


async def test_sink_error_passes_through_unchanged(backend: ImagineBackend) -> None:
    class SinkGone(Exception):
        pass

    async def broken(ev: Token | Progress) -> None:
        raise SinkGone("client went away")

    with pytest.raises(SinkGone):
        await backend.generate({**SMALL, "seed": 1}, broken)
    result = await backend.generate({**SMALL, "seed": 1}, Collector())
    assert decode(result.output["image"]).size == (64, 64)


async def test_one_generation_at_a_time(backend: ImagineBackend) -> None:
    log: list[tuple[str, int]] = []

    def tagged(tag: str):
        async def sink(ev: Token | Progress) -> None:
            log.append((tag, ev.done))  # type: ignore[union-attr]

        return sink

    async with trio.open_nursery() as nursery:
        nursery.start_soon(backend.generate, {**SMALL, "seed": 1}, tagged("a"))
        nursery.start_soon(backend.generate, {**SMALL, "seed": 2}, tagged("b"))
    first, second = log[0][0], log[-1][0]
    assert first != second
    assert log == [(first, i) for i in range(1, 5)] + [(second, i) for i in range(1, 5)]


# ------------------------------------------------------------- validation


def parse(payload: object, *, max_steps: int = MAX_STEPS, max_pixels: int = MAX_PIXELS) -> ImagineParams:
    return parse_imagine_payload(
        payload,
        max_steps=max_steps,
        max_pixels=max_pixels,  # type: ignore[arg-type]
    )


def test_defaults_and_limits() -> None:
    p = parse_imagine_payload({"prompt": "x"}, max_steps=50, max_pixels=1024 * 1024)
    assert p == ImagineParams("x", None, None, 20, 512, 512, 7.5)
    assert parse({"prompt": "x"}, max_steps=8).steps == 8
    assert (parse({"prompt": "x"}).width, parse({"prompt": "x"}).height) == (256, 256)
    full = parse(
        {
            "prompt": "p" * 2000,
            "negative_prompt": "",
            "seed": MAX_SEED,
            "steps": MAX_STEPS,
            "width": 64,
            "height": 1024,
            "guidance": 0,
        }
    )
    assert (full.seed, full.steps, full.width, full.height) == (MAX_SEED, MAX_STEPS, 64, 1024)
    assert isinstance(full.guidance, float)
    assert parse({"prompt": "x", "seed": None, "negative_prompt": None}).seed is None
    big = parse_imagine_payload({"prompt": "x", "width": 2048, "height": 2048}, max_steps=1, max_pixels=2048 * 2048)
    assert big.width == big.height == 2048


@pytest.mark.parametrize(
    "change, field",
    [
        ({"steps": 0}, "payload.steps"),
        ({"steps": MAX_STEPS + 1}, "payload.steps"),
        ({"steps": True}, "payload.steps"),
        ({"steps": 4.0}, "payload.steps"),
        ({"width": 100}, "payload.width"),
        ({"width": 56}, "payload.width"),
        ({"height": 2056}, "payload.height"),
        ({"height": "64"}, "payload.height"),
        ({"width": 512, "height": 256}, "payload.width"),  # 131072 > 65536 pixels
        ({"guidance": 30.5}, "payload.guidance"),
        ({"guidance": -1}, "payload.guidance"),
        ({"guidance": float("nan")}, "payload.guidance"),
        ({"guidance": False}, "payload.guidance"),
        ({"prompt": ""}, "payload.prompt"),
        ({"prompt": "x" * 2001}, "payload.prompt"),
        ({"prompt": 42}, "payload.prompt"),
        ({"prompt": "bad \ud800 surrogate"}, "payload.prompt"),
        ({"negative_prompt": "x" * 2001}, "payload.negative_prompt"),
        ({"negative_prompt": ["x"]}, "payload.negative_prompt"),
        ({"seed": -1}, "payload.seed"),
        ({"seed": MAX_SEED + 1}, "payload.seed"),
        ({"seed": True}, "payload.seed"),
        ({"sampler": "euler"}, "'sampler'"),
    ],
)
def test_bad_field_is_named(change: dict, field: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse({**SMALL, **change})
    assert field in info.value.message
    assert info.value.code == "bad_request"


def test_missing_prompt_and_non_object() -> None:
    with pytest.raises(BadRequest, match="payload.prompt: required"):
        parse({"steps": 4})
    with pytest.raises(BadRequest, match="payload: expected an object"):
        parse(["prompt"])


async def test_generate_validates_before_running(backend: ImagineBackend) -> None:
    sink = Collector()
    with pytest.raises(BadRequest, match="payload.steps"):
        await backend.generate({**SMALL, "steps": MAX_STEPS + 1}, sink)
    with pytest.raises(BadRequest, match="unknown field"):
        await backend.generate({**SMALL, "scheduler": "x"}, sink)
    assert sink.events == []
