"""Talking to things from a test: one-line requests, HTTP GETs, metric samples, polling, and
`LoadStream`, a bounded stream of new connections at a fixed rate (each one line and its reply).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp


async def request(port: int, line: str = "ping", timeout: float = 3.0) -> str:
    """One connection to 127.0.0.1:port: send a line, return the reply line (stripped)."""

    async def go() -> str:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(line.encode() + b"\n")
            reply = await reader.readline()
            if not reply:
                raise ConnectionError("closed without a reply")
            return reply.decode().strip()
        finally:
            writer.transport.abort()

    return await asyncio.wait_for(go(), timeout)


async def http_get(port: int, path: str, timeout: float = 3.0) -> tuple[int, str]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
        async with s.get(f"http://127.0.0.1:{port}{path}") as r:
            return r.status, await r.text()


async def http_json(port: int, path: str, timeout: float = 3.0) -> Any:
    status, text = await http_get(port, path, timeout)
    if status != 200:
        raise AssertionError(f"GET :{port}{path} -> {status}: {text[:200]}")
    return json.loads(text)


def metric_value(text: str, name: str, labels: str = "") -> float:
    """Sum of the samples of `name` (optionally those whose label text contains `labels`)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if key == name or (key.startswith(name + "{") and labels in key):
            total += float(value)
    return total


async def wait_for(predicate, timeout: float, interval: float = 0.05,
                   what: str = "condition") -> float:
    """Poll an async or sync predicate until truthy; returns the seconds it took."""
    started = time.monotonic()
    last: Any = None
    while True:
        try:
            res = predicate()
            if asyncio.iscoroutine(res):
                res = await res
            if res:
                return time.monotonic() - started
        except Exception as e:  # not up yet, connection refused, ...
            last = e
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}"
                                 + (f" (last error: {last!r})" if last else ""))
        await asyncio.sleep(interval)


async def chatter(port: int, stop: asyncio.Event, log: list[tuple[float, str | None]]) -> None:
    """One long-lived connection: a line every 200 ms, every reply logged (None = failure)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while not stop.is_set():
            try:
                writer.write(b"tick\n")
                reply = await asyncio.wait_for(reader.readline(), 2.0)
            except (OSError, TimeoutError) as e:
                log.append((time.monotonic(), f"error {e!r}"))
                return
            log.append((time.monotonic(), reply.decode().strip() or "EOF"))
            if not reply:
                return
            await asyncio.sleep(0.2)
    finally:
        writer.transport.abort()


async def chatter_rounds(port: int, stop: asyncio.Event, log: list[tuple[float, str | None]],
                         each: float) -> None:
    """`chatter` connections one after another, each `each` seconds long, until `stop`: long-lived
    connections within what a link guarantees them (about half the SVID lifetime)."""
    while not stop.is_set():
        done = asyncio.Event()
        timer = asyncio.get_running_loop().call_later(each, done.set)
        watch = asyncio.create_task(stop.wait())
        watch.add_done_callback(lambda _, d=done: d.set())
        try:
            await chatter(port, done, log)
        finally:
            timer.cancel()
            watch.cancel()
        if log and (log[-1][1] is None or log[-1][1] == "EOF" or str(log[-1][1]).startswith(
                "error")):
            return


async def count_through(port: int, n: int) -> str:
    """One connection: send `n` bytes, half-close, return the reply line (stripped)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        chunk = bytes(range(256)) * 256  # 64 KiB
        sent = 0
        while sent < n:
            piece = chunk[: min(len(chunk), n - sent)]
            writer.write(piece)
            sent += len(piece)
            await writer.drain()
        writer.write_eof()  # half-close: we still read the reply
        reply = await asyncio.wait_for(reader.read(), 10.0)
        return reply.decode().strip()
    finally:
        writer.transport.abort()


@dataclass
class Conn:
    started: float
    ended: float = 0.0
    reply: str | None = None
    error: str | None = None


@dataclass
class LoadStream:
    """New connections at `rate`/s to one port, each sending a line and reading the reply.
    Bounded by `max_count` connections and `max_seconds`; `stop()` waits for the last ones."""

    port: int
    rate: float = 50.0
    max_seconds: float = 30.0
    max_count: int = 2000
    timeout: float = 3.0
    conns: list[Conn] = field(default_factory=list)
    _task: asyncio.Task | None = None
    _inflight: set = field(default_factory=set)

    def start(self) -> LoadStream:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def _one(self, c: Conn) -> None:
        try:
            c.reply = await request(self.port, "ping", self.timeout)
        except Exception as e:
            c.error = f"{type(e).__name__}: {e}"
        c.ended = time.monotonic()

    async def _run(self) -> None:
        began = time.monotonic()
        step = 1.0 / self.rate
        n = 0
        while n < self.max_count and time.monotonic() - began < self.max_seconds:
            c = Conn(time.monotonic())
            self.conns.append(c)
            t = asyncio.get_running_loop().create_task(self._one(c))
            self._inflight.add(t)
            t.add_done_callback(self._inflight.discard)
            n += 1
            await asyncio.sleep(max(0.0, began + n * step - time.monotonic()))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=self.timeout + 2)

    def done(self) -> list[Conn]:
        return [c for c in self.conns if c.ended]

    @property
    def failed(self) -> list[Conn]:
        return [c for c in self.done() if c.reply is None]

    def first_served_by(self, cluster: str, after: float) -> float | None:
        """Seconds from `after` until the first reply from `cluster` that ended after it."""
        ends = [c.ended for c in self.done() if c.reply == cluster and c.ended > after]
        return min(ends) - after if ends else None

    def last_reply(self) -> str | None:
        done = sorted(self.done(), key=lambda c: c.ended)
        return done[-1].reply if done else None

    def counts(self, since: float = 0.0) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.done():
            if c.started >= since:
                k = c.reply or "FAILED"
                out[k] = out.get(k, 0) + 1
        return out
