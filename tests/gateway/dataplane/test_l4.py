"""The TCP data plane on real sockets (127.0.0.1) under uvloop: relay, flow control, half-close,
connect-time failover, limits, idle timeout, and the mutual-TLS hop between two gateways.

Every test coroutine runs on a fresh uvloop loop (`on_uvloop`), and asserts that it does.
The router is an interface here (`l4.Router`: plan/report), so a tiny scripted fake stands in.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import hashlib
import inspect
import os
import socket
import struct
import time
import weakref

import pytest
import uvloop

from federation.identity import CertificateAuthority, SpiffeId, TrustBundle, gateway_id
from federation.model import Endpoint, Export, Locality, ServiceKey
from gateway.core.balance import Target
from gateway.dataplane import l4, legs, link
from gateway.dataplane.l4 import Dialer, ImportListener, InboundListener
from gateway.dataplane.mux import LinkPool
from gateway.dataplane.tls import GatewayTls, TlsSnapshot
from gateway.errors import DialError

HOST = "127.0.0.1"
SERVICE = ServiceKey("shop", "cart")
TD_A, TD_B = "a.isthmus.local", "b.isthmus.local"
LOC_A = Locality("us-east", "a", "cluster-a")
LOC_B = Locality("us-east", "b", "cluster-b")
TEST_TIMEOUT = 60.0


# ------------------------------------------------------------------------------ harness


def on_uvloop(fn):
    """Run an async test on a new uvloop event loop (pytest-asyncio is not involved)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        async def checked():
            assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
            async with contextlib.AsyncExitStack() as stack:
                return await asyncio.wait_for(fn(stack, *args, **kwargs), TEST_TIMEOUT)

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(checked())

    # pytest must not see the `stack` parameter as a fixture
    run.__signature__ = _without_first_param(fn)
    return run


def _without_first_param(fn):
    sig = inspect.signature(fn)
    return sig.replace(parameters=list(sig.parameters.values())[1:])


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


# ------------------------------------------------------------------------------ uvloop


@on_uvloop
async def test_runs_on_uvloop(stack):
    assert type(asyncio.get_running_loop()) is uvloop.Loop
    port = await echo_server(stack)
    lst = await import_listener(stack, FakeRouter(local_target(port)))
    reader, writer = await connect(stack, lst.port)
    await roundtrip(reader, writer)
    (leg,) = lst.legs
    assert type(leg.transport).__module__.startswith("uvloop")


# ------------------------------------------------------------------------------ plain relay


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



@on_uvloop
async def test_relays_a_large_payload_both_ways(stack):
    port = await echo_server(stack)
    router = FakeRouter(local_target(port))
    lst = await import_listener(stack, router)
    payload = os.urandom(8 * 1024 * 1024)
    assert await exchange(lst.port, payload) == hashlib.sha256(payload).hexdigest()
    assert router.reports == [(f"local:{HOST}:{port}", True)]
    assert lst.stats.served_by == {f"local:{HOST}:{port}": 1}
    assert lst.stats.accepted == 1
    await eventually(lambda: lst.stats.active == 0, what="connection forgotten")


@on_uvloop
async def test_slow_reader_backpressures_the_client(stack):
    """The backend stops reading: the gateway pauses reading from the client instead of
    buffering, so the client's drain() blocks; nothing is lost once the backend reads again."""
    release = asyncio.Event()
    result: asyncio.Future = asyncio.get_running_loop().create_future()

    async def slow(reader, writer):
        await release.wait()
        n, digest = await read_hashed(reader)
        writer.write(f"{n} {digest}".encode())
        await writer.drain()
        writer.close()
        result.set_result(n)

    port = await server(stack, slow, rcvbuf=64 * 1024)
    lst = await import_listener(stack, FakeRouter(local_target(port)))

    reader, writer = await small_buffer_client(stack, lst.port)

    total, sent = await write_until_blocked(writer)
    assert total < 96 * 1024 * 1024, f"{total} bytes accepted before backpressure"

    # The gateway itself holds little: its client leg stopped reading, its backend leg's
    # write buffer is bounded.
    (down,) = lst.legs
    up = down.other
    assert up is not None
    assert down.paused_for_other
    assert not down.transport.is_reading()
    assert up.transport.get_write_buffer_size() < 2 * 1024 * 1024

    release.set()
    await writer.drain()
    writer.write_eof()
    reply = await asyncio.wait_for(reader.read(), 10.0)
    assert reply == f"{total} {sent.hexdigest()}".encode()
    assert await result == total


