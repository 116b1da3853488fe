"""The gateway's Aggregated Discovery Service (state of the world), on grpcio's asyncio server.

One `XdsServer` holds the current `Snapshot` (resources.py). Each ADS stream keeps, per type:
the names it subscribed to (empty for Listener and Cluster = all of them), the version and
nonce last sent, and the version it last ACKed. A request that echoes our last nonce is an ACK
(its version becomes the acked one; the time since that version's catalog change is observed)
or, with `error_detail`, a NACK: logged (rate-limited, the detail quoted), counted, and the
client keeps its last good version — the same version is not sent again, the next change is.
A request with a stale nonce is ignored (a response is in flight). A stream gets a response for
a type when it asks for new names or when that type's content in the snapshot changed.

Pushes are coalesced by `Pusher`: changes mark the snapshot stale; it is rebuilt ~100 ms after
the first change of a burst (at most 1 s after it while changes keep coming), then every stream
is woken once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from federation.logs import LogLimiter, quote
from gateway.xds.resources import CLUSTER, LISTENER, TYPES, Snapshot

log = logging.getLogger("isthmus.gateway.xds")

WILDCARD_TYPES = (LISTENER, CLUSTER)
MAX_NAMES = 10_000  # resource names one stream may subscribe to, per type
DEBOUNCE, MAX_DELAY = 0.1, 1.0


class XdsStats:
    def __init__(self) -> None:
        self.streams = 0
        self.pushes: Counter[str] = Counter()  # by type URL
        self.acks = 0
        self.nacks: Counter[str] = Counter()
        self.ack_seconds: list[float] = []  # catalog change -> ACK, the latest 1000

    def ack(self, seconds: float) -> None:
        self.acks += 1
        self.ack_seconds.append(seconds)
        if len(self.ack_seconds) > 1000:
            del self.ack_seconds[:500]


class _Stream:
    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.names: dict[str, set[str] | None] = {}  # type -> names (None: wildcard)
        self.sent: dict[str, tuple[str, str]] = {}  # type -> (version, nonce)
        self.acked: dict[str, str] = {}
        self.wanted: set[str] = set()  # types to (re)send now
        self.wake = asyncio.Event()
        self.node = ""


class XdsServer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.changed_at: dict[str, float] = {t: time.monotonic() for t in TYPES}
        self.streams: set[_Stream] = set()
        self.stats = XdsStats()
        self.events = LogLimiter(log, interval=30.0, burst=3)
        self._nonce = itertools.count(1)
        self.server: grpc.aio.Server | None = None
        self.port = 0

    # -- snapshot ------------------------------------------------------------------------------
    def update(self, snap: Snapshot) -> None:
        now = time.monotonic()
        changed = [t for t in TYPES if snap.versions.get(t) != self.snapshot.versions.get(t)]
        self.snapshot = snap
        for t in changed:
            self.changed_at[t] = now
        if changed:
            for s in self.streams:
                s.wanted.update(t for t in changed if t in s.names)
                s.wake.set()

    # -- serving -------------------------------------------------------------------------------
    async def start(self, host: str, port: int) -> None:
        self.server = grpc.aio.server(options=[("grpc.so_reuseport", 0),
                                               ("grpc.max_concurrent_streams", 1000)])
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"cannot listen on {host}:{port}")
        await self.server.start()

    async def close(self) -> None:
        if self.server is not None:
            await self.server.stop(0.5)
            self.server = None

    async def StreamAggregatedResources(  # noqa: N802 - the gRPC method's name
            self, request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest],
            context: Any) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        stream = _Stream(context.peer())
        self.streams.add(stream)
        self.stats.streams += 1
        reader = asyncio.ensure_future(self._read(stream, request_iterator))
        try:
            while not reader.done():
                waiter = asyncio.ensure_future(stream.wake.wait())
                await asyncio.wait({reader, waiter}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                stream.wake.clear()
                for t in [t for t in TYPES if t in stream.wanted]:
                    stream.wanted.discard(t)
                    yield self._response(stream, t)
        finally:
            reader.cancel()
            self.streams.discard(stream)

    async def _read(self, stream: _Stream, requests: AsyncIterator[Any]) -> None:
        async for req in requests:
            self._request(stream, req)

    def _request(self, stream: _Stream, req: discovery_pb2.DiscoveryRequest) -> None:
        t = req.type_url
        if t not in TYPES:
            self.events.warning(f"type:{t[:80]}", "xDS client %s asked for unknown type %s",
                                quote(stream.peer), quote(t))
            return
        if req.node.id:
            stream.node = req.node.id
        sent = stream.sent.get(t)
        if req.response_nonce:
            if sent is None or req.response_nonce != sent[1]:
                return  # about an older response: the newer one answers it
            if req.HasField("error_detail"):
                self.stats.nacks[t] += 1
                self.events.warning(f"nack:{stream.peer}", "xDS client %s (%s) NACKed %s "
                                    "version %s: %s; it keeps its last good version %s",
                                    quote(stream.peer), quote(stream.node), t.rsplit(".", 1)[-1],
                                    sent[0], quote(req.error_detail.message[:300]),
                                    stream.acked.get(t, "none"))
            else:
                stream.acked[t] = sent[0]
                self.stats.ack(time.monotonic() - self.changed_at.get(t, time.monotonic()))
        names = set(list(req.resource_names)[:MAX_NAMES])
        want: set[str] | None = None if (not names and t in WILDCARD_TYPES) else names
        if t not in stream.names or stream.names[t] != want:
            stream.names[t] = want
            stream.wanted.add(t)
            stream.wake.set()

    def _response(self, stream: _Stream, t: str) -> discovery_pb2.DiscoveryResponse:
        snap, want = self.snapshot, stream.names.get(t)
        by_name = snap.resources.get(t, {})
        picked = [a for n, a in sorted(by_name.items()) if want is None or n in want]
        nonce = str(next(self._nonce))
        version = snap.versions.get(t, "")
        stream.sent[t] = (version, nonce)
        self.stats.pushes[t] += 1
        return discovery_pb2.DiscoveryResponse(version_info=version, resources=picked,
                                               type_url=t, nonce=nonce)

    def describe(self) -> dict[str, Any]:
        acks = sorted(self.stats.ack_seconds)
        return {
            "listen": self.port,
            "clients": [{"peer": s.peer, "node": s.node,
                         "acked": {t.rsplit(".", 1)[-1]: v for t, v in s.acked.items()}}
                        for s in self.streams],
            "versions": {t.rsplit(".", 1)[-1]: v for t, v in self.snapshot.versions.items()},
            "pushes": sum(self.stats.pushes.values()), "acks": self.stats.acks,
            "nacks": sum(self.stats.nacks.values()),
            "change_to_ack_p50_seconds": acks[len(acks) // 2] if acks else None,
        }


class Pusher:
    """Coalesces changes into snapshot rebuilds: `mark()` on every change; `run()` rebuilds
    DEBOUNCE after the first mark of a burst (MAX_DELAY at most) and hands it to the server."""

    def __init__(self, server: XdsServer, build: Callable[[], Snapshot]) -> None:
        self.server = server
        self.build = build
        self.dirty = asyncio.Event()
        self.rebuilds = 0

    def mark(self) -> None:
        self.dirty.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.dirty.wait()
            first = loop.time()
            self.dirty.clear()
            await asyncio.sleep(DEBOUNCE)
            while self.dirty.is_set() and loop.time() - first < MAX_DELAY:
                self.dirty.clear()
                await asyncio.sleep(DEBOUNCE)
            try:
                snap = self.build()
            except Exception:  # noqa: BLE001 - a bad build keeps the last good snapshot
                log.exception("xDS: building the resources failed; clients keep the last ones")
                continue
            self.server.update(snap)
            self.rebuilds += 1
