"""A small headless-Chromium driver for the UI tests, speaking the Chrome DevTools Protocol.

One websocket to the browser endpoint; each page is a target attached with ``flatten=True``, so
its commands and events travel on that same socket, tagged with the page's ``sessionId``. A
reader task routes each answer to the command waiting for it (by ``id``) and each event to its
page. The browser runs in a process group of its own in a fresh profile directory: on leaving
``open_browser`` the whole group is killed and the directory removed, whatever happened inside.

    async with open_browser() as browser:
        page = await browser.new_page("http://127.0.0.1:8765/")
        await page.wait_for("document.querySelector('#conn').dataset.state === 'connected'")
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

CHROMIUM = "/usr/bin/chromium"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",  # a microphone: a beep
    # A page under test must keep its timers and media running although no one looks at it.
    "--disable-background-timer-throttling",
    "--disable-renderer-backgrounding",
    "--disable-backgrounding-occluded-windows",
    "--autoplay-policy=no-user-gesture-required",
    "--disable-breakpad",
    "--remote-debugging-port=0",
)
START_TIMEOUT = 30.0
COMMAND_TIMEOUT = 30.0
CLOSE_TIMEOUT = 5.0
POLL_INTERVAL = 0.05
MAX_MESSAGE = 64 * 1024 * 1024  # screenshots and data: URLs come back whole


class BrowserError(Exception):
    """The browser refused a command, went away, or never started."""


class JavaScriptError(BrowserError):
    """Code evaluated in a page threw; the message is the page's own description of it."""


class PageTimeout(BrowserError):
    """A condition on a page stayed false until its deadline."""


@dataclass(frozen=True)
class ConsoleMessage:
    """Something a page said: ``kind`` is a console level (log, warning, error, ...), ``exception``
    for an uncaught exception or rejection, ``dialog`` for an alert/confirm/prompt, or
    ``log.<level>`` for the browser's own messages (a failed resource load, a CSP violation)."""

    kind: str
    text: str

    @property
    def is_error(self) -> bool:
        return self.kind in ("error", "assert", "exception", "dialog", "log.error")