@on_uvloop
async def test_bytes_sent_while_connecting_are_bounded_then_relayed(stack):
    """Before the up leg exists the gateway buffers at most PENDING_LIMIT, then stops reading;
    once connected, flow control toward a slow backend still holds."""
    release = asyncio.Event()
    result: asyncio.Future = asyncio.get_running_loop().create_future()

    async def silent_gateway(reader, writer):  # accepts, never answers OPEN
        await asyncio.sleep(30)

    async def slow(reader, writer):
        await release.wait()
        result.set_result(await read_hashed(reader))
        writer.close()

    silent = await server(stack, silent_gateway)
    port = await server(stack, slow, rcvbuf=64 * 1024)
    tls_a, _ = tls_pair()
    router = FakeRouter(remote_target(silent), local_target(port))
    lst = await import_listener(stack, router, tls=tls_a, connect_timeout=0.5)

    reader, writer = await small_buffer_client(stack, lst.port)

    chunk = os.urandom(128 * 1024)
    sent = hashlib.sha256()
    total = 0
    deadline = time.monotonic() + 4.0
    while time.monotonic() < deadline and total < 256 * 1024 * 1024:
        writer.write(chunk)
        sent.update(chunk)
        total += len(chunk)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(writer.drain(), 0.2)
    (down,) = lst.legs
    up = down.other
    assert up is not None, "the second candidate should have been connected by now"
    assert router.reports[0] == ("remote:cluster-b", False)
    assert up.transport.get_write_buffer_size() < 2 * 1024 * 1024, (
        f"gateway buffers {up.transport.get_write_buffer_size()} bytes for a backend that "
        "does not read"
    )
    assert not down.transport.is_reading()

    release.set()
    await writer.drain()
    writer.write_eof()
    n, digest = await asyncio.wait_for(result, 10.0)
    assert (n, digest) == (total, sent.hexdigest())


@on_uvloop
async def test_half_close_client_writes_then_waits_for_the_reply(stack):
    async def reply_at_eof(reader, writer):
        data = await reader.read()  # to EOF
        writer.write(
            b"got " + str(len(data)).encode() + b" " + hashlib.sha256(data).hexdigest().encode()
        )
        await writer.drain()
        writer.close()

    port = await server(stack, reply_at_eof)
    lst = await import_listener(stack, FakeRouter(local_target(port)))
    reader, writer = await connect(stack, lst.port)
    body = os.urandom(300_000)
    writer.write(body)
    writer.write_eof()
    await writer.drain()
    reply = await asyncio.wait_for(reader.read(), 5.0)
    assert reply == b"got 300000 " + hashlib.sha256(body).hexdigest().encode()
    await eventually(lambda: not lst.legs, what="both legs closed after both EOFs")


@on_uvloop
async def test_half_close_sent_before_the_backend_is_connected(stack):
    async def reply_at_eof(reader, writer):
        data = await reader.read()
        writer.write(data[::-1])
        await writer.drain()
        writer.close()

    port = await server(stack, reply_at_eof)
    lst = await import_listener(stack, FakeRouter(local_target(closed_port()), local_target(port)))
    reader, writer = await connect(stack, lst.port)
    writer.write(b"abc")
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 5.0) == b"cba"


# ------------------------------------------------------------------------------ failover


@on_uvloop
async def test_a_finished_relay_is_freed_by_refcounting_not_the_gc(stack):
    # Both legs point at each other; left as a cycle, every connection's legs (and what they
    # hold) would wait for a GC pass. The relay drops the cycle when the second leg ends.
    port = await echo_server(stack)
    lst = await import_listener(stack, FakeRouter(local_target(port)))
    reader, writer = await connect(stack, lst.port)
    await roundtrip(reader, writer)
    (down,) = lst.legs
    up = down.other
    refs = weakref.ref(down), weakref.ref(up)
    del down, up
    gc.disable()
    stack.callback(gc.enable)
    writer.close()
    await eventually(lambda: not lst.legs, what="connection forgotten")
    await eventually(lambda: all(r() is None for r in refs), what="both legs freed without the GC")


@on_uvloop
async def test_connect_time_failover_serves_the_same_client_connection(stack):
    dead = local_target(closed_port())
    port = await echo_server(stack)
    live = local_target(port)
    router = FakeRouter(dead, live)
    lst = await import_listener(stack, router)
    reader, writer = await connect(stack, lst.port)
    writer.write(b"sent before the gateway connected anywhere")
    await roundtrip(reader, writer, b"")
    assert await asyncio.wait_for(reader.readexactly(42), 2.0) == (
        b"sent before the gateway connected anywhere"
    )
    await roundtrip(reader, writer, b"and after")
    assert router.reports == [(dead.key, False), (live.key, True)]
    s = lst.stats
    assert (s.attempts, s.attempt_failures, s.failed) == (2, 1, 0)
    assert s.served_by == {live.key: 1}


