"""Headless Chromium driven over the DevTools protocol, with aiohttp only.

For the status page's browser test (``tests/test_status_page.py``) and its screenshot
(``bench/status_page.py``): Debian's ``chromium``, launched with a fresh profile and
without the background networking that makes it slow on a closed network, one page
reached over the protocol's websocket. No Playwright: nothing to download, and the
few commands needed (navigate, evaluate, type, screenshot) are one JSON message each.
Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import shutil
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, BinaryIO

import aiohttp

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--mute-audio",
         "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0")
START_TIMEOUT = 30.0  # seconds for the browser to open its DevTools port
COMMAND_TIMEOUT = 20.0  # seconds for one protocol command's answer
POLL = 0.05  # seconds between two looks at the page's state


def find_chromium() -> str | None:
    """Debian's ``chromium`` (``.ci/run`` installs it), if installed."""
    return shutil.which("chromium") or (
        "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


class Page:
    """One browser tab: commands are sent one at a time and their answers awaited; the
    protocol's events (none are enabled) are skipped."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self._ws = ws
        self._ids = itertools.count(1)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        command_id = next(self._ids)
        await self._ws.send_json({"id": command_id, "method": method, "params": params})
        async with asyncio.timeout(COMMAND_TIMEOUT):
            while True:
                message = await self._ws.receive_json()
                if message.get("id") != command_id:
                    continue
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                result: dict[str, Any] = message.get("result", {})
                return result

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", url=url)
        await self.wait_for("document.readyState === 'complete'")

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = await self.send("Runtime.evaluate", expression=expression,
                                 returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, within: float = 15.0) -> Any:
        """Poll ``expression`` (the page's own state: no event to wait on) until it is
        truthy; its value, or ``TimeoutError`` after ``within`` seconds."""
        value = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        for _ in range(int(within / POLL) + 1):
            value = await self.evaluate(expression)
            if value or loop.time() > deadline:
                break
            await asyncio.sleep(POLL)
        if not value:
            raise TimeoutError(f"{expression!r} still {value!r} after {within} s")
        return value

    async def type_into(self, selector: str, text: str) -> None:
        """Focus the element and type ``text`` as a user would (input events fire)."""
        await self.evaluate(f"document.querySelector({selector!r}).focus()")
        await self.send("Input.insertText", text=text)

    async def screenshot(self) -> bytes:
        """The whole page as PNG."""
        result = await self.send("Page.captureScreenshot", format="png",
                                 captureBeyondViewport=True)
        return base64.b64decode(result["data"])


@asynccontextmanager
async def chromium(profile: Path, binary: str, size: tuple[int, int] = (1280, 860)
                   ) -> AsyncIterator[Page]:
    """A headless Chromium with a fresh profile in ``profile``; its first tab. The
    browser (our child, by PID) is terminated on the way out, killed if it lingers."""
    log = _log_file(profile)
    process = await asyncio.create_subprocess_exec(
        binary, *FLAGS, f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}",
        "about:blank", stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        port = await _devtools_port(profile, process)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/json/list") as response:
                targets = await response.json()
            page_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
            async with session.ws_connect(page_url, max_msg_size=0) as ws:
                yield Page(ws)
    finally:
        await _stop(process)
        log.close()


def _log_file(profile: Path) -> BinaryIO:
    """Where the browser's own output goes: read back only when it fails to start."""
    profile.mkdir(parents=True, exist_ok=True)
    return (profile / "chromium.log").open("wb")


async def _devtools_port(profile: Path, process: asyncio.subprocess.Process) -> int:
    """The port Chromium chose, from the ``DevToolsActivePort`` file it writes."""
    marker = profile / "DevToolsActivePort"
    async with asyncio.timeout(START_TIMEOUT):
        while True:
            if process.returncode is not None:
                log = (profile / "chromium.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"chromium exited with {process.returncode}: {log}")
            text = marker.read_text() if marker.exists() else ""
            if text.endswith("\n") or "\n" in text:
                return int(text.split("\n", 1)[0])
            await asyncio.sleep(0.05)


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(10):
            await process.wait()
    except TimeoutError:
        process.kill()
        await process.wait()
