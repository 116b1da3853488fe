"""Bounded HTTP serving (federation/http_serving.py) on the real servers, over real sockets and
real TLS 1.3 on 127.0.0.1: the federation's TLS port and admin port, and a gateway's admin port.

Each test starts its servers with short limits (a second or so) so timeouts are seen quickly;
the defaults are the same code with other numbers. The key cases run on both asyncio's loop
and uvloop (what the processes use), since their TLS transports differ.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import uvloop
from aiohttp import web

from federation.client import FederationClient, load_federation_bundle
from federation.http_serving import BoundedSite, ServingLimits, ServingStats, refusal
from federation.server.app import FederationServer, create_token
from federation.store.sqlite import SqliteStore
from federation.tls import client_context
from gateway.config.schema import parse_config
from gateway.control.admin import start_admin
from gateway.runtime import Gateway
from tests.helpers.federation import make_cluster

HOST = "127.0.0.1"
LOOPS = pytest.mark.parametrize(
    "loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"]
)
SHORT = ServingLimits(handshake_timeout=1.0, header_timeout=1.0, body_timeout=1.0,
                      idle_timeout=1.0, max_anonymous=400)
SLACK = 3.0  # seconds a close may come after its deadline on a loaded 2-core machine
GATEWAY_CONFIG = """\
cluster: {name: east-1, region: us-east, zone: a}
federation: {url: "https://127.0.0.1:7443", ca_file: ca.pem}
listen: {inbound: "127.0.0.1:15443", admin: "127.0.0.1:15000"}
state_dir: state
"""


def run(loop_factory: Callable[[], asyncio.AbstractEventLoop], coro: Awaitable[Any]) -> Any:
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(asyncio.wait_for(coro, 100))


# ---- servers -------------------------------------------------------------------------------


class Servers:
    """A federation (TLS + admin port) and a gateway's admin port, with `limits` on each."""

    def __init__(self, tmp: Path, limits: ServingLimits = SHORT,
                 admin_limits: ServingLimits | None = None, store: Any = None) -> None:
        self.tmp = tmp
        self.limits = limits
        self.admin_limits = admin_limits or limits
        self.store = store or SqliteStore(str(tmp / "fed.db"))
        self.fed: FederationServer | None = None
        self.gw_runner: web.AppRunner | None = None
        self.clients: list[FederationClient] = []
        self.east: Any = None  # the cluster `gateway_client` joined

    async def __aenter__(self) -> Servers:
        self.fed = FederationServer(self.store, self.tmp / "state", (HOST, 0), (HOST, 0),
                                    lease_ttl=5.0, limits=self.limits,
                                    admin_limits=self.admin_limits)
        await self.fed.start()
        gw = Gateway(parse_config(GATEWAY_CONFIG, self.tmp / "gw.yaml"))
        self.gw_runner = await start_admin(gw, HOST, 0, limits=self.admin_limits)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for c in self.clients:
            await c.close()
        if self.gw_runner is not None:
            await self.gw_runner.cleanup()
        if self.fed is not None:
            await self.fed.stop()

    @property
    def tls_port(self) -> int:
        assert self.fed is not None and self.fed.port is not None
        return self.fed.port

    @property
    def fed_admin_port(self) -> int:
        assert self.fed is not None and self.fed.admin_port is not None
        return self.fed.admin_port

    @property
    def gw_site(self) -> BoundedSite:
        assert self.gw_runner is not None
        (site,) = self.gw_runner.sites
        assert isinstance(site, BoundedSite)
        return site

    @property
    def gw_admin_port(self) -> int:
        return self.gw_site.port

    def stats(self, port: str) -> ServingStats:
        assert self.fed is not None
        if port == "gateway admin":
            return self.gw_site.stats
        return self.fed._sites[{"tls": "api", "federation admin": "admin"}[port]].stats

    def port(self, name: str) -> int:
        if name == "gateway admin":
            return self.gw_admin_port
        return {"tls": self.tls_port, "federation admin": self.fed_admin_port}[name]

    def anonymous_context(self) -> ssl.SSLContext:
        return client_context(None, load_federation_bundle(self.tmp / "state" / "ca.pem"))

    def client(self, svid: Any = None) -> FederationClient:
        bundle = load_federation_bundle(self.tmp / "state" / "ca.pem")
        c = FederationClient(f"https://{HOST}:{self.tls_port}", bundle, svid, timeout=10.0)
        self.clients.append(c)
        return c

    def operator(self) -> FederationClient:
        assert self.fed is not None
        return self.client(self.fed.operator_svid)

    async def gateway_client(self) -> FederationClient:
        """A joined cluster's gateway (east-1), as a real gateway talks to the federation."""
        assert self.fed is not None
        east = self.east = make_cluster("east-1")
        token, _ = await create_token(self.fed.store, "east-1", 60.0, time.time())
        anonymous = self.client()
        await anonymous.join(token, east.record, east.bundle())
        await anonymous.close()  # its pooled connection would count as anonymous
        return self.client(east.svid)

    async def metrics(self, where: str = "federation admin") -> str:
        return (await http_get(self.port(where), "/metrics"))[1]


