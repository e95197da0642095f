"""A tiny random-weight whisper model (ggml .bin) for smoke tests.

No weights can be downloaded on a fresh node (or in CI), yet the speech
backend should run exactly the code path real weights take: a ggml file on
disk, loaded and run by whisper.cpp through pywhispercpp. `write_tiny_whisper`
writes such a file (8.0 MB) from a seeded RNG. The transcript is gibberish.

The file format (whisper.cpp `models/convert-pt-to-ggml.py`, read back by
`whisper_model_load` in `src/whisper.cpp`), all little-endian int32/float32:

* magic 0x67676d6c ("ggml");
* 11 hparams: n_vocab, n_audio_ctx, n_audio_state, n_audio_head,
  n_audio_layer, n_text_ctx, n_text_state, n_text_head, n_text_layer, n_mels,
  ftype (0 = f32, 1 = f16; quantized files add 1000 * the quantization
  version);
* the mel filterbank: n_mel, n_fft, then n_mel * n_fft float32;
* the vocabulary: a token count, then each token as a length and its bytes;
  ids from the count up to n_vocab are filled in by whisper.cpp with its
  special tokens (end of text, start of transcript, languages, tasks,
  timestamps);
* the tensors until the end of the file, each as n_dims, name length, type
  (0 f32, 1 f16, ...), the dims innermost first (ggml's ne[], the reverse of
  the PyTorch shape), the name, then the raw data.

What the loader insists on: every tensor of the architecture present (by its
PyTorch name), with exactly the expected ne[] and a byte size that fits the
expected type (1-D tensors, the conv biases (shape [1, n_state]) and both
positional embeddings are f32, the matrices use the file's ftype, the conv
kernels f16 unless the file is f32), and nothing unknown or repeated. It
does *not* check the vocabulary size against n_vocab, and a file that ends
right after the vocabulary loads as an "empty model for testing" with
uninitialised weights (which is why the speech backend walks the tensor
table itself before handing a file to whisper.cpp).

Why n_vocab stays 51865. whisper.cpp derives every special-token id from
n_vocab (end of text 50257, start of transcript 50258, the 99 language
tokens, transcribe 50359, no-timestamps 50363, then 1,501 timestamp tokens
from <|0.00|> at 50364 to <|30.00|> at 51864), so the vocabulary keeps the
multilingual size; the file lists 50,257 plain text tokens and whisper.cpp
names the rest. Everything else shrinks: width 64, one head, one layer per
side. n_audio_ctx stays 1500: the encoder always sees a 30 s window of 3,000
mel frames, halved by conv2's stride 2, and the encoder positional embedding
must cover that. The token embedding (51865 x 64 f16, 6.6 MB) is most of the
file.

Behaviour. With plain random weights the decoder writes 220-token runs of
low-probability tokens and whisper.cpp's temperature fallback re-decodes every
30 s window up to five more times (92 s for one second of audio, measured here
on a first attempt).
So the decoder follows a script instead, through its positional embedding:
at each position a large spike on one "script" channel (the final layer norm
turns it into a logit of about +24 for the tokens whose embedding carries
that channel; every token starts at -10 through a constant channel). Position
0 (language detection) picks <|en|>; position 2 <|0.00|>; 3, 4 and 5 one word
each from three groups of `_WORDS`, the cross-attention (so the audio)
deciding which word of the group; 6 <|1.00|>; 7 and on end of text. Every
window is one confident segment, "<|0.00|> w1 w2 w3 <|1.00|>", decoded in
about 0.1 s on one core. Attention and MLP outputs are kept off the script
channels.

Smoke-test marker: the hyperparameters themselves. No released whisper model
is narrower than 384 (tiny); `is_tiny_whisper_hparams` recognises width 64
with one layer per side, and the speech backend labels such a model
`SMOKE_TEST_MODEL_NAME`.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np

from . import WHISPER_N_LAYER, WHISPER_N_STATE
from .tiny_llama import replace_atomically

GGML_MAGIC = 0x67676D6C

N_VOCAB = 51865  # multilingual: special-token ids depend on it (see above)
N_AUDIO_CTX = 1500  # 3000 mel frames (30 s) / conv2 stride 2
N_TEXT_CTX = 448
N_STATE = WHISPER_N_STATE
N_HEAD = 1
N_LAYER = WHISPER_N_LAYER
N_MELS = 80
N_FFT = 201  # WHISPER_N_FFT 400 -> 201 frequency bins
SAMPLE_RATE = 16000
N_TEXT_TOKENS = 50257  # ids 0..50256; whisper.cpp names 50257.. itself
TOKEN_EOT = 50257  # multilingual end of text
TOKEN_LANG_EN = 50259  # <|en|>, right after start of transcript (50258)
TOKEN_TS0 = 50364  # <|0.00|>; timestamps go in 20 ms steps
TOKEN_TS_END = TOKEN_TS0 + 50  # <|1.00|>

# ggml type ids used in the file
_F32, _F16 = 0, 1

# The decoder's script: the channel the positional embedding lights up at
# each position (the token at that position predicts the next one). The
# prompt is <|startoftranscript|> <|lang|> <|transcribe|> (positions 0..2);
# language detection decodes position 0 alone. Positions past the script
# (7 and on) all point at end of text.
_CH_BASE, _CH_EN, _CH_TS0, _CH_W1, _CH_W2, _CH_W3, _CH_TS_END, _CH_EOT = range(8)
_SCRIPT_CHANNELS = list(range(8))
_SCRIPT: dict[int, int | None] = {
    0: _CH_EN,  # language detection -> <|en|>
    1: None,
    2: _CH_TS0,  # first token: the segment starts at <|0.00|>
    3: _CH_W1,  # three words, each from its own group of _WORDS
    4: _CH_W2,  # (which one within the group is up to the audio)
    5: _CH_W3,
    6: _CH_TS_END,  # the segment ends at <|1.00|>
}
_P = 30.0  # positional spike: dominates the residual stream
_S = 3.0  # a scripted token's weight on its channel (logit ~ _S * 8)
_BASE = 10.0  # every token's logit starts at -_BASE
_CROSS_GAIN = 4.0  # the audio's say in which word of a group is picked (more: gibberish runs)

_WORDS = [
    "hello",
    "world",
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "node",
    "peer",
    "realm",
    "speech",
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
]


def _mel_filters(sr: int = SAMPLE_RATE, n_fft: int = 400, n_mels: int = N_MELS) -> np.ndarray:
    """A Slaney-style mel filterbank (what librosa.filters.mel gives whisper)."""

    def hz_to_mel(f: np.ndarray) -> np.ndarray:
        f = np.asarray(f, dtype=np.float64)
        f_sp = 200.0 / 3
        mels = f / f_sp
        min_log_hz = 1000.0
        min_log_mel = min_log_hz / f_sp
        logstep = np.log(6.4) / 27.0
        logs = min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep
        return np.where(f >= min_log_hz, logs, mels)

    def mel_to_hz(m: np.ndarray) -> np.ndarray:
        m = np.asarray(m, dtype=np.float64)
        f_sp = 200.0 / 3
        freqs = f_sp * m
        min_log_hz = 1000.0
        min_log_mel = min_log_hz / f_sp
        logstep = np.log(6.4) / 27.0
        return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), freqs)

    fftfreqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    mel_f = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(sr / 2), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fftfreqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2 : n_mels + 2] - mel_f[:n_mels]))[:, None]
    return weights.astype(np.float32)  # (n_mels, n_fft // 2 + 1)


def _vocab(rng: np.random.Generator) -> list[bytes]:
    """50,257 distinct byte strings standing in for the GPT-2 BPE vocabulary."""
    tokens: list[bytes] = [bytes([b]) for b in range(256)]
    seen = set(tokens)
    words = [w.encode() for w in _WORDS] + [b" " + w.encode() for w in _WORDS]
    for w in words:
        if w not in seen:
            tokens.append(w)
            seen.add(w)
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", dtype=np.uint8)
    while len(tokens) < N_TEXT_TOKENS - 1:
        n = int(rng.integers(2, 8))
        piece = bytes(letters[rng.integers(0, 26, n)])
        if rng.random() < 0.5:
            piece = b" " + piece
        if piece not in seen:
            tokens.append(piece)
            seen.add(piece)
    tokens.append(b"")  # id 50256: empty in the multilingual vocabulary too
    return tokens


def _tensors(rng: np.random.Generator, vocab: list[bytes]) -> list[tuple[str, np.ndarray, int]]:
    """(PyTorch name, array in PyTorch shape, ggml type) in file order."""
    d, ff = N_STATE, 4 * N_STATE
    out: list[tuple[str, np.ndarray, int]] = []

    def rand(*shape: int, scale: float) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def add(name: str, arr: np.ndarray, ttype: int | None = None) -> None:
        if ttype is None:
            ttype = _F16 if arr.ndim >= 2 else _F32
        out.append((name, arr, ttype))

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    def zeros(n: int) -> np.ndarray:
        return np.zeros(n, dtype=np.float32)

    w = 1.0 / np.sqrt(d)

    def block(p: str, kind: str, gain: float = 1.0) -> None:
        add(f"{p}{kind}.query.weight", rand(d, d, scale=w))
        add(f"{p}{kind}.query.bias", zeros(d))
        add(f"{p}{kind}.key.weight", rand(d, d, scale=w))
        add(f"{p}{kind}.value.weight", rand(d, d, scale=w))
        add(f"{p}{kind}.value.bias", zeros(d))
        add(f"{p}{kind}.out.weight", _off_script(rand(d, d, scale=gain * w)))
        add(f"{p}{kind}.out.bias", zeros(d))
        add(f"{p}{kind}_ln.weight", ones(d))
        add(f"{p}{kind}_ln.bias", zeros(d))

    def mlp(p: str) -> None:
        add(p + "mlp.0.weight", rand(ff, d, scale=w))
        add(p + "mlp.0.bias", zeros(ff))
        add(p + "mlp.2.weight", _off_script(rand(d, ff, scale=1.0 / np.sqrt(ff))))
        add(p + "mlp.2.bias", zeros(d))
        add(p + "mlp_ln.weight", ones(d))
        add(p + "mlp_ln.bias", zeros(d))

    # encoder: plain random weights
    add("encoder.positional_embedding", rand(N_AUDIO_CTX, d, scale=0.1), _F32)
    add("encoder.conv1.weight", rand(d, N_MELS, 3, scale=1.0 / np.sqrt(3 * N_MELS)))
    add("encoder.conv1.bias", zeros(d).reshape(d, 1), _F32)
    add("encoder.conv2.weight", rand(d, d, 3, scale=1.0 / np.sqrt(3 * d)))
    add("encoder.conv2.bias", zeros(d).reshape(d, 1), _F32)
    for i in range(N_LAYER):
        block(f"encoder.blocks.{i}.", "attn")
        mlp(f"encoder.blocks.{i}.")
    add("encoder.ln_post.weight", ones(d))
    add("encoder.ln_post.bias", zeros(d))

    # decoder: the script (see the module docstring)
    pe = rand(N_TEXT_CTX, d, scale=0.1)
    for pos in range(N_TEXT_CTX):
        ch = _SCRIPT.get(pos, _CH_EOT)
        if ch is not None:
            pe[pos, ch] += _P
    add("decoder.positional_embedding", pe, _F32)
    emb = rand(N_VOCAB, d, scale=0.5)
    emb[:, _SCRIPT_CHANNELS] = 0.0
    emb[:, _CH_BASE] = -1.0
    spaced = {b" " + w.encode(): i for i, w in enumerate(_WORDS)}
    groups = (_CH_W1, _CH_W2, _CH_W3)
    for tok_id, tok in enumerate(vocab):
        if tok in spaced:
            emb[tok_id, groups[spaced[tok] % len(groups)]] = _S
    emb[TOKEN_TS0, _CH_TS0] = _S
    emb[TOKEN_TS_END, _CH_TS_END] = _S
    emb[TOKEN_EOT, _CH_EOT] = _S
    emb[TOKEN_LANG_EN, _CH_EN] = _S
    add("decoder.token_embedding.weight", emb)
    for i in range(N_LAYER):
        p = f"decoder.blocks.{i}."
        block(p, "attn")
        block(p, "cross_attn", gain=_CROSS_GAIN)
        mlp(p)
    ln_w = ones(d)
    ln_w[_CH_BASE] = 0.0
    ln_b = zeros(d)
    ln_b[_CH_BASE] = _BASE
    add("decoder.ln.weight", ln_w)
    add("decoder.ln.bias", ln_b)
    return out


def _off_script(m: np.ndarray) -> np.ndarray:
    """Keep a layer's output off the script channels (rows of an out-projection)."""
    m[_SCRIPT_CHANNELS, :] = 0.0
    return m


