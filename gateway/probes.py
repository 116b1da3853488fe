"""Active probes of local endpoints: TCP connect or HTTP GET. (Remote gateways are probed with
PING over their pooled link: mux.LinkPool.ping.)

Each probe loop belongs to the runtime's task group and feeds results into the HealthBook; the
decisions (thresholds, hysteresis) are health.py's. A probe never raises: every failure is a
`False` result, logged at debug level with the reason.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from .router import HealthBook

log = logging.getLogger("isthmus.gateway.probes")


async def tcp_check(host: str, port: int, timeout: float) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError) as e:
        log.debug("tcp probe %s:%s failed: %s", host, port, e or "timeout")
        return False
    writer.close()
    return True


async def http_check(host: str, port: int, path: str, timeout: float) -> bool:
    """GET path over HTTP/1.1; healthy on any 2xx/3xx status line within the timeout."""

    async def go() -> bool:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            line = await reader.readline()
            parts = line.split(b" ", 2)
            return len(parts) >= 2 and parts[0].startswith(b"HTTP/1.") and parts[1][:1] in (b"2", b"3")
        finally:
            writer.close()

    try:
        return await asyncio.wait_for(go(), timeout)
    except (OSError, TimeoutError, ValueError) as e:
        log.debug("http probe %s:%s%s failed: %s", host, port, path, e or "timeout")
        return False


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
