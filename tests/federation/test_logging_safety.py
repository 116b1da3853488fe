"""What bad clients cost in log volume, and that they cannot forge log lines: the federation's
TLS and admin ports, a gateway's admin port and its inbound listener, on real sockets.

The rule (federation/logs.py): one line per event class, rate-limited, untrusted input quoted;
counters carry the volume. Before it, 200 junk requests to an admin port wrote 2.5 MB of
tracebacks and raw bytes, and a 403 with `%0A` in its path forged a log line.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
from pathlib import Path

import aiohttp
import pytest

from federation.client import load_federation_bundle
from federation.errors import FederationError
from federation.logs import LogLimiter
from federation.model import CATALOG_PREFIX
from federation.store.sqlite import SqliteStore
from federation.tls import client_context
from tests.federation.test_http_serving import Junk, Servers, http_get, metric, open_many
from tests.helpers.relay import SERVICE, Exports, connect, echo_server, inbound, on_uvloop
from tests.helpers.tls import tls_pair

FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")  # as the CLI's
BURST = LogLimiter(logging.getLogger("x")).burst


def log_bytes(records: list[logging.LogRecord]) -> int:
    return sum(len(FORMAT.format(r)) + 1 for r in records)


def assert_few_safe_lines(records: list[logging.LogRecord], classes: int = 1) -> None:
    """At most a burst per event class, each one line, no traceback."""
    assert len(records) <= classes * BURST, [r.getMessage() for r in records]
    for r in records:
        text = FORMAT.format(r)
        assert "\n" not in text and r.exc_info is None and "Traceback" not in text, text


def junk_request(rng: random.Random) -> bytes:
    """A request line, then random bytes: what scanners and broken clients send."""
    return b"GET / HTTP/1.1\r\n" + rng.randbytes(rng.randint(256, 8192))


@pytest.mark.parametrize("port", ["federation admin", "gateway admin", "tls"])
async def test_200_junk_requests_cost_a_few_lines_and_are_counted(tmp_path: Path, caplog, port):
    rng = random.Random(7)
    async with Servers(tmp_path) as s:
        ctx = s.anonymous_context() if port == "tls" else None
        caplog.set_level(logging.INFO)
        caplog.clear()
        for _ in range(0, 200, 25):
            batch = await asyncio.gather(*(Junk().open(s.port(port), ctx, junk_request(rng))
                                           for _ in range(25)))
            closed = await asyncio.gather(*(j.until_closed(10) for j in batch))
            assert all(c is not None for c in closed)
        records = list(caplog.records)
        assert log_bytes(records) < 3000, log_bytes(records)  # (before: 2.5 MB; TLS: 4.5 MB)
        assert_few_safe_lines(records)
        assert all("malformed request from" in r.getMessage() for r in records)
        assert s.stats(port).bad_requests == 200
        prefix = "isthmus_gateway_http" if port == "gateway admin" else "isthmus_federation_http"
        where = "gateway admin" if port == "gateway admin" else "federation admin"
        listener = "api" if port == "tls" else "admin"
        assert metric(await s.metrics(where), f"{prefix}_bad_requests_total",
                      listener=listener) == 200


async def test_200_random_byte_connections_to_the_tls_port_are_counted_handshake_failures(
        tmp_path: Path, caplog):
    rng = random.Random(11)
    async with Servers(tmp_path) as s:
        caplog.set_level(logging.INFO)
        caplog.clear()
        for _ in range(0, 200, 25):
            batch = await open_many(25, s.tls_port)
            for j in batch:
                assert j.writer is not None
                j.writer.write(rng.randbytes(rng.randint(256, 4096)))
            await asyncio.gather(*(j.until_closed(10) for j in batch))
        assert_few_safe_lines(list(caplog.records), classes=2)
        st = s.stats("tls")
        # random bytes that happen to look like the start of a TLS record wait for the rest
        assert st.handshake_failed + st.timed_out["handshake"] == 200 and st.handshaking == 0
        assert st.handshake_failed > 150
        text = await s.metrics()
        assert metric(text, "isthmus_federation_http_tls_handshake_failures_total",
                      listener="api") == st.handshake_failed


async def test_100_forbidden_requests_cost_a_few_lines_and_are_counted(tmp_path: Path, caplog):
    async with Servers(tmp_path) as s:
        gateway = await s.gateway_client()
        await gateway.catalog()
        caplog.set_level(logging.INFO)
        caplog.clear()
        for i in range(100):
            with pytest.raises(FederationError) as e:
                await gateway.put_bundle(f"west-{i}", s.east.bundle())
            assert e.value.status == 403
        records = list(caplog.records)
        assert_few_safe_lines(records)
        assert log_bytes(records) < 2000  # (before: 25 KB, a line each)
        text = await s.metrics()
        assert metric(text, "isthmus_federation_authz_denied_total") == 100
        assert metric(text, "isthmus_federation_requests_total",
                      route="/v1/clusters/{name}/bundle", code="403") == 100


async def test_a_path_cannot_forge_a_log_line(tmp_path: Path, caplog):
    forged = "2026-01-01 00:00:00,000 INFO isthmus.federation: cluster west-1 joined"
    async with Servers(tmp_path) as s:
        await s.gateway_client()
        caplog.set_level(logging.INFO)
        caplog.clear()
        ctx = client_context(s.east.svid, load_federation_bundle(tmp_path / "state" / "ca.pem"))
        path = "/v1/clusters/x%0A" + forged.replace(" ", "%20") + "%1b[2J/bundle"
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as session:
            async with session.put(f"https://127.0.0.1:{s.tls_port}{path}", data=b"{}") as r:
                assert r.status == 403
        lines = [FORMAT.format(r) for r in caplog.records]
        assert any("denied: cluster 'east-1'" in line for line in lines), lines
        assert all("\n" not in line and "\x1b" not in line for line in lines)
        assert any(re.search(r"'/v1/clusters/x\\n2026-01-01 .*\\x1b\[2J/bundle'", line)
                   for line in lines), lines


async def test_junk_bytes_cannot_forge_a_log_line(tmp_path: Path, caplog):
    async with Servers(tmp_path) as s:
        caplog.set_level(logging.INFO)
        caplog.clear()
        j = await Junk().open(s.fed_admin_port,
                              send=b"GET / HTTP/1.1\r\nX\n2026-01-01 INFO forged\x1b[2J: y\r\n\r\n")
        await j.until_closed(5)
        lines = [FORMAT.format(r) for r in caplog.records]
        assert len(lines) == 1 and "malformed request from" in lines[0], lines
        assert "\n" not in lines[0] and "\x1b" not in lines[0]


class FailingStore(SqliteStore):
    """The real store, plus one fault on demand: reading the catalog raises what no handler
    expects (as a bug would)."""

    fail = False

    async def range(self, prefix: str):
        if self.fail and prefix == CATALOG_PREFIX:
            raise RuntimeError("disk on fire\n2026-01-01 INFO forged")
        return await super().range(prefix)


async def test_an_unexpected_exception_is_a_counted_json_500_and_one_line(tmp_path: Path, caplog):
    store = FailingStore(str(tmp_path / "fed.db"))
    async with Servers(tmp_path, store=store) as s:
        caplog.set_level(logging.INFO)
        caplog.clear()
        store.fail = True
        async with aiohttp.ClientSession() as session:
            for _ in range(20):
                async with session.get(f"http://127.0.0.1:{s.fed_admin_port}/status") as r:
                    assert r.status == 500
                    body = await r.json()
                    assert "RuntimeError" in body["error"] and "fire" not in body["error"]
        store.fail = False
        records = list(caplog.records)
        assert_few_safe_lines(records)
        assert re.search(r"GET '/status' \(route /status\) failed: RuntimeError: 'disk on fire"
                         r"\\n2026-01-01 INFO forged' \(at test_logging_safety.py:\d+ in range\)",
                         records[0].getMessage()), records[0].getMessage()
        text = await s.metrics()
        assert metric(text, "isthmus_federation_requests_total", route="/status", code="500") == 20
        assert metric(text, "isthmus_federation_http_handler_errors_total", listener="admin") == 0


@pytest.mark.parametrize("port,path,method,allow", [
    ("tls", "/v1/catalog", "DELETE", "GET"),
    ("federation admin", "/healthz", "POST", "GET"),
    ("gateway admin", "/healthz", "POST", "GET,HEAD"),
])
async def test_405_names_the_allowed_methods(tmp_path: Path, port, path, method, allow):
    async with Servers(tmp_path) as s:
        scheme, ctx = ("https", s.anonymous_context()) if port == "tls" else ("http", None)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx or False)) as c:
            async with c.request(method, f"{scheme}://127.0.0.1:{s.port(port)}{path}") as r:
                assert r.status == 405
                assert r.headers["Allow"].replace(" ", "") == allow
        if port != "gateway admin":
            text = (await http_get(s.fed_admin_port, "/metrics"))[1]
            assert metric(text, "isthmus_federation_requests_total",
                          route="unmatched", code="405") == 1


@on_uvloop
async def test_junk_on_the_inbound_listener_costs_a_few_lines_and_is_counted(stack):
    """200 connections that are not TLS: 200 failed handshakes counted, a few log lines."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("isthmus.gateway")
    logger.addHandler(handler)
    stack.callback(logger.removeHandler, handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    stack.callback(logger.setLevel, old)
    _, tls_b = tls_pair()
    exports = Exports()
    exports.add(SERVICE, await echo_server(stack))
    b = await inbound(stack, tls_b, exports)
    rng = random.Random(3)
    for _ in range(0, 200, 25):
        conns = [await connect(stack, b.port) for _ in range(25)]
        for _, writer in conns:
            writer.write(b"GET / HTTP/1.1\r\n\n2026-01-01 INFO forged\r\n" + rng.randbytes(512))
        for reader, _ in conns:
            await asyncio.wait_for(reader.read(), 10)
    for _ in range(100):
        if b.handshake_failed == 200:
            break
        await asyncio.sleep(0.05)
    assert b.handshake_failed == 200 and b.handshaking == 0
    assert_few_safe_lines(records)
