"""Multiplexed east-west links (gateway/dataplane/mux.py), the link: window violations, link
loss, ERR and late answers, PING, stream ids; on real sockets and real mutual TLS under uvloop
(harness: tests/helpers/mux.py). Replacing and closing links: test_link_lifecycle.py.
"""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from federation.model import ServiceKey
from gateway.dataplane import link
from gateway.dataplane.dial import Dialer
from gateway.dataplane.link import WINDOW_SIZE
from gateway.errors import DialError
from tests.helpers.mux import (
    OTHER,
    Counting,
    RawPeer,
    data_frame,
    fake_answerer,
    gateways,
    ok_frame,
    only_link,
    open_frame,
    raw_caller,
    until,
)
from tests.helpers.relay import (
    HOST,
    SERVICE,
    Exports,
    FakeRouter,
    closed_by_peer,
    connect,
    echo_server,
    import_listener,
    inbound,
    on_uvloop,
    remote_target,
    roundtrip,
    server,
)
from tests.helpers.tls import tls_pair

# ---------------------------------------------------------------------------- (3) window violations


@on_uvloop
async def test_answerer_sending_beyond_the_window_cuts_the_link_and_all_its_streams(stack):
    tls_a, tls_b = tls_pair()
    peer = RawPeer()
    peer.script = lambda kind, sid, payload: peer.send(ok_frame(sid)) if kind == link.OPEN else None
    port = await fake_answerer(stack, tls_b, peer)
    a = await import_listener(stack, FakeRouter(remote_target(port)), tls=tls_a)
    dialer = a.dialer
    clients = [await connect(stack, a.port) for _ in range(2)]
    await until(
        lambda: len(a.legs) == 2 and all(leg.other is not None for leg in a.legs),
        what="2 streams attached",
    )
    stream = await dialer.dial(remote_target(port), SERVICE)  # never attached: never grants
    assert stream.sid == 5
    lk = only_link(dialer.pool)
    assert len(lk.streams) == 3

    peer.send(data_frame(5, b"w" * WINDOW_SIZE) + data_frame(5, b"!"))
    await asyncio.wait_for(peer.closed.wait(), 3.0)
    assert lk.closed and not lk.streams
    assert stream.closed
    for reader, _ in clients:
        assert await closed_by_peer(reader)
    await until(lambda: not a.legs, what="client connections closed")
    assert not dialer.pool.links


@on_uvloop
async def test_caller_sending_beyond_the_window_cuts_the_link_and_all_its_streams(stack):
    backend = Counting()
    tls_a, tls_b = tls_pair()
    exports = Exports()
    exports.add(SERVICE, await server(stack, backend))
    b = await inbound(stack, tls_b, exports)
    peer = RawPeer()
    reader, writer = await raw_caller(stack, tls_a, b.port, peer)
    writer.write(open_frame(1))
    await until(lambda: "OK" in peer.kinds(1), what="OK for stream 1")
    writer.write(data_frame(1, b"hello"))
    await until(
        lambda: any(k == link.DATA and s == 1 and p == b"hello" for k, s, p in peer.frames),
        what="echo",
    )
    assert backend.open == 1

    writer.write(open_frame(3) + data_frame(3, b"w" * WINDOW_SIZE) + data_frame(3, b"!"))
    await asyncio.wait_for(peer.closed.wait(), 3.0)
    await until(
        lambda: not b.links and not b.legs and backend.open == 0, what="link and streams closed"
    )


# ------------------------------------------------------------------------------ (4) link loss


@on_uvloop
async def test_link_loss_closes_every_stream_and_the_next_dial_makes_a_new_link(stack):
    backend = Counting()
    g = await gateways(stack, {SERVICE: await server(stack, backend)})
    clients = [await connect(stack, g.a[SERVICE].port) for _ in range(3)]
    for reader, writer in clients:
        await roundtrip(reader, writer)
    old = only_link(g.pool)
    assert backend.open == 3 and len(old.streams) == 3

    (blink,) = g.b.links
    blink.transport.abort()
    for reader, _ in clients:
        assert await closed_by_peer(reader)
    await until(
        lambda: not g.a[SERVICE].legs and not g.b.legs and backend.open == 0,
        what="every leg closed",
    )
    assert old.closed and not old.streams
    assert not g.pool.links and not g.b.links

    reader, writer = await connect(stack, g.a[SERVICE].port)
    await roundtrip(reader, writer, b"again")
    assert only_link(g.pool) is not old
    assert len(g.b.links) == 1


