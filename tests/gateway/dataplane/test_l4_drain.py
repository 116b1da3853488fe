"""Listener lifecycle for restarts (gateway/l4.py): listening on a socket bound elsewhere,
starting to accept later, stopping accepting while another holder of the same socket goes on,
draining open connections to a bound, and GOAWAY on east-west links. Real sockets, uvloop."""

from __future__ import annotations

import asyncio
import socket
import time

from gateway.dataplane import mux
from gateway.dataplane.dial import Dialer
from gateway.dataplane.l4 import ImportListener
from tests.helpers.relay import (
    HOST,
    SERVICE,
    Exports,
    FakeRouter,
    connect,
    echo_server,
    eventually,
    inbound,
    local_target,
    on_uvloop,
    remote_target,
    roundtrip,
)
from tests.helpers.tls import tls_pair


def listening() -> socket.socket:
    return socket.create_server((HOST, 0), backlog=128)


async def listener_on(stack, sock: socket.socket, router, *, serving: bool = True,
                      dialer: Dialer | None = None) -> ImportListener:
    if dialer is None:
        dialer = Dialer(None, 2.0)
        stack.push_async_callback(dialer.pool.close)
    lst = ImportListener(SERVICE, router, dialer, max_connections=100, idle_timeout=30.0)
    await lst.start(HOST, 0, sock=sock, serving=serving)
    stack.push_async_callback(lst.close)
    return lst


@on_uvloop
async def test_a_connection_queued_before_serving_is_served_once_it_serves(stack):
    backend = await echo_server(stack)
    sock = listening()
    stack.callback(sock.close)
    lst = await listener_on(stack, sock, FakeRouter(local_target(backend)), serving=False)
    reader, writer = await connect(stack, sock.getsockname()[1])  # the kernel queues it
    writer.write(b"early")
    await asyncio.sleep(0.1)
    assert lst.stats.accepted == 0
    await lst.serve()
    assert await asyncio.wait_for(reader.readexactly(5), 2) == b"early"


@on_uvloop
async def test_the_other_holder_of_the_socket_takes_over_and_the_old_one_drains(stack):
    """Two listeners on the same socket (the old and the new process): the old stops accepting
    and every new connection, including one queued meanwhile, reaches the new one; the old
    one's open connection keeps working until its client closes it."""
    backend = await echo_server(stack)
    sock = listening()
    stack.callback(sock.close)
    port = sock.getsockname()[1]
    old_router, new_router = FakeRouter(local_target(backend)), FakeRouter(local_target(backend))
    old = await listener_on(stack, sock, old_router)
    r1, w1 = await connect(stack, port)
    await roundtrip(r1, w1)
    new = await listener_on(stack, sock, new_router, serving=False)
    old.stop_accepting()
    r2, w2 = await connect(stack, port)  # nobody accepts right now: queued, not refused
    await new.serve()
    await roundtrip(r2, w2)
    for _ in range(20):
        r, w = await connect(stack, port)
        await roundtrip(r, w, b"x")
        w.close()
    assert old.stats.accepted == 1 and new.stats.accepted == 21
    await roundtrip(r1, w1, b"still here")  # the old connection goes on
    drain = asyncio.ensure_future(old.drain(10.0))
    await asyncio.sleep(0.2)
    assert not drain.done()
    w1.close()
    assert await asyncio.wait_for(drain, 3) == 0  # ended by its client: none left at the bound


@on_uvloop
async def test_at_the_drain_bound_open_connections_get_a_clean_eof(stack):
    backend = await echo_server(stack)
    sock = listening()
    stack.callback(sock.close)
    lst = await listener_on(stack, sock, FakeRouter(local_target(backend)))
    reader, writer = await connect(stack, sock.getsockname()[1])
    await roundtrip(reader, writer)
    lst.stop_accepting()
    started = time.monotonic()
    left = await lst.drain(0.5, grace=2.0)
    assert left == 1
    assert time.monotonic() - started >= 0.5
    assert await asyncio.wait_for(reader.read(), 2) == b""  # EOF, not a reset
    await eventually(lambda: not lst.legs, what="the half-closed connection to be closed")


@on_uvloop
async def test_goaway_moves_the_caller_to_a_new_link_and_the_old_stream_finishes(stack):
    """b (answerer) drains: its callers are told GOAWAY; a's pool retires the link, the next
    connection dials a new one (here: to b2, which holds the same socket as b), and the
    stream already open on the old link goes on to its end."""
    tls_a, tls_b = tls_pair()
    backend = await echo_server(stack)
    exports = Exports()
    exports.add(SERVICE, backend, ("cluster-a",))
    b = await inbound(stack, tls_b, exports)
    dialer = Dialer(tls_a, 2.0)
    stack.push_async_callback(dialer.pool.close)
    a = await listener_on(stack, listening(), FakeRouter(remote_target(b.port)), dialer=dialer)
    r1, w1 = await connect(stack, a.port)
    await roundtrip(r1, w1)
    (first,) = dialer.pool.links.values()
    b2 = await inbound_on(stack, tls_b, exports, b.sock)
    b.stop_accepting()
    await eventually(lambda: first.retired, what="the caller to retire the link on GOAWAY")
    r2, w2 = await connect(stack, a.port)
    await roundtrip(r2, w2)  # a new link, accepted by b2
    (second,) = dialer.pool.links.values()
    assert second is not first and len(b2.links) == 1
    await roundtrip(r1, w1, b"old stream")  # still on the retired link, answered by b
    w1.close()
    await eventually(lambda: first.closed, what="the retired link to close after its last stream")
    assert await asyncio.wait_for(b.drain(5.0), 5) == 0


async def inbound_on(stack, tls, exports, sock):
    from gateway.dataplane.l4 import InboundListener

    lst = InboundListener(tls, exports, Dialer(tls, 2.0), max_connections=100, idle_timeout=30.0)
    await lst.start(HOST, 0, sock=sock)
    stack.push_async_callback(lst.close)
    return lst


def test_a_retired_link_is_not_usable():
    lk = mux.MuxLink("caller")
    lk.transport = type("T", (), {"is_closing": lambda self: False, "close": lambda self: None})()
    assert lk.usable()
    lk.retire()
    assert not lk.usable()
