"""GPU awareness: which CUDA GPUs this machine has, and how much of a model to put on them.

``detect_gpus`` asks ``nvidia-smi`` first (cheap, no CUDA context in this process), then
``torch.cuda`` when torch is installed. ``plan_gpu_layers`` turns a realm's ``n_gpu_layers``
(-1 = auto) into the number llama.cpp gets, and ``check_fits`` refuses a request that clearly
cannot fit with a :class:`ModelTooLarge` naming the fix. Nothing here needs a GPU to import.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import signal
import subprocess
from dataclasses import dataclass

from ..node.limits import FIT_RESERVE_MIB, NVIDIA_SMI_TIMEOUT

MIB = 1024 * 1024
ALL_LAYERS = 999  # llama.cpp: "every layer", whatever the model has
FIT_FACTOR = 1.2  # weights plus KV cache, compute buffers and CUDA context, roughly
NVIDIA_SMI_QUERY = [
    "nvidia-smi",
    "--query-gpu=index,name,memory.total,memory.free",
    "--format=csv,noheader,nounits",
]


@dataclass(frozen=True)
class GPUInfo:
    index: int
    name: str
    total_mib: int
    free_mib: int
    backend: str = "cuda"

    def to_dict(self) -> dict[str, object]:
        return {
            "index": self.index,
            "name": self.name,
            "total_mib": self.total_mib,
            "free_mib": self.free_mib,
            "backend": self.backend,
        }


class ModelTooLarge(Exception):
    """The requested GPU offload clearly cannot fit; ``str()`` is one line naming the fix."""

    def __init__(self, message: str, *, needed_mib: int = 0, free_mib: int = 0) -> None:
        super().__init__(message)
        self.needed_mib = needed_mib
        self.free_mib = free_mib


# --- detection -------------------------------------------------------------------------------------
def _mib(text: str) -> int | None:
    text = text.strip()
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if math.isfinite(value) and value >= 0 else None


def parse_nvidia_smi(text: str) -> list[GPUInfo]:
    """GPUs from ``nvidia-smi --query-gpu=index,name,memory.total,memory.free
    --format=csv,noheader,nounits``. Lines that do not parse (a GPU reporting ``[N/A]`` memory,
    an error message) are skipped; garbage gives []."""
    out: list[GPUInfo] = []
    for line in text.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) < 4:
            continue
        index_text, total_text, free_text = fields[0], fields[-2], fields[-1]
        name = ", ".join(fields[1:-2]).strip()  # a name could hold a comma
        total, free = _mib(total_text), _mib(free_text)
        if not index_text.isdigit() or not name or total is None or free is None or free > total:
            continue
        out.append(GPUInfo(int(index_text), name, total, free, "cuda"))
    return out


def _visible_filter(gpus: list[GPUInfo]) -> list[GPUInfo]:
    """Apply CUDA_VISIBLE_DEVICES the way CUDA would (numeric indices only; UUID or MIG lists
    are left alone, as nvidia-smi cannot be matched to them here)."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return gpus
    items = [v.strip() for v in value.split(",")]
    if value.strip() in ("", "-1") or value.strip().lower() in ("none", "void", "nodevfiles"):
        return []
    if not all(v.lstrip("-").isdigit() for v in items):
        return gpus
    by_index = {g.index: g for g in gpus}
    out = []
    for v in items:
        idx = int(v)
        if idx not in by_index:
            break  # CUDA stops at the first invalid entry
        out.append(by_index[idx])
    return out


def _from_nvidia_smi() -> list[GPUInfo] | None:
    """GPUs per nvidia-smi; None when it is absent, fails, hangs past NVIDIA_SMI_TIMEOUT (it is
    killed, with anything it started) or lists none."""
    try:
        proc = subprocess.Popen(
            NVIDIA_SMI_QUERY,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=(os.name == "posix"),
        )
    except (OSError, ValueError):
        return None
    try:
        out, _ = proc.communicate(timeout=NVIDIA_SMI_TIMEOUT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(OSError):
            if os.name == "posix":
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=1.0)
        return None
    if proc.returncode != 0:
        return None
    return parse_nvidia_smi(out) or None


