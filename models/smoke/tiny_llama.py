"""A tiny random-weight llama GGUF for smoke tests and a model-less first run.

No weights can be downloaded on a fresh node (or in CI), yet the chat backend
should be exercised through exactly the code path real weights take: a GGUF
file on disk, loaded by llama.cpp, prompted through the GGUF's own chat
template. `write_tiny_llama` writes such a file (~0.5 MB) from a seeded RNG.

The output is gibberish made of real words. Two details make it behave well
as a stand-in for a real model:

* the vocabulary is SentencePiece-style ("llama" tokenizer): `<unk> <s> </s>`,
  the 256 byte-fallback tokens `<0x00>`..`<0xFF>`, single characters and
  `▁word` pieces, so any prompt tokenizes (unknown text falls back to bytes);
* one embedding dimension carries a large constant and the output head reads
  it with +1 for word pieces and -1 for byte/control tokens, so sampling picks
  words and (almost) never lone bytes. Random byte tokens would otherwise form
  invalid UTF-8, which llama-cpp-python's streaming holds back until the end
  of the generation; that would make streaming untestable.

`general.name` is set to `SMOKE_TEST_MODEL_NAME` so a node can label the model
as a smoke-test model rather than pass it off as a real one.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from . import SMOKE_TEST_MODEL_NAME

# Architecture (tiny on purpose: ~0.5 MB of float32).
_N_EMBD = 64
TINY_LLAMA_N_EMBD = _N_EMBD  # what a projector for the tiny llama must output
_N_HEAD = 4
_N_HEAD_KV = 2  # grouped-query attention, as most current llamas use
_N_LAYER = 2
_N_FF = 128
_RMS_EPS = 1e-5
_ROPE_BASE = 10000.0

_WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "it",
    "his",
    "an",
    "were",
    "are",
    "which",
    "this",
    "be",
    "or",
    "has",
    "had",
    "not",
    "but",
    "first",
    "one",
    "their",
    "its",
    "new",
    "after",
    "who",
    "they",
    "have",
    "her",
    "she",
    "two",
    "been",
    "other",
    "when",
    "there",
    "all",
    "during",
    "into",
    "school",
    "time",
    "may",
    "years",
    "more",
    "most",
    "only",
    "over",
    "city",
    "some",
    "world",
    "would",
    "where",
    "later",
    "up",
    "such",
    "used",
    "many",
    "can",
    "state",
    "about",
    "national",
    "out",
    "known",
    "university",
    "united",
    "then",
    "made",
    "however",
    "these",
    "under",
    "system",
    "well",
    "season",
    "three",
    "also",
    "both",
    "between",
    "each",
    "life",
    "called",
    "node",
    "peer",
    "realm",
    "chat",
    "model",
    "token",
    "stream",
    "small",
    "quick",
    "brown",
    "fox",
    "jumps",
    "lazy",
    "dog",
    "hello",
    "river",
    "mountain",
    "light",
    "green",
    "blue",
    "red",
    "north",
    "south",
    "east",
    "west",
    "day",
    "night",
]

_CHARS = (
    list("abcdefghijklmnopqrstuvwxyz") + list("ABCDEFGHIJKLMNOPQRSTUVWXYZ") + list("0123456789") + list(".,!?;:'\"-()")
)

# A plain-text chat template (every role, system included). Rendered by
# llama-cpp-python's Jinja2ChatFormatter with bos_token/eos_token provided.
_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

# gguf TokenType values (gguf.TokenType), spelled out to keep this readable.
_NORMAL, _UNKNOWN, _CONTROL, _BYTE = 1, 2, 3, 6


def _vocab() -> tuple[list[str], list[float], list[int]]:
    tokens: list[str] = ["<unk>", "<s>", "</s>"]
    types: list[int] = [_UNKNOWN, _CONTROL, _CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [_BYTE] * 256
    pieces = ["\u2581"] + _CHARS + ["\u2581" + w for w in _WORDS]
    tokens += pieces
    types += [_NORMAL] * len(pieces)
    # SentencePiece scores: higher merges first; special/byte tokens score 0.
    scores = [0.0] * (3 + 256) + [-float(i) for i in range(len(pieces))]
    assert len(set(tokens)) == len(tokens), "duplicate token in tiny vocab"
    return tokens, scores, types


def _weights(rng: np.random.Generator, types: list[int]) -> dict[str, np.ndarray]:
    n_vocab = len(types)
    head_dim = _N_EMBD // _N_HEAD

    def rand(*shape: int, scale: float) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    # numpy shapes are the reverse of ggml's ne[]: token_embd is ggml
    # {n_embd, n_vocab}, i.e. numpy (n_vocab, n_embd); likewise below.
    emb = rand(n_vocab, _N_EMBD, scale=1.0)
    emb[:, 0] = 8.0  # constant "is text" direction, see module docstring

    out = rand(n_vocab, _N_EMBD, scale=0.5)
    kind = np.asarray(types)
    out[:, 0] = -1.0  # <unk>, <s> and the byte tokens
    out[kind == _NORMAL, 0] = 0.3  # "▁" and single characters
    out[n_vocab - len(_WORDS) :, 0] = 1.0  # "▁word" pieces, last in the vocab
    # </s> slightly favoured: at temperature 0.7 most generations end on their
    # own within a few hundred tokens (so ignore_eos is observable), while
    # greedy decoding falls into a loop of words instead.
    out[2, 0] = 1.4

    t: dict[str, np.ndarray] = {"token_embd.weight": emb}
    w_in = 1.0 / np.sqrt(_N_EMBD)
    for i in range(_N_LAYER):
        p = f"blk.{i}."
        t[p + "attn_norm.weight"] = np.ones(_N_EMBD, dtype=np.float32)
        t[p + "attn_q.weight"] = rand(_N_HEAD * head_dim, _N_EMBD, scale=w_in)
        t[p + "attn_k.weight"] = rand(_N_HEAD_KV * head_dim, _N_EMBD, scale=w_in)
        t[p + "attn_v.weight"] = rand(_N_HEAD_KV * head_dim, _N_EMBD, scale=w_in)
        t[p + "attn_output.weight"] = rand(_N_EMBD, _N_HEAD * head_dim, scale=0.5 * w_in)
        t[p + "ffn_norm.weight"] = np.ones(_N_EMBD, dtype=np.float32)
        t[p + "ffn_gate.weight"] = rand(_N_FF, _N_EMBD, scale=w_in)
        t[p + "ffn_up.weight"] = rand(_N_FF, _N_EMBD, scale=w_in)
        t[p + "ffn_down.weight"] = rand(_N_EMBD, _N_FF, scale=0.5 / np.sqrt(_N_FF))
    t["output_norm.weight"] = np.ones(_N_EMBD, dtype=np.float32)
    t["output.weight"] = out
    return t


def replace_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """Create the file `path` by `write(tmp)`, which writes a temporary file
    in the same directory; that file is then fsynced, given the mode a new
    file gets under the umask (0600 under the node's 077) and moved into
    place with os.replace, so readers never see a half-written file. On any
    failure the temporary file is removed. Returns `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600 whatever the umask
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_gguf_atomically(path: Path, arch: str, fill: Callable[[Any], None]) -> Path:
    """Write a GGUF file for `arch` to `path`; `fill(writer)` adds its
    metadata and tensors to a `gguf.GGUFWriter`. Returns `path`.

    Written through `replace_atomically`, so readers never see a half-written
    model.
    """
    import gguf  # imported lazily: only needed when writing the file

    def write(tmp: Path) -> None:
        w = gguf.GGUFWriter(tmp, arch)
        fill(w)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    return replace_atomically(path, write)


def write_tiny_llama(
    path: Path,
    *,
    seed: int = 0,
    context_length: int = 4096,
    chat_template: str | None = _CHAT_TEMPLATE,
) -> Path:
    """Write a tiny random-weight llama GGUF to `path` and return `path`.

    Deterministic: the same seed and context_length give a byte-identical file.
    `chat_template=None` leaves the template out (as in many LLaVA-1.5
    conversions), so llama-cpp-python falls back to its own prompt formats.
    Written to a temporary file in the same directory and moved into place
    with os.replace, so readers never see a half-written model.
    """
    import gguf  # imported lazily: only needed when writing the file

    if context_length < 16:
        raise ValueError(f"context_length must be >= 16, got {context_length}")
    tokens, scores, types = _vocab()
    rng = np.random.default_rng(seed)
    tensors = _weights(rng, types)

    def fill(w: Any) -> None:
        w.add_name(SMOKE_TEST_MODEL_NAME)
        w.add_description("random-weight llama for smoke tests; output is gibberish")
        w.add_file_type(gguf.LlamaFileType.ALL_F32)
        w.add_context_length(context_length)
        w.add_embedding_length(_N_EMBD)
        w.add_block_count(_N_LAYER)
        w.add_feed_forward_length(_N_FF)
        w.add_head_count(_N_HEAD)
        w.add_head_count_kv(_N_HEAD_KV)
        w.add_layer_norm_rms_eps(_RMS_EPS)
        w.add_rope_dimension_count(_N_EMBD // _N_HEAD)
        w.add_rope_freq_base(_ROPE_BASE)
        w.add_vocab_size(len(tokens))
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_unk_token_id(0)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)
        if chat_template is not None:
            w.add_chat_template(chat_template)
        for name, arr in tensors.items():
            w.add_tensor(name, arr)

    return write_gguf_atomically(path, "llama", fill)
