"""Active probes of local endpoints: TCP connect (optionally send/expect) or HTTP GET. (Remote
gateways are probed with PING over their pooled link: pool.LinkPool.ping.)

What each check proves, against a process that is stopped (SIGSTOP) or wedged: its kernel still
completes the TCP handshake from the listen backlog and takes the bytes we send, so

- `tcp` without `expect` proves only that the kernel accepts: it stays healthy;
- `tcp` with `expect` (after an optional `send`, like HAProxy's tcp-check) and `http` need the
  app to answer: nothing comes back, so the check fails when its timeout runs out.

The whole check (connect, send, read) gets one `timeout`. Replies are read up to REPLY_LIMIT
bytes: `expect` must appear within them (a substring anywhere in them, not only at the start).
An `http` check sends `GET path HTTP/1.1` (Connection: close) and reads the status line only;
it is healthy on a status in 200 .. healthy_status_below - 1 (config.HealthCheck: 2xx/3xx with
a configured path, anything below 500 for the implied /healthz).

Each probe loop belongs to the runtime's task group and feeds results into the HealthBook; the
decisions (thresholds, hysteresis) are health.py's. A probe never raises: every failure is a
`False` result, logged at debug level with the reason.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from federation.units import format_hostport
from gateway.config.schema import HealthCheck
from gateway.core.health import HealthBook

log = logging.getLogger("isthmus.gateway.probes")

REPLY_LIMIT = 16 * 1024  # bytes of a reply a check reads at most (HAProxy's check buffer size)


class _Failed(Exception):
    """A check got an answer that is not healthy; the message says what."""


async def _exchange(host: str, port: int, timeout: float, talk) -> bool:
    """Connect, run `talk(reader, writer)` and close, all within `timeout`; never raises."""

    async def go() -> bool:
        reader, writer = await asyncio.open_connection(host, port, limit=REPLY_LIMIT)
        try:
            await talk(reader, writer)
            return True
        finally:
            writer.close()

    try:
        return await asyncio.wait_for(go(), timeout)
    except TimeoutError:
        log.debug("probe %s failed: no answer within %gs", format_hostport(host, port), timeout)
    except (OSError, ValueError, asyncio.IncompleteReadError, _Failed) as e:
        log.debug("probe %s failed: %s", format_hostport(host, port), e)
    return False


async def tcp_check(
    host: str, port: int, timeout: float, send: bytes | None = None, expect: bytes | None = None
) -> bool:
    """Connect; then, if given, write `send`; then, if given, read until `expect` shows up in the
    reply (healthy), the peer closes, or REPLY_LIMIT bytes came without it (unhealthy)."""

    async def talk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if send:
            writer.write(send)
        if not expect:
            return
        got = bytearray()
        while len(got) < REPLY_LIMIT:
            chunk = await reader.read(REPLY_LIMIT - len(got))
            if not chunk:
                raise _Failed(f"closed after {len(got)} bytes without {expect!r}")
            start = max(0, len(got) - len(expect) + 1)
            got += chunk
            if got.find(expect, start) >= 0:
                return
        raise _Failed(f"no {expect!r} in the first {REPLY_LIMIT} bytes of the reply")

    return await _exchange(host, port, timeout, talk)


async def http_check(
    host: str, port: int, path: str, timeout: float, healthy_status_below: int = 400
) -> bool:
    """GET path over HTTP/1.1; healthy on a status line with 200 <= status <
    healthy_status_below within the timeout."""
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {format_hostport(host, port)}\r\n"
        "User-Agent: isthmus-health-check\r\nConnection: close\r\n\r\n"
    ).encode()

    async def talk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(request)
        line = await reader.readline()
        parts = line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise _Failed(f"not an HTTP status line: {bytes(line[:80])!r}")
        status = int(parts[1])
        if not 200 <= status < healthy_status_below:
            raise _Failed(f"GET {path} answered {status}")

    return await _exchange(host, port, timeout, talk)


def checker(hc: HealthCheck, host: str, port: int) -> Callable[[], Awaitable[bool]]:
    """The check `hc` describes, of one endpoint, as a coroutine function for probe_loop."""
    if hc.kind == "http":
        path = hc.path or "/"
        return lambda: http_check(host, port, path, hc.timeout, hc.healthy_status_below)
    return lambda: tcp_check(host, port, hc.timeout, hc.send, hc.expect)


async def probe_loop(
    book: HealthBook,
    key: str,
    check: Callable[[], Awaitable[bool]],
    interval: float,
    healthy_threshold: int,
    unhealthy_threshold: int,
    clock: Callable[[], float],
) -> None:
    """Probe forever (until cancelled), `interval` apart start to start."""
    while True:
        started = clock()
        ok = await check()
        book.probe(key, ok, clock(), healthy_threshold, unhealthy_threshold)
        await asyncio.sleep(max(0.0, interval - (clock() - started)))
