"""The caller side of multiplexed east-west links: one `MuxLink` per peer gateway.

`LinkPool.link` returns the usable link to a peer, dialling it (mutual TLS, verified once at the
handshake) on first use or after it was lost; concurrent callers share one dial. `LinkPool.ping`
is the liveness probe of a peer gateway (probes.py). The links, streams and flow control
themselves are gateway/dataplane/mux.py's.

Lifecycle (gateway/core/links.py decides, `sweep` acts; `keep_links` runs the sweeps of the
pool and of the inbound listener whenever the TLS material changes and about once a second):

* replace: make-before-break. The old link keeps taking new streams while the new one is
  dialled; once the new one is up it takes the old one's place and the old one is retired (no
  new streams; it closes after its last stream). A failed dial leaves the old link in place and
  is tried again on the next sweep. An answerer's GOAWAY retires a link at once (that is what
  it asks), and the new link is dialled right away.
* close: the link is aborted now, its streams reset; counted by reason (`LinkStats`), one
  rate-limited log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from federation.logs import LogLimiter, quote
from gateway.core.links import Action
from gateway.dataplane.mux import MuxLink

log = logging.getLogger("isthmus.gateway.mux")
limited = LogLimiter(log)

SWEEP_INTERVAL = 1.0  # links are judged this often, and whenever the TLS material changes
EXPIRY_MARGIN = SWEEP_INTERVAL + 0.5  # a link is closed this long before a certificate expires


@dataclass
class LinkStats:
    """Counters of one side's links (/metrics): replacements and closes by reason."""

    replaced: dict[str, int] = field(default_factory=dict)  # caller: reason -> links replaced
    closed: dict[str, int] = field(default_factory=dict)  # reason -> links aborted
    streams_reset: int = 0  # streams still open on a link that was aborted

    def count(self, table: dict[str, int], reason: str) -> None:
        table[reason] = table.get(reason, 0) + 1

    def to_json(self) -> dict[str, Any]:
        return {"replaced": dict(self.replaced), "closed": dict(self.closed),
                "streams_reset": self.streams_reset}


def close_link(link: MuxLink, reason: str, stats: LinkStats) -> None:
    """Abort a link the core said to close now, with its counters and one log line."""
    peer = link.facts.peer if link.facts is not None else link.peer
    n = link.close_now()
    stats.count(stats.closed, reason)
    stats.streams_reset += n
    limited.warning(f"link-closed-{reason}", "%s link with cluster %s closed now (%s): "
                    "%d stream(s) reset", link.role, quote(peer), reason, n)


class LinkPool:
    """The caller side: one link per peer gateway, dialled on first use and re-dialled when lost."""

    def __init__(self, tls: Any, connect_timeout: float) -> None:
        self.tls = tls
        self.connect_timeout = connect_timeout
        self.links: dict[tuple[str, str, int], MuxLink] = {}
        self.dialing: dict[tuple[str, str, int], asyncio.Future] = {}
        self.retired: set[MuxLink] = set()  # replaced links still finishing their streams
        self.stats = LinkStats()

    async def link(self, cluster: str, host: str, port: int) -> MuxLink:
        key = (cluster, host, port)
        link = self.links.get(key)
        if link is not None and link.usable():
            return link
        return await asyncio.shield(self._dialing(key))

    def _dialing(self, key: tuple[str, str, int]) -> asyncio.Future:
        fut = self.dialing.get(key)
        if fut is None:
            fut = asyncio.get_running_loop().create_task(self._dial(key))
            self.dialing[key] = fut
            fut.add_done_callback(lambda f, k=key: self.dialing.pop(k, None))
        return fut

    async def _dial(self, key: tuple[str, str, int]) -> MuxLink:
        cluster, host, port = key
        ctx, verify = self.tls.for_peer(cluster)
        loop = asyncio.get_running_loop()
        ready = loop.create_future()

        def factory() -> MuxLink:
            link = MuxLink("caller", verify=verify, on_lost=lambda lk: self._lost(key, lk),
                           on_goaway=lambda lk: self._replace(key, lk))
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
        if link.closed:  # lost before we got here: in TLS 1.3 the answerer checks our
            # certificate after our side of the handshake is done, and refuses it by closing
            raise ConnectionError("the peer closed the link at once (it refused our SVID?)")
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

    def _replace(self, key: tuple[str, str, int], link: MuxLink) -> None:
        """Dial a successor of `link` (unless one is being dialled); it replaces `link` once
        it is up. A failure leaves `link` as it is: the next sweep tries again."""
        if self.links.get(key) is not link or key in self.dialing:
            return
        fut = self._dialing(key)
        fut.add_done_callback(lambda f: self._replaced(f, key, link))

    def _replaced(self, fut: asyncio.Future, key: tuple[str, str, int], old: MuxLink) -> None:
        """The successor of `old` is up (counted by the reason), or could not be dialled."""
        if fut.cancelled():
            return
        e = fut.exception()
        if e is None:
            self.stats.count(self.stats.replaced, old.replacing or old.goaway or "unknown")
        else:
            _dial_failed(e, key, old)

    def sweep(self) -> None:
        """Judge every link (gateway/core/links.py) and do what it says."""
        judge = self.tls.judge
        for key, link in list(self.links.items()):
            if link.facts is None or link.closed:
                continue
            verdict = judge(link.facts, EXPIRY_MARGIN)
            if verdict.action is Action.CLOSE:
                close_link(link, verdict.reason, self.stats)
            elif verdict.action is Action.REPLACE or link.retired:
                if not link.replacing:
                    link.replacing = verdict.reason or link.goaway
                    limited.info(f"link-replace-{link.replacing}", "replacing the link to "
                                 "cluster %s (%s)", quote(link.facts.peer), link.replacing)
                self._replace(key, link)
        for link in list(self.retired):
            if link.facts is not None and not link.closed:
                verdict = judge(link.facts, EXPIRY_MARGIN)
                if verdict.action is Action.CLOSE:
                    close_link(link, verdict.reason, self.stats)

    def describe(self, now: float) -> list[dict[str, Any]]:
        """/status rows of every link (the current ones, then the retired ones)."""
        return [lk.describe(now) for lk in [*self.links.values(), *self.retired]
                if lk.facts is not None]

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


def _dial_failed(e: BaseException, key: tuple[str, str, int], old: MuxLink) -> None:
    why = quote(str(e) or type(e).__name__)
    if old.retired:  # GOAWAY: e.g. the peer is shutting down; the next OPEN dials again
        log.debug("no new link to cluster %s after its GOAWAY: %s", quote(key[0]), why)
    else:
        limited.warning("link-replace-failed", "could not dial a new link to cluster %s "
                        "(%s:%s) yet, the old one stays in use: %s", quote(key[0]), key[1],
                        key[2], why)


class Sweeps(Protocol):
    def sweep(self) -> None: ...


async def keep_links(tls: Any, sides: Iterable[Sweeps], interval: float = SWEEP_INTERVAL) -> None:
    """Judge every link of `sides` (the pool, the inbound listener) whenever the TLS material
    changes (`tls.changed`) and at least every `interval` seconds."""
    sides = list(sides)
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(tls.changed.wait(), interval)
        tls.changed.clear()
        for side in sides:
            side.sweep()
