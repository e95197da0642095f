"""The bundled web UI in a real browser, served by real nodes running the smoke-test models.

One pair of nodes serves the module: B serves every realm, A serves none and is bootstrapped to
B, so a page loaded from A has each of its queries executed by B. B's chat model calls itself
by a name made of HTML, as a hostile peer's might: wherever a page shows it, it must be text.
Every test opens its own headless Chromium (tests/browser.py) and ends with no page errors.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import wave
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import trio
from PIL import Image

from rentahal.models.smoke import tiny_llama as tiny
from rentahal.scripts.federation import Federation, NodeProcess

from .browser import Browser, Page, open_browser

Pair = tuple[NodeProcess, NodeProcess]
ALL = "chat,vision,imagine,speech"
HOSTILE_NAME = '<img id="pwned" src="x" onerror="document.title=1">'
ENDED = ("done", "error", "cancelled")


# --- nodes and a browser -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    """(A, B): A serves nothing and sends every query to B, which serves all four realms."""
    root = tmp_path_factory.mktemp("ui")
    model = root / "hostile.gguf"
    with mock.patch.object(tiny, "SMOKE_TEST_MODEL_NAME", HOSTILE_NAME):
        tiny.write_tiny_llama(model)
    # One thread per backend: four realms on two cores, and ggml/torch threads spin while waiting.
    settings = {f"realms.{r}.threads": "1" for r in ALL.split(",")}
    settings["realms.chat.model"] = json.dumps(str(model))
    settings["node.name"] = NODE_NAME
    federation = Federation(root)
    try:
        b = federation.start("B", serve=ALL, settings=settings)
        a = federation.start("A", serve="none", bootstrap=(b.addr,))
        a.wait_for(rf"peer {b.peer_id} is live \(serves: {ALL}\)", 60)
        yield a, b
    finally:
        federation.close()


NODE_NAME = "Bee's <b>node</b>"  # [node] name, shown as text in the header


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with open_browser() as b:
        yield b


def page_url(node: NodeProcess) -> str:
    """The node serves its UI over HTTP on the port of its websocket."""
    return node.ui.replace("ws://", "http://", 1)


# --- reading the page ----------------------------------------------------------------------------
def q(selector: str) -> str:
    """JS for the element matching ``selector``."""
    return f"document.querySelector({json.dumps(selector)})"


async def open_ui(browser: Browser, node: NodeProcess, tab: str = "chat", *, init_script: str = "") -> Page:
    """The node's page, connected, on ``tab``."""
    page = await browser.new_page(page_url(node), init_script=init_script)
    await page.wait_for(f"{q('#conn')}.dataset.state === 'connected'", timeout=15, show=f"{q('#conn')}.outerHTML")
    await page.click(f"[data-tab={tab}]")
    await page.wait_for(f"!{q(f'#tab-{tab}')}.hidden")
    return page


async def fill_in(page: Page, prefix: str, fields: dict[str, str | int]) -> None:
    for name, value in fields.items():
        await page.fill(f"#{prefix}-{name}", value)


async def answer_of(page: Page, answer: str, *, timeout: float = 60) -> dict[str, Any]:
    """Wait until the answer element ``answer`` ends (done, error or cancelled); what it shows,
    with the text of its section's status line."""
    await page.wait_for(
        f"{json.dumps(ENDED)}.includes({q(answer)}.dataset.state)",
        timeout=timeout,
        show=f"{q(answer)}.closest('section').innerText",
    )
    return await page.eval(f"""(a => ({{
        state: a.dataset.state, executor: a.dataset.executor, queryId: a.dataset.queryId,
        text: a.textContent, src: a.getAttribute('src') ?? '',
        status: a.closest('section').querySelector('.status').textContent,
    }}))({q(answer)})""")


async def record(page: Page, name: str, selector: str, value: str) -> None:
    """From now on, note ``value`` (JS, with ``el`` the element) whenever ``selector`` changes:
    every state the page showed, not only those a poll happened to see. Read with ``seen``."""
    await page.eval(f"""(el => {{
        const seen = (window.__seen ??= {{}})[{json.dumps(name)}] = [];
        new MutationObserver(() => seen.push({value}))
            .observe(el, {{attributes: true, childList: true, characterData: true, subtree: true}});
    }})({q(selector)})""")


async def seen(page: Page, name: str) -> list[Any]:
    return await page.eval(f"window.__seen[{json.dumps(name)}]")