class Browser:
    """A running browser; make pages with ``new_page``. Built by ``open_browser``."""

    def __init__(self, ws: WebSocketConnection, nursery: trio.Nursery) -> None:
        self._ws = ws
        self._nursery = nursery
        self._ids = itertools.count(1)
        self._answers: dict[int, trio.MemorySendChannel[dict[str, Any]]] = {}
        self._pages: dict[str, Page] = {}

    async def send(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        session: str | None = None,
        timeout: float = COMMAND_TIMEOUT,
    ) -> dict[str, Any]:
        """One CDP command; its result, or BrowserError with the browser's reason."""
        cid = next(self._ids)
        send, receive = trio.open_memory_channel[dict[str, Any]](1)
        self._answers[cid] = send
        message: dict[str, Any] = {"id": cid, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        try:
            with trio.fail_after(timeout):
                try:
                    await self._ws.send_message(json.dumps(message))
                    answer = await receive.receive()
                except (trio.EndOfChannel, ConnectionClosed):
                    raise BrowserError(f"{method}: the browser closed the connection") from None
        except trio.TooSlowError:
            raise BrowserError(f"{method}: no answer within {timeout}s") from None
        finally:
            self._answers.pop(cid, None)
        if "error" in answer:
            error = answer["error"]
            raise BrowserError(f"{method}: {error.get('message')} {error.get('data', '')}".strip())
        return answer.get("result", {})

    async def new_page(self, url: str, *, init_script: str = "", timeout: float = COMMAND_TIMEOUT) -> Page:
        """A new tab that loads ``url``; returns once its load event fired. Console messages and
        exceptions are collected from before the first byte of the page; ``init_script`` runs in
        every document of the tab before the page's own scripts."""
        target = (await self.send("Target.createTarget", {"url": "about:blank"}))["targetId"]
        attached = await self.send("Target.attachToTarget", {"targetId": target, "flatten": True})
        session = attached["sessionId"]
        page = Page(self, target, session)
        self._pages[session] = page
        for domain in ("Runtime", "Page", "Log", "DOM"):
            await page.send(f"{domain}.enable")
        if init_script:
            await page.send("Page.addScriptToEvaluateOnNewDocument", {"source": init_script})
        await page.goto(url, timeout=timeout)
        return page

    async def _close(self, proc: trio.Process) -> None:
        """Ask the browser to quit (it then ends its helpers itself) and wait until it did."""
        try:
            await self._ws.send_message(json.dumps({"id": 0, "method": "Browser.close"}))
        except ConnectionClosed:
            pass
        await proc.wait()

    async def _read(self) -> None:
        try:
            while True:
                message = json.loads(await self._ws.get_message())
                if "id" in message:
                    route = self._answers.get(message["id"])
                    if route is not None:
                        route.send_nowait(message)
                elif (page := self._pages.get(message.get("sessionId", ""))) is not None:
                    page._on_event(message["method"], message.get("params", {}))
        except ConnectionClosed:
            pass
        finally:  # every command still waiting learns the browser is gone
            for route in self._answers.values():
                route.close()


class Page:
    """One tab. ``console`` holds everything it logged and every uncaught exception."""

    def __init__(self, browser: Browser, target: str, session: str) -> None:
        self.browser = browser
        self.target = target
        self.session = session
        self.console: list[ConsoleMessage] = []
        self._event_waiters: list[tuple[str, trio.MemorySendChannel[dict[str, Any]]]] = []

    @property
    def errors(self) -> list[ConsoleMessage]:
        return [m for m in self.console if m.is_error]

    async def send(
        self, method: str, params: dict[str, Any] | None = None, *, timeout: float = COMMAND_TIMEOUT
    ) -> dict[str, Any]:
        return await self.browser.send(method, params, session=self.session, timeout=timeout)

    async def goto(self, url: str, *, timeout: float = COMMAND_TIMEOUT) -> None:
        loaded = self._expect("Page.loadEventFired")
        with trio.fail_after(timeout):
            nav = await self.send("Page.navigate", {"url": url}, timeout=timeout)
            if nav.get("errorText"):
                raise BrowserError(f"loading {url}: {nav['errorText']}")
            await loaded.receive()

    async def eval(self, js: str, *, timeout: float = COMMAND_TIMEOUT) -> Any:
        """The value of a JavaScript expression (awaited if it is a promise), as JSON."""
        answer = await self.send(
            "Runtime.evaluate",
            {
                "expression": js,
                "returnByValue": True,
                "awaitPromise": True,
                "userGesture": True,
            },
            timeout=timeout,
        )
        if "exceptionDetails" in answer:
            raise JavaScriptError(f"{_exception_text(answer['exceptionDetails'])}\n  in: {js}")
        return answer["result"].get("value")

    async def wait_for(self, condition: str, *, timeout: float = 10.0, show: str | None = None) -> Any:
        """Evaluate ``condition`` until it is truthy (in JavaScript) and return its value (an
        element's value is True).

        A condition that throws counts as not yet true (its element may not exist yet); the last
        such error is part of the PageTimeout message, with the value of ``show`` if given, and
        the page's errors, so a failure says what the page looked like.
        """
        # Truthiness is JavaScript's: an element is truthy there but arrives here as {}.
        probe = (
            f"(async () => {{ const v = await ({condition});"
            " return v ? {ok: true, value: v instanceof Node ? true : v} : {ok: false}; })()"
        )
        last_error = ""
        try:
            with trio.fail_after(timeout):
                while True:
                    try:
                        met = await self.eval(probe)
                    except JavaScriptError as exc:
                        last_error = str(exc).splitlines()[0]
                    else:
                        if met["ok"]:
                            return met["value"]
                    await trio.sleep(POLL_INTERVAL)  # pacing between reads of the page's state
        except trio.TooSlowError:
            pass
        lines = [f"still false after {timeout}s: {condition}"]
        if last_error:
            lines.append(f"  last error: {last_error}")
        if show is not None:
            try:
                lines.append(f"  {show} = {json.dumps(await self.eval(show))[:2000]}")
            except BrowserError as exc:
                lines.append(f"  {show} failed: {exc}")
        lines += [f"  page {m.kind}: {m.text[:500]}" for m in self.errors]
        raise PageTimeout("\n".join(lines))

    # --- what a user does ----------------------------------------------------------------------
    async def click(self, selector: str) -> None:
        await self.eval(f"{_element(selector)}.click()")

    async def fill(self, selector: str, value: str | int) -> None:
        """Set a form field as typing would: its value, then input and change events."""
        await self.eval(
            f"(() => {{ const el = {_element(selector)}; el.value = {json.dumps(str(value))};"
            " el.dispatchEvent(new Event('input', {bubbles: true}));"
            " el.dispatchEvent(new Event('change', {bubbles: true})); })()"
        )

    async def text(self, selector: str) -> str:
        return await self.eval(f"{_element(selector)}.textContent")

    async def set_file_input(self, selector: str, *paths: str | os.PathLike[str]) -> None:
        """Choose files on an ``<input type=file>``, as the file picker would (fires change)."""
        root = (await self.send("DOM.getDocument", {"depth": 0}))["root"]["nodeId"]
        found = await self.send("DOM.querySelector", {"nodeId": root, "selector": selector})
        node = found["nodeId"]
        if not node:
            raise BrowserError(f"no element matches {selector!r}")
        files = [str(Path(p).resolve()) for p in paths]
        await self.send("DOM.setFileInputFiles", {"nodeId": node, "files": files})

    async def screenshot(self, path: str | os.PathLike[str]) -> Path:
        data = (await self.send("Page.captureScreenshot", {"format": "png"}))["data"]
        out = Path(path)
        out.write_bytes(base64.b64decode(data))
        return out

    async def close(self) -> None:
        await self.browser.send("Target.closeTarget", {"targetId": self.target})
        self.browser._pages.pop(self.session, None)

    # --- events --------------------------------------------------------------------------------
    def _expect(self, method: str) -> trio.MemoryReceiveChannel[dict[str, Any]]:
        """A channel that gets the params of the next ``method`` event; ask before causing it."""
        send, receive = trio.open_memory_channel[dict[str, Any]](1)
        self._event_waiters.append((method, send))
        return receive

    def _on_event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Runtime.consoleAPICalled":
            text = " ".join(_remote_text(a) for a in params.get("args", []))
            self.console.append(ConsoleMessage(params.get("type", "log"), text))
        elif method == "Runtime.exceptionThrown":
            text = _exception_text(params["exceptionDetails"])
            self.console.append(ConsoleMessage("exception", text))
        elif method == "Log.entryAdded":
            entry = params["entry"]
            text = entry.get("text", "") + (f" ({entry['url']})" if entry.get("url") else "")
            self.console.append(ConsoleMessage(f"log.{entry.get('level', 'info')}", text))
        elif method == "Page.javascriptDialogOpening":
            # A dialog blocks the page until answered: note it (an error for the tests) and go on.
            text = f"{params.get('type')}: {params.get('message')}"
            self.console.append(ConsoleMessage("dialog", text))
            self.browser._nursery.start_soon(self._dismiss_dialog)
        for waiter in [w for w in self._event_waiters if w[0] == method]:
            self._event_waiters.remove(waiter)
            waiter[1].send_nowait(params)

    async def _dismiss_dialog(self) -> None:
        try:
            await self.send("Page.handleJavaScriptDialog", {"accept": False})
        except BrowserError:
            pass  # already gone with its page


def _element(selector: str) -> str:
    """JS for the element matching ``selector``, throwing a readable error when there is none."""
    sel = json.dumps(selector)
    missing = f"(() => {{ throw new Error('no element matches ' + {sel}) }})()"
    return f"(document.querySelector({sel}) ?? {missing})"


def _remote_text(obj: dict[str, Any]) -> str:
    if "value" in obj:
        return obj["value"] if isinstance(obj["value"], str) else json.dumps(obj["value"])
    return obj.get("description") or obj.get("unserializableValue") or obj.get("type", "")


def _exception_text(details: dict[str, Any]) -> str:
    exc = details.get("exception") or {}
    text = exc.get("description") or exc.get("value") or details.get("text", "exception")
    return str(text)


class _Stderr:
    """The browser's stderr: finds the DevTools URL, then keeps draining (a full pipe would stall
    the browser) and remembers the tail for error messages."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.tail: deque[str] = deque(maxlen=40)
        self._buffer = b""

    async def readline(self) -> str | None:
        """The next line, or None at the end of the stream."""
        while b"\n" not in self._buffer:
            chunk = await self.stream.receive_some()
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        text = line.decode("utf-8", "replace")
        self.tail.append(text)
        return text

    async def devtools_url(self) -> str:
        while (line := await self.readline()) is not None:
            if m := re.search(r"DevTools listening on (ws://\S+)", line):
                return m.group(1)
        raise BrowserError("chromium exited before listening:\n" + "\n".join(self.tail))

    async def drain(self) -> None:
        while await self.readline() is not None:
            pass


@asynccontextmanager
async def open_browser(*, executable: str = CHROMIUM) -> AsyncIterator[Browser]:
    """A headless Chromium for the duration of the block, killed with its children at the end."""
    if not Path(executable).exists():
        raise BrowserError(f"no browser at {executable} (apt-get install chromium)")
    profile = Path(tempfile.mkdtemp(prefix="rentahal-chromium-"))
    try:
        proc = await trio.lowlevel.open_process(
            [executable, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group: renderers and helpers die with it
        )
        try:
            assert proc.stderr is not None
            stderr = _Stderr(proc.stderr)
            try:
                with trio.fail_after(START_TIMEOUT):
                    url = await stderr.devtools_url()
            except trio.TooSlowError:
                raise BrowserError(
                    f"chromium did not listen within {START_TIMEOUT}s:\n" + "\n".join(stderr.tail)
                ) from None
            async with _single_errors(), trio.open_nursery() as nursery:
                nursery.start_soon(stderr.drain)
                async with open_websocket_url(url, max_message_size=MAX_MESSAGE) as ws:
                    browser = Browser(ws, nursery)
                    nursery.start_soon(browser._read)
                    try:
                        yield browser
                    finally:
                        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
                            await browser._close(proc)
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                _kill_group(proc.pid)  # whatever is left of it: a hung browser, a stray helper
                await proc.wait()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@asynccontextmanager
async def _single_errors() -> AsyncIterator[None]:
    """Let a test's own failure out of the browser's nursery as itself, not in an ExceptionGroup."""
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
