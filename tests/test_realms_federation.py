"""Every realm through the federation: A serves nothing, B serves all four with smoke-test
models; each query sent to A is executed by B, with progress events and a valid result."""

from __future__ import annotations

import io
import subprocess
import uuid
import wave
from pathlib import Path
from typing import Any

import pytest
import trio
from PIL import Image

from rentahal.cli import _short as short
from rentahal.scripts.federation import Federation, NodeProcess, connect

ALL = "chat,vision,imagine,speech"


@pytest.fixture
def pair(federation: Federation) -> tuple[NodeProcess, NodeProcess]:
    # One thread per backend: four realms on two cores, and ggml/torch threads spin while waiting.
    one_thread = {f"realms.{r}.threads": "1" for r in ALL.split(",")}
    b = federation.start("B", serve=ALL, settings=one_thread)
    a = federation.start("A", serve="none", bootstrap=(b.addr,))
    a.wait_for(rf"peer {b.peer_id} is live \(serves: {ALL}\)", 60)
    return a, b


async def ask(node: NodeProcess, realm: str, payload: dict[str, Any]) -> list[dict[str, Any]]:
    async with connect(node.ui, guid=uuid.uuid4().hex) as client:
        with trio.fail_after(120):
            return [m async for m in client.stream("submit_query", realm=realm, payload=payload)]


def media(data: bytes) -> dict[str, str]:
    import base64

    return {"$bytes": base64.b64encode(data).decode("ascii")}


def unmedia(value: dict[str, str]) -> bytes:
    import base64

    return base64.b64decode(value["$bytes"])


def events(msgs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [m["event"] for m in msgs if m["op"] == "event" and m["event"]["type"] == kind]


def png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def spoken_wav(text: str, tmp: Path) -> bytes:
    path = tmp / "said.wav"
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True, timeout=30)
    return path.read_bytes()


async def test_every_realm_is_answered_by_the_peer_that_serves_it(
    pair: tuple[NodeProcess, NodeProcess], tmp_path: Path
) -> None:
    a, b = pair
    realms = {r["realm"]: r for r in await trio.to_thread.run_sync(a.cli_json, "realms")}
    assert all(realms[r]["live_peers"] == 1 for r in ALL.split(","))

    # vision: an image and a question in, text out
    msgs = await ask(a, "vision", {"prompt": "what colour is this?", "image": media(png(80, 60)), "max_tokens": 8})
    assert msgs[-1]["op"] == "result", msgs[-1]
    result = msgs[-1]["result"]
    assert result["executor"] == b.peer_id
    assert isinstance(result["output"]["text"], str) and events(msgs, "token")

    # imagine: text in, a PNG of the asked size out, a progress event per denoising step
    msgs = await ask(a, "imagine", {"prompt": "a red cat", "width": 96, "height": 64, "steps": 4, "seed": 7})
    assert msgs[-1]["op"] == "result", msgs[-1]
    result = msgs[-1]["result"]
    assert result["executor"] == b.peer_id
    steps = [(e["done"], e["total"]) for e in events(msgs, "progress") if e["stage"] == "denoising"]
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]
    image = Image.open(io.BytesIO(unmedia(result["output"]["image"])))
    assert image.format == "PNG" and image.size == (96, 64)

    # speech: audio in, a transcript out; and text in, spoken audio out
    msgs = await ask(a, "speech", {"audio": media(spoken_wav("hello world", tmp_path))})
    assert msgs[-1]["op"] == "result", msgs[-1]
    assert msgs[-1]["result"]["executor"] == b.peer_id
    assert isinstance(msgs[-1]["result"]["output"]["text"], str)
    msgs = await ask(a, "speech", {"text": "hello from the federation"})
    assert msgs[-1]["op"] == "result", msgs[-1]
    with wave.open(io.BytesIO(unmedia(msgs[-1]["result"]["output"]["audio"]))) as w:
        assert w.getnframes() > 0 and w.getframerate() > 0

    # chat, for completeness, and the CLI writes the image where it is told
    out = tmp_path / "cat.png"
    res = await trio.to_thread.run_sync(
        lambda: a.cli(
            "query",
            "imagine",
            "a cat",
            "--param",
            "width=64",
            "--param",
            "height=64",
            "--param",
            "steps=2",
            "--out",
            str(out),
        )
    )
    assert res.stdout.strip() == str(out) and Image.open(out).size == (64, 64)


