"""outlier_detection.response_timeout in the relay (legs.WatchedLeg), on real sockets under uvloop.

A *frozen* backend is a socket that listens and is never accepted from: exactly what the kernel
shows of a SIGSTOPped process (handshakes complete from the backlog, bytes are taken, nothing
comes back). The rules themselves are health.py's (tests/gateway/core/test_health.py has their
tables); this checks that the relay acts on them: what is reported to the router, what is
counted, and what the client sees.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import time

from federation.model import Endpoint, FailoverPolicy, OutlierPolicy
from gateway.core.health import HealthBook
from gateway.dataplane.router import Router, local_key
from tests.helpers.relay import (
    HOST,
    LOC_A,
    SERVICE,
    FakeRouter,
    closed_by_peer,
    connect,
    echo_server,
    eventually,
    import_listener,
    local_target,
    on_uvloop,
    remote_target,
    roundtrip,
    server,
    two_gateways,
)

RT = 0.2  # response timeout of these tests


async def frozen_backend(stack) -> int:
    s = socket.socket()
    s.bind((HOST, 0))
    s.listen(64)
    stack.callback(s.close)
    return s.getsockname()[1]


@on_uvloop
async def test_an_endpoint_that_never_answers_is_reported_failed_and_its_connection_reset(stack):
    target = local_target(await frozen_backend(stack))
    router = FakeRouter(target, response_timeout=RT)
    lst = await import_listener(stack, router)
    reader, writer = await connect(stack, lst.port)
    writer.write(b"GET / HTTP/1.1\r\n\r\n")
    started = time.monotonic()
    assert await closed_by_peer(reader, 3.0)
    took = time.monotonic() - started
    # the connect succeeded (the kernel accepted), and is not reported as a success
    assert router.reports == [(target.key, False)]
    s = lst.stats
    assert s.response_timeouts_by == {target.key: 1}
    assert s.served_by == {} and s.failed == 0
    assert RT * 0.9 <= took < RT + 1.0, took
    await eventually(lambda: not lst.legs, what="connection forgotten")


@on_uvloop
async def test_an_answer_is_served_and_reported_once_and_later_silence_is_not_watched(stack):
    target = local_target(await echo_server(stack))
    router = FakeRouter(target, response_timeout=RT)
    lst = await import_listener(stack, router)
    reader, writer = await connect(stack, lst.port)
    await roundtrip(reader, writer, b"hello")
    assert router.reports == [(target.key, True)]  # once: at the answer, not at the connect
    assert lst.stats.served_by == {target.key: 1}
    await asyncio.sleep(RT * 3)  # quiet after the first answer: the idle timeout's business
    await roundtrip(reader, writer, b"still here")
    assert router.reports == [(target.key, True)]
    assert lst.stats.response_timeouts_by == {}


@on_uvloop
async def test_a_client_that_never_speaks_starts_no_clock(stack):
    target = local_target(await frozen_backend(stack))
    router = FakeRouter(target, response_timeout=RT)
    lst = await import_listener(stack, router)
    reader, writer = await connect(stack, lst.port)
    assert not await closed_by_peer(reader, RT * 3)  # nothing asked, nothing timed out
    assert router.reports == [] and lst.stats.response_timeouts_by == {}
    assert lst.stats.served_by == {}  # no verdict yet
    # Its EOF is a question too (a half-closed client waits for the reply): the clock starts.
    writer.write_eof()
    assert await closed_by_peer(reader, 3.0)
    assert router.reports == [(target.key, False)]
    assert lst.stats.response_timeouts_by == {target.key: 1}


@on_uvloop
async def test_a_connection_that_ends_before_a_verdict_is_served_without_a_report(stack):
    target = local_target(await frozen_backend(stack))
    router = FakeRouter(target, response_timeout=5.0)
    lst = await import_listener(stack, router)
    reader, writer = await connect(stack, lst.port)
    writer.write(b"ping\n")
    await eventually(
        lambda: lst.legs and next(iter(lst.legs)).other is not None, what="connection relayed"
    )
    sock = writer.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()  # the client gives up first (an RST): nothing was learnt
    await eventually(lambda: lst.stats.served_by == {target.key: 1}, what="served at close")
    assert router.reports == [] and lst.stats.response_timeouts_by == {}
    await eventually(lambda: not lst.legs, what="connection forgotten")


@on_uvloop
async def test_a_banner_before_the_client_speaks_is_an_answer(stack):
    async def banner(reader, writer):
        writer.write(b"220 ready\r\n")
        await writer.drain()
        await asyncio.sleep(RT * 3)  # then it answers nothing more, which is fine
        writer.close()

    target = local_target(await server(stack, banner))
    router = FakeRouter(target, response_timeout=RT)
    lst = await import_listener(stack, router)
    reader, writer = await connect(stack, lst.port)
    assert await asyncio.wait_for(reader.readline(), 2.0) == b"220 ready\r\n"
    writer.write(b"HELO x\r\n")
    assert not await closed_by_peer(reader, RT * 2)
    assert router.reports == [(target.key, True)]
    assert lst.stats.response_timeouts_by == {}


@on_uvloop
async def test_an_eof_from_the_endpoint_is_an_answer(stack):
    async def closer(reader, writer):
        await reader.readline()
        writer.write_eof()  # says nothing, but only a running app closes its side
        await asyncio.sleep(RT * 4)
        writer.close()

    target = local_target(await server(stack, closer))
    router = FakeRouter(target, response_timeout=RT)
    lst = await import_listener(stack, router)
    reader, writer = await connect(stack, lst.port)
    writer.write(b"bye\n")
    assert await asyncio.wait_for(reader.read(), 2.0) == b""
    await asyncio.sleep(RT * 2)
    assert router.reports == [(target.key, True)]
    assert lst.stats.response_timeouts_by == {}


@on_uvloop
async def test_without_a_response_timeout_a_frozen_endpoint_looks_served(stack):
    # The blind spot the option exists for (and the default: off).
    target = local_target(await frozen_backend(stack))
    router = FakeRouter(target)
    lst = await import_listener(stack, router)
    reader, writer = await connect(stack, lst.port)
    writer.write(b"ping\n")
    assert not await closed_by_peer(reader, RT * 3)
    assert router.reports == [(target.key, True)]
    assert lst.stats.served_by == {target.key: 1}


@on_uvloop
async def test_the_passive_path_ejects_a_frozen_endpoint_from_new_connections(stack):
    """A real Router and HealthBook: the first connection to the frozen endpoint is lost, the
    endpoint is ejected by that one timeout (consecutive_failures 1), and every later connection
    goes to the live one."""
    frozen, live = await frozen_backend(stack), await echo_server(stack)
    book = HealthBook(
        OutlierPolicy(
            consecutive_failures=1, base_ejection=30.0, max_ejection=60.0, response_timeout=RT
        )
    )
    router = Router(
        SERVICE, LOC_A, FailoverPolicy(tiers=("cluster",)), book, time.monotonic,
        random.Random(7).random
    )
    router.set_local([Endpoint(HOST, frozen), Endpoint(HOST, live)])
    lst = await import_listener(stack, router)
    results = []
    for i in range(12):
        reader, writer = await connect(stack, lst.port)
        writer.write(b"ping %d\n" % i)
        try:
            got = await asyncio.wait_for(reader.readline(), 3.0)
        except (ConnectionError, TimeoutError):
            got = b""
        results.append(got != b"")
        writer.close()
    frozen_key = local_key(HOST, frozen)
    timeouts = lst.stats.response_timeouts_by.get(frozen_key, 0)
    assert results.count(False) == timeouts == 1, results  # (seeded: it is picked early)
    assert all(results[results.index(False) + 1 :])  # after the one loss, all served
    assert not book.routable(frozen_key, time.monotonic())
    assert lst.stats.served_by == {local_key(HOST, live): results.count(True)}


@on_uvloop
async def test_the_serving_gateway_watches_its_endpoint_not_the_caller_the_remote(stack):
    a, b, router, inner, _, _ = await two_gateways(stack, backend=frozen_backend)
    inner.response_timeout = RT  # the serving gateway's setting
    router.response_timeout = RT  # the caller's: applies to its local endpoints only
    reader, writer = await connect(stack, a.port)
    writer.write(b"ping\n")
    assert await closed_by_peer(reader, 3.0)  # reset behind the remote gateway, then here
    endpoint = inner.targets[0].key
    assert inner.reports == [(endpoint, False)]
    assert b.stats.response_timeouts_by == {endpoint: 1} and b.stats.served_by == {}
    # The caller committed at OK and cannot tell a hung endpoint behind the remote gateway from
    # a reset one: its remote target is not ejected for one endpoint of that cluster.
    assert router.reports == [(remote_target(b.port).key, True)]
    assert a.stats.response_timeouts_by == {}
    await eventually(lambda: not a.legs and not b.legs, what="both gateways closed the stream")
