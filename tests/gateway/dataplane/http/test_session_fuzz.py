"""The HTTP request path against real sockets: an HttpImportListener in front of a real aiohttp
backend, both on an event loop in a background thread; clients are plain blocking sockets.

Hypothesis throws byte streams at it — valid requests, cut ones, pipelined ones, garbage — and
each must get well-formed HTTP/1.1 answers (or a clean close), never a crash: after every
example a normal request still works. Tables cover pipelining order and the limits (431, 414,
400)."""

from __future__ import annotations

import asyncio
import json
import random
import re
import socket
import threading
import time

import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from federation.model import Endpoint, FailoverPolicy, Locality, OutlierPolicy, ServiceKey
from gateway.core.health import HealthBook
from gateway.core.routes import compile_routes
from gateway.dataplane.dial import Dialer
from gateway.dataplane.http.host import HttpLimits
from gateway.dataplane.http.listener import HttpImportListener
from gateway.dataplane.router import Router
from tests.helpers.http_backends import HttpBackend
from tests.helpers.processes import free_port

SMALL = HttpLimits(4096, 20, 512)  # head bytes, headers, target bytes
STATUS = re.compile(rb"HTTP/1\.1 [1-5]\d\d [^\r\n]*\r\n")


class Proxy:
    """The listener and its backend on a loop of their own (a thread)."""

    def __init__(self, limits: HttpLimits = SMALL) -> None:
        self.limits = limits
        self.port = free_port()
        self.backend_port = free_port()
        self.loop = uvloop.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.listener: HttpImportListener | None = None
        self.error: BaseException | None = None
        self.loop.set_exception_handler(self._on_error)

    def _on_error(self, loop, context) -> None:  # an exception nobody caught: a crash
        self.error = context.get("exception") or RuntimeError(context["message"])

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start())
        self.ready.set()
        self.loop.run_forever()

    async def _start(self) -> None:
        svc = ServiceKey("default", "web")
        self.backend = HttpBackend("c", "web", self.backend_port)
        await self.backend.start()
        router = Router(svc, Locality("r", "z", "c"), FailoverPolicy(),
                        HealthBook(OutlierPolicy()), time.monotonic, random.random)
        router.set_local([Endpoint("127.0.0.1", self.backend_port)])
        self.listener = HttpImportListener(
            svc, compile_routes([]), {svc: router}, Dialer(None, 1.0), max_connections=1000,
            idle_timeout=60, limits=self.limits)
        await self.listener.start("127.0.0.1", self.port)

    def start(self) -> Proxy:
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def stop(self) -> None:
        async def down() -> None:
            await self.listener.close()
            await self.backend.stop()

        asyncio.run_coroutine_threadsafe(down(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def proxy():
    p = Proxy().start()
    yield p
    p.stop()


def exchange(port: int, data: bytes, timeout: float = 2.0) -> bytes:
    """Send `data`, half-close, read until the server closes (or the timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            out += chunk
        return out


def responses(raw: bytes) -> list[tuple[int, bytes]]:
    """(status, body) of every response in `raw` (Content-Length or chunked framing)."""
    out = []
    while raw:
        m = STATUS.match(raw)
        assert m, f"not an HTTP/1.1 status line: {raw[:80]!r}"
        head, sep, rest = raw.partition(b"\r\n\r\n")
        assert sep, f"no end of head: {raw[:200]!r}"
        status = int(head[9:12])
        hl = head.lower()
        n = re.search(rb"\r\ncontent-length: *(\d+)", hl)
        if n:
            body, raw = rest[:int(n.group(1))], rest[int(n.group(1)):]
        elif b"transfer-encoding: chunked" in hl:
            body = b""
            while True:
                size, _, rest = rest.partition(b"\r\n")
                k = int(size, 16)
                body, rest = body + rest[:k], rest[k + 2:]
                if k == 0:
                    break
            raw = rest
        else:
            body, raw = rest, b""
        out.append((status, body))
    return out


def get(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: t\r\n{extra}\r\n".encode()


def test_pipelined_requests_are_answered_in_order(proxy):
    raw = exchange(proxy.port, b"".join(get(f"/p{i}") for i in range(5)))
    got = responses(raw)
    assert [s for s, _ in got] == [200] * 5
    assert [json.loads(b)["path"] for _, b in got] == [f"/p{i}" for i in range(5)]


def test_a_head_response_has_no_body_even_pipelined(proxy):
    raw = exchange(proxy.port, b"HEAD /h HTTP/1.1\r\nHost: t\r\n\r\n" + get("/after"))
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"content-length: " in head.lower()
    ((status, body),) = responses(rest)  # what follows the HEAD's head is the GET's answer
    assert status == 200 and json.loads(body)["path"] == "/after"


def test_a_post_with_a_chunked_body_and_one_with_a_length(proxy):
    chunked = (b"POST /c HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    sized = b"POST /s HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc"
    got = responses(exchange(proxy.port, chunked + sized))
    assert [json.loads(b)["body_bytes"] for _, b in got] == [11, 3]


@pytest.mark.parametrize("data, status", [
    (get("/x", "".join(f"x-{i}: 1\r\n" for i in range(25))), 431),  # more than 20 headers
    (get("/x", "x-big: " + "a" * 5000 + "\r\n"), 431),  # head over 4096 bytes
    (get("/" + "a" * 600), 414),  # target over 512 bytes
    (b"GET / HTTP/1.1\r\nHost x\r\n\r\n", 400),
    (b"\x16\x03\x01\x00\xa5\x01\x00\x00", 400),  # a TLS ClientHello
    (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", 501),
])
def test_bad_requests_get_their_status_then_close(proxy, data, status):
    got = responses(exchange(proxy.port, data))
    assert [s for s, _ in got] == [status]


def test_a_slow_request_head_gets_408_while_others_are_served():
    """Slowloris: heads trickled (or never sent) past http_header_timeout get 408 and close;
    a keep-alive connection between requests is not cut by it; other clients are served."""
    p = Proxy(HttpLimits(4096, 20, 512, header_timeout=1.0)).start()
    try:
        slow = [socket.create_connection(("127.0.0.1", p.port), timeout=5) for _ in range(20)]
        for s in slow[:10]:
            s.sendall(b"GET / HTTP/1.1\r\nHo")  # half a head; the other 10 send nothing
        kept = socket.create_connection(("127.0.0.1", p.port), timeout=5)
        kept.sendall(get("/first"))
        first = kept.recv(65536)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 1.5:  # others are served meanwhile
            assert responses(exchange(p.port, get("/other")))[0][0] == 200
        got = []
        for s in slow:
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            got.append(data)
            s.close()
        took = time.monotonic() - t0
        assert all(g.startswith(b"HTTP/1.1 408 ") for g in got), got[:2]
        assert 1.0 <= took <= 4.0, took
        kept.sendall(get("/second"))  # idle between requests, not a slow head: still open
        assert responses(first)[0][0] == 200 and kept.recv(65536).startswith(b"HTTP/1.1 200")
        kept.close()
        assert p.listener.http.refused.get(408) == 20
    finally:
        p.stop()


def test_a_request_after_a_refused_one_on_a_new_connection_is_served(proxy):
    exchange(proxy.port, b"garbage\r\n\r\n")
    assert responses(exchange(proxy.port, get("/ok")))[0][0] == 200


PIECES = st.sampled_from([
    get("/a"), get("/b?q=1", "traceparent: garbage\r\n"), b"GET / HTTP/1.0\r\n\r\n",
    b"POST /p HTTP/1.1\r\nContent-Length: 4\r\n\r\nbody",
    b"POST /p HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"\r\n", b"GET", b" / HTTP/1.1\r\n", b"Host: x\r\n",
    b"\x00\xff", b"Content-Length: 99999999999999999999\r\n", b"x" * 700,
])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(PIECES, st.binary(max_size=64)), max_size=8))
def test_any_bytes_get_well_formed_answers_and_never_a_crash(proxy, pieces):
    raw = exchange(proxy.port, b"".join(pieces), timeout=1.0)
    if raw:
        for status, _ in responses(raw):
            assert 100 <= status <= 599
    assert proxy.error is None, proxy.error
    assert responses(exchange(proxy.port, get("/alive")))[0][0] == 200
