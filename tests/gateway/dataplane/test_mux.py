"""Multiplexed east-west links (gateway/dataplane/mux.py), the streams: many streams on one
link, per-stream flow control, half-close and RST, and bugs found in review. The link itself
(window violations, loss, ERR, late answers, PING, age, stream ids) is in test_mux_link.py.

Two gateways run in-process: a (the caller: ImportListeners sharing one LinkPool) and b (the
answerer: an InboundListener). Where the other side must misbehave, a raw TLS peer speaking
gateway/dataplane/link.py frames by hand stands in for it (tests/helpers/mux.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from types import SimpleNamespace

from gateway.dataplane import link, mux
from gateway.dataplane.link import WINDOW_SIZE
from tests.helpers.mux import (
    OTHER,
    SLOW,
    Counting,
    RawPeer,
    answerer_stream,
    fake_answerer,
    gateways,
    ok_frame,
    only_link,
    reset_connection,
    until,
)
from tests.helpers.relay import (
    HOST,
    SERVICE,
    FakeRouter,
    closed_by_peer,
    connect,
    echo_server,
    exchange,
    import_listener,
    on_uvloop,
    read_hashed,
    remote_target,
    roundtrip,
    server,
    small_buffer_client,
    write_until_blocked,
)
from tests.helpers.tls import tls_pair

# ------------------------------------------------------------------------------ (1) many streams


@on_uvloop
async def test_two_hundred_streams_share_one_link_and_relay_distinct_payloads(stack):
    g = await gateways(stack, {SERVICE: await echo_server(stack)})
    port = g.a[SERVICE].port
    payloads = [os.urandom(256 * 1024) for _ in range(200)]
    digests = await asyncio.gather(*(exchange(port, p) for p in payloads))
    assert digests == [hashlib.sha256(p).hexdigest() for p in payloads]
    lk = only_link(g.pool)
    assert len(g.b.links) == 1
    assert lk.next_sid == 1 + 2 * 200  # 200 odd ids, none reused
    assert g.a[SERVICE].stats.served_by == {"remote:cluster-b": 200}
    assert sum(g.b.stats.served_by.values()) == 200
    await until(
        lambda: not g.a[SERVICE].legs and not g.b.legs and not lk.streams, what="all streams ended"
    )
    (blink,) = g.b.links
    assert not blink.streams


# ------------------------------------------------------------------------------ (2) flow control


@on_uvloop
async def test_a_stalled_stream_neither_stalls_its_link_nor_grows_buffers(stack):
    release = asyncio.Event()
    result: asyncio.Future = asyncio.get_running_loop().create_future()

    async def stalls(reader, writer):
        await release.wait()
        result.set_result(await read_hashed(reader))
        writer.close()

    slow_port = await server(stack, stalls, rcvbuf=64 * 1024)
    g = await gateways(stack, {SERVICE: await echo_server(stack), SLOW: slow_port})
    fast_port = g.a[SERVICE].port

    async def batch():
        payloads = [os.urandom(1024 * 1024) for _ in range(16)]
        t0 = time.monotonic()
        digests = await asyncio.gather(*(exchange(fast_port, p) for p in payloads))
        assert digests == [hashlib.sha256(p).hexdigest() for p in payloads]
        return time.monotonic() - t0

    baseline = await batch()  # also sets the link up

    reader, writer = await small_buffer_client(stack, g.a[SLOW].port, rcvbuf=64 * 1024)
    total, sent = await write_until_blocked(writer)
    assert total < 64 * 1024 * 1024, f"{total} bytes accepted before backpressure"

    # The other streams of the same link still relay at full speed.
    stalled = await batch()
    assert stalled < 3 * baseline + 1.0, (
        f"16 x 1 MiB took {stalled:.2f}s next to a stalled stream ({baseline:.2f}s alone)"
    )
    assert len(g.pool.links) == 1 and len(g.b.links) == 1

    # Bounded buffers on both gateways.
    (down,) = g.a[SLOW].legs
    stream = down.other
    assert isinstance(stream, mux.Stream)
    assert not down.transport.is_reading(), (
        "the caller keeps reading a client whose stream has no credit"
    )
    assert sum(map(len, stream.pending_out)) <= WINDOW_SIZE
    assert stream.credit == 0
    lk = only_link(g.pool)
    assert lk.transport.get_write_buffer_size() < 256 * 1024
    far = answerer_stream(g.b, stream.sid)
    assert far.held, "the answerer grants credit although its backend leg is full"
    assert 0 <= far.recv_window <= WINDOW_SIZE
    assert far.other.transport.get_write_buffer_size() <= WINDOW_SIZE + 256 * 1024
    assert not far.pending_out
    (blink,) = g.b.links
    assert blink.transport.get_write_buffer_size() < 256 * 1024

    # The slow reader resumes: everything arrives intact.
    release.set()
    await asyncio.wait_for(writer.drain(), 10.0)
    writer.write_eof()
    n, digest = await asyncio.wait_for(result, 10.0)
    assert (n, digest) == (total, sent.hexdigest())
    assert await closed_by_peer(reader, 5.0)


@on_uvloop
async def test_a_client_that_stops_reading_is_bounded_on_both_gateways(stack):
    """The other direction: the backend streams, the client on the caller side reads nothing."""
    release = asyncio.Event()
    sent = hashlib.sha256()
    total = 0

    async def firehose(reader, writer):
        nonlocal total
        try:
            while not release.is_set() and total < 256 * 1024 * 1024:
                chunk = os.urandom(256 * 1024)
                writer.write(chunk)
                sent.update(chunk)
                total += len(chunk)
                await writer.drain()
        finally:
            writer.close()

    g = await gateways(
        stack, {SLOW: await server(stack, firehose), SERVICE: await echo_server(stack)}
    )
    reader, writer = await small_buffer_client(stack, g.a[SLOW].port, rcvbuf=64 * 1024)
    writer.write(b"go")
    await asyncio.sleep(0.05)
    before = -1
    for _ in range(100):  # until the backend is blocked
        await asyncio.sleep(0.1)
        if total == before:
            break
        before = total
    assert total < 64 * 1024 * 1024
    assert (
        await exchange(g.a[SERVICE].port, b"x" * 100_000)
        == hashlib.sha256(b"x" * 100_000).hexdigest()
    )

    (down,) = g.a[SLOW].legs
    stream = down.other
    assert stream.held
    assert down.transport.get_write_buffer_size() <= WINDOW_SIZE + 256 * 1024
    far = answerer_stream(g.b, stream.sid)
    assert far.credit == 0
    assert sum(map(len, far.pending_out)) <= WINDOW_SIZE
    assert not far.other.transport.is_reading()

    release.set()
    got, n = hashlib.sha256(), 0
    while chunk := await asyncio.wait_for(reader.read(1 << 20), 10.0):
        got.update(chunk)
        n += len(chunk)
    assert (n, got.hexdigest()) == (total, sent.hexdigest())


# ------------------------------------------------------------------------------ (5) half-close, RST


@on_uvloop
async def test_half_close_from_the_backend_first_then_the_client(stack):
    result: asyncio.Future = asyncio.get_running_loop().create_future()

    async def hello_then_read(reader, writer):
        writer.write(b"hello")
        writer.write_eof()  # we are done talking; keep listening
        data = await reader.read()
        result.set_result((len(data), hashlib.sha256(data).hexdigest()))
        writer.close()

    g = await gateways(stack, {SERVICE: await server(stack, hello_then_read)})
    reader, writer = await connect(stack, g.a[SERVICE].port)
    assert await asyncio.wait_for(reader.read(), 5.0) == b"hello"  # ... then EOF
    payload = os.urandom(1024 * 1024)
    writer.write(payload)  # the client's direction is still open across the hop
    await writer.drain()
    writer.write_eof()
    assert await asyncio.wait_for(result, 5.0) == (
        len(payload),
        hashlib.sha256(payload).hexdigest(),
    )
    await until(
        lambda: not g.a[SERVICE].legs and not g.b.legs, what="both gateways closed the stream"
    )


@on_uvloop
async def test_half_close_from_the_client_first_with_a_large_reply(stack):
    async def digest_reply(reader, writer):
        data = await reader.read()
        writer.write(hashlib.sha256(data).digest() * (2 * 1024 * 1024 // 32))
        await writer.drain()
        writer.close()

    g = await gateways(stack, {SERVICE: await server(stack, digest_reply)})
    reader, writer = await connect(stack, g.a[SERVICE].port)
    payload = os.urandom(1024 * 1024)
    writer.write(payload)
    writer.write_eof()
    await writer.drain()
    reply = await asyncio.wait_for(reader.read(), 5.0)
    assert reply == hashlib.sha256(payload).digest() * (2 * 1024 * 1024 // 32)
    await until(
        lambda: not g.a[SERVICE].legs and not g.b.legs, what="both gateways closed the stream"
    )


@on_uvloop
async def test_client_reset_resets_the_remote_stream_and_closes_the_backend_connection(stack):
    backend = Counting()
    g = await gateways(stack, {SERVICE: await server(stack, backend)})
    reader, writer = await connect(stack, g.a[SERVICE].port)
    await roundtrip(reader, writer)
    lk = only_link(g.pool)
    assert backend.open == 1
    reset_connection(writer)
    await until(lambda: backend.open == 0, what="backend connection closed")
    await until(
        lambda: not g.b.legs and not g.a[SERVICE].legs and not lk.streams, what="stream forgotten"
    )
    (blink,) = g.b.links
    assert not blink.streams
    # The link itself is fine.
    assert only_link(g.pool) is lk and not lk.closed
    assert await g.pool.ping("cluster-b", HOST, g.b.port, 2.0)


@on_uvloop
async def test_backend_reset_closes_the_client_connection(stack):
    async def resets(reader, writer):
        await reader.read(4)
        reset_connection(writer)

    g = await gateways(stack, {SERVICE: await server(stack, resets)})
    reader, writer = await connect(stack, g.a[SERVICE].port)
    writer.write(b"ping")
    assert await closed_by_peer(reader, 3.0)
    await until(lambda: not g.b.legs and not g.a[SERVICE].legs, what="stream forgotten")
    assert not only_link(g.pool).closed


# ---------------------------------------------------------------------------- bugs found in review


@on_uvloop
async def test_backend_that_speaks_first_is_heard(stack):
    """The answerer writes OK and the backend's first bytes (and even its EOF) together; the
    caller's stream is attached to the client a few loop turns after OK. Nothing may be lost."""

    async def banner(reader, writer):
        writer.write(b"220 hello\r\n")
        await writer.drain()
        await reader.read()
        writer.close()

    async def banner_and_close(reader, writer):
        writer.write(b"bye" * 1000)
        await writer.drain()
        writer.close()

    g = await gateways(
        stack, {SERVICE: await server(stack, banner), OTHER: await server(stack, banner_and_close)}
    )
    for _ in range(5):  # a fresh stream each time; the first one also dials the link
        reader, writer = await connect(stack, g.a[SERVICE].port)
        assert await asyncio.wait_for(reader.readexactly(11), 2.0) == b"220 hello\r\n"
        writer.close()
        reader, writer = await connect(stack, g.a[OTHER].port)
        assert await asyncio.wait_for(reader.read(), 2.0) == b"bye" * 1000
        writer.close()
    await until(
        lambda: not g.b.legs and not g.a[SERVICE].legs and not g.a[OTHER].legs, what="all closed"
    )