async def image_size(page: Page, selector: str) -> list[int]:
    """[naturalWidth, naturalHeight] of an <img> once its picture is decoded."""
    return await page.wait_for(
        f"(i => i.complete && i.naturalWidth && [i.naturalWidth, i.naturalHeight])({q(selector)})"
    )


async def no_page_errors(page: Page) -> None:
    """No console error or warning, uncaught exception or dialog, and no peer-supplied markup in
    the DOM."""
    assert [m for m in page.console if m.is_error or m.kind == "warning"] == []
    assert await page.eval(f"{q('#pwned')} === null")


def png(tmp: Path, width: int, height: int) -> Path:
    path = tmp / "red.png"
    Image.new("RGB", (width, height), (200, 30, 30)).save(path, format="PNG")
    return path


def spoken_wav(tmp: Path, text: str) -> Path:
    path = tmp / "said.wav"
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True, timeout=30)
    with wave.open(str(path)) as w:
        assert w.getnframes() > 0
    return path


# --- the page and its node -----------------------------------------------------------------------
async def test_the_page_connects_to_its_node_and_streams_a_chat_answer(
    pair: Pair, browser: Browser, tmp_path: Path
) -> None:
    _, b = pair
    page = await open_ui(browser, b)
    await page.wait_for(f"{q('#peer-id')}.textContent === {json.dumps(b.peer_id)}", show=f"{q('#peer-id')}.textContent")
    assert re.fullmatch("[0-9a-f]{32}", await page.text("#whoami"))
    assert await page.eval("[document.querySelector('.brand h1').textContent, document.title]") == [NODE_NAME] * 2

    await record(page, "chat", "#chat-answer", "[el.dataset.state, el.textContent.length]")
    await page.fill("#chat-prompt", "hello there")
    await page.click("#chat-send")
    shown = await answer_of(page, "#chat-answer")
    assert shown["state"] == "done", shown
    assert shown["text"].strip() and shown["executor"] in ("local", b.peer_id)
    assert len(shown["queryId"]) == 32 and shown["status"].startswith("done in ")
    # Streamed: text was on the page while the query was still running.
    assert any(state == "running" and length > 0 for state, length in await seen(page, "chat"))

    shot = await page.screenshot(tmp_path / "chat.png")
    assert Image.open(shot).format == "PNG"
    await no_page_errors(page)


async def test_tabs_show_one_section_at_a_time(pair: Pair, browser: Browser) -> None:
    a, _ = pair
    page = await open_ui(browser, a)
    tabs = ["chat", "vision", "imagine", "speech", "dashboard"]
    for tab in tabs:
        await page.click(f"[data-tab={tab}]")
        shown = await page.eval(f"{json.dumps(tabs)}.filter(t => !document.getElementById('tab-' + t).hidden)")
        assert shown == [tab]
    # Vision has no panel in the page: it was built from the node's catalog, and the page's own
    # panels take their bounds from it (this node caps chat's max_tokens at realms.chat.max_tokens).
    assert await page.eval("document.getElementById('tab-vision').hasAttribute('data-generic')") is True
    assert await page.eval("document.getElementById('tab-chat').hasAttribute('data-generic')") is False
    assert await page.eval(
        "[document.getElementById('chat-max-tokens').max, document.getElementById('vision-max-tokens').max]"
    ) == ["512", "512"]
    await no_page_errors(page)


async def test_a_nickname_is_saved_and_a_bad_one_is_refused_with_the_reason(pair: Pair, browser: Browser) -> None:
    a, _ = pair
    page = await open_ui(browser, a)
    await page.fill("#nickname", "bad<nick>")
    await page.click("#nickname-save")
    error = await page.wait_for(f"{q('#nickname-error')}.textContent")
    assert error.startswith("bad_request: nickname must be")

    await page.fill("#nickname", "ui tester")
    await record(page, "save", "#nickname-save", "el.textContent")  # "Saved" shows for a moment
    await page.click("#nickname-save")
    await page.wait_for("window.__seen.save.includes('Saved')")
    assert await page.text("#nickname-error") == ""
    # The same user (the browser keeps its guid) after a reload: the node remembered the name.
    guid = await page.text("#whoami")
    await page.goto(page_url(a))
    await page.wait_for(f"{q('#conn')}.dataset.state === 'connected'")
    assert await page.text("#whoami") == guid
    await page.wait_for(f"{q('#nickname')}.value === 'ui tester'")
    await no_page_errors(page)


