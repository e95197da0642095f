"""Headless Chromium for the UI tests, driven by Playwright (sync API) with Debian's chromium.

Playwright's sync objects belong to the thread that made them, so every call runs on one thread
of its own (a single-worker executor); the trio tests await each call through
``trio.to_thread``. What a page logs, throws or opens as a dialog is collected from before its
first script runs, and a dialog is dismissed (and counted as an error).

    async with open_browser() as browser:
        page = await browser.new_page("http://127.0.0.1:8765/")
        await page.wait_for("document.querySelector('#conn').dataset.state === 'connected'")
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import trio

CHROMIUM = "/usr/bin/chromium"
FLAGS = (
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
)
COMMAND_TIMEOUT = 30.0
POLL_INTERVAL = 0.05
T = TypeVar("T")


class BrowserError(Exception):
    """The browser refused a command, went away, or never started."""


class JavaScriptError(BrowserError):
    """Code evaluated in a page threw; the message is the page's own description of it."""


class PageTimeout(BrowserError):
    """A condition on a page stayed false until its deadline."""


@dataclass(frozen=True)
class ConsoleMessage:
    """Something a page said: ``kind`` is a console level (log, warning, error, ...), ``exception``
    for an uncaught exception, ``dialog`` for an alert/confirm/prompt."""

    kind: str
    text: str

    @property
    def is_error(self) -> bool:
        return self.kind in ("error", "assert", "exception", "dialog")


class _Thread:
    """Runs every Playwright call on one thread."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="playwright")

    async def run(self, fn: Callable[[], T], timeout: float = COMMAND_TIMEOUT) -> T:
        future = self.pool.submit(fn)
        try:
            with trio.fail_after(timeout + 5):
                return await trio.to_thread.run_sync(future.result, abandon_on_cancel=True)
        except trio.TooSlowError:
            raise BrowserError(f"no answer from the browser within {timeout}s") from None


class Browser:
    """A running browser; make pages with ``new_page``. Built by ``open_browser``."""

    def __init__(self, thread: _Thread, pw_browser: Any) -> None:
        self._thread = thread
        self._browser = pw_browser

    async def new_page(self, url: str, *, init_script: str = "", timeout: float = COMMAND_TIMEOUT) -> Page:
        """A new tab that loads ``url``; returns once its load event fired. ``init_script`` runs
        in every document of the tab before the page's own scripts."""

        def make() -> Any:
            context = self._browser.new_context()
            pw_page = context.new_page()
            return pw_page

        pw_page = await self._thread.run(make)
        page = Page(self._thread, pw_page)
        await self._thread.run(lambda: page._listen(init_script))
        await page.goto(url, timeout=timeout)
        return page


class Page:
    """One tab. ``console`` holds everything it logged and every uncaught exception."""

    def __init__(self, thread: _Thread, pw_page: Any) -> None:
        self._thread = thread
        self._page = pw_page
        self.console: list[ConsoleMessage] = []

    def _listen(self, init_script: str) -> None:
        page = self._page
        page.on("console", lambda m: self.console.append(ConsoleMessage(m.type, m.text)))
        page.on("pageerror", lambda e: self.console.append(ConsoleMessage("exception", str(e))))

        def dialog(d: Any) -> None:
            self.console.append(ConsoleMessage("dialog", f"{d.type}: {d.message}"))
            d.dismiss()

        page.on("dialog", dialog)
        if init_script:
            page.add_init_script(init_script)

    @property
    def errors(self) -> list[ConsoleMessage]:
        return [m for m in self.console if m.is_error]

    async def goto(self, url: str, *, timeout: float = COMMAND_TIMEOUT) -> None:
        try:
            await self._thread.run(lambda: self._page.goto(url, timeout=timeout * 1000, wait_until="load"), timeout)
        except BrowserError:
            raise
        except Exception as exc:  # playwright's Error: a failed navigation
            raise BrowserError(f"loading {url}: {exc}") from None

    async def eval(self, js: str, *, timeout: float = COMMAND_TIMEOUT) -> Any:
        """The value of a JavaScript expression (awaited if it is a promise), as JSON."""
        from playwright.sync_api import Error

        def run() -> Any:
            try:
                # Wrapped in a function: Playwright evaluates a bare expression or a function.
                return self._page.evaluate(f"async () => ({js})")
            except Error as exc:
                raise JavaScriptError(f"{str(exc).splitlines()[0]}\n  in: {js}") from None

        return await self._thread.run(run, timeout)

    async def wait_for(self, condition: str, *, timeout: float = 10.0, show: str | None = None) -> Any:
        """Evaluate ``condition`` until it is truthy (in JavaScript) and return its value (an
        element's value is True). A condition that throws counts as not yet true; the last such
        error, the value of ``show`` and the page's errors are in the PageTimeout message."""
        probe = (
            f"(async () => {{ const v = await ({condition});"
            " return v ? {ok: true, value: v instanceof Node ? true : v} : {ok: false}; })()"
        )
        last_error = ""
        with trio.move_on_after(timeout):
            while True:
                try:
                    met = await self.eval(probe)
                except JavaScriptError as exc:
                    last_error = str(exc).splitlines()[0]
                else:
                    if met["ok"]:
                        return met["value"]
                await trio.sleep(POLL_INTERVAL)  # pacing between reads of the page's state
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
        files = [str(Path(p).resolve()) for p in paths]
        await self._thread.run(lambda: self._page.set_input_files(selector, files))

    async def screenshot(self, path: str | os.PathLike[str]) -> Path:
        out = Path(path)
        await self._thread.run(lambda: self._page.screenshot(path=str(out)))
        return out

    async def close(self) -> None:
        await self._thread.run(lambda: self._page.context.close())


def _element(selector: str) -> str:
    """JS for the element matching ``selector``, throwing a readable error when there is none."""
    sel = json.dumps(selector)
    missing = f"(() => {{ throw new Error('no element matches ' + {sel}) }})()"
    return f"(document.querySelector({sel}) ?? {missing})"


@asynccontextmanager
async def open_browser(*, executable: str = CHROMIUM) -> AsyncIterator[Browser]:
    """A headless Chromium (Debian's, by path) for the duration of the block."""
    if not Path(executable).exists():
        raise BrowserError(f"no browser at {executable} (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise BrowserError("playwright is not installed (pip install -e '.[test]')") from None
    thread = _Thread()
    profile = Path(tempfile.mkdtemp(prefix="rentahal-chromium-"))
    state: dict[str, Any] = {}

    def start() -> Any:
        state["pw"] = sync_playwright().start()
        return state["pw"].chromium.launch(executable_path=executable, headless=True, args=list(FLAGS))

    def stop() -> None:
        try:
            if "browser" in state:
                state["browser"].close()
        finally:
            if "pw" in state:
                state["pw"].stop()

    try:
        state["browser"] = await thread.run(start)
        yield Browser(thread, state["browser"])
    finally:
        with trio.CancelScope(shield=True):
            try:
                await thread.run(stop, 10.0)
            except Exception:
                pass
            thread.pool.shutdown(wait=False)
        shutil.rmtree(profile, ignore_errors=True)
