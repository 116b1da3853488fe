"""Health checks (gateway/dataplane/probes.py) against real sockets on 127.0.0.1.

A *frozen* endpoint is modelled exactly as the kernel presents a SIGSTOPped process: a socket
that listens but is never accepted from. Connects complete (the kernel answers the handshake
from the backlog) and sent bytes are taken (into the receive buffer), but nothing ever comes
back. A plain tcp check calls that healthy; send/expect and http checks must fail within their
timeout. (tests/integration/test_hung_backend.py does it with a real SIGSTOP.)
"""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from gateway.config.schema import DEFAULT_HTTP_HEALTH_CHECK, HealthCheck
from gateway.dataplane import probes
from gateway.dataplane.probes import REPLY_LIMIT, checker, http_check, tcp_check

HOST = "127.0.0.1"
TIMEOUT = 0.3


@pytest.fixture
def frozen_port():
    """Listening, never accepting: what a stopped process looks like from outside."""
    s = socket.socket()
    s.bind((HOST, 0))
    s.listen(16)
    yield s.getsockname()[1]
    s.close()


@pytest.fixture
def closed_port():
    s = socket.socket()
    s.bind((HOST, 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture
async def serve():
    """serve(handler) -> port of a server running handler(reader, writer) per connection."""
    servers = []

    async def start(handler) -> int:
        async def wrapped(reader, writer):
            try:
                await handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        srv = await asyncio.start_server(wrapped, HOST, 0)
        servers.append(srv)
        return srv.sockets[0].getsockname()[1]

    yield start
    for srv in servers:
        srv.close()
        await srv.wait_closed()


async def timed(coro) -> tuple[bool, float]:
    started = time.monotonic()
    ok = await coro
    return ok, time.monotonic() - started


def http_reply(status: str):
    async def handler(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(f"HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n".encode())
        await writer.drain()

    return handler


# --- tcp ----------------------------------------------------------------------------------


async def test_plain_tcp_check_cannot_tell_a_frozen_process(frozen_port, closed_port):
    # The blind spot this module documents: the kernel completes the handshake.
    assert await tcp_check(HOST, frozen_port, TIMEOUT) is True
    assert await tcp_check(HOST, closed_port, TIMEOUT) is False


async def test_send_expect_fails_on_a_frozen_process_within_the_timeout(frozen_port):
    ok, took = await timed(tcp_check(HOST, frozen_port, TIMEOUT, b"PING\r\n", b"PONG"))
    assert ok is False
    assert TIMEOUT * 0.9 <= took < TIMEOUT + 0.5, took


async def test_send_expect_healthy_when_the_reply_holds_the_expected_bytes(serve):
    seen: list[bytes] = []

    async def pong(reader, writer):
        seen.append(await reader.readline())
        writer.write(b"+PONG\r\n")
        await writer.drain()

    port = await serve(pong)
    assert await tcp_check(HOST, port, TIMEOUT, b"PING\r\n", b"PONG") is True
    assert seen == [b"PING\r\n"]


async def test_expect_may_straddle_two_reads(serve):
    async def slow(reader, writer):
        await reader.readline()
        writer.write(b"status: he")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"althy\n")
        await writer.drain()
        await asyncio.sleep(1)

    port = await serve(slow)
    assert await tcp_check(HOST, port, 1.0, b"status?\n", b"healthy") is True


@pytest.mark.parametrize(
    "reply, why",
    [
        (b"-ERR unknown command\r\n", "wrong answer, then the server closes"),
        (b"", "closed without a byte"),
    ],
)
async def test_send_expect_unhealthy_on_a_wrong_or_no_reply(serve, reply, why):
    async def wrong(reader, writer):
        await reader.readline()
        writer.write(reply)
        await writer.drain()

    port = await serve(wrong)
    ok, took = await timed(tcp_check(HOST, port, 2.0, b"PING\r\n", b"PONG"))
    assert ok is False, why
    assert took < 1.0, f"{why}: a closed connection fails at once, not at the timeout ({took})"


async def test_expect_beyond_the_reply_limit_is_unhealthy(serve):
    async def chatty(reader, writer):
        writer.write(b"x" * (REPLY_LIMIT + 10) + b"PONG")
        await writer.drain()
        await asyncio.sleep(1)

    port = await serve(chatty)
    assert await tcp_check(HOST, port, 2.0, None, b"PONG") is False


async def test_expect_alone_reads_a_banner(serve, frozen_port):
    async def banner(reader, writer):
        writer.write(b"SSH-2.0-test\r\n")
        await writer.drain()
        await asyncio.sleep(1)

    port = await serve(banner)
    assert await tcp_check(HOST, port, TIMEOUT, None, b"SSH-2.0") is True
    assert await tcp_check(HOST, frozen_port, TIMEOUT, None, b"SSH-2.0") is False


# --- http ---------------------------------------------------------------------------------


async def test_http_check_fails_on_a_frozen_process_within_the_timeout(frozen_port):
    ok, took = await timed(http_check(HOST, frozen_port, "/healthz", TIMEOUT))
    assert ok is False
    assert TIMEOUT * 0.9 <= took < TIMEOUT + 0.5, took


@pytest.mark.parametrize(
    "status, below, healthy",
    [
        ("200 OK", 400, True),
        ("204 No Content", 400, True),
        ("301 Moved Permanently", 400, True),
        ("404 Not Found", 400, False),  # a configured path that is missing is a failure
        ("503 Service Unavailable", 400, False),
        ("404 Not Found", 500, True),  # the implied /healthz: an answer proves the app runs
        ("401 Unauthorized", 500, True),
        ("500 Internal Server Error", 500, False),
        ("503 Service Unavailable", 500, False),
        ("101 Switching Protocols", 500, False),
    ],
)
async def test_http_check_status_rule(serve, status, below, healthy):
    port = await serve(http_reply(status))
    assert await http_check(HOST, port, "/healthz", TIMEOUT, below) is healthy


async def test_http_check_sends_a_well_formed_request(serve):
    got: list[bytes] = []

    async def record(reader, writer):
        got.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.0 200 OK\r\n\r\n")
        await writer.drain()

    port = await serve(record)
    assert await http_check(HOST, port, "/ready?x=1", TIMEOUT) is True
    (head,) = got
    lines = head.decode().split("\r\n")
    assert lines[0] == "GET /ready?x=1 HTTP/1.1"
    assert f"Host: {HOST}:{port}" in lines and "Connection: close" in lines


@pytest.mark.parametrize(
    "reply",
    [b"SSH-2.0-OpenSSH\r\n", b"HTTP/1.1 abc OK\r\n", b"\r\n", b"x" * (REPLY_LIMIT + 100)],
)
async def test_http_check_refuses_what_is_not_a_status_line(serve, reply):
    async def junk(reader, writer):
        writer.write(reply)
        await writer.drain()
        await asyncio.sleep(0.5)

    port = await serve(junk)
    assert await http_check(HOST, port, "/healthz", 1.0) is False


async def test_http_check_refused_connect(closed_port):
    assert await http_check(HOST, closed_port, "/healthz", TIMEOUT) is False


# --- wiring from the config value ---------------------------------------------------------


async def test_checker_builds_the_check_the_config_describes(serve, frozen_port):
    tcp = HealthCheck("tcp", None, 1.0, TIMEOUT, 2, 2)
    expecting = HealthCheck("tcp", None, 1.0, TIMEOUT, 2, 2, b"PING\n", b"PONG")
    assert await checker(tcp, HOST, frozen_port)() is True
    assert await checker(expecting, HOST, frozen_port)() is False
    port = await serve(http_reply("404 Not Found"))
    strict = HealthCheck("http", "/healthz", 1.0, TIMEOUT, 2, 2)
    assert await checker(strict, HOST, port)() is False
    assert await checker(DEFAULT_HTTP_HEALTH_CHECK, HOST, port)() is True
    assert await checker(DEFAULT_HTTP_HEALTH_CHECK, HOST, frozen_port)() is False


async def test_a_failing_probe_is_logged_at_debug_with_its_reason(serve, caplog):
    port = await serve(http_reply("503 Service Unavailable"))
    with caplog.at_level("DEBUG", probes.log.name):
        assert await http_check(HOST, port, "/healthz", TIMEOUT) is False
    assert any("answered 503" in r.getMessage() for r in caplog.records)