# --- every realm, executed by the peer -----------------------------------------------------------
async def test_chat_from_a_node_that_serves_nothing_is_answered_by_its_peer_and_read_aloud(
    pair: Pair, browser: Browser
) -> None:
    a, b = pair
    page = await open_ui(browser, a)
    prompt = f"who answers? {HOSTILE_NAME}"
    await page.fill("#chat-prompt", prompt)
    await page.click("#chat-send")
    shown = await answer_of(page, "#chat-answer")
    assert shown["state"] == "done", shown
    assert shown["executor"] == b.peer_id and shown["text"].strip()
    # The history lists it, with the prompt's markup as text.
    listed = f'#history li[data-query-id="{shown["queryId"]}"]'
    entry = await page.wait_for(f"{q(listed)}?.textContent")
    assert prompt in entry

    # "Speak answer": the answer goes to the speech realm (B again) and comes back as audio.
    await page.click("#chat-speak")
    spoken = await answer_of(page, "#tts-answer")
    assert spoken["state"] == "done", spoken
    assert spoken["executor"] == b.peer_id and spoken["src"].startswith("data:audio/wav;base64,")
    assert await page.eval(f"{q('#tts-text')}.value") == shown["text"].strip()
    assert (await page.text("#chat-speak-note")).startswith("done in ")
    await no_page_errors(page)


async def test_imagine_shows_each_step_and_an_image_of_the_asked_size(pair: Pair, browser: Browser) -> None:
    a, b = pair
    page = await open_ui(browser, a, "imagine")
    await fill_in(page, "imagine", {"prompt": "a red cat", "width": 96, "height": 64, "steps": 3, "seed": 7})
    await record(page, "bar", "#imagine-progress", "[el.value, el.max]")
    await record(page, "status", "#tab-imagine .status", "el.textContent")
    await page.click("#imagine-send")
    shown = await answer_of(page, "#imagine-answer")
    assert shown["state"] == "done", shown
    assert shown["executor"] == b.peer_id and shown["src"].startswith("data:image/png;base64,")
    assert await image_size(page, "#imagine-answer") == [96, 64]
    statuses = await seen(page, "status")
    assert all(f"denoising: step {i}/3" in statuses for i in (1, 2, 3)), statuses
    assert [v for v in await seen(page, "bar") if v[0] > 0][:3] == [[1, 3], [2, 3], [3, 3]]
    await no_page_errors(page)


async def test_vision_answers_a_question_about_a_chosen_image(pair: Pair, browser: Browser, tmp_path: Path) -> None:
    a, b = pair
    page = await open_ui(browser, a, "vision")
    await page.set_file_input("#vision-image", png(tmp_path, 80, 60))
    assert await image_size(page, "#vision-preview") == [80, 60]
    await page.fill("#vision-prompt", "what colour is this?")
    await page.click("#vision-send")
    shown = await answer_of(page, "#vision-answer")
    assert shown["state"] == "done", shown
    assert shown["executor"] == b.peer_id and isinstance(shown["text"], str)
    await no_page_errors(page)


async def test_speech_speaks_text_and_transcribes_an_audio_file(pair: Pair, browser: Browser, tmp_path: Path) -> None:
    a, b = pair
    page = await open_ui(browser, a, "speech")
    await page.fill("#tts-text", "hello from the browser")
    await page.click("#tts-send")
    shown = await answer_of(page, "#tts-answer")
    assert shown["state"] == "done", shown
    assert shown["executor"] == b.peer_id and shown["src"].startswith("data:audio/wav;base64,")
    duration = await page.eval(f"""new Promise((resolve, reject) => {{
        const audio = {q("#tts-answer")};
        if (audio.readyState >= 1) return resolve(audio.duration);
        audio.addEventListener('loadedmetadata', () => resolve(audio.duration));
        audio.addEventListener('error', () => reject(new Error('audio error ' + audio.error?.code)));
    }})""")
    assert duration > 0

    await page.set_file_input("#speech-file", spoken_wav(tmp_path, "hello world"))
    await page.click("#speech-send")
    shown = await answer_of(page, "#speech-answer")
    assert shown["state"] == "done", shown
    assert shown["executor"] == b.peer_id and isinstance(shown["text"], str)
    await no_page_errors(page)