@on_uvloop
async def test_all_candidates_fail_closes_the_client(stack):
    a, b = local_target(closed_port()), local_target(closed_port())
    router = FakeRouter(a, b)
    lst = await import_listener(stack, router)
    reader, writer = await connect(stack, lst.port)
    assert await closed_by_peer(reader)
    await eventually(lambda: lst.stats.failed == 1, what="failed counted")
    assert router.reports == [(a.key, False), (b.key, False)]
    assert lst.stats.attempts == 2
    assert lst.stats.attempt_failures == 2
    assert lst.stats.served_by == {}
    await eventually(lambda: lst.stats.active == 0, what="connection forgotten")


@on_uvloop
async def test_empty_plan_closes_the_client(stack):
    lst = await import_listener(stack, FakeRouter())
    reader, _ = await connect(stack, lst.port)
    assert await closed_by_peer(reader)
    await eventually(lambda: lst.stats.failed == 1)


@on_uvloop
async def test_connect_timeout_moves_on(stack):
    # A listening socket with a full backlog would be needed for a real SYN timeout; a TLS
    # peer that never completes the handshake gives the same effect deterministically.
    async def mute(reader, writer):
        await asyncio.sleep(30)

    port = await server(stack, mute)
    echo = await echo_server(stack)
    tls_a, _ = tls_pair()
    router = FakeRouter(remote_target(port), local_target(echo))
    lst = await import_listener(stack, router, tls=tls_a, connect_timeout=0.3)
    reader, writer = await connect(stack, lst.port)
    started = time.monotonic()
    await roundtrip(reader, writer)
    assert time.monotonic() - started < 2.0
    assert router.reports == [("remote:cluster-b", False), (f"local:{HOST}:{echo}", True)]


def blackholed_port(stack) -> int:
    """A listener that never accepts, its one-slot queue filled: SYNs get no answer, so a
    plain TCP connect to it can only time out."""
    sock = socket.socket()
    sock.bind((HOST, 0))
    sock.listen(0)
    filler = socket.socket()
    filler.setblocking(False)
    filler.connect_ex(sock.getsockname())
    stack.callback(sock.close)
    stack.callback(filler.close)
    return sock.getsockname()[1]


@on_uvloop
async def test_local_connect_timeout_moves_on(stack):
    hole = blackholed_port(stack)
    echo = await echo_server(stack)
    router = FakeRouter(local_target(hole), local_target(echo))
    lst = await import_listener(stack, router, connect_timeout=0.3)
    reader, writer = await connect(stack, lst.port)
    started = time.monotonic()
    await roundtrip(reader, writer)
    assert 0.25 < time.monotonic() - started < 2.0
    assert router.reports == [(f"local:{HOST}:{hole}", False), (f"local:{HOST}:{echo}", True)]
    assert (lst.stats.attempts, lst.stats.attempt_failures, lst.stats.failed) == (2, 1, 0)


@on_uvloop
async def test_local_dial_timeout_is_a_dial_error_and_leaves_the_task_uncancelled(stack):
    hole = blackholed_port(stack)
    dialer = Dialer(None, 0.2)
    with pytest.raises(DialError, match="timed out after 0.2s"):
        await dialer.dial(local_target(hole), SERVICE)
    assert asyncio.current_task().cancelling() == 0
    await asyncio.sleep(0)  # still usable: no cancellation left pending on this task


@on_uvloop
async def test_local_dial_cancelled_from_outside_stays_cancelled(stack, monkeypatch):
    hole = blackholed_port(stack)
    dialer = Dialer(None, 20.0)
    task = asyncio.get_running_loop().create_task(dialer.dial(local_target(hole), SERVICE))
    await asyncio.sleep(0.05)
    task.cancel()  # e.g. the client left while we were dialling
    with pytest.raises(asyncio.CancelledError):
        await task
    # The timeout firing in the same instant as an outside cancel: still cancelled, not a
    # timeout that connect_first would answer by trying the next target.
    real = l4._Expiry.__call__

    def expire_and_cancel(self):
        real(self)
        self.task.cancel()

    monkeypatch.setattr(l4._Expiry, "__call__", expire_and_cancel)
    dialer = Dialer(None, 0.1)
    task = asyncio.get_running_loop().create_task(dialer.dial(local_target(hole), SERVICE))
    with pytest.raises(asyncio.CancelledError):
        await task


