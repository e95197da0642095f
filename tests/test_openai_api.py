"""The OpenAI-compatible API, driven by the official `openai` client against real node processes:
A routes only (it serves nothing), B (and C) execute. Every request goes through A's /v1 and is
answered by a peer, exactly like a UI query."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import urllib.request
import wave
from pathlib import Path

import openai
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from rentahal.scripts.federation import Federation, NodeProcess

from .test_ui import lan_address

ALL = "chat,vision,imagine,speech"
ONE_THREAD = {f"realms.{r}.threads": "1" for r in ALL.split(",")}


def api_base(node: NodeProcess, host: str = "127.0.0.1") -> str:
    port = node.ui.rsplit(":", 1)[1].strip("/")
    return f"http://{host}:{port}/v1"


def client(node: NodeProcess, key: str = "unused-on-loopback", host: str = "127.0.0.1") -> openai.OpenAI:
    return openai.OpenAI(base_url=api_base(node, host), api_key=key, max_retries=0, timeout=120)


def metrics(node: NodeProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of A's /metrics, parsed by prometheus_client's own parser."""
    url = api_base(node)[: -len("/v1")] + "/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def count(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    want = tuple(sorted(labels.items()))
    return samples.get((name, want), 0.0)


def png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def pair(federation: Federation) -> tuple[NodeProcess, NodeProcess]:
    b = federation.start("B", serve=ALL, settings=ONE_THREAD)
    a = federation.start("A", serve="none", bootstrap=(b.addr,))
    a.wait_for(rf"peer {b.peer_id} is live \(serves: {ALL}\)", 60)
    return a, b


