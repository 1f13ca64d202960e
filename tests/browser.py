"""Headless Chromium for tests: Playwright's sync API in a thread of its own.

The tests run on trio; Playwright's sync API must be used from the thread
that started it, and its async API wants asyncio. So `open_browser()`
starts one thread that owns Playwright and a Chromium (the system one,
`/usr/bin/chromium`: Playwright never downloads a browser here) and runs
the callables it is handed, one at a time: `await browser.run(fn, *args)`
runs `fn(*args)` in that thread from a trio task (in a worker thread, so
trio keeps running the test's servers meanwhile). Page objects may only be
touched inside such callables. Every Playwright call has its own timeout
(`DEFAULT_TIMEOUT_MS`), so a stuck page fails the test instead of hanging.

`Recorder` attaches to a page and keeps every request URL (HTTP and
WebSocket), every console message and every uncaught page error, for the
"no console errors, nothing leaves the host" checks.

`open_harness(base)` opens a document the server serves (a plain-text one,
so no page script runs) and imports `/client/apix.js` from the server as
`window.apix` and the client scenarios (tests/web/scenarios.mjs, answered by
Playwright on the server's origin, never by the server) as
`window.scenarios`. The document must come from the server itself: Chromium's
local network access checks refuse a WebSocket to 127.0.0.1 from a page
Playwright made up.

Resource handling: the thread closes the browser and stops Playwright when
the `open_browser` block exits (also on failure).
"""

from __future__ import annotations

import queue
import shutil
import threading
import urllib.parse
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import attrs
import trio

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DEFAULT_TIMEOUT_MS = 20000
REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "artifacts" / "screenshots"
HARNESS_DOCUMENT = "/client/apix.d.ts"
SCENARIOS_PATH = "/__browser_test__/scenarios.mjs"
SCENARIOS_FILE = REPO / "tests" / "web" / "scenarios.mjs"

T = TypeVar("T")


class BrowserThread:
    """See the module docstring."""

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], queue.SimpleQueue[Any]] | None]
        self._calls = queue.SimpleQueue()
        self._started = threading.Event()
        self._failure: BaseException | None = None
        self.browser: Any = None
        self._thread = threading.Thread(target=self._main, name="chromium", daemon=True)

    def _main(self) -> None:
        from playwright.sync_api import sync_playwright

        try:
            with sync_playwright() as playwright:
                self.browser = playwright.chromium.launch(
                    executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60000
                )
                self._started.set()
                try:
                    while (call := self._calls.get()) is not None:
                        fn, reply = call
                        try:
                            reply.put((True, fn()))
                        except BaseException as exc:
                            reply.put((False, exc))
                finally:
                    self.browser.close()
        except BaseException as exc:
            self._failure = exc
            self._started.set()

    def _call(self, fn: Callable[[], T]) -> T:
        reply: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._calls.put((fn, reply))
        ok, value = reply.get()
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in the browser thread; its exception is re-raised here."""
        return await trio.to_thread.run_sync(self._call, lambda: fn(*args))

    async def new_page(self, *, width: int = 1280, height: int = 800) -> Any:
        """A page in a context of its own (its own sessionStorage: another "tab user")."""

        def make() -> Any:
            context = self.browser.new_context(viewport={"width": width, "height": height})
            context.set_default_timeout(DEFAULT_TIMEOUT_MS)
            return context.new_page()

        return await self.run(make)

    async def open_harness(self, base: str) -> Any:
        """A page on `base`'s origin with apix.js imported as `window.apix`."""

        def load(page: Any) -> Any:
            page.route(base + SCENARIOS_PATH, _answer_with(SCENARIOS_FILE, "text/javascript"))
            page.goto(base + HARNESS_DOCUMENT)
            page.evaluate(
                """async (scenarios) => {
                  window.apix = await import("/client/apix.js");
                  window.scenarios = await import(scenarios);
                }""",
                SCENARIOS_PATH,
            )
            return page

        page = await self.new_page()
        return await self.run(load, page)

    async def evaluate(self, page: Any, script: str, arg: Any = None) -> Any:
        return await self.run(page.evaluate, script, arg)

    async def wait_for(
        self, page: Any, script: str, arg: Any = None, *, seconds: float = 20
    ) -> Any:
        """Until `script` (a JS function of `arg`) returns something truthy
        (Playwright's TimeoutError after `seconds`)."""
        return await self.run(
            lambda: page.wait_for_function(script, arg=arg, timeout=seconds * 1000).json_value()
        )

    def _start(self) -> None:
        assert Path(CHROMIUM).exists(), "chromium is needed (scripts/test.sh installs it)"
        self._thread.start()
        self._started.wait()
        if self._failure is not None:
            raise RuntimeError(f"cannot start Chromium ({CHROMIUM}): {self._failure}")

    def _stop(self) -> None:
        self._calls.put(None)
        self._thread.join(timeout=30)


def _answer_with(file: Path, content_type: str) -> Callable[[Any], None]:
    def answer(route: Any) -> None:
        route.fulfill(status=200, content_type=content_type, body=file.read_text())

    return answer


@asynccontextmanager
async def open_browser() -> AsyncIterator[BrowserThread]:
    """A headless Chromium for the block (see the module docstring)."""
    browser = BrowserThread()
    await trio.to_thread.run_sync(browser._start)
    try:
        yield browser
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(browser._stop)


@attrs.define
class Recorder:
    """Requests, console messages and page errors of one page."""

    requests: list[str] = attrs.Factory(list)
    console: list[tuple[str, str, str]] = attrs.Factory(list)
    """(type, text, location url)"""
    page_errors: list[str] = attrs.Factory(list)
    failed_responses: dict[str, int] = attrs.Factory(dict)
    """URL -> status, for every answer of 400 or more."""

    def attach(self, page: Any) -> None:
        """Call in the browser thread (`await browser.run(recorder.attach, page)`)."""
        page.on("request", lambda request: self.requests.append(request.url))
        page.on("websocket", lambda socket: self.requests.append(socket.url))
        page.on(
            "console",
            lambda message: self.console.append(
                (message.type, message.text, (message.location or {}).get("url", ""))
            ),
        )
        page.on("pageerror", lambda error: self.page_errors.append(str(error)))
        page.on("response", lambda response: self._response(response))

    def _response(self, response: Any) -> None:
        if response.status >= 400:
            self.failed_responses[response.url] = response.status

    def foreign_requests(self) -> list[str]:
        """Request URLs that are not on 127.0.0.1 (data: URLs stay in the page)."""
        foreign = []
        for url in self.requests:
            parsed = urllib.parse.urlsplit(url)
            if parsed.scheme == "data":
                continue
            if parsed.hostname != "127.0.0.1":
                foreign.append(url)
        return foreign

    def console_errors(self, *, missing_routes: tuple[str, ...] = ()) -> list[tuple[str, str, str]]:
        """Console errors, except Chromium's own "Failed to load resource" line
        for a route in `missing_routes` that the server answered 404 (a route
        another branch adds: the page handles its absence, Chromium logs it)."""
        errors = []
        for kind, text, url in self.console:
            if kind != "error":
                continue
            path = urllib.parse.urlsplit(url).path
            if (
                text.startswith("Failed to load resource")
                and path in missing_routes
                and self.failed_responses.get(url) == 404
            ):
                continue
            errors.append((kind, text, url))
        return errors
