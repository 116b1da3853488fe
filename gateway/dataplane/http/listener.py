"""The HTTP import listener: an import with `protocol: http` (host.py: its routes, counters and
access log).

It accepts like the TCP import listener (l4.Listener: connection limit, idle sweeper, drain on
reload and restart) and puts an HTTP `Session` (session.py) on each accepted connection instead
of dialling at once. The upstream keep-alive pool (upstream.Pool) is the listener's; its
sweeper runs while it serves.
"""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import Mapping
from typing import Any

from federation.model import ServiceKey
from gateway.core import routes as rt
from gateway.dataplane.dial import Dialer
from gateway.dataplane.http.host import DEFAULT_LIMITS, HttpHost, HttpLimits
from gateway.dataplane.http.session import Session
from gateway.dataplane.l4 import Listener
from gateway.dataplane.legs import ImportLeg


class HttpImportListener(Listener, HttpHost):
    """HTTP/1.1 from local apps for one imported service (see the module docstring)."""

    def __init__(self, service: ServiceKey, routes: rt.CompiledRoutes,
                 routers: Mapping[ServiceKey, Any], dialer: Dialer, *, max_connections: int,
                 idle_timeout: float, limits: HttpLimits = DEFAULT_LIMITS,
                 access_log: bool = False, rng: random.Random | None = None) -> None:
        Listener.__init__(self, f"import {service}", max_connections, idle_timeout)
        HttpHost.__init__(self, service, routes, routers, dialer, limits, access_log, rng)
        self._pool_sweeper: asyncio.Task | None = None

    spawn = Listener.spawn

    async def start(self, host: str, port: int, reuse_port: bool = False, *,
                    sock: socket.socket | None = None, serving: bool = True) -> None:
        kw = {"reuse_port": reuse_port} if sock is None else {}
        await self.start_server(lambda: ImportLeg(self), host, port, sock=sock, serving=serving,
                                **kw)
        self._pool_sweeper = self.loop.create_task(self._keep())  # type: ignore[union-attr]

    async def _keep(self) -> None:
        """Every second: the upstream pool's idle connections, and request heads awaited past
        limits.http_header_timeout (408)."""
        loop = self.loop
        while True:
            await asyncio.sleep(1.0)
            self.pool.sweep(loop.time())  # type: ignore[union-attr]
            timeout = self.header_timeout
            if timeout:
                for leg in list(self.legs):
                    session = leg.other
                    if isinstance(session, Session):
                        session.head_timed_out(timeout)

    # -- l4.Listener / legs.Host ---------------------------------------------------------------
    def made(self, leg: ImportLeg) -> None:
        if self.admit(leg):
            leg.attach(Session(leg, self))  # type: ignore[arg-type]

    def lost(self, leg: ImportLeg) -> None:
        self.forget(leg)

    def counters(self) -> dict[str, Any]:
        return {**super().counters(), "http": self.http_counters()}

    async def close(self) -> None:
        if self._pool_sweeper is not None:
            self._pool_sweeper.cancel()
        self.pool.close()
        await super().close()