@on_uvloop
async def test_client_leaving_during_a_local_dial_cancels_it_without_a_report(stack):
    hole = blackholed_port(stack)
    router = FakeRouter(local_target(hole))
    lst = await import_listener(stack, router, connect_timeout=20)
    _, writer = await connect(stack, lst.port)
    await eventually(lambda: lst.tasks, what="connect task running")
    # A FIN would be a half-close (the client may still want a reply): reset instead.
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
    await eventually(lambda: not lst.tasks and not lst.legs, what="dial cancelled")
    assert router.reports == []
    assert (lst.stats.attempt_failures, lst.stats.failed, lst.stats.active) == (0, 0, 0)


# ------------------------------------------------------------------------------ limits, idle


@on_uvloop
async def test_connection_limit_closes_the_third_connection_at_once(stack):
    port = await echo_server(stack)
    lst = await import_listener(stack, FakeRouter(local_target(port)), max_connections=2)
    r1, w1 = await connect(stack, lst.port)
    await roundtrip(r1, w1)
    r2, w2 = await connect(stack, lst.port)
    await roundtrip(r2, w2)
    r3, w3 = await connect(stack, lst.port)
    assert await closed_by_peer(r3, timeout=1.0)
    assert lst.stats.refused_limit == 1
    assert lst.stats.accepted == 3
    assert lst.stats.active == 2
    await roundtrip(r1, w1, b"still")  # the admitted ones are untouched
    await roundtrip(r2, w2, b"fine")

    w1.close()  # a slot frees up
    await eventually(lambda: lst.stats.active == 1)
    r4, w4 = await connect(stack, lst.port)
    await roundtrip(r4, w4)
    assert lst.stats.refused_limit == 1


@on_uvloop
async def test_idle_connection_is_closed(stack):
    port = await echo_server(stack)
    lst = await import_listener(stack, FakeRouter(local_target(port)), idle_timeout=0.3)
    busy_r, busy_w = await connect(stack, lst.port)
    reader, writer = await connect(stack, lst.port)
    await roundtrip(reader, writer)
    started = time.monotonic()

    stop = asyncio.Event()

    async def keep_busy():
        # (a stop flag, not cancel(): 3.11's wait_for can swallow a cancellation)
        while not stop.is_set():
            await roundtrip(busy_r, busy_w, b"x")
            await asyncio.sleep(0.05)

    busy = asyncio.create_task(keep_busy())
    try:
        assert await closed_by_peer(reader, timeout=2.0)
        assert time.monotonic() - started < 1.0
        assert lst.stats.idle_closed == 1
        assert not busy.done()  # traffic keeps a connection alive
    finally:
        stop.set()
        await busy
    assert lst.stats.idle_closed == 1


@on_uvloop
async def test_idle_connection_whose_client_does_not_read_is_released(stack):
    """The backend floods, the client never reads: once everything is stuck (no traffic),
    the idle sweep must free the connection, not wait forever to flush to a dead reader."""

    async def flood(reader, writer):
        with contextlib.suppress(ConnectionError):
            while True:
                writer.write(b"z" * 65536)
                await writer.drain()

    port = await server(stack, flood)
    lst = await import_listener(stack, FakeRouter(local_target(port)), idle_timeout=0.3)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.connect((HOST, lst.port))
    stack.callback(sock.close)
    await eventually(lambda: lst.stats.active == 1)
    await eventually(lambda: lst.stats.active == 0, timeout=3.0, what="stuck connection released")
    await asyncio.sleep(0.5)
    assert lst.stats.idle_closed == 1


# ------------------------------------------------------------------------------ listener close


@on_uvloop
async def test_close_aborts_connections_and_cancels_connect_tasks(stack):
    async def mute(reader, writer):
        await asyncio.sleep(30)

    port = await echo_server(stack)
    mute_port = await server(stack, mute)
    tls_a, _ = tls_pair()
    lst = await import_listener(stack, FakeRouter(local_target(port)))
    slow = await import_listener(
        stack, FakeRouter(remote_target(mute_port)), tls=tls_a, connect_timeout=20
    )
    r1, w1 = await connect(stack, lst.port)
    await roundtrip(r1, w1)
    r2, _ = await connect(stack, slow.port)
    await eventually(lambda: slow.tasks, what="connect task running")
    await lst.close()
    await slow.close()
    assert await closed_by_peer(r1)
    assert await closed_by_peer(r2)
    assert not slow.tasks


# ------------------------------------------------------------------------------ mutual TLS hop


NOW = time.time()
_CAS: dict[str, CertificateAuthority] = {}


def ca(td: str) -> CertificateAuthority:
    if td not in _CAS:
        _CAS[td] = CertificateAuthority.create(td, NOW)
    return _CAS[td]


