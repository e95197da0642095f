"""A tiny random-weight Stable Diffusion pipeline for smoke tests.

No weights can be downloaded on a fresh node (or in CI), yet the imagine
backend should be exercised through exactly the code path real weights take:
a diffusers pipeline folder on disk (model_index.json plus one folder per
component), loaded with `DiffusionPipeline.from_pretrained(dir,
local_files_only=True)`. `write_tiny_pipeline` writes such a folder (~7 MB of
float32 safetensors) from a seeded RNG.

Components, all built from configs with random weights:

* UNet2DConditionModel, block_out_channels (32, 64), one cross-attention level;
* AutoencoderKL, block_out_channels (32, 64): a latent is 1/2 of the image
  side (a real SD VAE: 1/8), so 64x64 images denoise 32x32 latents;
* a 2-layer CLIPTextModel (width 32 = the UNet's cross_attention_dim);
* a CLIPTokenizer over a small byte-level BPE vocabulary (the 256 byte
  symbols, each also as an end-of-word symbol, some whole words, and CLIP's
  two special tokens), so any text tokenizes without an unknown token. Its
  `model_max_length` is 77: without it the tokenizer would not truncate and a
  long prompt would overflow the text encoder's 77 positions;
* a DDIMScheduler (first order: exactly one UNet call and one
  `callback_on_step_end` per inference step);
* no safety checker and no feature extractor.

The folder also carries `SMOKE_MARKER`, a small JSON file: a backend that
finds it labels the model a smoke-test model rather than pass it off as a
real one. Real pipelines do not have it.

Cost at large sizes. With latents at 1/2 of the image side, self-attention
(each latent pixel attending to every other) grows with the fourth power of
the side: built like that, the tiny pipeline took ~60 s per step at 512x512 on
one CPU core, so a default-size request to a smoke-test node would run for
20 minutes. Its UNet therefore attends only to the prompt
(`only_cross_attention=True`, no mid block) and its VAE has no mid-block
attention, which keeps every component linear in the pixel count: ~3.5 s per
step at 512x512, 0.05 s at 64x64, on one core. The pipeline code path is the
same as for real weights.

The images are coloured noise. 64x64 in 4 steps takes ~0.25 s on one core.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from . import SMOKE_MARKER, SMOKE_TEST_MODEL_NAME

_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"
_MAX_TOKENS = 77  # CLIP's context: positions in the text encoder, tokenizer limit
_TEXT_WIDTH = 32  # CLIP hidden size == UNet cross_attention_dim

_WORDS = [
    "a",
    "an",
    "the",
    "of",
    "and",
    "with",
    "in",
    "on",
    "at",
    "by",
    "for",
    "from",
    "to",
    "under",
    "over",
    "near",
    "photo",
    "picture",
    "painting",
    "drawing",
    "portrait",
    "landscape",
    "cat",
    "dog",
    "bird",
    "horse",
    "fish",
    "fox",
    "bear",
    "tree",
    "flower",
    "forest",
    "river",
    "lake",
    "sea",
    "ocean",
    "mountain",
    "sky",
    "cloud",
    "sun",
    "moon",
    "star",
    "night",
    "day",
    "city",
    "street",
    "house",
    "castle",
    "tower",
    "road",
    "car",
    "boat",
    "ship",
    "train",
    "man",
    "woman",
    "child",
    "face",
    "eyes",
    "hair",
    "red",
    "green",
    "blue",
    "yellow",
    "orange",
    "purple",
    "black",
    "white",
    "gray",
    "golden",
    "silver",
    "dark",
    "light",
    "bright",
    "small",
    "big",
    "old",
    "new",
    "beautiful",
    "detailed",
    "realistic",
    "style",
    "art",
    "digital",
    "oil",
    "watercolor",
    "sketch",
    "cinematic",
    "lighting",
    "high",
    "quality",
    "4k",
]


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP byte-level alphabet: one printable character per byte value."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    codes = {b: b for b in printable}
    extra = 0
    for b in range(256):
        if b not in codes:
            codes[b] = 256 + extra
            extra += 1
    return [chr(codes[b]) for b in range(256)]


def _bpe() -> tuple[dict[str, int], list[str]]:
    """A small CLIP-style BPE vocabulary and merge list (deterministic)."""
    vocab: dict[str, int] = {}

    def add(token: str) -> None:
        if token not in vocab:
            vocab[token] = len(vocab)

    symbols = _byte_symbols()
    for s in symbols:
        add(s)
    for s in symbols:
        add(s + "</w>")
    merges: list[str] = []
    seen: set[str] = set()
    for word in _WORDS:
        if len(word) < 2:
            continue
        left = word[0]
        for i, ch in enumerate(word[1:], start=1):
            right = ch + ("</w>" if i == len(word) - 1 else "")
            merge = f"{left} {right}"
            if merge not in seen:
                seen.add(merge)
                merges.append(merge)
            left += right
            add(left)
    add(_BOS)
    add(_EOS)
    return vocab, merges


def _build_pipeline(tokenizer_dir: Path, seed: int):
    """Build the pipeline in memory; the tokenizer is read from vocab.json and
    merges.txt written to `tokenizer_dir` (which stay in the saved folder, so
    older transformers releases that want them can load it too)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab, merges = _bpe()
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = tokenizer_dir / "vocab.json", tokenizer_dir / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False, indent=1), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(vocab=str(vocab_file), merges=str(merges_file), model_max_length=_MAX_TOKENS)

    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state alone
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=_TEXT_WIDTH,
            attention_head_dim=8,
            norm_num_groups=32,
            # No pixel-to-pixel self-attention anywhere (see module docstring):
            only_cross_attention=True,
            mid_block_type=None,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            latent_channels=4,
            norm_num_groups=32,
            sample_size=64,
            mid_block_add_attention=False,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(vocab),
                hidden_size=_TEXT_WIDTH,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=_MAX_TOKENS,
                layer_norm_eps=1e-5,
                bos_token_id=vocab[_BOS],
                eos_token_id=vocab[_EOS],
                pad_token_id=vocab[_EOS],
            )
        )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def write_tiny_pipeline(path: Path, *, seed: int = 0) -> Path:
    """Write a tiny random-weight StableDiffusionPipeline folder at `path`.

    Deterministic: the same seed gives byte-identical files. Built in a
    temporary folder next to `path` and renamed into place, so readers never
    see a half-written pipeline. An existing empty folder or an existing
    smoke-test pipeline at `path` is replaced; anything else there raises
    FileExistsError (this never deletes a real model).
    """
    from ..imagine import quiet_progress_bars

    path = Path(path)
    if path.exists() and not _replaceable(path):
        raise FileExistsError(f"{path}: exists and is not a tiny smoke-test pipeline")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old: Path | None = None
    try:
        pipe = _build_pipeline(tmp / "tokenizer", seed)
        with quiet_progress_bars():  # transformers' "Writing model shards" bar
            pipe.save_pretrained(tmp, safe_serialization=True)
        marker = {
            "name": SMOKE_TEST_MODEL_NAME,
            "description": "random-weight StableDiffusionPipeline for smoke tests; its images are noise",
            "seed": seed,
        }
        (tmp / SMOKE_MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
        # mkdtemp creates 0700 and safetensors writes 0600: make it readable
        # like any file the caller writes (a node may run under another user).
        os.chmod(tmp, 0o755)
        for root, dirs, files in os.walk(tmp):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o755)
            for f in files:
                os.chmod(os.path.join(root, f), 0o644)
        if path.exists() and any(path.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.rename(path, old / "pipeline")
        os.rename(tmp, path)  # replaces an empty folder atomically
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not path.exists() and (old / "pipeline").exists():
            os.rename(old / "pipeline", path)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return path


def _replaceable(path: Path) -> bool:
    if not path.is_dir() or path.is_symlink():
        return False
    return (path / SMOKE_MARKER).is_file() or not any(path.iterdir())
