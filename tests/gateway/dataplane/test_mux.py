"""Multiplexed east-west links (gateway/dataplane/mux.py) on real sockets and real mutual TLS under uvloop:
many streams on one link, per-stream flow control, protocol violations, link loss, half-close
and RST, ERR and late answers, PING, link age, stream ids.

Two gateways run in-process: a (the caller: ImportListeners sharing one LinkPool) and b (the
answerer: an InboundListener). Where the other side must misbehave, a raw TLS peer speaking
gateway/dataplane/link.py frames by hand stands in for it.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
import time
from types import SimpleNamespace

import pytest

from federation.model import ServiceKey
from gateway.dataplane import link, mux
from gateway.dataplane.l4 import Dialer, ImportListener
from gateway.dataplane.link import WINDOW_SIZE
from gateway.dataplane.mux import LinkPool
from gateway.errors import DialError
from tests.gateway.dataplane.test_l4 import (
    HOST,
    SERVICE,
    Exports,
    FakeRouter,
    closed_by_peer,
    connect,
    echo_server,
    eventually,
    exchange,
    import_listener,
    inbound,
    on_uvloop,
    read_hashed,
    remote_target,
    roundtrip,
    server,
    small_buffer_client,
    tls_pair,
    write_until_blocked,
)

SLOW = ServiceKey("shop", "slow")
OTHER = ServiceKey("shop", "other")


# ------------------------------------------------------------------------------ harness


async def gateways(stack, services: dict[ServiceKey, int], *, allowed=("cluster-a",), connect_timeout=2.0,
                   max_connections=1000, idle_timeout=30.0):
    """b exports `services` (service -> local backend port); a imports each of them through
    its own ImportListener, all sharing ONE LinkPool (so one link to b)."""
    tls_a, tls_b = tls_pair()
    exports = Exports()
    for svc, port in services.items():
        exports.add(svc, port, allowed)
    b = await inbound(stack, tls_b, exports, max_connections=max_connections, idle_timeout=idle_timeout)
    pool = LinkPool(tls_a, connect_timeout)
    stack.push_async_callback(pool.close)
    dialer = Dialer(tls_a, connect_timeout, pool)
    imports = {}
    for svc in services:
        lst = ImportListener(svc, FakeRouter(remote_target(b.port)), dialer,
                             max_connections=max_connections, idle_timeout=idle_timeout)
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
    await until(lambda: not g.a[SERVICE].legs and not g.b.legs and not lk.streams, what="all streams ended")
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
    assert stalled < 3 * baseline + 1.0, f"16 x 1 MiB took {stalled:.2f}s next to a stalled stream ({baseline:.2f}s alone)"
    assert len(g.pool.links) == 1 and len(g.b.links) == 1

    # Bounded buffers on both gateways.
    (down,) = g.a[SLOW].legs
    stream = down.other
    assert isinstance(stream, mux.Stream)
    assert not down.transport.is_reading(), "the caller keeps reading a client whose stream has no credit"
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

    g = await gateways(stack, {SLOW: await server(stack, firehose), SERVICE: await echo_server(stack)})
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
    assert await exchange(g.a[SERVICE].port, b"x" * 100_000) == hashlib.sha256(b"x" * 100_000).hexdigest()

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


# ------------------------------------------------------------------------------ (3) window violations


@on_uvloop
async def test_answerer_sending_beyond_the_window_cuts_the_link_and_all_its_streams(stack):
    tls_a, tls_b = tls_pair()
    peer = RawPeer()
    peer.script = lambda kind, sid, payload: peer.send(ok_frame(sid)) if kind == link.OPEN else None
    port = await fake_answerer(stack, tls_b, peer)
    a = await import_listener(stack, FakeRouter(remote_target(port)), tls=tls_a)
    dialer = a.dialer
    clients = [await connect(stack, a.port) for _ in range(2)]
    await until(lambda: len(a.legs) == 2 and all(leg.other is not None for leg in a.legs), what="2 streams attached")
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
    await until(lambda: any(k == link.DATA and s == 1 and p == b"hello" for k, s, p in peer.frames), what="echo")
    assert backend.open == 1

    writer.write(open_frame(3) + data_frame(3, b"w" * WINDOW_SIZE) + data_frame(3, b"!"))
    await asyncio.wait_for(peer.closed.wait(), 3.0)
    await until(lambda: not b.links and not b.legs and backend.open == 0, what="link and streams closed")


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
    await until(lambda: not g.a[SERVICE].legs and not g.b.legs and backend.open == 0, what="every leg closed")
    assert old.closed and not old.streams
    assert not g.pool.links and not g.b.links

    reader, writer = await connect(stack, g.a[SERVICE].port)
    await roundtrip(reader, writer, b"again")
    assert only_link(g.pool) is not old
    assert len(g.b.links) == 1


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
    assert await asyncio.wait_for(result, 5.0) == (len(payload), hashlib.sha256(payload).hexdigest())
    await until(lambda: not g.a[SERVICE].legs and not g.b.legs, what="both gateways closed the stream")


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
    await until(lambda: not g.a[SERVICE].legs and not g.b.legs, what="both gateways closed the stream")


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
    await until(lambda: not g.b.legs and not g.a[SERVICE].legs and not lk.streams, what="stream forgotten")
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
                peer.send(link.control(link.ERR, sid, {"code": "unknown-service", "error": service}))
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
    peer.send(ok_frame(1) + data_frame(1, b"late") + link.frame(link.EOF, 1)
              + link.control(link.ERR, 3, {"code": "busy", "error": "late"}))
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


# ------------------------------------------------------------------------------ (9) link age


@on_uvloop
async def test_an_expired_link_is_replaced_and_retired_once_its_streams_end(stack, monkeypatch):
    monkeypatch.setattr(mux, "MAX_LINK_AGE", 0.5)
    g = await gateways(stack, {SERVICE: await echo_server(stack)})
    r1, w1 = await connect(stack, g.a[SERVICE].port)
    await roundtrip(r1, w1)
    old = only_link(g.pool)
    await asyncio.sleep(0.6)

    r2, w2 = await connect(stack, g.a[SERVICE].port)
    await roundtrip(r2, w2, b"new link")
    new = only_link(g.pool)
    assert new is not old and len(g.b.links) == 2
    # the stream on the old link keeps working
    await roundtrip(r1, w1, b"old link, still relaying")
    assert not old.closed and len(old.streams) == 1

    w1.write_eof()
    assert await asyncio.wait_for(r1.read(), 2.0) == b""
    await until(lambda: old.closed, what="the retired link closed after its last stream")
    await until(lambda: len(g.b.links) == 1, what="the answerer dropped the retired link")
    assert only_link(g.pool) is new
    await roundtrip(r2, w2, b"new link unaffected")


@on_uvloop
async def test_closing_the_pool_closes_retired_links_too(stack, monkeypatch):
    monkeypatch.setattr(mux, "MAX_LINK_AGE", 0.3)
    g = await gateways(stack, {SERVICE: await echo_server(stack)})
    r1, w1 = await connect(stack, g.a[SERVICE].port)
    await roundtrip(r1, w1)
    old = only_link(g.pool)
    await asyncio.sleep(0.4)
    assert await g.pool.ping("cluster-b", HOST, g.b.port, 2.0)
    new = only_link(g.pool)
    assert new is not old and not old.closed
    await g.pool.close()
    await until(lambda: old.closed and new.closed, what="every link of the pool closed")
    assert await closed_by_peer(r1)


@on_uvloop
async def test_an_expired_link_without_streams_is_closed_at_once(stack, monkeypatch):
    monkeypatch.setattr(mux, "MAX_LINK_AGE", 0.3)
    g = await gateways(stack, {SERVICE: await echo_server(stack)})
    assert await g.pool.ping("cluster-b", HOST, g.b.port, 2.0)
    old = only_link(g.pool)
    await asyncio.sleep(0.4)
    assert await g.pool.ping("cluster-b", HOST, g.b.port, 2.0)
    assert only_link(g.pool) is not old
    await until(lambda: old.closed and len(g.b.links) == 1, what="old link closed")


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
    ids=["even", "reused-after-end", "falling", "reused-while-open", "data-never-opened",
         "above-max", "max-u32"],
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
    """"v":999 (or none) gets ERR unsupported-version naming what was sent, and no stream; the
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


# ------------------------------------------------------------------------------ bugs found in review


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

    g = await gateways(stack, {SERVICE: await server(stack, banner), OTHER: await server(stack, banner_and_close)})
    for _ in range(5):  # a fresh stream each time; the first one also dials the link
        reader, writer = await connect(stack, g.a[SERVICE].port)
        assert await asyncio.wait_for(reader.readexactly(11), 2.0) == b"220 hello\r\n"
        writer.close()
        reader, writer = await connect(stack, g.a[OTHER].port)
        assert await asyncio.wait_for(reader.read(), 2.0) == b"bye" * 1000
        writer.close()
    await until(lambda: not g.b.legs and not g.a[SERVICE].legs and not g.a[OTHER].legs, what="all closed")


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
    assert queued <= 2 * WINDOW_SIZE, f"the caller queued {queued} bytes for a stream without credit"
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
    assert await asyncio.wait_for(result, 5.0) == (len(payload), hashlib.sha256(payload).hexdigest())
    await until(lambda: not g.b.legs and not g.a[SERVICE].legs, what="both gateways closed the stream")
