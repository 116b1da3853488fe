"""Multiplexed-link test harness: two in-process gateways sharing one link, raw link peers
speaking gateway/dataplane/link.py frames by hand, frame builders."""

from __future__ import annotations

import asyncio
import socket
import struct
from types import SimpleNamespace

from federation.model import ServiceKey
from gateway.dataplane import link, mux
from gateway.dataplane.dial import Dialer
from gateway.dataplane.l4 import ImportListener
from gateway.dataplane.pool import LinkPool
from tests.helpers.relay import (
    HOST,
    SERVICE,
    Exports,
    FakeRouter,
    eventually,
    inbound,
    remote_target,
)
from tests.helpers.tls import tls_pair

SLOW = ServiceKey("shop", "slow")
OTHER = ServiceKey("shop", "other")


async def gateways(
    stack,
    services: dict[ServiceKey, int],
    *,
    allowed=("cluster-a",),
    connect_timeout=2.0,
    max_connections=1000,
    idle_timeout=30.0,
):
    """b exports `services` (service -> local backend port); a imports each of them through
    its own ImportListener, all sharing ONE LinkPool (so one link to b)."""
    tls_a, tls_b = tls_pair()
    exports = Exports()
    for svc, port in services.items():
        exports.add(svc, port, allowed)
    b = await inbound(
        stack, tls_b, exports, max_connections=max_connections, idle_timeout=idle_timeout
    )
    pool = LinkPool(tls_a, connect_timeout)
    stack.push_async_callback(pool.close)
    dialer = Dialer(tls_a, connect_timeout, pool)
    imports = {}
    for svc in services:
        lst = ImportListener(
            svc,
            FakeRouter(remote_target(b.port)),
            dialer,
            max_connections=max_connections,
            idle_timeout=idle_timeout,
        )
        await lst.start(HOST, 0)
        stack.push_async_callback(lst.close)
        imports[svc] = lst
    return SimpleNamespace(a=imports, b=b, pool=pool, dialer=dialer, tls_a=tls_a, tls_b=tls_b)


def only_link(pool: LinkPool) -> mux.MuxLink:
    (lk,) = pool.links.values()
    return lk


def answerer_stream(b, sid: int) -> mux.Stream:
    (lk,) = b.links
    return lk.streams[sid]


def reset_connection(writer) -> None:
    """Abort with SO_LINGER 0: the peer sees RST, not FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class Counting:
    """An echo backend that counts its open connections."""

    def __init__(self) -> None:
        self.open = 0
        self.served = 0

    async def __call__(self, reader, writer):
        self.open += 1
        self.served += 1
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            self.open -= 1
            writer.close()


class RawPeer:
    """The far side of a link spoken by hand: collects frames; `script(kind, sid, payload)`
    answers them (through self.send)."""

    def __init__(self, script=None) -> None:
        self.frames: list[tuple[int, int, bytes]] = []
        self.script = script
        self.writer = None
        self.closed = asyncio.Event()
        self.connected = asyncio.Event()

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def kinds(self, sid: int) -> list[str]:
        return [link.NAMES[k] for k, s, _ in self.frames if s == sid]

    async def pump(self, reader) -> None:
        frames = link.FrameReader()
        try:
            while chunk := await reader.read(65536):
                for f in frames.feed(chunk):
                    self.frames.append(f)
                    if self.script is not None:
                        self.script(*f)
        except (ConnectionError, OSError):
            pass
        self.closed.set()

    async def handler(self, reader, writer) -> None:  # as a fake answerer
        self.writer = writer
        self.connected.set()
        await self.pump(reader)
        writer.close()


async def fake_answerer(stack, tls_b, peer: RawPeer) -> int:
    srv = await asyncio.start_server(peer.handler, HOST, 0, ssl=tls_b.server_context)
    stack.push_async_callback(srv.wait_closed)
    stack.callback(srv.close)
    return srv.sockets[0].getsockname()[1]


async def raw_caller(stack, tls_a, port: int, peer: RawPeer):
    ctx, _ = tls_a.for_peer("cluster-b")
    reader, writer = await asyncio.open_connection(HOST, port, ssl=ctx, server_hostname="b")
    stack.callback(writer.close)
    peer.writer = writer
    task = asyncio.create_task(peer.pump(reader))
    stack.callback(task.cancel)
    return reader, writer


def open_frame(sid: int, service: ServiceKey = SERVICE) -> bytes:
    return link.control(link.OPEN, sid, {"v": link.VERSION, "service": str(service)})


def ok_frame(sid: int) -> bytes:
    return link.control(link.OK, sid, {"endpoint": "fake"})


def data_frame(sid: int, payload: bytes) -> bytes:
    return link.frame(link.DATA, sid, payload)


async def until(pred, timeout: float = 3.0, what: str = "condition") -> None:
    await eventually(pred, timeout, what)
