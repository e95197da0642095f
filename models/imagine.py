"""The imagine realm backend: text to image with a diffusers pipeline.

`parse_imagine_payload` validates a request from an untrusted peer or
websocket client; `ImagineBackend` loads a diffusers pipeline folder and
renders one PNG per request.

Loading. The model is a diffusers pipeline *folder* (model_index.json plus a
folder per component), loaded with `DiffusionPipeline.from_pretrained(folder,
local_files_only=True)` in a worker thread: the class comes from
model_index.json, so Stable Diffusion 1.x/2.x, SDXL and other text-to-image
pipelines that take `prompt`, `width`, `height`, `num_inference_steps`,
`guidance_scale`, `generator` and `callback_on_step_end` all work. The path is
checked first (it must be an existing folder with a model_index.json): given
a name that is not a folder, from_pretrained would look it up as a Hub repo id
in the local cache instead. Device "auto" is CUDA in float16 when torch sees a
GPU, else the CPU in float32. A CUDA out-of-memory while moving the weights to
the GPU becomes a ModelLoadError that says how much GPU memory was free.

Threading model. A pipeline call blocks, so it runs in a worker thread
(`trio.to_thread.run_sync`, never abandoned: a pipeline is not thread-safe,
so a generation must be over before the lock is released). diffusers calls
`callback_on_step_end` after every denoising step; there the worker hands a
Progress to the trio side with `trio.from_thread.run` (which blocks the
worker until the sink has taken it) and polls trio for cancellation with
`trio.from_thread.check_cancelled()`.

Cancellation. diffusers 0.42 offers `pipe._interrupt = True`, but its loop
then only *skips* the remaining steps and still VAE-decodes the half-denoised
latents and post-processes the image: seconds of wasted work on a large image.
An exception raised from `callback_on_step_end` propagates straight out of
`pipe.__call__` (nothing in the denoising loop catches it), so the backend
raises the trio.Cancelled there: the run stops after the step in progress,
with no decode. The pipeline stays usable: every call resets the scheduler
(set_timesteps) and the pipeline's per-call state.

Progress. One Progress("denoising", i, total) per callback, where total
is the number of timesteps the pipeline runs (`pipe._num_timesteps`): equal
to `steps` for first-order schedulers (DDIM, Euler, DPM-Solver multistep, the
tiny pipeline's DDIM); PNDM (the scheduler Stable Diffusion 1.x ships) runs
steps + 1 and Heun-type schedulers about twice as many, and the events say so.

Seeds. The initial noise comes from a CPU `torch.Generator` seeded with the
request's seed (drawn with `secrets` when the request has none, and reported),
so a seed gives the same image on the same pipeline, and the same latents on
a CPU and a GPU node.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import inspect
import io
import json
import math
import re
import secrets
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import msgspec
import trio
from msgspec import Meta

from .base import (
    BadRequest,
    EventSink,
    ModelFailure,
    ModelLoadError,
    Progress,
    Result,
    parse_payload,
    require_positive_int,
)
from .smoke import SMOKE_MARKER, SMOKE_TEST_MODEL_NAME

MAX_PROMPT_CHARS = 2000
MAX_SEED = 2**32 - 1
MIN_SIDE = 64
MAX_SIDE = 2048
SIDE_MULTIPLE = 8
DEFAULT_SIDE = 512
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 7.5
MAX_GUIDANCE = 30.0
# What __call__ must accept for this backend to drive a pipeline.
_NEEDED_ARGS = (
    "prompt",
    "width",
    "height",
    "num_inference_steps",
    "guidance_scale",
    "generator",
    "callback_on_step_end",
)
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


# --------------------------------------------------------------------------
# payload validation


Side = Annotated[
    int,
    Meta(
        ge=MIN_SIDE,
        le=MAX_SIDE,
        multiple_of=SIDE_MULTIPLE,
        description=f"a multiple of {SIDE_MULTIPLE} in {MIN_SIDE}..{MAX_SIDE}",
    ),
]


class ImaginePayload(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """What an imagine query may say; the node's own max_steps and max_pixels apply after."""

    prompt: Annotated[str, Meta(min_length=1, max_length=MAX_PROMPT_CHARS)]
    # JSON clients often send null for "not given"; it means absent.
    negative_prompt: Annotated[str, Meta(max_length=MAX_PROMPT_CHARS)] | None = None
    seed: Annotated[int, Meta(ge=0, le=MAX_SEED)] | None = None
    steps: Annotated[int, Meta(ge=1)] | None = None
    width: Side | None = None
    height: Side | None = None
    guidance: Annotated[float, Meta(ge=0, le=MAX_GUIDANCE)] = DEFAULT_GUIDANCE