def snapshot(own_td: str, bundles: dict[str, TrustBundle], owners: dict[str, str], svid_ca=None):
    svid = (svid_ca or ca(own_td)).issue(gateway_id(own_td), NOW)
    return TlsSnapshot(svid, bundles, owners)


def tls_pair() -> tuple[GatewayTls, GatewayTls]:
    bundles = {TD_A: ca(TD_A).bundle(1), TD_B: ca(TD_B).bundle(1)}
    owners = {TD_A: "cluster-a", TD_B: "cluster-b"}
    return (
        GatewayTls(snapshot(TD_A, bundles, owners), time.time),
        GatewayTls(snapshot(TD_B, bundles, owners), time.time),
    )


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
    )
    await lst.start(HOST, 0)
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


@on_uvloop
async def test_remote_hop_relays_bytes_end_to_end(stack):
    a, b, router, inner, _, _ = await two_gateways(stack)
    reader, writer = await connect(stack, a.port)
    payload = os.urandom(4 * 1024 * 1024)

    async def send():
        for i in range(0, len(payload), 100_000):
            writer.write(payload[i : i + 100_000])
            await writer.drain()
        writer.write_eof()

    sender = asyncio.create_task(send())
    got = bytearray()
    while chunk := await asyncio.wait_for(reader.read(1 << 20), 10.0):
        got += chunk
    await sender
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    assert router.reports == [("remote:cluster-b", True)]
    assert a.stats.served_by == {"remote:cluster-b": 1}
    assert inner.reports == [(inner.targets[0].key, True)]
    assert b.stats.served_by == {inner.targets[0].key: 1}
    assert b.denied == 0 and b.identity_refused == 0
    await eventually(lambda: not a.legs and not b.legs, what="both gateways closed the stream")


@on_uvloop
async def test_remote_hop_half_close(stack):
    async def reply_at_eof_server(stack):
        async def handler(reader, writer):
            data = await reader.read()
            writer.write(b"len=" + str(len(data)).encode())
            await writer.drain()
            writer.close()

        return await server(stack, handler)

    a, b, _, _, _, _ = await two_gateways(stack, backend=reply_at_eof_server)
    reader, writer = await connect(stack, a.port)
    writer.write(b"x" * 100_000)
    writer.write_eof()
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 5.0) == b"len=100000"
    await eventually(lambda: not a.legs and not b.legs, what="both gateways closed the stream")


@on_uvloop
async def test_remote_hop_client_can_keep_reading_after_half_close(stack):
    """Client EOF crosses the hop while the backend keeps streaming to the client."""

    async def streamer(stack):
        async def handler(reader, writer):
            assert await reader.read() == b"go"
            for _ in range(50):
                writer.write(b"y" * 20_000)
                await writer.drain()
            writer.close()

        return await server(stack, handler)

    a, _, _, _, _, _ = await two_gateways(stack, backend=streamer)
    reader, writer = await connect(stack, a.port)
    writer.write(b"go")
    writer.write_eof()
    data = await asyncio.wait_for(reader.read(), 5.0)
    assert data == b"y" * 1_000_000


@on_uvloop
async def test_idle_stream_on_the_inbound_listener_is_closed(stack):
    tls_a, tls_b = tls_pair()
    exports = Exports()
    exports.add(SERVICE, await echo_server(stack))
    b = await inbound(stack, tls_b, exports, idle_timeout=0.3)
    a = await import_listener(stack, FakeRouter(remote_target(b.port)), tls=tls_a)
    reader, writer = await connect(stack, a.port)
    await roundtrip(reader, writer)
    assert await closed_by_peer(reader, timeout=2.0)
    assert b.stats.idle_closed == 1
    await eventually(lambda: not a.legs and not b.legs, what="both gateways closed the stream")


@on_uvloop
async def test_unknown_service_gets_err_and_the_client_fails_over(stack):
    tls_a, tls_b = tls_pair()
    exports = Exports()  # exports nothing
    b = await inbound(stack, tls_b, exports)
    echo = await echo_server(stack)
    router = FakeRouter(remote_target(b.port), local_target(echo))
    a = await import_listener(stack, router, tls=tls_a)
    reader, writer = await connect(stack, a.port)
    await roundtrip(reader, writer, b"served locally")
    assert router.reports == [("remote:cluster-b", False), (f"local:{HOST}:{echo}", True)]

    with pytest.raises(DialError, match="unknown-service"):
        await Dialer(tls_a, 2.0).dial(remote_target(b.port), ServiceKey("shop", "nope"))


