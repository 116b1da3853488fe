"""The mutual-TLS hop between two gateways (an ImportListener dialling an InboundListener),
on real sockets and real TLS under uvloop: relay and half-close over the hop, refused
identities and consumers, protocol violations, PING, silent and abandoned dials.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
import time

import pytest

from federation.ca import CertificateAuthority
from federation.identity import SpiffeId, TrustBundle
from federation.model import ServiceKey
from gateway.dataplane import link
from gateway.dataplane.dial import Dialer
from gateway.dataplane.pool import LinkPool
from gateway.dataplane.tls import GatewayTls, TlsSnapshot
from gateway.errors import DialError
from tests.helpers.relay import (
    HOST,
    SERVICE,
    Exports,
    FakeRouter,
    closed_by_peer,
    closed_port,
    connect,
    echo_server,
    eventually,
    import_listener,
    inbound,
    local_target,
    on_uvloop,
    remote_target,
    roundtrip,
    server,
    two_gateways,
)
from tests.helpers.tls import NOW, TD_A, TD_B, ca, snapshot, tls_pair


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
    # a real peer still gets in
    stream = await Dialer(tls_a, 2.0).dial(remote_target(b.port), SERVICE)
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
    assert link.HEADER.unpack(header[: link.HEADER.size]) == (link.PONG, 0, 8) and header.endswith(
        b"12345678"
    )

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