def _encode(vocab: list[bytes], tensors: list[tuple[str, np.ndarray, int]], f: BinaryIO) -> None:
    f.write(struct.pack("<i", GGML_MAGIC))
    hparams = (
        N_VOCAB,
        N_AUDIO_CTX,
        N_STATE,
        N_HEAD,
        N_LAYER,
        N_TEXT_CTX,
        N_STATE,
        N_HEAD,
        N_LAYER,
        N_MELS,
        _F16,
    )
    f.write(struct.pack("<11i", *hparams))
    filters = _mel_filters()
    f.write(struct.pack("<ii", *filters.shape))
    f.write(filters.astype("<f4").tobytes())
    f.write(struct.pack("<i", len(vocab)))
    for tok in vocab:
        f.write(struct.pack("<i", len(tok)))
        f.write(tok)
    for name, arr, ttype in tensors:
        raw = name.encode()
        f.write(struct.pack("<iii", arr.ndim, len(raw), ttype))
        f.write(struct.pack(f"<{arr.ndim}i", *reversed(arr.shape)))
        f.write(raw)
        f.write(arr.astype("<f2" if ttype == _F16 else "<f4").tobytes())


def write_tiny_whisper(path: Path, *, seed: int = 0) -> Path:
    """Write a tiny random-weight whisper ggml model to `path`; return `path`.

    Deterministic: the same seed gives a byte-identical file. Written to a
    temporary file and moved into place (`tiny.replace_atomically`), so a
    reader never sees a half-written model.
    """
    rng = np.random.default_rng(seed)
    vocab = _vocab(rng)
    tensors = _tensors(rng, vocab)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            _encode(vocab, tensors, f)

    return replace_atomically(path, write)