# ------------------------------------------------------------------------------ (6) ERR


@on_uvloop
async def test_err_drops_the_stream_without_rst_and_the_link_stays_usable(stack):
    tls_a, tls_b = tls_pair()
    peer = RawPeer()

    def script(kind, sid, payload):
        if kind == link.OPEN:
            service = link.parse_control(kind, payload)["service"]
            if service == str(SERVICE):
                peer.send(ok_frame(sid))
            else:
                peer.send(
                    link.control(link.ERR, sid, {"code": "unknown-service", "error": service})
                )
        elif kind == link.PING:
            peer.send(link.frame(link.PONG, 0, payload))

    peer.script = script
    port = await fake_answerer(stack, tls_b, peer)
    dialer = Dialer(tls_a, 2.0)
    stack.push_async_callback(dialer.pool.close)
    with pytest.raises(DialError, match="unknown-service"):
        await dialer.dial(remote_target(port), ServiceKey("shop", "nope"))
    lk = only_link(dialer.pool)
    assert not lk.streams
    stream = await dialer.dial(remote_target(port), SERVICE)
    assert stream.sid == 3 and only_link(dialer.pool) is lk
    assert await dialer.pool.ping("cluster-b", HOST, port, 2.0)
    assert peer.kinds(1) == ["OPEN"], "ERR must not be answered with RST"


@on_uvloop
async def test_unknown_service_and_forbidden_consumer_leave_the_link_usable(stack):
    g = await gateways(stack, {SERVICE: await echo_server(stack)})
    exports = g.b.exports
    exports.add(OTHER, await echo_server(stack), allowed=("cluster-c",))
    reader, writer = await connect(stack, g.a[SERVICE].port)
    await roundtrip(reader, writer)
    lk = only_link(g.pool)
    with pytest.raises(DialError, match="unknown-service"):
        await g.dialer.dial(remote_target(g.b.port), ServiceKey("shop", "nope"))
    with pytest.raises(DialError, match="forbidden"):
        await g.dialer.dial(remote_target(g.b.port), OTHER)
    assert g.b.denied == 1
    assert only_link(g.pool) is lk and len(lk.streams) == 1
    await roundtrip(reader, writer, b"still here")
    r2, w2 = await connect(stack, g.a[SERVICE].port)
    await roundtrip(r2, w2, b"new stream, same link")
    assert only_link(g.pool) is lk and len(g.b.links) == 1


# ------------------------------------------------------------------------------ (7) late answers


@on_uvloop
async def test_late_ok_and_err_are_ignored(stack):
    tls_a, tls_b = tls_pair()
    peer = RawPeer()
    late = asyncio.Event()

    def script(kind, sid, payload):
        if kind == link.OPEN and sid == 5:
            peer.send(ok_frame(5))
        elif kind == link.RST and sid == 3:
            late.set()
        elif kind == link.PING:
            peer.send(link.frame(link.PONG, 0, payload))

    peer.script = script
    port = await fake_answerer(stack, tls_b, peer)
    dialer = Dialer(tls_a, 0.3)
    stack.push_async_callback(dialer.pool.close)
    for _ in range(2):  # sid 1 and 3: no answer in time
        with pytest.raises(DialError, match="timed out"):
            await dialer.dial(remote_target(port), SERVICE)
    await asyncio.wait_for(late.wait(), 2.0)
    assert peer.kinds(1) == ["OPEN", "RST"] and peer.kinds(3) == ["OPEN", "RST"]
    lk = only_link(dialer.pool)
    assert not lk.streams
    # Now the answers come, too late; DATA/EOF on the abandoned stream as well.
    peer.send(
        ok_frame(1)
        + data_frame(1, b"late")
        + link.frame(link.EOF, 1)
        + link.control(link.ERR, 3, {"code": "busy", "error": "late"})
    )
    assert await dialer.pool.ping("cluster-b", HOST, port, 2.0)
    assert only_link(dialer.pool) is lk and not lk.closed and not lk.streams
    stream = await dialer.dial(remote_target(port), SERVICE)
    assert stream.sid == 5 and not stream.closed


# ------------------------------------------------------------------------------ (8) PING


