"""Headless Chromium driven over the DevTools protocol (CDP), with aiohttp's websocket client.

`async with Browser(tmp_path) as b:` starts `chromium --headless --remote-debugging-port=P`
(the flags of PLATFORM-NOTES, its own profile dir under tmp_path), connects to its one page
target and enables Runtime, Log and Page events. `await b.goto(url)` navigates and waits for
the load event; `await b.eval(js)` returns a JS expression's value (awaiting promises);
`await b.screenshot(path)` writes a PNG. Every console error, uncaught exception and
error-level log entry (a failed fetch, a CSP refusal) is collected in `b.errors` as text.
The browser is stopped by its PID when the block ends.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import aiohttp

from tests.helpers.processes import free_port

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars")


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


class Browser:
    def __init__(self, tmp: Path, size: tuple[int, int] = (1280, 1100)) -> None:
        self.tmp = Path(tmp)
        self.size = size
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.session: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.errors: list[str] = []
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._events: dict[str, asyncio.Event] = {}
        self._reader: asyncio.Task | None = None

    async def __aenter__(self) -> Browser:
        path = chromium()
        assert path, "no chromium (apt-get install -y chromium)"
        log = open(self.tmp / "chromium.log", "wb")  # noqa: SIM115 (closed with the process)
        self.proc = subprocess.Popen(
            [path, *FLAGS, f"--remote-debugging-port={self.port}",
             f"--user-data-dir={self.tmp / 'chromium-profile'}",
             f"--window-size={self.size[0]},{self.size[1]}", "about:blank"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        self.session = aiohttp.ClientSession()
        try:
            ws_url = await self._page_target()
            self.ws = await self.session.ws_connect(ws_url, max_msg_size=64 << 20)
            self._reader = asyncio.create_task(self._read())
            for domain in ("Runtime", "Log", "Page"):
                await self.call(f"{domain}.enable")
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def _page_target(self) -> str:
        url = f"http://127.0.0.1:{self.port}/json/list"
        for _ in range(200):
            with contextlib.suppress(aiohttp.ClientError, ValueError):
                async with self.session.get(url) as r:  # type: ignore[union-attr]
                    for t in await r.json():
                        if t.get("type") == "page":
                            return t["webSocketDebuggerUrl"]
            assert self.proc is not None and self.proc.poll() is None, \
                (self.tmp / "chromium.log").read_text(errors="replace")[-2000:]
            await asyncio.sleep(0.1)
        raise AssertionError("chromium's DevTools port never listed a page")

    async def _read(self) -> None:
        async for msg in self.ws:  # type: ignore[union-attr]
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            m = json.loads(msg.data)
            if "id" in m:
                fut = self._waiting.pop(m["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(m)
                continue
            method, p = m.get("method", ""), m.get("params", {})
            if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                self.errors.append("console: " + " ".join(
                    str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
            elif method == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                self.errors.append("exception: " + str(
                    d.get("exception", {}).get("description") or d.get("text")))
            elif method == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                e = p["entry"]
                self.errors.append(f"log: {e.get('text')} ({e.get('url', '')})")
            if method in self._events:
                self._events[method].set()

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        i = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._waiting[i] = fut
        await self.ws.send_str(json.dumps({"id": i, "method": method, "params": params}))
        m = await asyncio.wait_for(fut, 30)
        assert "error" not in m, f"{method}: {m['error']}"
        return m.get("result", {})

    async def goto(self, url: str, timeout: float = 20.0) -> None:
        loaded = self._events["Page.loadEventFired"] = asyncio.Event()
        await self.call("Page.navigate", url=url)
        await asyncio.wait_for(loaded.wait(), timeout)

    async def eval(self, expression: str) -> Any:
        r = await self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                            awaitPromise=True)
        assert "exceptionDetails" not in r, f"{expression}: {r['exceptionDetails']}"
        return r["result"].get("value")

    async def screenshot(self, path: Path) -> Path:
        r = await self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(r["data"]))
        return path

    async def __aexit__(self, *exc: object) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self.ws is not None:
            await self.ws.close()
        if self.session is not None:
            await self.session.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