# Keeps every MediaRecorder the page makes, counting the bytes it has handed out.
RECORDERS = """
const PageMediaRecorder = window.MediaRecorder;
window.recorders = [];
window.MediaRecorder = class extends PageMediaRecorder {
  constructor(...args) {
    super(...args);
    this.bytes = 0;
    this.addEventListener('dataavailable', (e) => { this.bytes += e.data.size; });
    window.recorders.push(this);
  }
};
"""


async def test_a_recording_from_the_microphone_is_transcribed(pair: Pair, browser: Browser) -> None:
    a, b = pair
    page = await open_ui(browser, a, "speech", init_script=RECORDERS)  # the microphone: a beep
    await page.click("#speech-record")
    await page.wait_for(
        f"{q('#speech-record')}.dataset.recording === 'true'", show=f"{q('#tab-speech .status')}.textContent"
    )
    # Record until the recorder holds some audio: ask it for what it has so far, until enough.
    await page.wait_for(
        "(r => r.state === 'recording' && (r.requestData(), r.bytes > 4000))(window.recorders[0])", timeout=15
    )
    await page.click("#speech-record")
    shown = await answer_of(page, "#speech-answer")
    assert shown["state"] == "done", shown
    assert shown["executor"] == b.peer_id and isinstance(shown["text"], str)
    assert await page.eval(f"{q('#speech-record')}.dataset.recording") == "false"
    await no_page_errors(page)


# --- the dashboard -------------------------------------------------------------------------------
async def test_the_dashboard_shows_realms_and_the_live_peer_and_refreshes(pair: Pair, browser: Browser) -> None:
    a, b = pair
    peer_row = f'#dash-peers tr[data-peer="{b.peer_id}"]'
    page = await open_ui(browser, a, "dashboard")
    for realm in ALL.split(","):
        await page.wait_for(q(f"#dash-realms tr[data-realm={realm}]"), show=f"{q('#tab-dashboard')}.innerText")
    await page.wait_for(f"{q(peer_row)}?.dataset.state === 'live'", show=f"{q('#dash-peers')}.outerHTML")
    count = int(await page.wait_for(f"{q('#dash-updated')}.dataset.count"))
    await page.wait_for(f"+{q('#dash-updated')}.dataset.count >= {count + 2}", timeout=10)
    # B's chat model calls itself by a name made of HTML. A shows it (B's word for it) in the
    # tooltip of B's realms, B in its own realms table: as text both times.
    titles = await page.eval(f"[...document.querySelectorAll({json.dumps(peer_row + ' td')})].map(td => td.title)")
    assert any(f"chat: {HOSTILE_NAME}" in t for t in titles), titles
    cells = await page.eval(f"[...document.querySelectorAll({json.dumps(peer_row + ' td')})].map(td => td.textContent)")
    assert "direct" in cells, cells
    # Whether peers can reach this node, in the same words as `rentahal-node status`.
    node_info = await page.eval(f"{q('#dash-node')}.innerText")
    status = await trio.to_thread.run_sync(a.cli_json, "status")
    assert "Reachability" in node_info and status["reachability"]["text"] in node_info, node_info
    assert f"--bootstrap {status['reachability']['bootstrap']}" in node_info, node_info
    await no_page_errors(page)

    own = await open_ui(browser, b, "dashboard")
    await own.wait_for(q("#dash-realms tr[data-realm=chat]"))
    cells = await own.eval(
        "[...document.querySelectorAll('#dash-realms tr[data-realm=chat] td')].map(td => td.textContent)"
    )
    assert HOSTILE_NAME in cells, cells
    await no_page_errors(own)


# --- cancelling, refusals, a lost node -----------------------------------------------------------
async def test_an_imagine_query_cancelled_while_it_runs_ends_cancelled(pair: Pair, browser: Browser) -> None:
    a, _ = pair
    page = await open_ui(browser, a, "imagine")
    await fill_in(page, "imagine", {"prompt": "a slow cat", "width": 256, "height": 256, "steps": 50})
    await page.click("#imagine-send")
    await page.wait_for(
        f"{q('#imagine-progress')}.value >= 1", timeout=30, show=f"{q('#tab-imagine .status')}.textContent"
    )
    await page.click("#imagine-cancel")
    shown = await answer_of(page, "#imagine-answer")
    assert shown["state"] == "cancelled" and shown["status"].startswith("cancelled: "), shown
    assert shown["src"] == "" and await page.eval(f"{q('#imagine-progress')}.value") < 50
    # Cancel is for a query under way only; Generate is back.
    buttons = await page.eval(f"[{q('#imagine-cancel')}.disabled, {q('#imagine-send')}.disabled]")
    assert buttons == [True, False]
    await no_page_errors(page)