def _from_torch() -> list[GPUInfo]:
    if importlib.util.find_spec("torch") is None:
        return []
    try:
        import torch

        if not torch.cuda.is_available():
            return []
        out = []
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            out.append(GPUInfo(i, torch.cuda.get_device_name(i), total // MIB, free // MIB, "cuda"))
        return out
    except Exception:  # a broken CUDA install must not stop the node
        return []


def detect_gpus() -> list[GPUInfo]:
    """The CUDA GPUs this process can use, with their free memory now; [] when there are none
    (no nvidia-smi, or it fails, and no CUDA-enabled torch)."""
    gpus = _from_nvidia_smi()
    if gpus is not None:
        return _visible_filter(gpus)
    return _from_torch()  # torch already applies CUDA_VISIBLE_DEVICES


def llama_gpu_offload_supported() -> bool:
    """Whether the installed llama-cpp-python was built with a GPU backend."""
    try:
        import llama_cpp

        return bool(llama_cpp.llama_supports_gpu_offload())
    except Exception:
        return False


def diffusers_device(gpus: list[GPUInfo], *, cuda_available: bool | None = None) -> tuple[str, str]:
    """(device, dtype) for a diffusers pipeline: ("cuda", "float16") with a GPU that torch can
    use, else ("cpu", "float32"). ``cuda_available`` None asks torch (when gpus is not empty)."""
    if not gpus:
        return "cpu", "float32"
    if cuda_available is None:
        try:
            import torch

            cuda_available = bool(torch.cuda.is_available())
        except Exception:
            cuda_available = False
    return ("cuda", "float16") if cuda_available else ("cpu", "float32")


# --- planning --------------------------------------------------------------------------------------
def _free_text(gpus: list[GPUInfo]) -> str:
    if len(gpus) == 1:
        g = gpus[0]
        return f"{g.free_mib} MiB free on GPU {g.index} ({g.name})"
    each = ", ".join(f"{g.free_mib} on GPU {g.index} ({g.name})" for g in gpus)
    return f"{sum(g.free_mib for g in gpus)} MiB free on {len(gpus)} GPUs ({each})"


def check_fits(
    requested: int,
    *,
    model_bytes: int,
    n_layers: int | None,
    gpus: list[GPUInfo],
    model_name: str = "model",
    realm: str = "chat",
) -> None:
    """Raise ModelTooLarge when ``requested`` layers clearly cannot fit in the GPUs' free memory:
    their share of the weights alone, without any margin, is more than is free."""
    if requested <= 0 or not gpus or model_bytes <= 0:
        return
    share = 1.0 if not n_layers or requested >= n_layers else requested / n_layers
    needed_mib = math.ceil(model_bytes * share / MIB)
    free_mib = sum(g.free_mib for g in gpus)
    if needed_mib > free_mib:
        layers = "all layers" if share >= 1.0 else f"{requested} of {n_layers} layers"
        raise ModelTooLarge(
            f"{realm} model {model_name} needs ~{needed_mib} MiB of GPU memory ({layers}), "
            f"{_free_text(gpus)}; set realms.{realm}.n_gpu_layers = 0 to run it on the CPU",
            needed_mib=needed_mib,
            free_mib=free_mib,
        )


def plan_gpu_layers(
    requested: int,
    *,
    model_bytes: int,
    n_layers: int | None,
    gpus: list[GPUInfo],
    offload_supported: bool,
    model_name: str = "model",
    realm: str = "chat",
) -> int:
    """The ``n_gpu_layers`` to give llama.cpp for a realm's setting ``requested``.

    * 0 stays 0 (CPU only).
    * -1 (auto): every layer (999) when llama.cpp can offload and the model fits in the GPUs'
      free memory with a margin (``1.2 x size + 512 MiB``); as many layers as fit when it fits
      partly and the layer count is known; else 0.
    * a positive number is honoured; ``check_fits`` raises ModelTooLarge when it clearly cannot
      fit. (Without a GPU or GPU offload, llama.cpp runs every layer on the CPU anyway.)
    """
    if requested == 0:
        return 0
    if requested > 0:
        if offload_supported:
            check_fits(
                requested,
                model_bytes=model_bytes,
                n_layers=n_layers,
                gpus=gpus,
                model_name=model_name,
                realm=realm,
            )
        return requested
    if requested != -1:
        raise ValueError(f"n_gpu_layers must be -1 (auto), 0 or positive, got {requested}")
    if not offload_supported or not gpus or model_bytes <= 0:
        return 0
    free = sum(g.free_mib for g in gpus) * MIB
    usable = free - FIT_RESERVE_MIB * MIB
    needed = model_bytes * FIT_FACTOR
    if needed <= usable:
        return ALL_LAYERS
    if not n_layers or usable <= 0:
        return 0
    return max(0, min(n_layers - 1, int(n_layers * usable / needed)))


__all__ = [
    "ALL_LAYERS",
    "GPUInfo",
    "ModelTooLarge",
    "check_fits",
    "detect_gpus",
    "diffusers_device",
    "llama_gpu_offload_supported",
    "parse_nvidia_smi",
    "plan_gpu_layers",
]
