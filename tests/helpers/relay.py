"""Relay test harness on real sockets (127.0.0.1) under uvloop: a fresh loop per test
(`on_uvloop`), echo backends, listeners, clients, a scripted router, and two gateways joined
by a mutual-TLS link."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import time

from federation.model import Endpoint, Export, Locality, ServiceKey
from gateway.core.balance import Target
from gateway.dataplane.dial import Dialer
from gateway.dataplane.l4 import ImportListener, InboundListener
from gateway.dataplane.tls import GatewayTls
from tests.helpers.loops import TEST_TIMEOUT, on_uvloop  # noqa: F401 (re-exported)
from tests.helpers.tls import tls_pair

HOST = "127.0.0.1"
SERVICE = ServiceKey("shop", "cart")
LOC_A = Locality("us-east", "a", "cluster-a")
LOC_B = Locality("us-east", "b", "cluster-b")


class FakeRouter:
    """Plans a fixed candidate list and records every report."""

    def __init__(self, *targets: Target, response_timeout: float | None = None) -> None:
        self.targets = list(targets)
        self.reports: list[tuple[str, bool]] = []
        self.response_timeout = response_timeout

    def plan(self) -> list[Target]:
        return list(self.targets)

    def report(self, target: Target, ok: bool) -> None:
        self.reports.append((target.key, ok))


def local_target(port: int) -> Target:
    return Target(f"local:{HOST}:{port}", LOC_A, HOST, port, 1, True, False)


def remote_target(port: int, cluster: str = "cluster-b", loc: Locality = LOC_B) -> Target:
    return Target(f"remote:{cluster}", loc, HOST, port, 1, True, True)


def closed_port() -> int:
    s = socket.socket()
    s.bind((HOST, 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there: connect is refused
    return port


async def eventually(pred, timeout: float = 3.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(0.01)


async def closed_by_peer(reader: asyncio.StreamReader, timeout: float = 2.0) -> bool:
    """True when the peer closes (EOF or reset) within timeout without sending anything."""
    try:
        data = await asyncio.wait_for(reader.read(1), timeout)
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return data == b""


async def server(stack, handler, rcvbuf: int | None = None) -> int:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind((HOST, 0))
    srv = await asyncio.start_server(handler, sock=sock)
    stack.push_async_callback(srv.wait_closed)
    stack.callback(srv.close)
    return srv.sockets[0].getsockname()[1]


async def _echo(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()  # half-close: echo everything, then our EOF
        await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def echo_server(stack) -> int:
    return await server(stack, _echo)


async def import_listener(stack, router, tls=None, **kw) -> ImportListener:
    dialer = Dialer(tls, kw.pop("connect_timeout", 2.0))
    stack.push_async_callback(dialer.pool.close)
    lst = ImportListener(
        SERVICE,
        router,
        dialer,
        max_connections=kw.pop("max_connections", 100),
        idle_timeout=kw.pop("idle_timeout", 30.0),
    )
    await lst.start(HOST, 0)
    stack.push_async_callback(lst.close)
    return lst


async def connect(stack, port: int):
    reader, writer = await asyncio.open_connection(HOST, port)
    stack.callback(writer.close)
    return reader, writer


async def small_buffer_client(stack, port: int, rcvbuf: int | None = None):
    """A client with a 64 KiB send buffer (and `rcvbuf`, if given), so backpressure shows fast."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect((HOST, port))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock)
    stack.callback(writer.close)
    return reader, writer


async def read_hashed(reader: asyncio.StreamReader) -> tuple[int, str]:
    """Read to EOF: how many bytes, and their sha256."""
    h, n = hashlib.sha256(), 0
    while data := await reader.read(1 << 20):
        h.update(data)
        n += len(data)
    return n, h.hexdigest()


async def write_until_blocked(writer, limit: int = 256 * 1024 * 1024, chunk_size: int = 256 * 1024):
    """Write random chunks until drain() blocks for 0.5s; returns (total, sha256 object)."""
    sent = hashlib.sha256()
    total = 0
    while total < limit:
        chunk = os.urandom(chunk_size)
        writer.write(chunk)
        sent.update(chunk)
        total += len(chunk)
        try:
            await asyncio.wait_for(writer.drain(), 0.5)
        except TimeoutError:
            return total, sent
    raise AssertionError(f"the client wrote {total} bytes without ever being slowed down")


async def roundtrip(reader, writer, data: bytes = b"ping") -> None:
    writer.write(data)
    await writer.drain()
    assert await asyncio.wait_for(reader.readexactly(len(data)), 2.0) == data


async def exchange(port: int, payload: bytes) -> str:
    """One client: send payload and half-close while reading the echo to EOF; sha256 back."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        async def send():
            for i in range(0, len(payload), 64 * 1024):
                writer.write(payload[i : i + 64 * 1024])
                await writer.drain()
            writer.write_eof()

        sender = asyncio.create_task(send())
        n, digest = await read_hashed(reader)
        await sender
        assert n == len(payload)
        return digest
    finally:
        writer.close()


class Exports:
    def __init__(self) -> None:
        self.entries: dict[ServiceKey, tuple[Export, FakeRouter]] = {}

    def add(self, service: ServiceKey, port: int, allowed=("cluster-a",)) -> FakeRouter:
        exp = Export(
            "cluster-b",
            service.namespace,
            service.name,
            port,
            "tcp",
            (Endpoint(HOST, port),),
            None if allowed is None else tuple(allowed),
        )
        router = FakeRouter(local_target(port))
        self.entries[service] = (exp, router)
        return router

    def __call__(self, service: ServiceKey):
        return self.entries.get(service)


async def inbound(stack, tls_b: GatewayTls, exports: Exports, **kw) -> InboundListener:
    lst = InboundListener(
        tls_b,
        exports,
        Dialer(tls_b, 2.0),
        max_connections=kw.get("max_connections", 100),
        idle_timeout=kw.get("idle_timeout", 30.0),
        max_handshakes=kw.get("max_handshakes", InboundListener.MAX_HANDSHAKES),
    )
    await lst.start(HOST, 0, handshake_timeout=kw.get("handshake_timeout", 5.0))
    stack.push_async_callback(lst.close)
    return lst


async def two_gateways(stack, allowed=("cluster-a",), backend=None, fallback: Target | None = None):
    tls_a, tls_b = tls_pair()
    port = await (backend(stack) if backend else echo_server(stack))
    exports = Exports()
    inner = exports.add(SERVICE, port, allowed)
    b = await inbound(stack, tls_b, exports)
    targets = [remote_target(b.port)] + ([fallback] if fallback else [])
    router = FakeRouter(*targets)
    a = await import_listener(stack, router, tls=tls_a)
    return a, b, router, inner, tls_a, tls_b
