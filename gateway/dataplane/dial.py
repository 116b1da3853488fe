"""Dialing and connect-time failover: the up leg of a proxied connection.

Theory of operation
-------------------
While connecting, the down leg buffers what the client sends (legs.PENDING_LIMIT). Connecting
(`connect_first`) walks the router's plan — the ordered candidates the pure core chose — and
reports each attempt back (outlier detection). A refused, reset or timed-out attempt, or a
remote gateway answering ERR or nothing, moves on to the next candidate with the same client
connection, so a dead endpoint costs the client nothing but the time to try it. Only when every
attempt failed is the client connection closed (counted). One attempt is the `Dialer`'s: plain
TCP to a local endpoint, or a stream on the pooled link to a remote gateway (pool.py, mux.py).

What connect-time failover cannot save: once committed, a connection belongs to its upstream.
If that process then dies or hangs, the connection fails: the bytes it already took cannot be
replayed elsewhere at L4. A stopped process even completes handshakes (its kernel does), so its
connects succeed; `outlier_detection.response_timeout` (off by default) is the passive signal
for that case: the up leg to a local endpoint is then a `WatchedLeg` (legs.py; health.py,
"Response timeout"), and an endpoint silent for that long after the client's first bytes is
reported failed (ejecting it from new connections), and its connection is reset and counted as
a response timeout instead of as served.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from federation.errors import IdentityError
from federation.logs import quote
from federation.model import ServiceKey
from gateway.core.balance import Target
from gateway.dataplane.legs import Leg, PlainLeg, WatchedLeg
from gateway.dataplane.pool import LinkPool
from gateway.errors import DialError, StreamRefused

log = logging.getLogger("isthmus.gateway.l4")


class Router(Protocol):
    def plan(self) -> list[Target]: ...

    def report(self, target: Target, ok: bool) -> None: ...

    @property
    def response_timeout(self) -> float | None: ...


@dataclass
class ListenerStats:
    """Plain counters, read by /metrics. Attempts/failovers count dials, not connections."""

    accepted: int = 0
    active: int = 0
    failed: int = 0  # client connections closed because no candidate could be reached
    refused_limit: int = 0
    attempts: int = 0
    attempt_failures: int = 0
    idle_closed: int = 0
    served_by: dict[str, int] = field(default_factory=dict)  # target key -> connections
    # target key -> connections reset because the upstream never answered (response_timeout)
    response_timeouts_by: dict[str, int] = field(default_factory=dict)

    def served(self, key: str) -> None:
        self.served_by[key] = self.served_by.get(key, 0) + 1

    def response_timed_out(self, key: str) -> None:
        self.response_timeouts_by[key] = self.response_timeouts_by.get(key, 0) + 1


class Dialer:
    """Makes one connect attempt to a target: a local endpoint (plain TCP), or a stream to a
    remote gateway over the pooled mutual-TLS link (OPEN, then wait for OK). The whole attempt
    — dialling the link if there is none yet, then the OK — gets one `connect_timeout`."""

    def __init__(self, tls: Any, connect_timeout: float, pool: LinkPool | None = None) -> None:
        self.tls = tls
        self.connect_timeout = connect_timeout
        self.pool = pool if pool is not None else LinkPool(tls, connect_timeout)
        self._loop: asyncio.AbstractEventLoop | None = None  # of the first dial (pool's too)

    async def dial(self, target: Target, service: ServiceKey) -> Leg:
        if not target.remote:
            return await self.dial_local(target)
        loop = asyncio.get_running_loop()
        timeout = self.connect_timeout
        try:
            deadline = loop.time() + timeout
            link = await asyncio.wait_for(
                self.pool.link(target.locality.cluster, target.host, target.port), timeout
            )
            stream = link.open_stream(str(service))
            try:
                left = max(0.0, deadline - loop.time())
                await asyncio.wait_for(asyncio.shield(stream.ready), left)
            except BaseException:
                stream.ready.add_done_callback(_consume)
                stream.close()  # timed out or our client left: RST, the answerer lets it go
                raise
            return stream
        except TimeoutError:
            raise DialError(f"{target.key}: connect timed out after {timeout:g}s") from None
        except StreamRefused as e:
            raise DialError(f"{target.key}: remote gateway refused: {e}") from None
        except (OSError, ssl.SSLError, IdentityError) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else e
            raise DialError(f"{target.key}: {why}") from None
        except LookupError as e:  # no bundle/context for that cluster
            raise DialError(f"{target.key}: {e}") from None

    async def dial_local(self, target: Target, leg: Callable[[], PlainLeg] = PlainLeg) -> PlainLeg:
        """Plain TCP to a local endpoint. The hot path of new connections: instead of
        `wait_for` (a second Task, a future and a timer per attempt), one timer cancels the
        task that dials; the cancellation it caused is taken back (uncancel) and reported as
        a timeout, while any other cancellation (the client left, the listener closes) goes on.
        (Timers shared by many dials measured no faster: the timer is not what costs.)"""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        timeout = self.connect_timeout
        expiry = _Expiry(task)
        handle = loop.call_later(timeout, expiry)
        try:
            _, up = await loop.create_connection(leg, target.host, target.port)
            return up
        except asyncio.CancelledError:
            if expiry.fired and task.uncancel() == 0:
                raise DialError(f"{target.key}: connect timed out after {timeout:g}s") from None
            raise
        except OSError as e:
            raise DialError(f"{target.key}: {e.strerror or e}") from None
        finally:
            handle.cancel()


class _Expiry:
    """The connect timeout of one local dial: cancels the dialling task, once, and says so."""

    __slots__ = ("task", "fired")

    def __init__(self, task: asyncio.Task) -> None:
        self.task = task
        self.fired = False

    def __call__(self) -> None:
        self.fired = True
        self.task.cancel()


def _consume(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()


async def connect_first(
    router: Router, dialer: Dialer, service: ServiceKey, stats: ListenerStats,
    response_timeout: float | None = None,
) -> tuple[Target, Leg] | None:
    """Try the router's plan in order; report every attempt; first success wins. With a
    response_timeout, a local endpoint gets a WatchedLeg and its connect is no result yet: the
    caller commits the leg, which reports the endpoint's answer (or silence) instead."""
    local = PlainLeg if response_timeout is None else WatchedLeg
    for target in router.plan():
        stats.attempts += 1
        try:
            # dial_local directly: one coroutine less on the hot path of new local connections
            leg = await (dialer.dial(target, service) if target.remote
                         else dialer.dial_local(target, local))
        except DialError as e:
            stats.attempt_failures += 1
            router.report(target, False)
            log.debug("attempt failed: %s", quote(e))
            continue
        if local is PlainLeg or target.remote:
            router.report(target, True)
        return target, leg
    return None