@dataclass(frozen=True)
class ImagineParams:
    prompt: str
    negative_prompt: str | None
    seed: int | None  # None: draw one
    steps: int
    width: int
    height: int
    guidance: float


def default_side(max_pixels: int) -> int:
    """The default width and height: 512, or the largest square that fits."""
    side = min(DEFAULT_SIDE, math.isqrt(max_pixels) // SIDE_MULTIPLE * SIDE_MULTIPLE)
    return max(side, MIN_SIDE)


def _check_limits(max_steps: object, max_pixels: object) -> None:
    require_positive_int("max_steps", max_steps)
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < MIN_SIDE * MIN_SIDE:
        raise ValueError(f"max_pixels must be an integer >= {MIN_SIDE * MIN_SIDE}, got {max_pixels!r}")


def parse_imagine_payload(payload: Mapping[str, object], *, max_steps: int, max_pixels: int) -> ImagineParams:
    """Validate an imagine request payload; raise BadRequest naming the bad field."""
    _check_limits(max_steps, max_pixels)
    p = parse_payload(payload, ImaginePayload, {"steps": (1, max_steps)})
    steps = min(DEFAULT_STEPS, max_steps) if p.steps is None else p.steps
    width = default_side(max_pixels) if p.width is None else p.width
    height = default_side(max_pixels) if p.height is None else p.height
    if width * height > max_pixels:
        raise BadRequest(
            f"payload.width, payload.height: {width}x{height} is {width * height} pixels;"
            f" this node allows at most {max_pixels}"
        )
    return ImagineParams(
        prompt=p.prompt,
        negative_prompt=p.negative_prompt,
        seed=p.seed,
        steps=steps,
        width=width,
        height=height,
        guidance=p.guidance,
    )


def check_payload(payload: Mapping[str, object]) -> None:
    """The imagine realm's rules with the widest limits any executor may set (realms/catalog.py)."""
    parse_imagine_payload(payload, max_steps=1000, max_pixels=64 * 1024 * 1024)


def canary(words: str, seed: int) -> dict[str, Any]:
    """A spot-check query (realms/spotcheck.py): two steps of a small image."""
    return {"prompt": words, "seed": seed, "steps": 2, "width": 64, "height": 64}


# --------------------------------------------------------------------------
# helpers


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    line = text[0].strip() if text else ""
    line = f"{type(exc).__name__}: {line}" if line else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


@contextlib.contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """Silence diffusers' and transformers' tqdm bars (loading, saving) for
    the duration; a daemon's log is no place for them. Restores the previous
    settings afterwards."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    was = (
        diffusers_logging.is_progress_bar_enabled(),
        transformers_logging.is_progress_bar_enabled(),
    )
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was[0]:
            diffusers_logging.enable_progress_bar()
        if was[1]:
            transformers_logging.enable_progress_bar()


def _is_oom(torch: Any, exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _free_gpu_gib(torch: Any, device: str) -> float | None:
    try:
        free, _total = torch.cuda.mem_get_info(torch.device(device))
    except Exception:
        return None
    return free / 2**30


def _release_gpu(torch: Any) -> None:
    gc.collect()
    with contextlib.suppress(Exception):
        torch.cuda.empty_cache()


class _Run:
    """State of one generation, touched only by its worker thread."""

    def __init__(self) -> None:
        self.steps = 0  # denoising steps completed (callbacks seen)
        self.raised: BaseException | None = None  # raised by us from the callback


# --------------------------------------------------------------------------
# the backend


class ImagineBackend:
    """A diffusers text-to-image pipeline. One generation at a time."""

    realm = "imagine"

    def __init__(
        self,
        model_path: Path,
        *,
        device: str = "auto",
        max_steps: int = 50,
        max_pixels: int = 1024 * 1024,
        threads: int = 0,
    ) -> None:
        _check_limits(max_steps, max_pixels)
        if not isinstance(device, str) or not _DEVICE.fullmatch(device):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
        self.model_path = Path(model_path)
        self.device = device
        self.max_steps = max_steps
        self.max_pixels = max_pixels
        self.threads = threads  # 0 = torch's default
        # Provisional until load().
        self.model_name: str = self.model_path.name
        self.is_smoke_test: bool = False
        self.gpu: bool = False
        self._pipe: Any = None  # a diffusers pipeline once loaded
        self._device = "cpu"  # the torch device actually used
        self._takes_negative = False
        self._lock = trio.Lock()

    # ---------------------------------------------------------------- load

    def _fail(self, why: str) -> ModelLoadError:
        return ModelLoadError(f"imagine model {self.model_path}: {why}")

    def _check_folder(self) -> Path:
        path = self.model_path
        try:
            if not path.exists():
                raise self._fail("folder not found")
            if not path.is_dir():
                raise self._fail("not a folder (expected a diffusers pipeline folder)")
            index = path / "model_index.json"
            if not index.is_file():
                raise self._fail("not a diffusers pipeline (no model_index.json)")
        except OSError as exc:
            raise self._fail(f"cannot read folder ({exc.strerror or exc})") from None
        return path.resolve()

    def _pick_device(self, torch: Any) -> tuple[str, Any]:
        if self.device == "cpu":
            return "cpu", torch.float32
        if torch.cuda.is_available():
            return ("cuda" if self.device == "auto" else self.device), torch.float16
        if self.device == "auto":
            return "cpu", torch.float32
        raise self._fail(f"device {self.device!r} requested but torch sees no CUDA GPU")

    def _smoke_name(self, folder: Path) -> str | None:
        """The smoke-test marker's model name, or None for a real pipeline."""
        marker = folder / SMOKE_MARKER
        if not marker.is_file():
            return None
        try:
            name = json.loads(marker.read_text(encoding="utf-8")).get("name")
        except (OSError, ValueError, AttributeError):
            name = None
        if isinstance(name, str) and 0 < len(name.strip()) <= 100:
            return name.strip()
        return SMOKE_TEST_MODEL_NAME

    def _load_sync(self) -> tuple[Any, str, Path, str | None]:
        folder = self._check_folder()
        smoke = self._smoke_name(folder)
        try:  # heavy imports: keep them off module import and off the trio thread
            import torch
            from diffusers import DiffusionPipeline
        except ImportError as exc:
            raise self._fail(f"diffusers/torch are not usable ({_one_line(exc)})") from None
        device, dtype = self._pick_device(torch)
        failure: ModelLoadError | None = None
        oom = False
        pipe: Any = None
        try:
            with quiet_progress_bars():
                pipe = DiffusionPipeline.from_pretrained(
                    str(folder),
                    local_files_only=True,
                    dtype=dtype,  # diffusers 0.42 deprecates torch_dtype
                    low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None,
                )
        except MemoryError:
            failure = self._fail("does not fit in memory")
        except Exception as exc:
            if device != "cpu" and _is_oom(torch, exc):
                oom = True
            else:
                failure = self._fail(f"not a diffusers pipeline or corrupt ({_one_line(exc)})")
        if failure is not None:
            raise failure
        if not oom:
            try:
                call_args = inspect.signature(pipe.__call__).parameters
            except (TypeError, ValueError):
                call_args = {}  # type: ignore[assignment]
            missing = [a for a in _NEEDED_ARGS if a not in call_args]
            if missing or "image" in call_args:
                why = f"missing {', '.join(missing)}" if missing else "it needs an input image"
                raise self._fail(
                    f"{type(pipe).__name__} is not a text-to-image pipeline this backend can drive ({why})"
                )
            self._takes_negative = "negative_prompt" in call_args
        if device != "cpu" and not oom:
            try:
                pipe.to(device)
            except Exception as exc:
                if _is_oom(torch, exc):
                    oom = True
                else:
                    failure = self._fail(f"cannot move it to {device} ({_one_line(exc)})")
        if oom or failure is not None:
            # Outside the except blocks: the traceback no longer pins the
            # half-moved weights, so the GPU memory can really be released.
            pipe = None
            _release_gpu(torch)
            if failure is not None:
                raise failure
            free = _free_gpu_gib(torch, device)
            room = f"{free:.1f} GiB free" if free is not None else "free memory unknown"
            raise self._fail(f"does not fit in GPU memory ({room})")
        pipe.set_progress_bar_config(disable=True)
        return pipe, device, folder, smoke

    async def load(self) -> None:
        """Load the pipeline (in a worker thread). Raises ModelLoadError."""
        async with self._lock:
            if self._pipe is not None:
                return
            pipe, device, folder, smoke = await trio.to_thread.run_sync(self._load_sync, abandon_on_cancel=False)
            self._pipe, self._device = pipe, device
            self.gpu = device != "cpu"
            self.is_smoke_test = smoke is not None
            self.model_name = smoke or folder.name

    async def aclose(self) -> None:
        """Free the pipeline. Waits for a running generation to finish first."""
        async with self._lock:
            pipe, self._pipe = self._pipe, None
            if pipe is None:
                return
            gpu = self.gpu
            del pipe

            def release() -> None:
                gc.collect()
                if gpu:
                    import torch

                    _release_gpu(torch)

            await trio.to_thread.run_sync(release, abandon_on_cancel=False)

    # ------------------------------------------------------------ generate

    async def generate(self, payload: Mapping[str, object], send: EventSink) -> Result:
        """Render one image, sending a Progress per denoising step.

        Raises BadRequest for an invalid payload, ModelFailure("backend_failed")
        if the pipeline fails, and trio.Cancelled (after the worker has
        stopped, within one denoising step) if the calling task is cancelled.
        """
        params = parse_imagine_payload(payload, max_steps=self.max_steps, max_pixels=self.max_pixels)
        seed = params.seed if params.seed is not None else secrets.randbelow(MAX_SEED + 1)
        async with self._lock:
            pipe = self._pipe
            if pipe is None:
                raise ModelFailure("imagine model is not loaded", code="backend_failed")
            if params.negative_prompt and not self._takes_negative:
                raise BadRequest(f"payload.negative_prompt: model {self.model_name} does not take one")
            start = time.perf_counter()
            png, width, height = await trio.to_thread.run_sync(
                self._generate_sync, pipe, params, seed, send, abandon_on_cancel=False
            )
            elapsed = time.perf_counter() - start
        stats: dict[str, int | float | str] = {
            "steps": params.steps,
            "ms": round(elapsed * 1000, 1),
            "images_per_s": round(1 / elapsed, 3) if elapsed > 0 else 0.0,
        }
        output = {
            "image": png,
            "width": width,
            "height": height,
            "seed": seed,
            "model": self.model_name,
        }
        return Result(output=output, stats=stats)

    def _generate_sync(self, pipe: Any, params: ImagineParams, seed: int, send: EventSink) -> tuple[bytes, int, int]:
        """Worker thread body: run the pipeline, encode the PNG."""
        import torch

        if self.threads:
            # torch's intra-op thread count is per OS thread: set it in the thread that runs.
            torch.set_num_threads(self.threads)
        run = _Run()

        def on_step_end(p: Any, i: int, t: Any, tensors: dict) -> dict:
            # Called by diffusers after each denoising step, in this thread.
            # Whatever we raise here leaves pipe.__call__ at once.
            run.steps = i + 1
            total = getattr(p, "_num_timesteps", None) or params.steps
            try:
                trio.from_thread.check_cancelled()
                trio.from_thread.run(send, Progress("denoising", i + 1, int(total)))
                trio.from_thread.check_cancelled()
            except BaseException as exc:
                run.raised = exc
                raise
            return {}

        trio.from_thread.check_cancelled()
        kwargs: dict[str, Any] = {
            "prompt": params.prompt,
            "width": params.width,
            "height": params.height,
            "num_inference_steps": params.steps,
            "guidance_scale": params.guidance,
            "generator": torch.Generator("cpu").manual_seed(seed),
            "num_images_per_prompt": 1,
            "output_type": "pil",
            "callback_on_step_end": on_step_end,
        }
        if params.negative_prompt:
            kwargs["negative_prompt"] = params.negative_prompt
        failure: ModelFailure | None = None
        try:
            with torch.inference_mode():
                images = pipe(**kwargs).images
        except Exception as exc:
            if run.raised is exc:
                raise  # the sink's own error: pass it on unchanged
            if self.gpu and _is_oom(torch, exc):
                failure = ModelFailure(
                    f"imagine generation failed: out of GPU memory at {params.width}x{params.height}",
                    code="backend_failed",
                )
            else:
                failure = ModelFailure(f"imagine generation failed: {_one_line(exc)}", code="backend_failed")
        if failure is not None:
            if self.gpu:
                _release_gpu(torch)
            raise failure
        trio.from_thread.check_cancelled()
        image = images[0]
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue(), image.width, image.height