async def http_get(port: int, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, s.get(f"http://{HOST}:{port}{path}") as r:
        return r.status, await r.text()


def metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {name}{{{want}}} in:\n{text}")


# ---- raw clients ---------------------------------------------------------------------------


class Junk:
    """One raw client connection, and when the server closed it (loop time)."""

    def __init__(self) -> None:
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.ready_at = 0.0  # connected (and TLS handshake done)
        self.closed_at: float | None = None
        self.got = b""

    async def open(self, port: int, ctx: ssl.SSLContext | None = None,
                   send: bytes = b"") -> Junk:
        loop = asyncio.get_running_loop()
        self.reader, self.writer = await asyncio.wait_for(
            asyncio.open_connection(HOST, port, ssl=ctx), 30)
        self.ready_at = loop.time()
        if send:
            self.writer.write(send)
        return self

    async def until_closed(self, timeout: float) -> float | None:
        """Read (and keep) what the server sends until it closes; the close time or None."""
        assert self.reader is not None
        loop = asyncio.get_running_loop()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                try:
                    while chunk := await self.reader.read(65536):
                        self.got += chunk
                except (ConnectionError, ssl.SSLError):
                    pass
                self.closed_at = loop.time()
        return self.closed_at

    def close(self) -> None:
        if self.writer is not None:
            self.writer.transport.abort()


async def open_many(n: int, port: int, ctx: ssl.SSLContext | None = None,
                    send: bytes = b"") -> list[Junk]:
    out: list[Junk] = []
    for i in range(0, n, 25):  # a few at a time: handshakes cost CPU on a loaded machine
        batch = range(i, min(n, i + 25))
        out += await asyncio.gather(*(Junk().open(port, ctx, send) for _ in batch))
    return out


HALF_REQUEST = b"GET /v1/catalog HTTP/1.1\r\nHost: federation\r\nAccept: */*\r\n"


# ---- the pure admission rule ---------------------------------------------------------------


@pytest.mark.parametrize("stage,tls,open_,handshaking,anonymous,want", [
    ("accept", True, 9, 0, 0, None),
    ("accept", True, 10, 0, 0, "connections"),
    ("accept", True, 5, 3, 0, "handshakes"),
    ("accept", False, 5, 3, 0, None),  # a plain port has no handshakes
    ("established", True, 10, 0, 3, "anonymous"),  # open counts us; the bound is on the others
    ("established", True, 10, 0, 2, None),
    ("established", False, 3, 0, 2, None),
])
def test_refusal(stage, tls, open_, handshaking, anonymous, want):
    limits = ServingLimits(max_connections=10, max_handshakes=3, max_anonymous=3)
    stats = ServingStats(open=open_, handshaking=handshaking, anonymous=anonymous)
    assert refusal(stats, limits, stage, tls) == want


def test_limits_refuse_nonsense():
    with pytest.raises(ValueError, match="header_timeout"):
        ServingLimits(header_timeout=0)
    with pytest.raises(ValueError, match="max_anonymous"):
        ServingLimits(max_anonymous=0)


# ---- time bounds ---------------------------------------------------------------------------


@LOOPS
def test_anonymous_half_request_tls_clients_are_closed_while_real_clients_get_in(
        tmp_path, loop_factory):
    """200 anonymous TLS clients each send half a request head and wait: each is closed
    `header_timeout` after its handshake (not before), and a gateway and the operator are
    served meanwhile. (Before: all 200 stayed open for the hour of aiohttp's keep-alive.)"""

    limits = ServingLimits(header_timeout=3.0, max_anonymous=400)

    async def main() -> None:
        async with Servers(tmp_path, limits=limits) as s:
            gateway = await s.gateway_client()
            junk = await open_many(200, s.tls_port, s.anonymous_context(), HALF_REQUEST)
            cat = await gateway.catalog()  # served while the junk is open
            assert "east-1" in cat.clusters
            assert (await s.operator().catalog()).revision == cat.revision
            assert s.stats("tls").anonymous > 0  # (still open)
            t = limits.header_timeout
            closed = await asyncio.gather(*(j.until_closed(t + 15) for j in junk))
            # the server's clock starts when ITS side of the handshake is done, which a client
            # busy with 200 handshakes sees up to a few hundred ms later: hence t - 0.5
            late = [c and c - j.ready_at for j, c in zip(junk, closed, strict=True)
                    if c is None or not t - 0.5 <= c - j.ready_at <= t + SLACK]
            assert late == [], f"{len(late)} of 200 not closed about 3s after the handshake"
            assert all(j.got == b"" for j in junk)  # aborted, nothing answered
            text = await s.metrics()
            assert metric(text, "isthmus_federation_http_connections_timed_out_total",
                          listener="api", phase="header") == 200
            assert metric(text, "isthmus_federation_http_connections_anonymous",
                          listener="api") == 0
            # the gateway's pooled connection outlived the junk; it is still served
            assert "east-1" in (await gateway.catalog()).clusters
            for j in junk:
                j.close()

    run(loop_factory, main())


@LOOPS
def test_tls_handshake_timeout_closes_silent_tcp_clients(tmp_path, loop_factory):
    """TCP clients that never send a ClientHello are closed after `handshake_timeout`."""

    async def main() -> None:
        async with Servers(tmp_path) as s:
            junk = await open_many(200, s.tls_port)
            await asyncio.sleep(0.2)
            assert s.stats("tls").handshaking == 200
            assert "east-1" in (await (await s.gateway_client()).catalog()).clusters
            closed = await asyncio.gather(*(j.until_closed(SHORT.handshake_timeout + 15)
                                            for j in junk))
            assert all(c is not None and c - j.ready_at <= SHORT.handshake_timeout + SLACK
                       for j, c in zip(junk, closed, strict=True))
            st = s.stats("tls")
            assert st.timed_out["handshake"] == 200 and st.handshaking == 0
            assert st.handshake_failed == 0
            for j in junk:
                j.close()

    run(loop_factory, main())


@pytest.mark.parametrize("port", ["federation admin", "gateway admin"])
async def test_slowloris_is_closed_on_each_admin_port(tmp_path, port):
    """A client trickling one header byte every 100 ms is closed `header_timeout` after its
    first byte: bytes do not push the deadline back. /healthz is served meanwhile."""
    async with Servers(tmp_path) as s:
        loop = asyncio.get_running_loop()
        slow = await Junk().open(s.port(port), send=b"GET /healthz HTTP/1.1\r\n")
        started = loop.time()
        assert slow.writer is not None

        async def trickle() -> None:
            with contextlib.suppress(ConnectionError):
                for _ in range(100):  # 10 s at most
                    slow.writer.write(b"X")
                    await asyncio.sleep(0.1)

        dripper = asyncio.create_task(trickle())
        assert await http_get(s.port(port), "/healthz") == (200, "ok\n")
        closed = await slow.until_closed(15)
        dripper.cancel()
        assert closed is not None and 0.9 <= closed - started <= 1.0 + SLACK
        assert s.stats(port).timed_out["header"] == 1
        assert await http_get(s.port(port), "/healthz") == (200, "ok\n")
        slow.close()


async def test_idle_keepalive_connection_is_closed_and_a_new_request_restarts_the_clock(tmp_path):
    """After a response a keep-alive connection may idle `idle_timeout`; a request that then
    starts gets `header_timeout` from its first byte."""
    limits = ServingLimits(idle_timeout=1.0, header_timeout=2.0)
    async with Servers(tmp_path, admin_limits=limits) as s:
        loop = asyncio.get_running_loop()
        c = await Junk().open(s.fed_admin_port, send=b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
        assert c.reader is not None and c.writer is not None
        head = await asyncio.wait_for(c.reader.readuntil(b"ok\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        answered = loop.time()
        assert await c.until_closed(15) is not None
        assert 0.9 <= c.closed_at - answered <= 1.0 + SLACK
        assert s.stats("federation admin").timed_out["idle"] == 1

        d = await Junk().open(s.fed_admin_port, send=b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
        assert d.reader is not None and d.writer is not None
        await asyncio.wait_for(d.reader.readuntil(b"ok\n"), 5)
        await asyncio.sleep(0.6)  # idle, within idle_timeout
        d.writer.write(b"GET /healthz HTTP/1.1\r\n")  # starts a head: now header_timeout (2 s)
        began = loop.time()
        assert await d.until_closed(15) is not None
        assert 1.9 <= d.closed_at - began <= 2.0 + SLACK
        assert s.stats("federation admin").timed_out["header"] == 1


async def test_a_body_sent_too_slowly_is_closed(tmp_path):
    """An anonymous join whose body never arrives in full is closed after `body_timeout`."""
    async with Servers(tmp_path) as s:
        loop = asyncio.get_running_loop()
        c = await Junk().open(
            s.tls_port, s.anonymous_context(),
            b"POST /v1/join HTTP/1.1\r\nHost: f\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n{\"token\": ")
        began = loop.time()
        assert await c.until_closed(15) is not None
        assert 0.9 <= c.closed_at - began <= 1.0 + SLACK
        st = s.stats("tls")
        assert st.timed_out["body"] == 1 and st.handler_errors == 0
        text = await s.metrics()
        assert "isthmus_federation_requests_total" in text
        assert 'code="500"' not in text  # a client that went away is not a server error


async def test_a_long_poll_is_not_cut_by_the_timeouts(tmp_path):
    """The handler's time is the app's: a 2.5 s watch outlives 1 s header/idle timeouts."""
    async with Servers(tmp_path) as s:
        gateway = await s.gateway_client()
        rev = (await gateway.catalog()).revision
        began = time.monotonic()
        assert await gateway.watch(rev, timeout=2.5) == (rev, [])
        assert time.monotonic() - began >= 2.4
        timed_out = s.stats("tls").timed_out
        assert timed_out["header"] == timed_out["body"] == 0  # (the join's connection idled out)


# ---- count bounds --------------------------------------------------------------------------


async def test_anonymous_bound_refuses_beyond_the_limit_but_not_clients_with_certificates(
        tmp_path):
    limits = ServingLimits(header_timeout=30.0, max_anonymous=20)
    async with Servers(tmp_path, limits=limits) as s:
        gateway = await s.gateway_client()  # joins anonymously before the junk arrives
        ctx = s.anonymous_context()
        held = await open_many(20, s.tls_port, ctx, HALF_REQUEST)
        await asyncio.sleep(0.2)
        assert s.stats("tls").anonymous == 20
        extra = await open_many(10, s.tls_port, ctx, HALF_REQUEST)
        closed = await asyncio.gather(*(j.until_closed(5) for j in extra))
        assert all(c is not None and c - j.ready_at < 2.0
                   for j, c in zip(extra, closed, strict=True))
        assert await held[0].until_closed(0.1) is None  # the first 20 are still held
        text = await s.metrics()
        assert metric(text, "isthmus_federation_http_connections_refused_total",
                      listener="api", reason="anonymous") == 10
        # a gateway and the operator have certificates: not anonymous, not refused
        assert "east-1" in (await gateway.catalog()).clusters
        assert (await s.operator().catalog()) is not None
        assert s.stats("tls").anonymous == 20
        for j in held + extra:
            j.close()


@pytest.mark.parametrize("port", ["federation admin", "gateway admin"])
async def test_connection_bound_on_each_admin_port(tmp_path, port):
    limits = ServingLimits(header_timeout=30.0, max_connections=10, max_anonymous=10)
    async with Servers(tmp_path, admin_limits=limits) as s:
        held = await open_many(10, s.port(port), send=b"GET /healthz HTTP/1.1\r\n")
        await asyncio.sleep(0.2)
        extra = await open_many(5, s.port(port), send=b"GET /healthz HTTP/1.1\r\n\r\n")
        closed = await asyncio.gather(*(j.until_closed(5) for j in extra))
        assert all(c is not None for c in closed)
        assert all(j.got == b"" for j in extra)  # closed at once: nothing read, nothing answered
        assert s.stats(port).refused["connections"] == 5
        for j in held:
            j.close()
        await asyncio.sleep(0.2)
        status, text = await http_get(s.port(port), "/metrics")
        assert status == 200
        prefix = "isthmus_gateway_http" if port == "gateway admin" else "isthmus_federation_http"
        assert metric(text, f"{prefix}_connections_refused_total",
                      listener="admin", reason="connections") == 5


async def test_handshake_bound(tmp_path):
    limits = ServingLimits(handshake_timeout=30.0, max_handshakes=10)
    async with Servers(tmp_path, limits=limits) as s:
        silent = await open_many(10, s.tls_port)
        await asyncio.sleep(0.2)
        assert s.stats("tls").handshaking == 10
        with pytest.raises((ConnectionError, ssl.SSLError, asyncio.IncompleteReadError)):
            await Junk().open(s.tls_port, s.anonymous_context())
        assert s.stats("tls").refused["handshakes"] == 1
        for j in silent:
            j.close()
        await asyncio.sleep(0.3)
        assert s.stats("tls").handshaking == 0
        assert "east-1" in (await (await s.gateway_client()).catalog()).clusters


# ---- the site on its own -------------------------------------------------------------------


async def test_unhandled_exception_outside_any_middleware_is_counted_and_answered_500(caplog):
    async def boom(_: web.Request) -> web.Response:
        raise RuntimeError("boom\nforged line")

    app = web.Application()
    app.router.add_get("/boom", boom)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = BoundedSite(runner, HOST, 0, limits=SHORT, name="test")
    await site.start()
    try:
        with caplog.at_level("INFO"):
            for _ in range(20):
                assert (await http_get(site.port, "/boom"))[0] == 500
        assert site.stats.handler_errors == 20
        lines = [r.getMessage() for r in caplog.records]
        assert 1 <= len(lines) <= 6, lines
        assert all("\n" not in m and r.exc_info is None for m, r in zip(lines, caplog.records,
                                                                      strict=True))
        assert re.search(r"GET '/boom' .* RuntimeError: 'boom\\nforged line' \(at "
                         r"test_http_serving.py:\d+ in boom\)", lines[0]), lines[0]
    finally:
        await runner.cleanup()


async def test_site_binds_every_address_of_a_name_on_one_port():
    runner = web.AppRunner(web.Application(), access_log=None)
    await runner.setup()
    site = BoundedSite(runner, "localhost", 0, limits=SHORT)
    await site.start()
    try:
        ports = {s.getsockname()[1] for s in site._sockets}
        assert ports == {site.port}
        assert site in runner.sites
    finally:
        await runner.cleanup()
    assert runner.sites == set() and all(s.fileno() == -1 for s in site._sockets)


def test_bind_failure_is_an_oserror_and_leaves_nothing_registered(tmp_path):
    async def main() -> None:
        runner = web.AppRunner(web.Application(), access_log=None)
        await runner.setup()
        first = BoundedSite(runner, HOST, 0, limits=SHORT)
        await first.start()
        second = BoundedSite(runner, HOST, first.port, limits=SHORT)
        with pytest.raises(OSError):
            await second.start()
        assert runner.sites == {first}
        await runner.cleanup()

    run(asyncio.new_event_loop, main())