async def test_cancelling_an_imagine_query_stops_it_within_one_step(pair: tuple[NodeProcess, NodeProcess]) -> None:
    a, b = pair
    async with connect(a.ui, guid=uuid.uuid4().hex) as client:
        stream = client.stream(
            "submit_query", realm="imagine", payload={"prompt": "a slow cat", "width": 256, "height": 256, "steps": 50}
        )
        seen: list[dict[str, Any]] = []
        async for msg in stream:
            seen.append(msg)
            ev = msg.get("event", {})
            if ev.get("type") == "progress" and ev.get("stage") == "denoising" and ev["done"] == 2:
                await client.call("cancel", query_id=ev["query_id"])
                break
        rest = [m async for m in stream]
    assert rest[-1]["op"] == "error" and rest[-1]["code"] == "cancelled"
    steps = [e["done"] for e in events(seen + rest, "progress") if e["stage"] == "denoising"]
    assert max(steps) <= 3  # at most the step under way when the cancel arrived
    # The executor noticed: its stats count a cancelled imagine query, none served.
    stats = await trio.to_thread.run_sync(lambda: b.cli_json("stats"))
    with trio.fail_after(10):
        while stats["imagine"]["cancelled"] != 1:
            await trio.sleep(0.2)  # pacing between polls of B's stored stats
            stats = await trio.to_thread.run_sync(lambda: b.cli_json("stats"))
    assert stats["imagine"]["served_for_peers"] == 0


async def test_a_corrupt_model_leaves_its_realm_unserved_and_the_others_running(
    federation: Federation, tmp_path: Path
) -> None:
    corrupt = tmp_path / "broken.gguf"
    corrupt.write_bytes(b"GGUF" + b"\x00" * 1000)
    missing = tmp_path / "nowhere" / "pipeline"
    node = federation.start(
        "C",
        serve="chat,imagine,speech",
        settings={"realms.chat.model": f'"{corrupt}"', "realms.imagine.model": f'"{missing}"'},
    )
    realms = {r["realm"]: r["local"] for r in await trio.to_thread.run_sync(node.cli_json, "realms")}
    assert realms["chat"]["status"].startswith("not served:") and "broken.gguf" in realms["chat"]["status"]
    assert realms["imagine"]["status"].startswith("not served:") and "pipeline" in realms["imagine"]["status"]
    assert realms["speech"]["status"] == "ready"
    msgs = await ask(node, "speech", {"text": "still here"})
    assert msgs[-1]["op"] == "result"
    msgs = await ask(node, "chat", {"prompt": "hi"})
    assert msgs[-1]["op"] == "error" and msgs[-1]["code"] == "realm_not_served"
    assert "broken.gguf" in msgs[-1]["message"]
    assert "Traceback" not in node.log()


def test_private_realm_and_trusted_peers(federation: Federation) -> None:
    """realms.chat.allow: B serves chat to A only; realms.chat.trusted: D routes chat to C only."""
    a = federation.start("A", serve="none")
    c = federation.start("C", serve="chat", bootstrap=(a.addr,))
    b = federation.start("B", serve="chat", bootstrap=(a.addr,), settings={"realms.chat.allow": f'["{a.peer_id}"]'})
    d = federation.start("D", serve="none", bootstrap=(a.addr,), settings={"realms.chat.trusted": f'["{c.peer_id}"]'})
    for peer in (b, c):
        d.wait_for(rf"peer {peer.peer_id} is live", 30)
    # D trusts C alone for chat: B is out of its routing, with the reason, and C answers.
    plan = d.cli_json("route", "chat")
    assert [x["executor"] for x in plan["candidates"]] == [c.peer_id]
    assert any(x["executor"] == b.peer_id and "not trusted" in x["reason"] for x in plan["excluded"])
    assert f"answered by {short(c.peer_id)}" in d.cli("query", "chat", "hi", "--max-tokens", "4").stderr
    assert "trusted for chat" in d.cli("peers").stdout
    # B serves chat to A alone. With C gone, E (not on B's list) is refused; A is answered by B.
    assert c.stop() == 0
    e = federation.start("E", serve="none", bootstrap=(a.addr,))
    e.wait_for(rf"peer {b.peer_id} is live", 30)
    a.wait_for(rf"peer {b.peer_id} is live", 30)
    assert b.peer(a.peer_id)["allowed"] == ["chat"]
    refused = e.cli("query", "chat", "hi", "--max-tokens", "4", check=False)
    assert refused.returncode == 1 and "private on this node" in refused.stderr, refused.stderr
    assert f"answered by {short(b.peer_id)}" in a.cli("query", "chat", "hi", "--max-tokens", "4").stderr
