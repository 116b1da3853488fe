"""The caller side of multiplexed east-west links: one `MuxLink` per peer gateway.

`LinkPool.link` returns the usable link to a peer, dialling it (mutual TLS, verified once at the
handshake) on first use, after it was lost, or after it aged out (mux.MAX_LINK_AGE); concurrent
callers share one dial. A replaced link is retired (no new streams) and closed after its last
stream. `LinkPool.ping` is the liveness probe of a peer gateway (probes.py). The links, streams
and flow control themselves are gateway/dataplane/mux.py's.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from federation.logs import quote
from gateway.dataplane.mux import MuxLink

log = logging.getLogger("isthmus.gateway.mux")


class LinkPool:
    """The caller side: one link per peer gateway, dialled on first use and re-dialled when lost."""

    def __init__(self, tls: Any, connect_timeout: float) -> None:
        self.tls = tls
        self.connect_timeout = connect_timeout
        self.links: dict[tuple[str, str, int], MuxLink] = {}
        self.dialing: dict[tuple[str, str, int], asyncio.Future] = {}
        self.retired: set[MuxLink] = set()  # replaced links still finishing their streams

    async def link(self, cluster: str, host: str, port: int) -> MuxLink:
        key = (cluster, host, port)
        loop = asyncio.get_running_loop()
        link = self.links.get(key)
        if link is not None and link.usable(loop.time()):
            return link
        fut = self.dialing.get(key)
        if fut is None:
            fut = loop.create_task(self._dial(key))
            self.dialing[key] = fut
            fut.add_done_callback(lambda f, k=key: self.dialing.pop(k, None))
        return await asyncio.shield(fut)

    async def _dial(self, key: tuple[str, str, int]) -> MuxLink:
        cluster, host, port = key
        ctx, verify = self.tls.for_peer(cluster)
        loop = asyncio.get_running_loop()
        ready = loop.create_future()

        def factory() -> MuxLink:
            link = MuxLink("caller", verify=verify, on_lost=lambda lk: self._lost(key, lk))
            link.ready = ready
            return link

        transport = None
        try:
            transport, _ = await asyncio.wait_for(
                loop.create_connection(factory, host, port, ssl=ctx, server_hostname=cluster,
                                       ssl_handshake_timeout=self.connect_timeout),
                self.connect_timeout,
            )
            link = await asyncio.wait_for(asyncio.shield(ready), self.connect_timeout)
        except BaseException:
            if transport is not None:
                transport.abort()
            if ready.done() and not ready.cancelled():
                ready.exception()  # consumed: the caller gets the error from this raise
            raise
        old = self.links.get(key)
        self.links[key] = link
        if old is not None and old is not link:
            self.retired.add(old)
            old.retire()
        return link

    def _lost(self, key: tuple[str, str, int], link: MuxLink) -> None:
        self.retired.discard(link)
        if self.links.get(key) is link:
            del self.links[key]

    async def ping(self, cluster: str, host: str, port: int, timeout: float) -> bool:
        """Liveness of a peer gateway: PING over its link (dialled if needed) within timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            link = await asyncio.wait_for(self.link(cluster, host, port), timeout)
        except Exception as e:  # any failure to reach or verify the peer is a failed probe
            log.debug(
                "gateway probe %s (%s:%s) failed: %s",
                cluster,
                host,
                port,
                quote(str(e) or type(e).__name__),
            )
            return False
        return await link.ping(max(0.01, deadline - loop.time()))

    async def close(self) -> None:
        for link in [*self.links.values(), *self.retired]:
            link.transport.abort()
        self.links.clear()
        self.retired.clear()
        for fut in list(self.dialing.values()):
            fut.cancel()
