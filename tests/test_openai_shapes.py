"""The OpenAI API's edge without a node: requests shaped into realm payloads, errors into
OpenAI's statuses, and a streamed answer kept whole across a failover."""

from __future__ import annotations

import base64

import pytest

from rentahal.node.executor import check_payload
from rentahal.node.openai_api import (
    ApiError,
    Resumed,
    chat_request,
    completion_request,
    error_for,
    image_request,
    parse_multipart,
    speech_request,
    transcription_request,
)

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 16).decode()


def test_chat_messages_become_a_chat_payload_the_realm_accepts() -> None:
    shaped = chat_request({
        "model": "gpt-x", "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        ],
        "max_completion_tokens": 5, "temperature": 0.5, "top_p": 0.9, "stop": "\n", "seed": 7, "stream": True,
        "user": "ignored", "frequency_penalty": 0,
    })  # fmt: skip
    assert shaped.realm == "chat" and shaped.stream and shaped.model == "gpt-x"
    assert shaped.payload == {
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        "max_tokens": 5, "temperature": 0.5, "top_p": 0.9, "stop": ["\n"], "seed": 7, "model": "gpt-x",
    }  # fmt: skip
    check_payload("chat", shaped.payload)  # what the realm itself will take


def test_a_seed_is_fixed_before_the_query_is_stored() -> None:
    one = chat_request({"messages": [{"role": "user", "content": "x"}]})
    assert isinstance(one.payload["seed"], int) and one.model is None
    assert (
        chat_request({"model": "any", "messages": [{"role": "user", "content": "x"}], "seed": -1}).payload["seed"] >= 0
    )


def test_an_image_part_makes_it_a_vision_query() -> None:
    shaped = chat_request({
        "model": "vision:tiny", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is it?"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
        ]}],
    })  # fmt: skip
    assert shaped.realm == "vision" and shaped.model == "tiny"
    assert shaped.payload["prompt"] == "what is it?" and shaped.payload["image"].startswith(b"\x89PNG")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature"),
        ({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
         "messages[0].content[0].image_url"),
        ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "messages[0].content[0].type"),
    ],
)  # fmt: skip
def test_bad_chat_requests_are_400_naming_the_field(body: dict[str, object], param: str | None) -> None:
    with pytest.raises(ApiError) as err:
        chat_request(body)
    assert err.value.status == 400 and err.value.param == param
    assert err.value.body()["error"]["type"] == "invalid_request_error"


def test_other_endpoints_shape_their_realms_payloads() -> None:
    assert completion_request({"prompt": ["hi"], "model": "any"}).payload["prompt"] == "hi"
    img = image_request({"prompt": "a cat", "size": "64x48", "model": "dall-e-3"})
    assert (img.realm, img.model, img.payload) == ("imagine", None, {"prompt": "a cat", "width": 64, "height": 48})
    with pytest.raises(ApiError, match="b64_json"):
        image_request({"prompt": "a cat", "response_format": "url"})
    tts = speech_request({"model": "tts-1", "input": "hello", "voice": "alloy", "speed": 2.0})
    assert tts.payload == {"text": "hello", "speed": 350} and tts.model is None  # OpenAI's voice: the default
    assert speech_request({"input": "hallo", "voice": "de"}).payload["voice"] == "de"
    check_payload("speech", tts.payload)
    stt = transcription_request({"file": b"RIFF....", "model": "whisper-1", "language": "en"})
    assert stt.payload == {"audio": b"RIFF....", "language": "en"} and stt.extra["format"] == "json"


def test_multipart_uploads_are_read() -> None:
    boundary = "XyZ"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
            f"Content-Type: audio/wav\r\n\r\n"
        ).encode()
        + b"RIFF\x00\x01binary\r\n"
        + f"--{boundary}--\r\n".encode()
    )
    form = parse_multipart(f"multipart/form-data; boundary={boundary}", body)
    assert form == {"model": "whisper-1", "file": b"RIFF\x00\x01binary"}
    with pytest.raises(ApiError) as err:
        parse_multipart("application/json", b"{}")
    assert err.value.status == 415


def test_query_errors_map_to_openai_statuses() -> None:
    assert error_for("rate_limited", "slow down").status == 429
    assert error_for("banned", "no").status == 403
    assert error_for("deadline_exceeded", "late").status == 504
    assert error_for("realm_not_served", "nobody").status == 503
    missing = error_for("realm_not_served", "nobody serves it", model="x")
    assert (missing.status, missing.code, missing.param) == (404, "model_not_found", "model")
    assert error_for("no_such_code", "?").status == 500


def test_a_stream_resumed_after_a_failover_sends_each_piece_once() -> None:
    r = Resumed()
    assert r.token(1, "Once ") + r.token(1, "upon") == "Once upon"
    # the executor died; the replacement starts over with the same seed and model
    assert r.token(2, "Once ") == "" and r.token(2, "upon a") == " a" and r.token(2, " time") == " time"
    assert r.advance("Once upon a time.") == "." and not r.diverged
    # a replacement that answers differently is caught, never spliced
    d = Resumed()
    d.token(1, "Once upon")
    assert d.token(2, "Twice") == "" and d.diverged
