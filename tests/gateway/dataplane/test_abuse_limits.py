"""Abuse bounded by a limit with a counter, while the process keeps serving everyone else.

Real sockets, real mutual TLS, uvloop: a gateway B (InboundListener) behind which an echo
backend is exported, a gateway A (ImportListener) whose router sends to B.

* Handshake flood: connections to B's inbound port that never send a ClientHello. At most
  `max_handshakes` are held (each for at most `handshake_timeout`); the rest are closed unread
  and counted in `handshakes_refused`. Streams over the link A already had keep flowing, new
  streams open over it, and once the flood's handshakes time out a new link gets in.
* Many idle connections: an import listener at `max_connections` refuses more (counted in
  `refused_limit`), the idle sweeper frees the slots after `idle_timeout`, and another import
  listener of the same process serves all along.
"""

from __future__ import annotations

import asyncio
import socket

from gateway.dataplane.dial import Dialer
from tests.helpers.relay import (
    HOST,
    SERVICE,
    Exports,
    FakeRouter,
    closed_by_peer,
    connect,
    echo_server,
    eventually,
    import_listener,
    inbound,
    local_target,
    on_uvloop,
    remote_target,
    roundtrip,
)
from tests.helpers.tls import tls_pair

FLOOD = 60
MAX_HANDSHAKES = 8


def _silent_connections(port: int, n: int) -> list[socket.socket]:
    """`n` TCP connections that send nothing (a handshake flood's shape)."""
    socks = []
    for _ in range(n):
        s = socket.create_connection((HOST, port))
        s.setblocking(False)
        socks.append(s)
    return socks


async def _closed(sock: socket.socket, timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    try:
        return await asyncio.wait_for(loop.sock_recv(sock, 1), timeout) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


@on_uvloop
async def test_handshake_flood_is_bounded_and_links_keep_serving(stack):
    tls_a, tls_b = tls_pair()
    exports = Exports()
    exports.add(SERVICE, await echo_server(stack), allowed=None)
    b = await inbound(stack, tls_b, exports, max_handshakes=MAX_HANDSHAKES,
                      handshake_timeout=1.0)
    a = await import_listener(stack, FakeRouter(remote_target(b.port)), tls=tls_a)
    before = await connect(stack, a.port)
    await roundtrip(*before)  # the link A -> B is up

    flood = _silent_connections(b.port, FLOOD)
    stack.callback(lambda: [s.close() for s in flood])
    await eventually(lambda: b.handshakes_refused >= FLOOD - MAX_HANDSHAKES,
                     what="flood connections beyond the limit refused")
    assert b.handshaking == MAX_HANDSHAKES
    refused = [s for s in flood if await _closed(s, 0.05)]
    assert len(refused) >= FLOOD - MAX_HANDSHAKES
    # during the flood: the old stream and a new one over the same link are served
    await roundtrip(*before, b"still here")
    during = await connect(stack, a.port)
    await roundtrip(*during, b"new stream")
    assert b.counters()["handshakes_refused"] == b.handshakes_refused
    assert b.counters()["handshaking"] == MAX_HANDSHAKES

    # the held handshakes end at handshake_timeout; then a new link (new handshake) gets in
    await eventually(lambda: b.handshaking == 0, timeout=3.0, what="held handshakes timed out")
    assert b.handshake_failed >= MAX_HANDSHAKES  # timeouts are failed handshakes
    stream = await Dialer(tls_a, 2.0).dial(remote_target(b.port), SERVICE)
    stream.close()
    await roundtrip(*before, b"and after")


@on_uvloop
async def test_idle_connections_fill_one_listener_not_the_process(stack):
    port = await echo_server(stack)
    full = await import_listener(stack, FakeRouter(local_target(port)), max_connections=5,
                                 idle_timeout=1.0)
    other = await import_listener(stack, FakeRouter(local_target(port)))
    idle = [await connect(stack, full.port) for _ in range(5)]
    await eventually(lambda: len(full.legs) == 5, what="5 connections admitted")
    extra_reader, _ = await connect(stack, full.port)
    assert await closed_by_peer(extra_reader)
    assert full.stats.refused_limit == 1
    await roundtrip(*idle[0], b"admitted ones relay")
    await roundtrip(*await connect(stack, other.port), b"other listener serves")

    # the idle sweeper frees the slots (idle_timeout 1 s), then new connections are admitted
    await eventually(lambda: full.stats.idle_closed >= 4, timeout=4.0, what="idle ones closed")
    await roundtrip(*await connect(stack, full.port), b"admitted again")
