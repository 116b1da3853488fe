"""The TCP data plane on real sockets (127.0.0.1) under uvloop: relay, flow control,
half-close, connect-time failover, limits, idle timeout, listener close. The mutual-TLS hop
is in test_remote_hop.py, the legs' plumbing in test_legs.py, the harness in tests/helpers/.

Every test coroutine runs on a fresh uvloop loop (`on_uvloop`), and asserts that it does.
The router is an interface here (`dial.Router`: plan/report), so a tiny scripted fake stands
in.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import os
import socket
import struct
import time
import weakref

import pytest
import uvloop

from gateway.dataplane import dial
from gateway.dataplane.dial import Dialer
from gateway.errors import DialError
from tests.helpers.relay import (
    HOST,
    SERVICE,
    FakeRouter,
    closed_by_peer,
    closed_port,
    connect,
    echo_server,
    eventually,
    exchange,
    import_listener,
    local_target,
    on_uvloop,
    read_hashed,
    remote_target,
    roundtrip,
    server,
    small_buffer_client,
    write_until_blocked,
)
from tests.helpers.tls import tls_pair

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
    real = dial._Expiry.__call__

    def expire_and_cancel(self):
        real(self)
        self.task.cancel()

    monkeypatch.setattr(dial._Expiry, "__call__", expire_and_cancel)
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
