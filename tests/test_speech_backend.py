"""The speech backend against real whisper.cpp (pywhispercpp), ffmpeg and
espeak-ng, with the tiny random-weight whisper model.

No mocks: the tiny model is written into a temp dir and loaded through the
same whisper.cpp path real weights take; the spoken audio is made by
espeak-ng and re-encoded by ffmpeg here.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import time
import wave
from pathlib import Path

import numpy as np
import pytest
import trio

from rentahal.models.base import BadRequest, ModelFailure, Progress
from rentahal.models.smoke import is_tiny_whisper_hparams
from rentahal.models.smoke.tiny_llama import SMOKE_TEST_MODEL_NAME, write_tiny_llama
from rentahal.models.smoke.tiny_whisper import write_tiny_whisper
from rentahal.models.speech import (
    SpeechBackend,
    SpeechParams,
    detect_audio_format,
    parse_speech_payload,
    read_whisper_ggml,
)

from .backend_helpers import Collector, load_error, loaded

# scripts/test.sh installs ffmpeg, espeak-ng and the [speech] extra: missing ones are a failure.
assert shutil.which("ffmpeg") and shutil.which("espeak-ng"), "install ffmpeg and espeak-ng"

LIMITS = {"max_audio_bytes": 1000, "max_tts_chars": 50}


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_whisper(tmp_path_factory.mktemp("whisper") / "tiny.bin", seed=0)


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """ "hello world" spoken by espeak-ng (22050 Hz WAV), re-encoded by ffmpeg,
    plus 16 kHz mono 16-bit WAVs of it (1 x and tiled to 300 s)."""
    d = tmp_path_factory.mktemp("media")
    wav = d / "hello.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), "hello world"], check=True)
    out = {"wav": wav.read_bytes()}
    codecs = {
        "webm": ["-c:a", "libopus"],
        "ogg": ["-c:a", "libvorbis"],
        "mp3": ["-c:a", "libmp3lame"],
        "flac": [],
    }
    for ext, codec in codecs.items():
        target = d / f"hello.{ext}"
        subprocess.run(
            ["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i", str(wav), *codec, str(target)],
            check=True,
        )
        out[ext] = target.read_bytes()
    pcm = subprocess.run(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(wav)] + ["-ar", "16000", "-ac", "1", "-f", "s16le", "-"],
        check=True,
        capture_output=True,
    ).stdout
    out["wav16k"] = _wav16k(pcm)
    samples = np.frombuffer(pcm, dtype="<i2")
    out["long16k"] = _wav16k(np.resize(samples, 300 * 16000).tobytes())  # 300 s: ten windows
    return out


def _wav16k(pcm: bytes) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm)
    return buf.getvalue()


@pytest.fixture
async def backend(tiny_path: Path):
    async with loaded(SpeechBackend(tiny_path, threads=1)) as b:
        yield b


# ------------------------------------------------------------ the tiny model


def test_tiny_model_is_deterministic_small_and_marked(tiny_path: Path, tmp_path: Path) -> None:
    again = write_tiny_whisper(tmp_path / "again.bin", seed=0)
    other = write_tiny_whisper(tmp_path / "other.bin", seed=1)
    assert again.read_bytes() == tiny_path.read_bytes()
    assert other.read_bytes() != tiny_path.read_bytes()
    assert tiny_path.stat().st_size < 10 * 1024 * 1024
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []  # temp files gone
    hp = read_whisper_ggml(tiny_path)
    assert hp["n_vocab"] == 51865 and hp["n_audio_ctx"] == 1500
    assert is_tiny_whisper_hparams(hp)


# ------------------------------------------------------------ transcription


async def test_loads_and_transcribes_spoken_wav(backend: SpeechBackend, media: dict[str, bytes]) -> None:
    assert backend.is_smoke_test and backend.model_name == SMOKE_TEST_MODEL_NAME
    assert backend.tts_available and backend.ffmpeg_available and backend.gpu is False
    sink = Collector()
    result = await backend.generate({"audio": media["wav"]}, sink)
    text = result.output["text"]
    assert isinstance(text, str) and text  # random weights: the words are gibberish
    assert result.output["language"] == "en" and result.output["model"] == SMOKE_TEST_MODEL_NAME
    assert result.stats["segments"] >= 1
    assert sink.events
    assert all(isinstance(e, Progress) and e.stage == "transcribing" for e in sink.events)
    assert [e.done for e in sink.events] == list(range(1, len(sink.events) + 1))
    assert abs(result.stats["audio_s"] - 1.03) < 0.1
    assert result.stats["realtime_factor"] > 0 and result.stats["ms"] > 0


@pytest.mark.parametrize("fmt", ["webm", "ogg", "mp3", "flac", "wav16k"])
async def test_other_formats_are_converted(backend: SpeechBackend, media: dict[str, bytes], fmt: str) -> None:
    assert detect_audio_format(media[fmt]) == ("wav" if fmt == "wav16k" else fmt)
    result = await backend.generate({"audio": media[fmt], "language": "de"}, Collector())
    assert isinstance(result.output["text"], str) and result.stats["segments"] >= 1
    assert result.output["language"] == "de"
    assert abs(result.stats["audio_s"] - 1.03) < 0.1  # mp3/opus pad a little


async def test_too_long_audio_is_refused(tiny_path: Path, media: dict[str, bytes]) -> None:
    async with loaded(SpeechBackend(tiny_path, threads=1, max_audio_s=0.5)) as b:
        for fmt in ("wav", "wav16k", "webm"):  # converted, read directly, converted
            with pytest.raises(BadRequest, match=r"^payload\.audio: longer than the 0\.5 s"):
                await b.generate({"audio": media[fmt]}, Collector())


async def test_undecodable_audio_is_a_bad_payload(backend: SpeechBackend) -> None:
    fake_webm = b"\x1a\x45\xdf\xa3" + bytes(range(256)) * 4
    expected = r"^payload\.audio: could not be decoded as WebM \(ffmpeg: "
    with pytest.raises(BadRequest, match=expected):
        await backend.generate({"audio": fake_webm}, Collector())
    silent_wav = _wav16k(b"")
    with pytest.raises(BadRequest, match=r"^payload\.audio: contains no audio"):
        await backend.generate({"audio": silent_wav}, Collector())


async def test_cancel_stops_whisper_and_backend_still_works(backend: SpeechBackend, media: dict[str, bytes]) -> None:
    seen: list[Progress] = []
    cancelled_at: list[float] = []
    with trio.CancelScope() as scope:

        async def send(ev: Progress) -> None:
            seen.append(ev)
            cancelled_at.append(time.perf_counter())
            scope.cancel()  # withdraw the request after the first 30 s window

        await backend.generate({"audio": media["long16k"]}, send)
    assert scope.cancelled_caught
    # whisper.cpp's abort callback stopped it: no second window was decoded
    # (ten windows of this audio take several seconds here).
    assert len(seen) == 1
    assert time.perf_counter() - cancelled_at[0] < 2.0
    result = await backend.generate({"audio": media["wav"]}, Collector())
    assert isinstance(result.output["text"], str) and result.stats["segments"] >= 1


async def test_transcriptions_queue_and_tts_runs_alongside(backend: SpeechBackend, media: dict[str, bytes]) -> None:
    results: dict[str, object] = {}

    async def run(key: str, payload: dict) -> None:
        results[key] = await backend.generate(payload, Collector())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, "a", {"audio": media["wav"]})
        nursery.start_soon(run, "b", {"audio": media["ogg"]})
        nursery.start_soon(run, "t", {"text": "meanwhile"})
    assert isinstance(results["a"].output["text"], str)  # type: ignore[attr-defined]
    assert isinstance(results["b"].output["text"], str)  # type: ignore[attr-defined]
    assert results["t"].output["format"] == "wav"  # type: ignore[attr-defined]


async def test_closed_backend_refuses(tiny_path: Path, media: dict[str, bytes]) -> None:
    b = SpeechBackend(tiny_path, threads=1)
    with pytest.raises(ModelFailure, match="not loaded"):
        await b.generate({"audio": media["wav"]}, Collector())
    await b.load()
    await b.aclose()
    with pytest.raises(ModelFailure, match="not loaded") as info:
        await b.generate({"audio": media["wav"]}, Collector())
    assert info.value.code == "backend_failed"


async def test_without_espeak_and_ffmpeg_stt_still_works(
    tiny_path: Path, media: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # neither espeak-ng nor ffmpeg on it
    async with loaded(SpeechBackend(tiny_path, threads=1)) as b:
        assert not b.tts_available and not b.ffmpeg_available
        result = await b.generate({"audio": media["wav16k"]}, Collector())  # no conversion needed
        assert isinstance(result.output["text"], str)
        with pytest.raises(ModelFailure, match="ffmpeg is not installed") as info:
            await b.generate({"audio": media["webm"]}, Collector())
        assert info.value.code == "backend_failed"
        with pytest.raises(ModelFailure, match="espeak-ng is not installed") as info:
            await b.generate({"text": "hello"}, Collector())
        assert info.value.code == "backend_failed"


# ---------------------------------------------------------------------- TTS


def _read_wav(data: bytes) -> tuple[int, float]:
    with wave.open(io.BytesIO(data), "rb") as w:
        assert w.getnchannels() == 1 and w.getsampwidth() == 2
        assert len(w.readframes(w.getnframes())) == w.getnframes() * 2  # header sizes are true
        return w.getframerate(), w.getnframes() / w.getframerate()


async def test_text_to_speech_makes_a_wav(backend: SpeechBackend) -> None:
    text = "Hello from the speech realm."
    result = await backend.generate({"text": text}, Collector())
    assert result.output["format"] == "wav"
    rate, seconds = _read_wav(result.output["audio"])
    assert rate > 0 and result.output["sample_rate"] == rate
    assert seconds > 0.5 and abs(result.stats["audio_s"] - seconds) < 0.01
    assert result.stats["chars"] == len(text) and result.stats["ms"] > 0
    fast = await backend.generate({"text": text, "voice": "en-us", "speed": 400}, Collector())
    assert 0 < _read_wav(fast.output["audio"])[1] < seconds


async def test_unknown_voice_is_a_bad_payload(backend: SpeechBackend) -> None:
    with pytest.raises(BadRequest, match=r"^payload\.voice: espeak-ng has no voice 'zz-nope'"):
        await backend.generate({"text": "hi", "voice": "zz-nope"}, Collector())


# ------------------------------------------------------------ payload checks


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"audio": b"RIFF....WAVE", "text": "hi"}, r"^payload\.audio: give either 'audio'"),
        ({}, r"^payload\.audio: required"),
        ({"text": "hi", "pitch": 3}, r"^payload: unknown field 'pitch'"),
        (
            {"audio": bytes(range(200))},
            r"^payload\.audio: unsupported format \(expected WAV, WebM, OGG, MP3 or FLAC\)",
        ),
        ({"audio": b"\xff\xf1" + bytes(50)}, r"^payload\.audio: unsupported format"),  # AAC ADTS
        ({"audio": b""}, r"^payload\.audio: empty"),
        ({"audio": "UklGRg=="}, r"^payload\.audio: expected bytes, got a string"),
        ({"audio": b"OggS" + bytes(2000)}, r"^payload\.audio: 2004 bytes; at most 1000"),
        ({"audio": b"OggS", "language": "xx"}, r"^payload\.language: expected \"auto\" or a"),
        ({"audio": b"OggS", "voice": "en"}, r"^payload\.voice: only allowed with 'text'"),
        ({"text": "hi", "language": "en"}, r"^payload\.language: only allowed with 'audio'"),
        ({"text": "x" * 51}, r"^payload\.text: expected 1\.\.50 characters, got 51"),
        ({"text": ""}, r"^payload\.text: expected a non-empty string, got ''"),
        ({"text": "   \n"}, r"^payload\.text: nothing to speak"),
        ({"text": "a\x00b"}, r"^payload\.text: contains a NUL"),
        ({"text": "\ud800"}, r"^payload\.text: not valid Unicode"),
        ({"text": 5}, r"^payload\.text: expected a non-empty string, got 5"),
        ({"text": "hi", "voice": "en; rm -rf /"}, r"^payload\.voice: expected an espeak-ng voice"),
        ({"text": "hi", "voice": "EN"}, r"^payload\.voice: expected an espeak-ng voice name"),
        ({"text": "hi", "voice": "a" * 33}, r"^payload\.voice: expected an espeak-ng voice name"),
        ({"text": "hi", "speed": 79}, r"^payload\.speed: expected an integer 80\.\.450"),
        ({"text": "hi", "speed": True}, r"^payload\.speed: expected an integer 80\.\.450"),
        ({"text": "hi", "speed": 200.0}, r"^payload\.speed: expected an integer 80\.\.450"),
    ],
)
def test_bad_payloads_name_the_field(payload: dict, message: str) -> None:
    with pytest.raises(BadRequest, match=message) as info:
        parse_speech_payload(payload, **LIMITS)
    assert info.value.code == "bad_request"


def test_good_payloads_parse() -> None:
    assert parse_speech_payload({"audio": bytearray(b"fLaC....")}, **LIMITS) == SpeechParams(
        audio=b"fLaC....", audio_format="flac", language="auto"
    )
    p = parse_speech_payload({"text": "hi", "voice": "en-gb+f3", "speed": 450}, **LIMITS)
    assert (p.text, p.voice, p.speed, p.audio) == ("hi", "en-gb+f3", 450, None)
    p = parse_speech_payload({"audio": b"ID3\x04rest", "language": "yue"}, **LIMITS)
    assert p.audio_format == "mp3"
    assert detect_audio_format(b"\xff\xfb\x90\x00") == "mp3"


async def test_bad_payload_through_generate(backend: SpeechBackend) -> None:
    with pytest.raises(BadRequest, match=r"^payload\.audio: unsupported format"):
        await backend.generate({"audio": np.random.default_rng(0).bytes(4096)}, Collector())


# ------------------------------------------------------------- model loading


async def _load_error(path: Path) -> str:
    message = await load_error(SpeechBackend(path, threads=1))
    assert str(path) in message
    return message


async def test_missing_file(tmp_path: Path) -> None:
    assert (await _load_error(tmp_path / "nope.bin")).endswith(": file not found")


async def test_random_bytes_file(tmp_path: Path) -> None:
    path = tmp_path / "random.bin"
    path.write_bytes(np.random.default_rng(1).bytes(100_000))
    message = await _load_error(path)
    assert "not a whisper ggml model or corrupt (not a whisper ggml model (bad magic))" in message


async def test_gguf_file(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "chat.gguf")
    assert "a GGUF file, not a whisper ggml .bin model" in await _load_error(path)


@pytest.mark.parametrize(
    "cut",
    [
        30,  # inside the hparams
        70_000,  # inside the vocabulary
        -1,  # one byte short of the end
        "vocab",  # right after the vocabulary: whisper.cpp alone would load an empty model
    ],
)
async def test_truncated_tiny_model(tiny_path: Path, tmp_path: Path, cut: int | str) -> None:
    data = tiny_path.read_bytes()
    if cut == "vocab":
        cut = data.index(b"encoder.positional_embedding") - 12 - 8  # back over dims and header
    path = tmp_path / "truncated.bin"
    path.write_bytes(data[:cut])
    message = await _load_error(path)
    assert "not a whisper ggml model or corrupt (truncated" in message


async def test_wrong_tensor_types(tiny_path: Path, tmp_path: Path) -> None:
    data = bytearray(tiny_path.read_bytes())
    # hparams.ftype f16 -> f32: the f16 tensors in the file no longer fit
    data[4 + 40 : 4 + 44] = (0).to_bytes(4, "little")
    path = tmp_path / "f32.bin"
    path.write_bytes(bytes(data))
    assert "has the wrong type" in await _load_error(path)