@on_uvloop
async def test_consumer_not_allowed_is_refused(stack):
    a, b, router, inner, tls_a, _ = await two_gateways(stack, allowed=("cluster-c",))
    with pytest.raises(DialError, match="forbidden") as e:
        await Dialer(tls_a, 2.0).dial(remote_target(b.port), SERVICE)
    assert "cluster-a" in str(e.value)
    assert b.denied == 1

    reader, _ = await connect(stack, a.port)
    assert await closed_by_peer(reader)
    await eventually(lambda: a.stats.failed == 1)
    assert router.reports == [("remote:cluster-b", False)]
    assert b.denied == 2
    assert inner.reports == []  # never dialled the backend


@on_uvloop
async def test_no_reachable_endpoint_behind_the_remote_gateway(stack):
    tls_a, tls_b = tls_pair()
    exports = Exports()
    inner = exports.add(SERVICE, closed_port())
    b = await inbound(stack, tls_b, exports)
    with pytest.raises(DialError, match="no-endpoint"):
        await Dialer(tls_a, 2.0).dial(remote_target(b.port), SERVICE)
    assert inner.reports == [(inner.targets[0].key, False)]
    assert b.stats.failed == 1


@on_uvloop
async def test_peer_with_svid_from_an_unknown_ca_is_refused(stack):
    """Cluster c's CA is unknown to b: the handshake itself fails, nothing is relayed."""
    _, tls_b = tls_pair()
    td_c = "c.isthmus.local"
    tls_c = GatewayTls(
        snapshot(td_c, {TD_B: ca(TD_B).bundle(1), td_c: ca(td_c).bundle(1)}, {TD_B: "cluster-b"}),
        time.time,
    )
    exports = Exports()
    inner = exports.add(SERVICE, await echo_server(stack), allowed=None)
    b = await inbound(stack, tls_b, exports)
    with pytest.raises(DialError):
        await Dialer(tls_c, 2.0).dial(remote_target(b.port), SERVICE)
    assert inner.reports == []
    assert b.stats.served_by == {}
    # refused by OpenSSL, before any SPIFFE check: counted as a failed handshake
    await eventually(lambda: b.handshake_failed == 1, what="failed handshake counted")
    assert b.identity_refused == 0 and b.handshaking == 0


