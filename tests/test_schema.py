"""One validation library (msgspec, through realms/schema.py) for node.toml, control requests and
query payloads: the same mistake reads the same wherever it is made, in one line naming the field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import msgspec
import pytest
from msgspec import Meta

from rentahal.models.chat import parse_chat_payload
from rentahal.models.imagine import parse_imagine_payload
from rentahal.node.config import ConfigError, load_config
from rentahal.node.control import BadRequest, parse_request
from rentahal.realms.events import BadRequest as PayloadError
from rentahal.realms.schema import check, describe, no_lone_surrogates


class Inner(msgspec.Struct, forbid_unknown_fields=True):
    role: Literal["user", "system"]
    text: Annotated[str, Meta(min_length=1)]


class Example(msgspec.Struct, forbid_unknown_fields=True):
    count: Annotated[int, Meta(ge=1, le=10)] = 1
    ratio: Annotated[float, Meta(gt=0, le=1)] = 0.5
    flag: bool = False
    items: Annotated[tuple[Inner, ...], Meta(max_length=2)] = ()
    voice: Annotated[str, Meta(pattern="^[a-z]+$", description="a voice name ([a-z])")] = "en"
    blob: bytes = b""
    either: str | None = None

    def __post_init__(self) -> None:
        if self.either == "both":
            raise ValueError("either: not both")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"count": 0}, "x.count: expected an integer in 1..10, got 0"),
        ({"count": True}, "x.count: expected an integer in 1..10, got true"),
        ({"count": 2.5}, "x.count: expected an integer in 1..10, got 2.5"),
        ({"ratio": 0}, "x.ratio: expected a number > 0 and <= 1, got 0"),
        ({"ratio": float("nan")}, "x.ratio: expected a number > 0 and <= 1, got nan"),
        ({"flag": 1}, "x.flag: expected true or false, got 1"),
        ({"items": [{"role": "bot", "text": "a"}]}, "x.items[0].role: expected one of system|user, got 'bot'"),
        ({"items": [{"role": "user"}]}, "x.items[0].text: required"),
        ({"items": [{"role": "user", "text": ""}]}, "x.items[0].text: expected a non-empty string, got ''"),
        ({"items": [{"role": "user", "text": "a", "z": 1}]}, "x.items[0]: unknown field 'z'"),
        ({"items": "ab"}, "x.items: expected a list of at most 2 objects, got 'ab'"),
        ({"cuont": 3}, "x: unknown field 'cuont' (did you mean 'count'?)"),
        ({"voice": "EN"}, "x.voice: expected a voice name ([a-z]), got 'EN'"),
        ({"blob": "aGk="}, "x.blob: expected bytes, got a string"),
        ({"either": None, "flag": None}, "x.flag: expected true or false, got null"),
        ({"either": "both"}, "x.either: not both"),
        ([1], "x: expected an object, got [1]"),
    ],
)
def test_messages_name_the_field_and_what_was_expected(raw: object, message: str) -> None:
    with pytest.raises(ValueError) as info:
        check(raw, Example, "x")
    assert str(info.value) == message
    assert "\n" not in str(info.value)


def test_a_good_value_converts() -> None:
    got = check({"count": 3, "ratio": 1, "items": [{"role": "user", "text": "a"}], "blob": b"\x00"}, Example, "x")
    assert (got.count, got.ratio, got.items[0].text, got.blob) == (3, 1.0, "a", b"\x00")


def test_lone_surrogates_are_named() -> None:
    with pytest.raises(ValueError, match=r"^payload\.messages\[1\]\.content: not valid Unicode"):
        no_lone_surrogates({"messages": [{"content": "ok"}, {"content": "\ud800"}]}, "payload")


def test_describe_covers_unions_and_lists() -> None:
    import msgspec.inspect as mi

    assert describe(mi.type_info(int | str)) == "an integer or a string"
    assert (
        describe(mi.type_info(list[Annotated[str, Meta(max_length=3)]])) == "a list of strings of at most 3 characters"
    )


def test_the_same_mistake_reads_the_same_from_every_source(tmp_path: Path) -> None:
    """An integer out of range, in node.toml, on the command line, in a control request and in
    a payload: one wording, each naming where it was."""
    toml = tmp_path / "node.toml"
    toml.write_text("[router]\nmax_attempts = 0\n")
    with pytest.raises(ConfigError) as c:
        load_config(toml)
    assert str(c.value) == f"{toml}: router.max_attempts: expected an integer in 1..16, got 0"
    with pytest.raises(ConfigError) as c:
        load_config(None, {"router.max_attempts": "0"})
    assert str(c.value) == "command line: router.max_attempts: expected an integer in 1..16, got 0"
    with pytest.raises(BadRequest) as r:
        parse_request(json.dumps({"op": "history", "limit": 0}))
    assert str(r.value) == "history.limit: expected an integer in 1..10000, got 0"
    with pytest.raises(PayloadError) as p:
        parse_chat_payload({"prompt": "x", "max_tokens": 0}, max_tokens_cap=64)
    assert str(p.value) == "payload.max_tokens: expected an integer in 1..64, got 0"
    with pytest.raises(PayloadError) as p:
        parse_imagine_payload({"prompt": "x", "steps": 0}, max_steps=8, max_pixels=4096)
    assert str(p.value) == "payload.steps: expected an integer in 1..8, got 0"


def test_unknown_fields_read_the_same_from_every_source() -> None:
    with pytest.raises(BadRequest, match=r"^history: unknown field 'limt' \(did you mean 'limit'\?\)$"):
        parse_request(json.dumps({"op": "history", "limt": 3}))
    with pytest.raises(PayloadError, match=r"^payload: unknown field 'max_tokns' \(did you mean 'max_tokens'\?\)$"):
        parse_chat_payload({"prompt": "x", "max_tokns": 3}, max_tokens_cap=64)
