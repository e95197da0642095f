"""GPU awareness: nvidia-smi parsing, detection without a GPU, offload planning."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from rentahal.models import gpu
from rentahal.models.gpu import (
    GPUInfo,
    ModelTooLarge,
    check_fits,
    detect_gpus,
    diffusers_device,
    llama_gpu_offload_supported,
    parse_nvidia_smi,
    plan_gpu_layers,
)

MIB = 1024 * 1024
ONE = "0, NVIDIA H100 80GB HBM3, 81559, 80989\n"
TWO = "0, NVIDIA GeForce RTX 4090, 24564, 23880\n1, NVIDIA GeForce RTX 3090, 24576, 1200\n"


def test_parse_nvidia_smi() -> None:
    assert parse_nvidia_smi(ONE) == [GPUInfo(0, "NVIDIA H100 80GB HBM3", 81559, 80989, "cuda")]
    assert parse_nvidia_smi(TWO) == [
        GPUInfo(0, "NVIDIA GeForce RTX 4090", 24564, 23880),
        GPUInfo(1, "NVIDIA GeForce RTX 3090", 24576, 1200),
    ]
    assert parse_nvidia_smi("  3 ,  Tesla T4 , 15360 , 15000  \r\n\n") == [GPUInfo(3, "Tesla T4", 15360, 15000)]
    assert parse_nvidia_smi("0, Weird, Name, Inc, 100, 50") == [GPUInfo(0, "Weird, Name, Inc", 100, 50)]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "garbage",
        "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.",
        "No devices were found",
        "index, name, memory.total [MiB], memory.free [MiB]",
        "0, NVIDIA A100-SXM4-40GB MIG 1g.5gb, [N/A], [N/A]",
        "x, GPU, 100, 50",
        "0, , 100, 50",
        "0, GPU, 100, 500",  # more free than total
        "0, GPU, -1, -1",
        "0, GPU, nan, nan",
    ],
)
def test_parse_nvidia_smi_garbage(text: str) -> None:
    assert parse_nvidia_smi(text) == []


def test_detect_gpus_here_is_empty() -> None:
    assert detect_gpus() == []  # no nvidia-smi and no CUDA on the test machine


def _fake_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: str) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\n" + script + "\n")
    smi.chmod(smi.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")


def test_detect_gpus_through_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_smi(tmp_path, monkeypatch, f"printf '{TWO}'")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert [g.index for g in detect_gpus()] == [0, 1]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert [g.name for g in detect_gpus()] == ["NVIDIA GeForce RTX 3090"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    assert [g.index for g in detect_gpus()] == [1, 0]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert detect_gpus() == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-8f6c2a1e-0000")
    assert len(detect_gpus()) == 2


def test_detect_gpus_nvidia_smi_failing_or_hanging(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_smi(tmp_path, monkeypatch, "echo 'NVIDIA-SMI has failed' ; exit 9")
    assert detect_gpus() == []
    _fake_smi(tmp_path, monkeypatch, "sleep 30 & sleep 30")  # a child that holds the pipe too
    monkeypatch.setattr(gpu, "NVIDIA_SMI_TIMEOUT", 0.3)
    start = time.monotonic()
    assert detect_gpus() == []
    assert time.monotonic() - start < 10


def test_llama_gpu_offload_supported_is_a_bool() -> None:
    supported = llama_gpu_offload_supported()
    assert isinstance(supported, bool)
    try:
        import llama_cpp
    except ImportError:
        assert supported is False
    else:
        assert supported == bool(llama_cpp.llama_supports_gpu_offload())


def test_diffusers_device() -> None:
    h100 = parse_nvidia_smi(ONE)
    assert diffusers_device([]) == ("cpu", "float32")
    assert diffusers_device(h100, cuda_available=True) == ("cuda", "float16")
    assert diffusers_device(h100, cuda_available=False) == ("cpu", "float32")


G24 = [GPUInfo(0, "RTX 4090", 24564, 24000)]
G8 = [GPUInfo(0, "RTX 3070", 8192, 8000)]
G2X = [GPUInfo(0, "A", 16384, 8000), GPUInfo(1, "B", 16384, 8000)]


@pytest.mark.parametrize(
    ("requested", "model_mib", "n_layers", "gpus", "offload", "expected"),
    [
        (0, 4000, 32, G24, True, 0),  # 0 stays 0
        (-1, 4000, 32, G24, True, 999),  # fits with margin: every layer
        (-1, 4000, None, G24, True, 999),
        (-1, 4000, 32, G24, False, 0),  # CPU build of llama.cpp
        (-1, 4000, 32, [], True, 0),  # no GPU
        (-1, 0, 32, G24, True, 0),  # unknown size
        (-1, 6000, 32, G8, True, 999),  # 6000*1.2 = 7200 <= 8000-512
        (-1, 6400, 32, G8, True, 31),  # 7680 > 7488: partly -> 32*7488/7680 = 31.2
        (-1, 13000, 40, G8, True, 19),  # 40*7488/15600 = 19.2
        (-1, 13000, None, G8, True, 0),  # partly, but layer count unknown
        (-1, 40000, 40, G8, True, 6),  # 40*7488/48000 = 6.24
        (-1, 12000, 32, G2X, True, 999),  # 14400 <= 16000-512: split over two GPUs
        (-1, 200000, 80, [GPUInfo(0, "tiny", 600, 400)], True, 0),  # nothing usable
        (20, 4000, 32, G24, True, 20),  # positive honoured
        (999, 4000, 32, G24, True, 999),
        (20, 4000, 32, [], False, 20),  # no GPU: llama.cpp runs it on the CPU anyway
        (16, 13000, 32, G8, True, 16),  # half of 13000 = 6500 <= 8000
    ],
)
def test_plan_gpu_layers(
    requested: int, model_mib: int, n_layers: int | None, gpus: list[GPUInfo], offload: bool, expected: int
) -> None:
    got = plan_gpu_layers(
        requested, model_bytes=model_mib * MIB, n_layers=n_layers, gpus=gpus, offload_supported=offload
    )
    assert got == expected


def test_plan_gpu_layers_partial_is_below_all_layers() -> None:
    for model_mib in range(6300, 40000, 700):
        got = plan_gpu_layers(-1, model_bytes=model_mib * MIB, n_layers=32, gpus=G8, offload_supported=True)
        assert got == 999 or 0 <= got < 32


def test_plan_gpu_layers_too_large() -> None:
    with pytest.raises(ModelTooLarge) as err:
        plan_gpu_layers(
            999,
            model_bytes=40000 * MIB,
            n_layers=80,
            gpus=G24,
            offload_supported=True,
            model_name="llama-70b.Q4.gguf",
        )
    assert str(err.value) == (
        "chat model llama-70b.Q4.gguf needs ~40000 MiB of GPU memory (all layers), "
        "24000 MiB free on GPU 0 (RTX 4090); set realms.chat.n_gpu_layers = 0 to run it on the CPU"
    )
    assert err.value.needed_mib == 40000 and err.value.free_mib == 24000
    with pytest.raises(ModelTooLarge, match=r"needs ~20000 MiB .*\(40 of 80 layers\), 16000 MiB free on 2 GPUs"):
        check_fits(40, model_bytes=40000 * MIB, n_layers=80, gpus=G2X, model_name="m", realm="vision")
    check_fits(20, model_bytes=40000 * MIB, n_layers=80, gpus=G24)  # 10000 MiB fits
    check_fits(20, model_bytes=40000 * MIB, n_layers=80, gpus=[])  # nothing to check against
    with pytest.raises(ValueError):
        plan_gpu_layers(-2, model_bytes=1, n_layers=1, gpus=G24, offload_supported=True)
