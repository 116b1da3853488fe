"""The answering side of a `protocol: http` export: HTTP sessions on inbound streams.

When another cluster's gateway opens a stream to one of our exports whose protocol is http, the
inbound listener (l4.InboundListener) does not connect the stream to one endpoint for its whole
life, as for TCP: it puts an HTTP `Session` on it (session.py), so each request on the stream is
a hop of its own here — a new span in its trace, a pooled keep-alive connection to a healthy
local endpoint chosen per request (the export's router), the counters and access log of this
side. The calling gateway keeps the stream open between requests (its pool), so a stream is
a keep-alive connection between the two gateways.

The stream is accepted (OK) only while the export's router has a target to try, so a cluster
with no endpoint left is refused at OPEN and the caller moves to its next candidate, as for TCP.
"""

from __future__ import annotations

import asyncio
from typing import Any

from federation.model import ServiceKey
from gateway.core import routes as rt
from gateway.dataplane.dial import Dialer, ListenerStats
from gateway.dataplane.http.host import HttpHost, HttpLimits


class ExportHttp(HttpHost):
    """The session.Host of one http export on the inbound listener (see the module docstring):
    no routes (everything goes to the export's own endpoints); the owner's loop, tasks and
    connection counters."""

    def __init__(self, service: ServiceKey, router: Any, dialer: Dialer, limits: HttpLimits,
                 owner: Any, access_log: bool) -> None:
        super().__init__(service, rt.compile_routes(()), {service: router}, dialer, limits,
                         access_log, None)
        self.name = f"export {service}"
        self.default = rt.Decision(rt.PROXY, self.name, service)  # its counters' route label
        self.owner = owner  # the InboundListener: its loop, tasks, counters and span sink
        self.spans = owner.spans
        self.export_router = router

    @property
    def loop(self) -> asyncio.AbstractEventLoop:  # type: ignore[override]
        return self.owner.loop

    @property
    def stats(self) -> ListenerStats:  # type: ignore[override]
        return self.owner.stats

    def spawn(self, coro: Any) -> asyncio.Task:
        return self.owner.spawn(coro)