async def test_a_refused_query_shows_the_nodes_reason(pair: Pair, browser: Browser) -> None:
    a, _ = pair
    page = await open_ui(browser, a, "imagine")
    await fill_in(page, "imagine", {"prompt": "too many steps", "width": 64, "height": 64, "steps": 100000})
    await page.click("#imagine-send")
    shown = await answer_of(page, "#imagine-answer")
    assert shown["state"] == "error", shown
    assert shown["status"].startswith("bad_request: ") and "steps" in shown["status"], shown
    assert await page.eval(f"{q('#tab-imagine .status')}.classList.contains('error')")
    await no_page_errors(page)


async def test_a_cancelled_chat_query_ends_cancelled_and_a_stopped_node_shows_disconnected(
    federation: Federation, browser: Browser
) -> None:
    b = federation.start("B", serve="chat")
    a = federation.start("A", serve="none", bootstrap=(b.addr,))
    a.wait_for(rf"peer {b.peer_id} is live \(serves: chat\)", 30)
    page = await open_ui(browser, a)
    b.signal(signal.SIGSTOP)  # the executor hangs: the query stays under way until cancelled
    try:
        await page.fill("#chat-prompt", "never answered")
        await page.click("#chat-send")
        query_id = await page.wait_for(f"{q('#chat-answer')}.dataset.queryId")
        await page.click("#chat-cancel")
        shown = await answer_of(page, "#chat-answer", timeout=10)
    finally:
        b.signal(signal.SIGCONT)
    assert shown["state"] == "cancelled" and shown["queryId"] == query_id, shown
    assert shown["status"].startswith("cancelled: "), shown
    await no_page_errors(page)

    # The page's own node goes away: the page says so (and keeps trying to reconnect).
    await record(page, "conn", "#conn", "el.dataset.state")
    await trio.to_thread.run_sync(a.stop)
    await page.wait_for("window.__seen.conn.includes('disconnected')", timeout=10)
    others = [m for m in page.errors if "WebSocket connection to" not in m.text]
    assert others == []  # the reconnection attempts fail, and nothing else does


# --- who may open the websocket ----------------------------------------------------------------------


def lan_address() -> str | None:
    """An IPv4 address of this machine other than loopback (the one a LAN neighbour dials)."""
    from rentahal.p2p import addrs as addrlib

    return next((a for a in addrlib.interface_addresses() if "." in a and not a.startswith("127.")), None)


async def test_the_ui_opened_over_the_lan_by_ip_connects(browser: Browser, tmp_path: Path) -> None:
    """wsproto takes Host out of the headers it hands on, so the same-origin check once saw
    none and refused every page not opened as localhost."""
    ip = lan_address()
    if ip is None:
        pytest.skip("SKIPPED LOUDLY: this machine has no non-loopback IPv4 address to open the UI on")
    federation = Federation(tmp_path)
    try:
        node = federation.start("lan", serve="none", settings={"ui.host": '"0.0.0.0"'})
        port = node.ui.rsplit(":", 1)[1].strip("/")
        page = await browser.new_page(f"http://{ip}:{port}/")
        await page.wait_for(f"{q('#conn')}.dataset.state === 'connected'", timeout=15, show=f"{q('#conn')}.outerHTML")
        await no_page_errors(page)
    finally:
        federation.close()


async def test_a_page_on_another_local_port_may_not_drive_the_node(tmp_path: Path) -> None:
    from trio_websocket import ConnectionRejected, open_websocket_url

    federation = Federation(tmp_path)
    try:
        node = federation.start("origins", serve="none", settings={"ui.allowed_origins": '["http://localhost:5173"]'})
        port = node.ui.rsplit(":", 1)[1].strip("/")
        for origin, allowed in (
            (f"http://127.0.0.1:{port}", True),
            ("http://localhost:3000", False),
            ("http://127.0.0.1:8080", False),
            ("http://localhost:5173", True),
        ):
            try:
                async with open_websocket_url(node.ui, extra_headers=[(b"Origin", origin.encode())]) as ws:
                    await ws.send_message(json.dumps({"op": "status", "rid": 1}))
                    assert json.loads(await ws.get_message())["op"] == "status"
                    got = True
            except ConnectionRejected as exc:
                assert exc.status_code == 403
                got = False
            assert got is allowed, origin
    finally:
        federation.close()
