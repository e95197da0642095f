"""A tiny random-weight vision model pair: the tiny llama plus an mmproj.

llama.cpp runs LLaVA / Qwen-VL class models from two GGUF files: the language
model, and a "multimodal projector" (mmproj) GGUF with architecture "clip"
that holds a vision encoder and a projector mapping image patches into the
language model's embedding space. `write_tiny_vision` writes both, so the
vision backend is exercised through exactly the path real weights take
(llama.cpp's `mtmd` library loading the projector next to the model).

The projector is a LLaVA-1.5 style one, the simplest this llama.cpp build's
clip loader (tools/mtmd/clip.cpp in llama-cpp-python 0.3.36) accepts:

* a CLIP ViT: 32x32 input, 8x8 patches (so 16 image tokens), width 32,
  4 heads, 2 pre-norm blocks with GELU, a class token and learned positions,
  a pre-layernorm (`v.pre_ln`); llava uses the second-to-last block's output;
* projector type "mlp": `mm.0` (32 -> 64), GELU, `mm.2` (64 -> 64). Its output
  width must equal the language model's embedding width (the tiny llama's
  64), which `mtmd_init_from_file` checks.

Key and tensor names follow llama.cpp's legacy llava converter
(tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py), including its
habit of storing the patch-embedding convolution kernel in f16. Both files
carry `general.name` = SMOKE_TEST_MODEL_NAME. ~0.1 MB for the projector.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from . import SMOKE_TEST_MODEL_NAME
from .tiny_llama import TINY_LLAMA_N_EMBD, write_gguf_atomically, write_tiny_llama

TINY_VISION_MODEL_FILE = "model.gguf"
TINY_VISION_MMPROJ_FILE = "mmproj.gguf"

# Vision encoder (tiny on purpose).
_IMAGE_SIZE = 32
_PATCH_SIZE = 8
_N_EMBD = 32
_N_HEAD = 4
_N_FF = 64
_N_LAYER = 2
_LN_EPS = 1e-5
_PROJ_HIDDEN = 64
_PROJ_OUT = TINY_LLAMA_N_EMBD
# CLIP's preprocessing constants (what real LLaVA projectors carry).
_IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
_IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]


def _projector_weights(rng: np.random.Generator, out_width: int) -> dict[str, np.ndarray]:
    n_pos = (_IMAGE_SIZE // _PATCH_SIZE) ** 2 + 1  # patches + class token

    def rand(*shape: int, scale: float) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    def zeros(n: int) -> np.ndarray:
        return np.zeros(n, dtype=np.float32)

    # numpy shapes are the reverse of ggml's ne[] (see tiny_llama.py).
    t: dict[str, np.ndarray] = {
        # conv2d kernel, ggml {patch, patch, 3, n_embd}
        "v.patch_embd.weight": rand(_N_EMBD, 3, _PATCH_SIZE, _PATCH_SIZE, scale=1.0 / _PATCH_SIZE).astype(np.float16),
        "v.class_embd": rand(_N_EMBD, scale=1.0),
        "v.position_embd.weight": rand(n_pos, _N_EMBD, scale=0.5),
        "v.pre_ln.weight": ones(_N_EMBD),
        "v.pre_ln.bias": zeros(_N_EMBD),
    }
    w_in = 1.0 / np.sqrt(_N_EMBD)
    for i in range(_N_LAYER):
        p = f"v.blk.{i}."
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            t[p + name + ".weight"] = rand(_N_EMBD, _N_EMBD, scale=w_in)
            t[p + name + ".bias"] = zeros(_N_EMBD)
        for name in ("ln1", "ln2"):
            t[p + name + ".weight"] = ones(_N_EMBD)
            t[p + name + ".bias"] = zeros(_N_EMBD)
        t[p + "ffn_up.weight"] = rand(_N_FF, _N_EMBD, scale=w_in)
        t[p + "ffn_up.bias"] = zeros(_N_FF)
        t[p + "ffn_down.weight"] = rand(_N_EMBD, _N_FF, scale=1.0 / np.sqrt(_N_FF))
        t[p + "ffn_down.bias"] = zeros(_N_EMBD)
    t["mm.0.weight"] = rand(_PROJ_HIDDEN, _N_EMBD, scale=w_in)
    t["mm.0.bias"] = zeros(_PROJ_HIDDEN)
    t["mm.2.weight"] = rand(out_width, _PROJ_HIDDEN, scale=2.0 / np.sqrt(_PROJ_HIDDEN))
    t["mm.2.bias"] = zeros(out_width)
    return t


def write_tiny_mmproj(path: Path, *, seed: int = 0, out_width: int = _PROJ_OUT) -> Path:
    """Write the tiny random-weight CLIP projector GGUF to `path` (atomically,
    deterministically for a seed) and return `path`.

    `out_width` is the projector's output width: the tiny llama's embedding
    width by default; anything else makes a projector for some other model
    (which llama.cpp refuses to pair with the tiny llama).
    """
    import gguf  # imported lazily: only needed when writing the file

    if out_width < 1:
        raise ValueError(f"out_width must be >= 1, got {out_width}")
    tensors = _projector_weights(np.random.default_rng([seed, 1]), out_width)

    def fill(w: Any) -> None:
        w.add_name(SMOKE_TEST_MODEL_NAME)
        w.add_description("random-weight LLaVA-style image encoder for smoke tests")
        w.add_file_type(gguf.LlamaFileType.ALL_F32)
        w.add_bool("clip.has_text_encoder", False)
        w.add_bool("clip.has_vision_encoder", True)
        w.add_bool("clip.has_llava_projector", True)
        w.add_string("clip.projector_type", "mlp")
        w.add_uint32("clip.vision.image_size", _IMAGE_SIZE)
        w.add_uint32("clip.vision.patch_size", _PATCH_SIZE)
        w.add_uint32("clip.vision.embedding_length", _N_EMBD)
        w.add_uint32("clip.vision.feed_forward_length", _N_FF)
        w.add_uint32("clip.vision.projection_dim", out_width)
        w.add_uint32("clip.vision.attention.head_count", _N_HEAD)
        w.add_float32("clip.vision.attention.layer_norm_epsilon", _LN_EPS)
        w.add_uint32("clip.vision.block_count", _N_LAYER)
        w.add_array("clip.vision.image_mean", _IMAGE_MEAN)
        w.add_array("clip.vision.image_std", _IMAGE_STD)
        w.add_bool("clip.use_gelu", True)
        for name, arr in tensors.items():
            w.add_tensor(name, arr)

    return write_gguf_atomically(path, "clip", fill)


def write_tiny_vision(dir: Path, *, seed: int = 0) -> tuple[Path, Path]:
    """Write the tiny llama and its tiny projector into `dir`; return
    (model path, mmproj path). Deterministic for a seed."""
    dir = Path(dir)
    model = write_tiny_llama(dir / TINY_VISION_MODEL_FILE, seed=seed)
    mmproj = write_tiny_mmproj(dir / TINY_VISION_MMPROJ_FILE, seed=seed)
    return model, mmproj
