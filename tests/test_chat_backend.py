"""The chat backend against real llama.cpp and the tiny random-weight GGUF.

No mocks: the tiny model is written with the gguf package into a temp dir and
loaded through the same llama_cpp.Llama path real weights take.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from rentahal.models.base import (
    BadRequest,
    ModelFailure,
    ModelLoadError,
    Progress,
    Result,
    Token,
)
from rentahal.models.chat import (
    MAX_TOKEN_EVENT_CHARS,
    ChatBackend,
    ChatParams,
    _batches,
    parse_chat_payload,
    stream_tokens,
)
from rentahal.models.smoke.tiny_llama import SMOKE_TEST_MODEL_NAME, write_tiny_llama
from rentahal.scripts.make_tiny_llama import main as make_tiny_main

from .backend_helpers import Collector, loaded

PROMPT = {"prompt": "Hello there, how are you today?"}


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny.gguf", seed=0)


@pytest.fixture
async def backend(tiny_path: Path):
    async with loaded(ChatBackend(tiny_path, n_ctx=1024, threads=2)) as b:
        yield b


# ---------------------------------------------------------------- the file


def test_tiny_file_is_small_and_deterministic(tiny_path: Path, tmp_path: Path) -> None:
    size = tiny_path.stat().st_size
    assert 100_000 < size < 2_000_000
    again = write_tiny_llama(tmp_path / "again.gguf", seed=0)
    assert again.read_bytes() == tiny_path.read_bytes()
    other = write_tiny_llama(tmp_path / "other.gguf", seed=1)
    assert other.read_bytes() != tiny_path.read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]  # atomic write


def test_script_writes_the_same_file(tiny_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli.gguf"
    assert make_tiny_main([str(out), "--seed", "0"]) == 0
    assert out.read_bytes() == tiny_path.read_bytes()


async def test_tiny_model_loads_as_smoke_test(backend: ChatBackend) -> None:
    assert backend.is_smoke_test is True
    assert backend.model_name == SMOKE_TEST_MODEL_NAME


# ------------------------------------------------------------ generation


async def test_stream_concatenation_equals_result(backend: ChatBackend) -> None:
    sink = Collector()
    result = await backend.generate({**PROMPT, "max_tokens": 40, "seed": 3}, sink)
    assert isinstance(result, Result)
    assert sink.tokens, "no tokens were streamed"
    assert [e.index for e in sink.tokens] == list(range(len(sink.tokens)))
    assert all(e.text for e in sink.tokens)
    assert sink.text == result.output["text"]
    assert result.output["model"] == SMOKE_TEST_MODEL_NAME
    stats = result.stats
    assert 1 <= stats["tokens"] <= 40
    assert stats["prompt_tokens"] > 0
    assert stats["finish_reason"] in ("stop", "length")
    assert all(isinstance(v, (int, float, str)) for v in stats.values())


async def test_ignore_eos_generates_exactly_max_tokens(backend: ChatBackend) -> None:
    sink = Collector()
    result = await backend.generate(
        {**PROMPT, "max_tokens": 300, "ignore_eos": True, "temperature": 1.0, "seed": 7}, sink
    )
    assert result.stats["tokens"] == 300
    assert result.stats["finish_reason"] == "length"
    assert sink.text == result.output["text"]
    assert result.stats["tokens_per_s"] > 0


async def test_end_of_sequence_stops_unless_ignored(backend: ChatBackend) -> None:
    # The tiny model ends most sampled generations on its own (</s>) ...
    for seed in range(10):
        req = {**PROMPT, "max_tokens": 300, "temperature": 0.7, "seed": seed}
        natural = await backend.generate(req, Collector())
        if natural.stats["finish_reason"] == "stop":
            break
    else:
        pytest.fail("the tiny model never produced </s> in 10 seeded generations")
    assert natural.stats["tokens"] < 300
    # ... the token count (which excludes </s>) agrees with llama-cpp-python's
    # own non-streaming usage for the same request ...
    reference = backend._llm.create_chat_completion(
        messages=[{"role": "user", "content": PROMPT["prompt"]}],
        max_tokens=300,
        temperature=0.7,
        seed=seed,
    )
    assert reference["choices"][0]["finish_reason"] == "stop"
    assert reference["usage"]["completion_tokens"] == natural.stats["tokens"]
    assert reference["choices"][0]["message"]["content"] == natural.output["text"]
    # ... and ignore_eos runs the same request on to max_tokens.
    forced = await backend.generate({**req, "ignore_eos": True}, Collector())
    assert (forced.stats["tokens"], forced.stats["finish_reason"]) == (300, "length")


async def test_same_seed_same_text(backend: ChatBackend) -> None:
    greedy = {
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}],
        "max_tokens": 30,
        "temperature": 0,
        "seed": 42,
    }
    a = await backend.generate(greedy, Collector())
    b = await backend.generate(greedy, Collector())
    assert a.output["text"] and a.output["text"] == b.output["text"]
    sampled = {**PROMPT, "max_tokens": 30, "temperature": 0.9, "seed": 5}
    c = await backend.generate(sampled, Collector())
    d = await backend.generate(sampled, Collector())
    assert c.output["text"] == d.output["text"]


async def test_stop_string_cuts_output(backend: ChatBackend) -> None:
    base = {**PROMPT, "max_tokens": 60, "temperature": 0, "ignore_eos": True}
    full = (await backend.generate(base, Collector())).output["text"]
    words = full.split()
    assert len(words) > 6
    stop = " " + words[5]
    sink = Collector()
    cut = await backend.generate({**base, "stop": ["zzz-never", stop]}, sink)
    assert cut.output["text"] == full[: full.index(stop)]
    assert sink.text == cut.output["text"]
    assert cut.stats["finish_reason"] == "stop"
    assert cut.stats["tokens"] < 60


async def test_generations_are_serialised(backend: ChatBackend) -> None:
    results: list[Result] = []

    async def one(seed: int) -> None:
        results.append(
            await backend.generate({**PROMPT, "max_tokens": 20, "ignore_eos": True, "seed": seed}, Collector())
        )

    async with trio.open_nursery() as nursery:
        for seed in range(3):
            nursery.start_soon(one, seed)
    assert [r.stats["tokens"] for r in results] == [20, 20, 20]


@pytest.mark.parametrize("canceller", ["sink", "other_task"])
async def test_cancellation_stops_the_worker(tiny_path: Path, canceller: str) -> None:
    async with loaded(ChatBackend(tiny_path, n_ctx=4096, threads=2, max_tokens_cap=100_000)) as backend:
        seen = 0
        at_cancel: list[int] = []
        fifth = trio.Event()
        with trio.CancelScope() as scope:

            async def sink(ev: Token | Progress) -> None:
                nonlocal seen
                seen += 1
                if seen == 5:
                    at_cancel.append(backend._llm.n_tokens)
                    if canceller == "sink":
                        scope.cancel()
                    else:
                        fifth.set()

            async with trio.open_nursery() as nursery:
                if canceller == "other_task":

                    async def cancel_on_fifth() -> None:
                        await fifth.wait()
                        scope.cancel()

                    nursery.start_soon(cancel_on_fifth)
                await backend.generate({**PROMPT, "max_tokens": 100_000, "ignore_eos": True}, sink)
        assert scope.cancelled_caught
        assert 5 <= seen <= 8
        # The worker stopped within a few tokens of the cancellation instead of
        # running on to the 4096-token context limit.
        assert backend._llm.n_tokens - at_cancel[0] <= 10, (at_cancel, backend._llm.n_tokens)
        # ... and the model is usable again straight away.
        again = await backend.generate({**PROMPT, "max_tokens": 10, "ignore_eos": True}, Collector())
        assert again.stats["tokens"] == 10
        assert again.stats["finish_reason"] == "length"


async def test_generate_before_load_fails_cleanly(tiny_path: Path) -> None:
    b = ChatBackend(tiny_path)
    with pytest.raises(ModelFailure) as info:
        await b.generate(PROMPT, Collector())
    assert info.value.code == "backend_failed"


async def test_prompt_longer_than_context_is_bad_request(tiny_path: Path) -> None:
    async with loaded(ChatBackend(tiny_path, n_ctx=64, threads=1)) as b:
        with pytest.raises(BadRequest, match=r"payload\.prompt: .*context"):
            await b.generate({"prompt": "a long prompt " * 20}, Collector())
        ok = await b.generate({"prompt": "hi", "max_tokens": 5, "ignore_eos": True}, Collector())
        assert ok.stats["tokens"] == 5


# ---------------------------------------------------------------- payload


def test_payload_defaults() -> None:
    p = parse_chat_payload({"prompt": "hi"}, max_tokens_cap=100)
    assert p == ChatParams(
        messages=(("user", "hi"),), max_tokens=100, temperature=0.7, top_p=0.95, seed=None, ignore_eos=False, stop=()
    )
    p = parse_chat_payload(
        {"messages": [{"role": "user", "content": "x"}], "seed": 1, "temperature": 1, "stop": ["\n"]},
        max_tokens_cap=512,
    )
    assert (p.max_tokens, p.temperature, p.seed, p.stop) == (256, 1.0, 1, ("\n",))


BAD_PAYLOADS = [
    ({}, "payload.prompt"),
    ({"prompt": "a", "messages": [{"role": "user", "content": "a"}]}, "payload.prompt"),
    ({"prompt": "a", "bogus": 1}, "bogus"),
    ({"prompt": ""}, "payload.prompt"),
    ({"prompt": 5}, "payload.prompt"),
    ({"prompt": "x" * 100_001}, "payload.prompt"),
    ({"prompt": "\ud800"}, "payload.prompt"),
    ({"messages": []}, "payload.messages"),
    ({"messages": "hi"}, "payload.messages"),
    ({"messages": [{"role": "user", "content": "a"}] * 257}, "payload.messages"),
    ({"messages": [{"role": "tool", "content": "a"}]}, "payload.messages[0].role"),
    ({"messages": [{"role": "user", "content": 1}]}, "payload.messages[0].content"),
    ({"messages": [{"role": "user", "content": "a", "name": "x"}]}, "payload.messages[0]"),
    ({"messages": ["hi"]}, "payload.messages[0]"),
    ({"messages": [{"role": "user", "content": "x" * 60_000}] * 2}, "payload.messages"),
    ({"prompt": "a", "max_tokens": -3}, "payload.max_tokens"),
    ({"prompt": "a", "max_tokens": 0}, "payload.max_tokens"),
    ({"prompt": "a", "max_tokens": 513}, "payload.max_tokens"),
    ({"prompt": "a", "max_tokens": True}, "payload.max_tokens"),
    ({"prompt": "a", "max_tokens": 5.0}, "payload.max_tokens"),
    ({"prompt": "a", "temperature": -0.1}, "payload.temperature"),
    ({"prompt": "a", "temperature": 2.5}, "payload.temperature"),
    ({"prompt": "a", "temperature": float("nan")}, "payload.temperature"),
    ({"prompt": "a", "temperature": "hot"}, "payload.temperature"),
    ({"prompt": "a", "temperature": False}, "payload.temperature"),
    ({"prompt": "a", "seed": -1}, "payload.seed"),
    ({"prompt": "a", "seed": 2**31}, "payload.seed"),
    ({"prompt": "a", "seed": True}, "payload.seed"),
    ({"prompt": "a", "ignore_eos": 1}, "payload.ignore_eos"),
    ({"prompt": "a", "stop": "x"}, "payload.stop"),
    ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "payload.stop"),
    ({"prompt": "a", "stop": [""]}, "payload.stop[0]"),
    ({"prompt": "a", "stop": ["ok", "x" * 65]}, "payload.stop[1]"),
    ({"prompt": "a", "stop": [3]}, "payload.stop[0]"),
]


@pytest.mark.parametrize(("payload", "field"), BAD_PAYLOADS, ids=lambda v: repr(v)[:40])
def test_bad_payload_names_the_field(payload: dict, field: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_chat_payload(payload, max_tokens_cap=512)
    assert field in str(info.value)
    assert info.value.code == "bad_request"
    assert len(str(info.value)) < 200 and "\n" not in str(info.value)


def test_bad_payload_message_format() -> None:
    expected = r"^payload\.max_tokens: expected an integer in 1\.\.512, got -3$"
    with pytest.raises(BadRequest, match=expected):
        parse_chat_payload({"prompt": "a", "max_tokens": -3}, max_tokens_cap=512)


async def test_generate_rejects_bad_payload_before_touching_the_model(tiny_path: Path) -> None:
    b = ChatBackend(tiny_path)  # not loaded: validation comes first
    with pytest.raises(BadRequest, match="payload.temperature"):
        await b.generate({"prompt": "a", "temperature": 9}, Collector())


# ------------------------------------------------------------- load errors


async def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.gguf"
    with pytest.raises(ModelLoadError) as info:
        await ChatBackend(path).load()
    assert str(info.value) == f"chat model {path}: file not found"
    assert info.value.code == "backend_failed"


async def test_not_a_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_text("this is not a model\n")
    with pytest.raises(ModelLoadError, match="not a GGUF file or corrupt") as info:
        await ChatBackend(path).load()
    assert str(info.value).startswith(f"chat model {path}: ")


async def test_truncated_gguf(tiny_path: Path, tmp_path: Path) -> None:
    path = tmp_path / "truncated.gguf"
    path.write_bytes(tiny_path.read_bytes()[:1000])
    with pytest.raises(ModelLoadError) as info:
        await ChatBackend(path).load()
    assert str(info.value) == (f"chat model {path}: not a GGUF file or corrupt (llama.cpp could not load it)")


# ------------------------------------------------- the worker -> trio pipe


async def test_a_busy_sink_gets_the_pieces_that_piled_up_as_one_event() -> None:
    """The worker never waits for the sink: while the sink is busy with the first piece, the
    worker puts the other 99, and they go out as one event, in order."""
    seen: list[Token] = []
    sink_has_first = threading.Event()
    release = trio.Event()

    async def sink(ev: Token | Progress) -> None:
        seen.append(ev)
        if len(seen) == 1:
            sink_has_first.set()
            await release.wait()

    def worker(put) -> str:
        put("p0 ")
        assert sink_has_first.wait(10)
        for i in range(1, 100):
            put(f"p{i} ")
        trio.from_thread.run_sync(release.set)  # only now may the sink go on
        return "done"

    result = await stream_tokens(sink, lambda pipe: trio.to_thread.run_sync(worker, pipe.put))
    assert result == "done"
    assert [(e.index, e.text) for e in seen] == [(0, "p0 "), (1, "".join(f"p{i} " for i in range(1, 100)))]


@given(st.lists(st.text(max_size=MAX_TOKEN_EVENT_CHARS + 10).filter(bool), max_size=40))
def test_coalesced_events_keep_the_text_and_stay_under_the_cap(pieces: list[str]) -> None:
    out = _batches(pieces)
    assert "".join(out) == "".join(pieces)
    assert all(len(b) <= MAX_TOKEN_EVENT_CHARS or b in pieces for b in out)
    assert len(out) <= len(pieces)


async def test_a_failing_sink_stops_the_generation_with_its_own_error(backend: ChatBackend) -> None:
    calls = 0

    async def sink(ev: Token | Progress) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise ConnectionError("client went away")

    with pytest.raises(ConnectionError, match="client went away"):  # as itself, not in a group
        await backend.generate({**PROMPT, "max_tokens": 500, "ignore_eos": True}, sink)
    assert calls == 3
    assert backend._llm.n_tokens < 300  # stopped early, not run on to max_tokens
    again = await backend.generate({**PROMPT, "max_tokens": 5, "ignore_eos": True}, Collector())
    assert again.stats["tokens"] == 5