@on_uvloop
async def test_ping_and_a_blackholed_answerer(stack):
    g = await gateways(stack, {SERVICE: await echo_server(stack)})
    assert await g.pool.ping("cluster-b", HOST, g.b.port, 2.0) is True
    lk = only_link(g.pool)
    g.b.fault = SimpleNamespace(mode="blackhole", latency=0.0, error_rate=0.0, random=lambda: 1.0)
    t0 = time.monotonic()
    assert await g.pool.ping("cluster-b", HOST, g.b.port, 0.3) is False
    assert time.monotonic() - t0 < 1.0
    assert only_link(g.pool) is lk and not lk.closed and not lk.pings
    assert len(g.b.links) == 1
    g.b.fault = None
    assert await g.pool.ping("cluster-b", HOST, g.b.port, 2.0) is True
    assert only_link(g.pool) is lk


# ------------------------------------------------------------------------------ (10) stream ids


@on_uvloop
async def test_caller_opens_odd_rising_stream_ids(stack):
    g = await gateways(stack, {SERVICE: await echo_server(stack)})
    sids = []
    for _ in range(4):
        stream = await g.dialer.dial(remote_target(g.b.port), SERVICE)
        sids.append(stream.sid)
        stream.close()
    assert sids == [1, 3, 5, 7]


@pytest.mark.parametrize(
    "frames, said",
    [
        ([open_frame(2)], "stream id 2 after 0"),  # even
        ([open_frame(1), link.frame(link.RST, 1), open_frame(1)], "stream id 1 after 1"),  # ended
        ([open_frame(5), open_frame(3)], "stream id 3 after 5"),  # not rising
        ([open_frame(1), open_frame(1)], "stream id 1 after 1"),  # reused while open
        ([data_frame(7, b"x")], "DATA on stream 7"),  # DATA on a stream never opened
        ([open_frame(link.MAX_STREAM_ID + 2)], f"stream id {link.MAX_STREAM_ID + 2} (max"),
        ([open_frame(1), open_frame(2**32 - 1)], f"stream id {2**32 - 1} (max"),
    ],
    ids=[
        "even",
        "reused-after-end",
        "falling",
        "reused-while-open",
        "data-never-opened",
        "above-max",
        "max-u32",
    ],
)
@on_uvloop
async def test_bad_stream_ids_are_protocol_errors(stack, frames, said, caplog):
    tls_a, tls_b = tls_pair()
    exports = Exports()
    exports.add(SERVICE, await echo_server(stack))
    b = await inbound(stack, tls_b, exports)
    peer = RawPeer()
    _, writer = await raw_caller(stack, tls_a, b.port, peer)
    for f in frames:
        writer.write(f)
        await asyncio.sleep(0.1)  # each in its own read, after the previous one was handled
    await asyncio.wait_for(peer.closed.wait(), 3.0)
    await until(lambda: not b.links and not b.legs, what="link dropped")
    said_it = [r.getMessage() for r in caplog.records if "broke protocol" in r.getMessage()]
    assert any(said in m for m in said_it), said_it


@on_uvloop
async def test_open_of_an_unknown_version_is_refused_and_the_link_survives(stack):
    """ "v":999 (or none) gets ERR unsupported-version naming what was sent, and no stream; the
    same link then opens a stream of our version, which works."""
    tls_a, tls_b = tls_pair()
    exports = Exports()
    exports.add(SERVICE, await echo_server(stack))
    b = await inbound(stack, tls_b, exports)
    peer = RawPeer()
    _, writer = await raw_caller(stack, tls_a, b.port, peer)
    writer.write(link.control(link.OPEN, 1, {"v": 999, "service": str(SERVICE)}))
    writer.write(link.control(link.OPEN, 3, {"service": str(SERVICE)}))
    await until(lambda: peer.kinds(1) and peer.kinds(3), what="answers to both OPENs")
    answers = {sid: link.parse_control(k, p) for k, sid, p in peer.frames if k == link.ERR}
    assert peer.kinds(1) == ["ERR"] and answers[1]["code"] == "unsupported-version"
    assert "version '999' is not supported" in answers[1]["error"]
    assert peer.kinds(3) == ["ERR"] and answers[3]["code"] == "unsupported-version"
    (lk,) = b.links
    assert not lk.streams and not b.legs
    writer.write(open_frame(5) + data_frame(5, b"hello") + link.frame(link.EOF, 5))

    def echoed() -> bytes:
        return b"".join(bytes(p) for k, s, p in peer.frames if k == link.DATA and s == 5)

    await until(lambda: b"hello" in echoed(), what="the echo on stream 5")
    assert peer.kinds(5)[0] == "OK" and not peer.closed.is_set() and b.links == {lk}