@on_uvloop
async def test_bytes_sent_while_the_stream_opens_stay_bounded(stack):
    """A client sends more than PENDING_LIMIT before OK arrives (the answerer is slow to
    answer, then grants no credit beyond the first window): once the stream is attached and
    out of credit, the caller must stop reading the client, not queue everything in
    pending_out. When credit flows again every byte arrives, in order."""
    tls_a, tls_b = tls_pair()
    peer = RawPeer()
    granting = asyncio.Event()
    got, eof = hashlib.sha256(), asyncio.Event()
    received = 0

    def script(kind, sid, payload):
        nonlocal received
        if kind == link.OPEN:
            asyncio.get_running_loop().call_later(0.3, peer.send, ok_frame(sid))
        elif kind == link.DATA:
            got.update(payload)
            received += len(payload)
            if granting.is_set():
                peer.send(link.frame(link.WINDOW, sid, link.CREDIT.pack(len(payload))))
        elif kind == link.EOF:
            eof.set()

    peer.script = script
    port = await fake_answerer(stack, tls_b, peer)
    a = await import_listener(stack, FakeRouter(remote_target(port)), tls=tls_a)
    reader, writer = await small_buffer_client(stack, a.port, rcvbuf=64 * 1024)
    total, sent = await write_until_blocked(writer, limit=64 * 1024 * 1024)
    (down,) = a.legs
    stream = down.other
    assert stream is not None, "the stream should be open by now"
    queued = sum(map(len, stream.pending_out))
    assert queued <= 2 * WINDOW_SIZE, (
        f"the caller queued {queued} bytes for a stream without credit"
    )
    assert not down.transport.is_reading()
    assert received == WINDOW_SIZE

    granting.set()
    peer.send(link.frame(link.WINDOW, stream.sid, link.CREDIT.pack(received)))
    await asyncio.wait_for(writer.drain(), 10.0)
    writer.write_eof()
    await asyncio.wait_for(eof.wait(), 10.0)
    assert (received, got.hexdigest()) == (total, sent.hexdigest())