def test_every_endpoint_through_the_sdk_and_metrics_count_each_query(
    pair: tuple[NodeProcess, NodeProcess], tmp_path: Path
) -> None:
    a, b = pair
    sdk = client(a)
    before = metrics(a)

    models = {m.id: m for m in sdk.models.list().data}
    realms = {m.model_extra["realm"] for m in models.values()}  # type: ignore[index]
    assert realms == set(ALL.split(",")), models
    chat_model = next(m for m in models.values() if m.model_extra["realm"] == "chat").id  # type: ignore[index]

    # chat, whole answer
    done = sdk.chat.completions.create(
        model=chat_model, messages=[{"role": "user", "content": "hello"}], max_tokens=8, seed=3
    )
    assert done.object == "chat.completion" and done.choices[0].message.role == "assistant"
    text = done.choices[0].message.content
    assert isinstance(text, str) and done.usage is not None and 1 <= done.usage.completion_tokens <= 8
    assert done.model == chat_model.split(":")[-1]

    # chat, streamed: the same seed and model give the same text, in pieces
    stream = sdk.chat.completions.create(
        model=chat_model, messages=[{"role": "user", "content": "hello"}], max_tokens=8, seed=3, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] in (
        ["stop"],
        ["length"],
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == done.usage.completion_tokens

    # the legacy completions endpoint
    legacy = sdk.completions.create(model="any", prompt="once upon a time", max_tokens=4)
    assert legacy.object == "text_completion" and isinstance(legacy.choices[0].text, str)

    # vision: a message with an image part (a data: URL)
    image_url = "data:image/png;base64," + base64.b64encode(png(64, 48)).decode()
    seen = sdk.chat.completions.create(
        model="any",
        messages=[{"role": "user", "content": [
            {"type": "text", "text": "what colour is this?"},
            {"type": "image_url", "image_url": {"url": image_url}},
        ]}],
        max_tokens=6,
    )  # fmt: skip
    assert isinstance(seen.choices[0].message.content, str)
    vision_model = next(m.id for m in models.values() if m.model_extra["realm"] == "vision")  # type: ignore[index]
    assert seen.model == vision_model.split(":")[-1]

    # imagine
    image = sdk.images.generate(prompt="a red square", size="64x64", response_format="b64_json")
    assert image.data is not None
    decoded = Image.open(io.BytesIO(base64.b64decode(image.data[0].b64_json or "")))
    assert decoded.size == (64, 64)

    # speech: text to speech, then that speech transcribed
    spoken = sdk.audio.speech.create(model="tts-1", voice="alloy", input="hello world", response_format="wav")
    wav = spoken.read()
    with wave.open(io.BytesIO(wav)) as w:
        assert w.getnframes() > 1000
    said = tmp_path / "said.wav"
    subprocess.run(["espeak-ng", "-w", str(said), "hello world"], check=True, timeout=30)
    with said.open("rb") as f:
        heard = sdk.audio.transcriptions.create(model="whisper-1", file=f)
    assert isinstance(heard.text, str)

    # Every query above ran on B, once, and A's /metrics counted exactly those.
    after = metrics(a)
    for realm, n in (("chat", 3), ("vision", 1), ("imagine", 1), ("speech", 2)):
        moved = count(after, "rentahal_queries_total", realm=realm, outcome="done", executor="peer") - count(
            before, "rentahal_queries_total", realm=realm, outcome="done", executor="peer"
        )
        assert moved == n, (realm, moved)
    assert count(after, "rentahal_images_total") - count(before, "rentahal_images_total") == 1
    assert count(after, "rentahal_queries_total", realm="chat", outcome="done", executor="local") == 0
    tokens = count(after, "rentahal_tokens_total", realm="chat") - count(before, "rentahal_tokens_total", realm="chat")
    assert tokens == 2 * done.usage.completion_tokens + (legacy.usage.completion_tokens if legacy.usage else 0)
    assert count(after, "rentahal_peers", state="live") == 1
    assert count(after, "process_open_fds") > 0 and count(after, "process_resident_memory_bytes") > 0
    # B's own counters say it executed them for a peer
    b_samples = metrics(b)
    assert count(b_samples, "rentahal_executed_queries_total", realm="chat", requester="peer", outcome="done") == 3


def test_errors_come_in_openai_shape(pair: tuple[NodeProcess, NodeProcess]) -> None:
    a, _ = pair
    sdk = client(a)
    with pytest.raises(openai.BadRequestError) as bad:
        sdk.chat.completions.create(model="any", messages=[], max_tokens=4)
    assert bad.value.status_code == 400 and "messages" in bad.value.message
    assert bad.value.body["param"] == "messages"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert missing.value.code == "model_not_found"
    req = urllib.request.Request(
        api_base(a) + "/chat/completions", data=b"{not json", headers={"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as raw:
        urllib.request.urlopen(req, timeout=10)
    assert raw.value.code == 400
    assert json.loads(raw.value.read())["error"]["type"] == "invalid_request_error"


def test_a_stream_whose_executor_is_killed_completes_once(federation: Federation) -> None:
    long = {"realms.chat.threads": "1", "realms.chat.max_tokens": "4000"}
    b = federation.start("B", serve="chat", settings=long)
    c = federation.start("C", serve="chat", settings=long)
    a = federation.start("A", serve="none", bootstrap=(b.addr, c.addr))
    a.wait_for(rf"peer {b.peer_id} is live", 60)
    a.wait_for(rf"peer {c.peer_id} is live", 60)
    stream = client(a).chat.completions.create(
        model="any", messages=[{"role": "user", "content": "tell me a long story"}], max_tokens=3000, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    pieces: list[str] = []
    killed: list[NodeProcess] = []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
            if not killed:  # mid-answer: kill whichever executor is answering
                busy = next(n for n in (b, c) if n.proc is not None and _running_chat(n))
                busy.kill()
                killed.append(busy)
    assert killed
    text = "".join(pieces)
    assert chunk.choices[0].finish_reason == "length"
    # One complete answer, the survivor's, each piece streamed once: what the SDK put together is
    # exactly the answer A stored (nothing repeated from the dead executor's part).
    qid = chunk.id.removeprefix("chatcmpl-")
    row = next(h for h in a.cli_json("history", "--all") if h["id"] == qid)
    survivor = c if killed[0] is b else b
    assert row["status"] == "done" and row["executor"] == survivor.peer_id
    assert row["result_text"] == text and len(text) > 100


def _running_chat(node: NodeProcess) -> bool:
    """Whether this node's chat queue holds a query now (its /metrics)."""
    try:
        return count(metrics(node), "rentahal_running", realm="chat") > 0
    except OSError:
        return False


def test_keys_are_needed_off_loopback_and_a_wrong_one_is_401(federation: Federation) -> None:
    ip = lan_address()
    if ip is None:
        pytest.skip("SKIPPED LOUDLY: this machine has no non-loopback IPv4 address to reach the API by")
    b = federation.start("B", serve="chat", settings={"realms.chat.threads": "1"})
    a = federation.start("A", serve="none", bootstrap=(b.addr,), settings={"ui.host": '"0.0.0.0"'})
    a.wait_for(rf"peer {b.peer_id} is live", 60)
    hello = [{"role": "user", "content": "hi"}]

    # No key from a LAN address (the SDK always sends one; this is a plain HTTP client)
    req = urllib.request.Request(
        api_base(a, ip) + "/chat/completions",
        data=json.dumps({"model": "any", "messages": hello}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as no_key:
        urllib.request.urlopen(req, timeout=10)
    assert no_key.value.code == 401
    assert json.loads(no_key.value.read())["error"]["code"] == "invalid_api_key"
    # ... while on loopback no key is needed by default
    assert client(a).chat.completions.create(model="any", messages=hello, max_tokens=2).choices
    with pytest.raises(openai.AuthenticationError) as wrong:
        client(a, key="rh-00000000-" + "x" * 43).chat.completions.create(model="any", messages=hello, max_tokens=2)
    assert wrong.value.status_code == 401
    body = wrong.value.body
    assert isinstance(body, dict) and set(body) == {"message", "type", "param", "code"}  # OpenAI's error shape
    assert (body["type"], body["code"]) == ("invalid_request_error", "invalid_api_key")

    made = json.loads(a.cli("keys", "create", "ci-client", "--json").stdout)
    keyed = client(a, key=made["key"], host=ip)
    answer = keyed.chat.completions.create(model="any", messages=hello, max_tokens=2)
    assert answer.choices[0].message.content is not None
    # The key is a user of its own: the query is in its history.
    history = a.cli_json("history", "--all")
    assert any(h["user_guid"] == made["user"] for h in history), history
    listed = a.cli_json("keys", "list")
    assert [k["id"] for k in listed] == [made["id"]] and "key" not in listed[0]

    a.cli("keys", "revoke", made["id"])
    with pytest.raises(openai.AuthenticationError):
        keyed.chat.completions.create(model="any", messages=hello, max_tokens=2)
    actions = [r["action"] for r in a.cli_json("audit")]
    assert actions[:2] == ["revoke_api_key", "create_api_key"]


def _raw(node: NodeProcess, request: bytes, *, read: bool = True) -> tuple[int, bytes]:
    """One raw HTTP exchange with a node's UI port (what no SDK would send)."""
    import socket

    port = int(node.ui.rsplit(":", 1)[1].strip("/"))
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        s.sendall(request)
        if not read:
            return 0, b""
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def _post(path: str, body: bytes, *headers: str) -> bytes:
    extra = "".join(f"{h}\r\n" for h in headers)
    return f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


def test_hostile_and_careless_clients_get_answers_and_the_node_stays_up(federation: Federation) -> None:
    a = federation.start("A", serve="none")
    chat = json.dumps({"model": "any", "messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()
    # Another site's page posting through the sysop's browser, and a DNS-rebinding page.
    status, body = _raw(a, _post("/v1/chat/completions", chat, "Content-Type: application/json",
                                 "Origin: http://evil.example"))  # fmt: skip
    assert status == 403 and json.loads(body)["error"]["type"] == "permission_error"
    rebound = _post("/v1/chat/completions", chat, "Content-Type: application/json").replace(
        b"Host: 127.0.0.1", b"Host: evil.example:8765"
    )
    assert _raw(a, rebound)[0] == 403
    # A reverse proxy on this machine passes its clients on: they are not local, so they need a key.
    status, body = _raw(a, _post("/v1/chat/completions", chat, "Content-Type: application/json",
                                 "X-Forwarded-For: 203.0.113.9"))  # fmt: skip
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
    # A form post without JSON's content type (no CORS preflight for it) is refused.
    assert _raw(a, _post("/v1/chat/completions", chat, "Content-Type: text/plain"))[0] == 415
    # A number too large for a float, and a multipart body of many tiny parts.
    huge = b'{"messages": [{"role": "user", "content": "x"}], "temperature": 1' + b"0" * 400 + b"}"
    status, body = _raw(a, _post("/v1/chat/completions", huge, "Content-Type: application/json"))
    assert status == 400 and "temperature" in json.loads(body)["error"]["message"]
    parts = b"".join(b'--b\r\nContent-Disposition: form-data; name="x"\r\n\r\ny\r\n' for _ in range(200)) + b"--b--\r\n"
    status, body = _raw(a, _post("/v1/audio/transcriptions", parts, "Content-Type: multipart/form-data; boundary=b"))
    assert status == 400 and "parts" in json.loads(body)["error"]["message"]
    # A streaming client that hangs up before its answer begins (A waits for an executor that
    # never comes): its query is cancelled, and the node keeps serving.
    _raw(a, _post("/v1/chat/completions", chat, "Content-Type: application/json"), read=False)
    a.wait_for(r"query \w+ \(chat\) failed|cancelled", 30)
    health = json.loads(urllib.request.urlopen(api_base(a)[: -len("/v1")] + "/healthz", timeout=10).read())
    assert health["ok"] is True
    assert client(a).models.list().data == []
    assert not [line for line in a.lines if " ERROR " in line or "Traceback" in line], a.log()
