"""A realm served by an external OpenAI-compatible model server: llama-cpp-python's own server
(`python -m llama_cpp.server`, a real one), on loopback, with a tiny model. B serves chat through
it, C serves chat with its local smoke-test model, A routes only. The external server's model is
asked for by name through A (so only B can answer it) and through B's own API; when the server
dies, B's query fails over to C."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from rentahal.models.external import read_key
from rentahal.models.smoke.tiny_llama import write_tiny_llama
from rentahal.realms.events import ModelFailure
from rentahal.scripts.federation import Federation

from .test_openai_api import client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def model_server(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    model = write_tiny_llama(tmp_path / "external.gguf")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--model_alias", "tiny-external",
         "--host", "127.0.0.1", "--port", str(port), "--n_threads", "1", "--n_ctx", "512"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 60
    while True:  # ready once it answers its model list (a readiness signal, not a fixed sleep)
        try:
            urllib.request.urlopen(url + "/models", timeout=2).read()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                err = proc.stderr.read().decode()[-2000:] if proc.stderr else ""
                raise AssertionError(f"llama_cpp.server did not start: {err}") from None
            time.sleep(0.1)
    try:
        yield proc, url
    finally:
        proc.kill()
        proc.wait(10)


def test_a_realm_served_by_an_external_server_answers_and_fails_over(
    federation: Federation, model_server: tuple[subprocess.Popen[bytes], str]
) -> None:
    server, url = model_server
    c = federation.start("C", serve="chat", settings={"realms.chat.threads": "1"})
    b = federation.start("B", serve="chat", bootstrap=(c.addr,), settings={"realms.chat.url": json.dumps(url)})
    a = federation.start("A", serve="none", bootstrap=(b.addr, c.addr))
    a.wait_for(rf"peer {b.peer_id} is live", 60)
    a.wait_for(rf"peer {c.peer_id} is live", 60)
    b.wait_for(rf"peer {c.peer_id} is live", 60)
    hello = [{"role": "user", "content": "hello"}]

    # The external server's model is advertised by B under its name, beside C's smoke-test model.
    models = {m.id: m.model_extra["executors"] for m in client(a).models.list().data}  # type: ignore[index]
    assert models.get("tiny-external") == 1, models

    # Through a peer: A routes the request for that model to B, which asks the external server.
    answer = client(a).chat.completions.create(model="tiny-external", messages=hello, max_tokens=6, seed=1)
    assert answer.model == "tiny-external" and answer.usage is not None and answer.usage.completion_tokens >= 1
    row = next(h for h in a.cli_json("history", "--all") if h["id"] == answer.id.removeprefix("chatcmpl-"))
    assert row["executor"] == b.peer_id

    # Streamed, through the node itself: B's local executor is the external server.
    pieces = [
        ch.choices[0].delta.content or ""
        for ch in client(b).chat.completions.create(model="tiny-external", messages=hello, max_tokens=6, stream=True)
        if ch.choices
    ]
    assert "".join(pieces)
    local = b.cli_json("history", "--all")[0]
    assert local["executor"] == "local" and local["status"] == "done"

    # The server dies: B's next query fails over from its local (external) executor to C.
    server.kill()
    server.wait(10)
    again = client(b).chat.completions.create(model="any", messages=hello, max_tokens=4)
    assert again.choices[0].message.content is not None
    last = next(h for h in b.cli_json("history", "--all") if h["id"] == again.id.removeprefix("chatcmpl-"))
    assert last["status"] == "done" and last["executor"] == c.peer_id, last
    assert "local" in last["failovers"], last


def test_the_key_comes_from_the_environment_or_a_private_file(tmp_path: Path) -> None:
    assert read_key("", "", "chat") == ""
    os.environ["RENTAHAL_TEST_KEY"] = "sk-test\n"
    try:
        assert read_key("RENTAHAL_TEST_KEY", "", "chat") == "sk-test"
    finally:
        del os.environ["RENTAHAL_TEST_KEY"]
    with pytest.raises(ModelFailure, match="RENTAHAL_TEST_KEY is not set"):
        read_key("RENTAHAL_TEST_KEY", "", "chat")
    key = tmp_path / "key"
    key.write_text("sk-file\n")
    key.chmod(0o644)
    with pytest.raises(ModelFailure, match="readable by others .*chmod 600"):
        read_key("", str(key), "chat")
    key.chmod(0o600)
    assert read_key("", str(key), "chat") == "sk-file"


def test_node_toml_refuses_a_key_itself(tmp_path: Path) -> None:
    from rentahal.node.config import ConfigError, load_config

    path = tmp_path / "node.toml"
    path.write_text('[realms.chat]\nurl = "https://api.example.com/v1"\napi_key = "sk-secret"\n')
    with pytest.raises(ConfigError, match="keys never go in node.toml"):
        load_config(path)


def test_an_unreachable_server_leaves_the_realm_unserved_with_why(federation: Federation) -> None:
    """A server that cannot be reached at start leaves the realm unserved, with why."""
    port = free_port()  # nothing listens there
    b = federation.start("B", serve="chat", settings={"realms.chat.url": json.dumps(f"http://127.0.0.1:{port}/v1")})
    health = json.loads(urllib.request.urlopen(b.ui.replace("ws://", "http://") + "healthz", timeout=10).read())
    assert health["realms"]["chat"].startswith("not served: external server"), health
    with pytest.raises(openai.APIStatusError) as refused:
        client(b).chat.completions.create(model="any", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    assert refused.value.status_code == 503


async def test_the_anthropic_messages_api_is_spoken(tmp_path: Path) -> None:
    """Against a stand-in that answers as Anthropic's messages API documents (no network here:
    a test double of the hosted API, not a claim that it was tried against Anthropic)."""
    import http.server
    import threading

    from rentahal.models.external import ExternalChatBackend

    seen: dict[str, Any] = {}
    events = [
        {"type": "message_start", "message": {"usage": {"input_tokens": 11, "output_tokens": 1}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello"}},
        {"type": "ping"},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " there"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "max_tokens"}, "usage": {"output_tokens": 2}},
        {"type": "message_stop"},
    ]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            seen["path"], seen["headers"] = self.path, dict(self.headers)
            seen["body"] = json.loads(self.rfile.read(int(self.headers["content-length"])))
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.end_headers()
            for e in events:
                self.wfile.write(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode())

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        backend = ExternalChatBackend(
            f"http://127.0.0.1:{server.server_address[1]}", api="anthropic", remote_model="claude-test", key="sk-ant"
        )
        await backend.load()
        tokens: list[str] = []

        async def sink(event: Any) -> None:
            tokens.append(event.text)

        payload = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}
        result = await backend.generate({**payload, "max_tokens": 2, "temperature": 1.5}, sink)
        await backend.aclose()
    finally:
        server.shutdown()
    assert seen["path"] == "/v1/messages"
    assert seen["headers"]["x-api-key"] == "sk-ant" and seen["headers"]["anthropic-version"] == "2023-06-01"
    assert seen["body"]["system"] == "be brief" and seen["body"]["messages"] == [{"role": "user", "content": "hi"}]
    assert seen["body"]["temperature"] == 1.0 and seen["body"]["max_tokens"] == 2 and seen["body"]["stream"] is True
    assert tokens == ["Hello", " there"]
    assert result.output == {"text": "Hello there", "model": "claude-test"}
    assert (result.stats["tokens"], result.stats["prompt_tokens"], result.stats["finish_reason"]) == (2, 11, "length")