@on_uvloop
async def test_inbound_counts_a_client_that_is_not_tls_and_keeps_serving(stack):
    tls_a, tls_b = tls_pair()
    exports = Exports()
    exports.add(SERVICE, await echo_server(stack), allowed=None)
    b = await inbound(stack, tls_b, exports)
    reader, writer = await connect(stack, b.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert await closed_by_peer(reader)
    await eventually(lambda: b.handshake_failed == 1, what="failed handshake counted")
    stream = await Dialer(tls_a, 2.0).dial(remote_target(b.port), SERVICE)  # a real peer still gets in
    stream.close()
    assert b.handshake_failed == 1 and b.handshaking == 0


@on_uvloop
async def test_peer_claiming_a_known_trust_domain_with_a_foreign_ca_is_refused(stack):
    """A rogue CA for trust domain A, trusted by b's server context only through the bundle
    of another trust domain (c), mints a gateway SVID for A. The handshake passes; the
    per-trust-domain check does not: bundles are never merged."""
    rogue_a = CertificateAuthority.create(TD_A, NOW)
    td_c = "c.isthmus.local"
    bundles_b = {
        TD_A: ca(TD_A).bundle(1),
        TD_B: ca(TD_B).bundle(1),
        td_c: TrustBundle(td_c, (rogue_a.cert_der,), 1),  # smuggled into the CA store
    }
    owners = {TD_A: "cluster-a", TD_B: "cluster-b", td_c: "cluster-c"}
    tls_b = GatewayTls(snapshot(TD_B, bundles_b, owners), time.time)
    forged = GatewayTls(
        snapshot(TD_A, {TD_B: ca(TD_B).bundle(1)}, {TD_B: "cluster-b"}, svid_ca=rogue_a),
        time.time,
    )
    exports = Exports()
    inner = exports.add(SERVICE, await echo_server(stack), allowed=None)
    b = await inbound(stack, tls_b, exports)
    with pytest.raises(DialError):
        await Dialer(forged, 2.0).dial(remote_target(b.port), SERVICE)
    await eventually(lambda: b.identity_refused == 1, what="identity refusal counted")
    assert inner.reports == []


@on_uvloop
async def test_peer_from_a_trust_domain_no_cluster_owns_is_refused(stack):
    td_c = "c.isthmus.local"
    bundles = {TD_B: ca(TD_B).bundle(1), td_c: ca(td_c).bundle(1)}
    tls_b = GatewayTls(snapshot(TD_B, bundles, {TD_B: "cluster-b"}), time.time)
    tls_c = GatewayTls(snapshot(td_c, bundles, {TD_B: "cluster-b"}), time.time)
    exports = Exports()
    exports.add(SERVICE, await echo_server(stack), allowed=None)
    b = await inbound(stack, tls_b, exports)
    with pytest.raises(DialError):
        await Dialer(tls_c, 2.0).dial(remote_target(b.port), SERVICE)
    await eventually(lambda: b.identity_refused == 1, what="identity refusal counted")


@on_uvloop
async def test_peer_that_is_not_the_gateway_of_its_trust_domain_is_refused(stack):
    bundles = {TD_A: ca(TD_A).bundle(1), TD_B: ca(TD_B).bundle(1)}
    owners = {TD_A: "cluster-a", TD_B: "cluster-b"}
    _, tls_b = tls_pair()
    workload = ca(TD_A).issue(SpiffeId.parse(f"spiffe://{TD_A}/ns/shop/sa/cart"), NOW)
    impostor = GatewayTls(TlsSnapshot(workload, bundles, owners), time.time)
    b = await inbound(stack, tls_b, Exports())
    with pytest.raises(DialError):
        await Dialer(impostor, 2.0).dial(remote_target(b.port), SERVICE)
    await eventually(lambda: b.identity_refused == 1, what="identity refusal counted")


@on_uvloop
async def test_dialer_refuses_a_remote_gateway_with_the_wrong_identity(stack):
    """a dials what should be cluster-b, but the listener presents cluster-c's gateway SVID
    (signed by a CA that is not in b's bundle): the client context refuses it."""
    td_c = "c.isthmus.local"
    tls_a, _ = tls_pair()
    bundles = {TD_A: ca(TD_A).bundle(1), td_c: ca(td_c).bundle(1)}
    tls_c = GatewayTls(snapshot(td_c, bundles, {TD_A: "cluster-a", td_c: "cluster-c"}), time.time)
    c = await inbound(stack, tls_c, Exports())
    with pytest.raises(DialError):
        await Dialer(tls_a, 2.0).dial(remote_target(c.port), SERVICE)


@on_uvloop
async def test_ping_gets_pong(stack):
    tls_a, tls_b = tls_pair()
    b = await inbound(stack, tls_b, Exports())
    ctx, _ = tls_a.for_peer("cluster-b")
    pool = LinkPool(tls_a, 2.0)
    stack.push_async_callback(pool.close)
    assert await pool.ping("cluster-b", HOST, b.port, 2.0) is True
    assert await pool.ping("cluster-b", HOST, b.port, 2.0) is True  # same link, no new handshake
    assert len(pool.links) == 1 and len(b.links) == 1
    assert b.stats.served_by == {} and b.stats.attempts == 0  # no endpoint touched

    # raw: PING, PONG with the payload echoed
    reader, writer = await asyncio.open_connection(HOST, b.port, ssl=ctx, server_hostname="b")
    stack.callback(writer.close)
    writer.write(link.frame(link.PING, 0, b"12345678"))
    header = await asyncio.wait_for(reader.readexactly(link.HEADER.size + 8), 2.0)
    assert link.HEADER.unpack(header[: link.HEADER.size]) == (link.PONG, 0, 8) and header.endswith(b"12345678")

    plain = await echo_server(stack)
    assert await pool.ping("cluster-b", HOST, plain, 1.0) is False
    assert await pool.ping("cluster-b", HOST, closed_port(), 1.0) is False


@on_uvloop
async def test_inbound_protocol_violation_cuts_the_link(stack):
    tls_a, tls_b = tls_pair()
    exports = Exports()
    exports.add(SERVICE, await echo_server(stack))
    b = await inbound(stack, tls_b, exports)
    ctx, _ = tls_a.for_peer("cluster-b")
    for bad in (
        link.frame(link.OPEN, 2, b'{"service": "shop/cart"}'),  # callers open odd ids
        bytes([99, 0, 0, 0, 0, 0, 0, 0, 0]),
        link.frame(link.OPEN, 1, b"[" * 3000),
        link.frame(link.OPEN, 1, b"not json"),
        link.frame(link.WINDOW, 1, b"12"),
    ):
        reader, writer = await asyncio.open_connection(HOST, b.port, ssl=ctx, server_hostname="b")
        stack.callback(writer.close)
        writer.write(bad)
        assert await closed_by_peer(reader), bad[:20]
    await eventually(lambda: not b.legs and not b.links, what="violating links dropped")


@on_uvloop
async def test_silent_remote_gateway_times_out_and_its_stream_is_reset(stack):
    """Waiting for OK times out: the dial fails AND the stream is reset (the link stays)."""
    tls_a, tls_b = tls_pair()
    reset = asyncio.Event()

    async def mute(reader, writer):
        frames = link.FrameReader()
        while chunk := await reader.read(65536):  # OPEN arrives; we never answer
            if any(kind == link.RST and sid == 1 for kind, sid, _ in frames.feed(chunk)):
                reset.set()

    srv = await asyncio.start_server(mute, HOST, 0, ssl=tls_b.server_context)
    stack.push_async_callback(srv.wait_closed)
    stack.callback(srv.close)
    port = srv.sockets[0].getsockname()[1]
    dialer = Dialer(tls_a, 0.3)
    stack.push_async_callback(dialer.pool.close)
    with pytest.raises(DialError, match="timed out"):
        await dialer.dial(remote_target(port), SERVICE)
    await asyncio.wait_for(reset.wait(), 2.0)
    link_ = next(iter(dialer.pool.links.values()))
    assert not link_.streams  # nothing left behind on the link


@on_uvloop
async def test_client_leaving_while_dialing_resets_the_remote_stream(stack):
    tls_a, tls_b = tls_pair()
    opened, reset = asyncio.Event(), asyncio.Event()

    async def mute(reader, writer):
        frames = link.FrameReader()
        while chunk := await reader.read(65536):
            for kind, sid, _ in frames.feed(chunk):
                if kind == link.OPEN:
                    opened.set()
                elif kind == link.RST and sid == 1:
                    reset.set()

    srv = await asyncio.start_server(mute, HOST, 0, ssl=tls_b.server_context)
    stack.push_async_callback(srv.wait_closed)
    stack.callback(srv.close)
    port = srv.sockets[0].getsockname()[1]
    lst = await import_listener(
        stack, FakeRouter(remote_target(port)), tls=tls_a, connect_timeout=20
    )
    _, writer = await connect(stack, lst.port)
    await asyncio.wait_for(opened.wait(), 2.0)
    # A FIN would be a half-close (the client may still want a reply): reset instead.
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
    await asyncio.wait_for(reset.wait(), 2.0)
    await eventually(lambda: not lst.tasks and not lst.legs)


def test_pending_limit_is_sane():
    assert 64 * 1024 <= legs.PENDING_LIMIT <= 4 * 1024 * 1024


# ------------------------------------------------------------------------------ leg plumbing


class FakeTransport:
    """Just enough of a transport to drive Leg flow control deterministically."""

    def __init__(self, protocol, high: int = 64 * 1024) -> None:
        self.protocol, self.high = protocol, high
        self.buffered = 0
        self.reading = True
        self.writing_paused = False
        self.closing = False
        self.eof_written = False
        protocol.connection_made(self)

    def write(self, data: bytes) -> None:
        self.buffered += len(data)
        if self.buffered > self.high and not self.writing_paused:
            self.writing_paused = True
            self.protocol.pause_writing()

    def writelines(self, chunks) -> None:
        for c in chunks:
            self.write(c)

    def drain(self) -> None:
        self.buffered = 0
        if self.writing_paused:
            self.writing_paused = False
            self.protocol.resume_writing()

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True


def test_pending_bytes_flushed_into_a_full_up_leg_keep_the_client_paused():
    down, up = legs.PlainLeg(), legs.PlainLeg()
    td, tu = FakeTransport(down), FakeTransport(up)
    chunk = b"x" * 65536
    while td.reading:  # the client sends while we are still connecting
        down.data_received(chunk)
    assert down.pending_size > legs.PENDING_LIMIT

    up.attach(down)
    down.attach(up)  # the flush overfills the up leg, which asks the client leg to pause
    assert tu.buffered == down.pending_size
    assert not td.reading, "client leg resumed although the backend leg is over its high water"

    tu.drain()  # the backend catches up
    assert td.reading


def test_leg_flow_control_and_half_close_plumbing():
    down, up = legs.PlainLeg(), legs.PlainLeg()
    td, tu = FakeTransport(down), FakeTransport(up)
    up.attach(down)
    down.attach(up)
    down.data_received(b"y" * 100_000)  # over the up leg's high water
    assert not td.reading and down.paused_for_other
    tu.drain()
    assert td.reading and not down.paused_for_other

    assert down.eof_received() is True  # keep the other direction open
    assert tu.eof_written
    up.data_received(b"reply")
    assert td.buffered == 5
    assert up.eof_received() is False  # both directions done
    assert td.closing