@on_uvloop
async def test_clean_close_flushes_what_the_stream_still_holds(stack, monkeypatch):
    """Both directions ended (EOF each way) while the stream still holds bytes beyond its
    credit: they are sent as credit comes back, then EOF — not dropped behind an RST.
    (A window smaller than PENDING_LIMIT makes this easy to reach: the client's bytes and FIN
    collected while connecting are more than one window.)"""
    monkeypatch.setattr(mux, "WINDOW_SIZE", 64 * 1024)
    result: asyncio.Future = asyncio.get_running_loop().create_future()

    async def hi_then_read(reader, writer):
        writer.write(b"hi")
        writer.write_eof()
        data = await reader.read()
        result.set_result((len(data), hashlib.sha256(data).hexdigest()))
        writer.close()

    g = await gateways(stack, {SERVICE: await server(stack, hi_then_read)})
    g.b.fault = SimpleNamespace(mode="degrade", latency=0.3, error_rate=0.0, random=lambda: 1.0)
    reader, writer = await connect(stack, g.a[SERVICE].port)
    payload = os.urandom(200 * 1024)  # below PENDING_LIMIT: the FIN is read while connecting
    writer.write(payload)
    writer.write_eof()
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 5.0) == b"hi"
    assert await asyncio.wait_for(result, 5.0) == (
        len(payload),
        hashlib.sha256(payload).hexdigest(),
    )
    await until(
        lambda: not g.b.legs and not g.a[SERVICE].legs, what="both gateways closed the stream"
    )
