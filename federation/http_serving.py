"""Bounded HTTP serving: an aiohttp site where every connection is bounded in time and count.

Used by every HTTP server of Isthmus: the federation's TLS port and admin port, and each
gateway's admin port. aiohttp's own `TCPSite` keeps a client as long as the client likes (an
anonymous TLS client that sends half a request head stays for an hour; the handshake has no
timeout at all), so anyone who can reach a port can fill the process's file descriptors.
`BoundedSite` replaces `TCPSite`: same runner (`web.AppRunner`), its own accept loop.

Theory of operation
-------------------
Time. Each connection is in one phase; each phase but the handler's has a deadline, and a
connection that misses it is aborted and counted in
`<prefix>_connections_timed_out_total{phase}`:

    phase      starts                                  ends                      limit
    handshake  accept (TLS ports only)                 TLS handshake done        handshake_timeout
    header     handshake done (or accept), or the      a complete request head   header_timeout
               first byte after an idle spell
    body       request head parsed                     request body read to end  body_timeout
    handler    body complete                           response written          none (long-polls)
    idle       response written (keep-alive)           first byte of the next    idle_timeout
                                                       request

A header deadline is not pushed back by further bytes, so a client trickling one header byte a
second (slowloris) is closed `header_timeout` after its first byte all the same.

Count. Checked when a connection arrives; beyond a bound it is closed at once (nothing is read
from it) and counted in `<prefix>_connections_refused_total{reason}`:

    reason       what is bounded                                                 limit
    connections  all open connections of the port, handshakes included          max_connections
    handshakes   TLS handshakes in progress                                      max_handshakes
    anonymous    connections without a client certificate, checked after the    max_anonymous
                 handshake (on a plain port every connection is anonymous)

A client with a certificate the TLS port trusts (a joined cluster's gateway, the operator) is
never refused for `anonymous`: junk without certificates fills its own bound, not theirs.

Errors and logs. A malformed request (aiohttp's parser answers 400) and an exception no
middleware caught (aiohttp answers 500) are counted (`_bad_requests_total`,
`_handler_errors_total`) and logged as ONE line, without traceback or raw bytes beyond
`quote()`'s bound, through a `LogLimiter` whose keys are the event classes; aiohttp's own
`aiohttp.server` error logging (a traceback plus the raw request per malformed request) is
replaced. Refused connections, failed handshakes and timeouts likewise: one rate-limited line per
class, and the counters carry the volume.

This reaches into aiohttp's `RequestHandler` (a subclass overriding `connection_made`,
`data_received`, `finish_response`, `handle_error`, `log_exception`; reading `_messages`) since
aiohttp has no public hook for these; tests/federation/test_http_serving.py pins the behaviour.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import traceback
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from federation.logs import LogLimiter, quote
from federation.metrics import Exposition, Sample

__all__ = [
    "ADMIN_LIMITS",
    "TLS_LIMITS",
    "BoundedSite",
    "ServingLimits",
    "ServingStats",
    "refusal",
    "serving_metrics",
    "where",
]

PHASES = ("handshake", "header", "body", "idle")
# aiohttp's RequestHandler logs through `logger=` at debug level too (with tracebacks); every
# event it would log is counted and logged by BoundedSite instead, so its logger is mute.
_MUTE = logging.Logger("isthmus.http.aiohttp")
_MUTE.disabled = True
REFUSALS = ("connections", "handshakes", "anonymous")


@dataclass(frozen=True)
class ServingLimits:
    """Time (seconds) and count bounds of one port; see the module docstring for each."""

    handshake_timeout: float = 5.0
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    idle_timeout: float = 30.0
    max_connections: int = 4096
    max_handshakes: int = 256
    max_anonymous: int = 256
    backlog: int = 512

    def __post_init__(self) -> None:
        for name in ("handshake_timeout", "header_timeout", "body_timeout", "idle_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: {getattr(self, name)!r}: must be positive")
        for name in ("max_connections", "max_handshakes", "max_anonymous", "backlog"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: {getattr(self, name)!r}: must be at least 1")


# The federation's TLS port: gateways hold a few connections each (watch + calls); anonymous
# clients only join. The idle timeout outlasts aiohttp's client pool (15 s) so a pooled
# connection is dropped by its client before the server closes it under a request.
TLS_LIMITS = ServingLimits()
# Admin ports (plain HTTP: probes, Prometheus, operators): few clients, all anonymous.
ADMIN_LIMITS = ServingLimits(max_connections=128, max_anonymous=128)


@dataclass
class ServingStats:
    """Counters and gauges of one port (see `serving_metrics` for their exposition)."""

    accepted: int = 0
    open: int = 0
    handshaking: int = 0
    anonymous: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    timed_out: Counter[str] = field(default_factory=Counter)
    handshake_failed: int = 0
    certificates_refused: int = 0  # of handshake_failed: a client certificate TLS refused
    bad_requests: int = 0
    handler_errors: int = 0


def refusal(stats: ServingStats, limits: ServingLimits, stage: str, tls: bool) -> str | None:
    """Why a connection must be closed at once at `stage` ("accept" or "established"), or None.

    At accept `stats.open` does not count the new connection yet; once established it does
    (and `stats.anonymous` does not)."""
    if stage == "accept":
        if stats.open >= limits.max_connections:
            return "connections"
        if tls and stats.handshaking >= limits.max_handshakes:
            return "handshakes"
        return None
    if stats.anonymous >= limits.max_anonymous:
        return "anonymous"
    return None


def _certificate_refused(e: BaseException) -> bool:
    """A handshake that failed on the peer's certificate (OpenSSL's verify step)."""
    return isinstance(e, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(e)


def where(exc: BaseException) -> str:
    """`file:line in function` of the innermost frame of `exc`'s traceback (for one-line logs)."""
    tb = traceback.extract_tb(exc.__traceback__) if exc.__traceback__ is not None else None
    if not tb:
        return "no traceback"
    f = tb[-1]
    return f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} in {f.name}"


def serving_metrics(page: Exposition, prefix: str, ports: Mapping[str, ServingStats]) -> None:
    """The ports' stats as metric families of `page`, labelled `listener`."""
    items = sorted(ports.items())

    def per_port(value: Callable[[ServingStats], float]) -> list[Sample]:
        return [({"listener": n}, value(s)) for n, s in items]

    page.counter(f"{prefix}_connections_accepted_total", "Connections accepted (before any check).",
                 per_port(lambda s: s.accepted))
    page.gauge(f"{prefix}_connections_open", "Connections open now, TLS handshakes included.",
               per_port(lambda s: s.open))
    page.gauge(f"{prefix}_connections_anonymous",
               "Open connections without a client certificate (every one on a plain port).",
               per_port(lambda s: s.anonymous))
    page.gauge(f"{prefix}_tls_handshakes_in_progress", "TLS handshakes in progress.",
               per_port(lambda s: s.handshaking))
    page.counter(f"{prefix}_connections_refused_total",
                 "Connections closed at once by a bound: connections, handshakes, anonymous.",
                 [({"listener": n, "reason": r}, s.refused[r]) for n, s in items for r in REFUSALS])
    page.counter(f"{prefix}_connections_timed_out_total",
                 "Connections closed by a timeout, by phase: handshake, header, body, idle.",
                 [({"listener": n, "phase": p}, s.timed_out[p]) for n, s in items for p in PHASES])
    page.counter(f"{prefix}_tls_handshake_failures_total",
                 "TLS handshakes that failed (not TLS, certificate refused, peer gone), "
                 "not timeouts.",
                 per_port(lambda s: s.handshake_failed))
    page.counter(f"{prefix}_tls_client_certificates_refused_total",
                 "Of the failed handshakes: a client certificate that chains to no CA the port "
                 "trusts now (an unknown cluster, a removed one, a retired CA), refused with a "
                 "TLS alert.",
                 per_port(lambda s: s.certificates_refused))
    page.counter(f"{prefix}_bad_requests_total",
                 "Malformed HTTP requests (answered 400 by the parser).",
                 per_port(lambda s: s.bad_requests))
    page.counter(f"{prefix}_handler_errors_total",
                 "Requests that failed with an exception no middleware answered (answered 500).",
                 per_port(lambda s: s.handler_errors))


class BoundedSite(web.BaseSite):
    """A `TCPSite` with the bounds of `limits`: `await site.start()`, `site.port`, `site.stats`;
    stopped by the runner's `cleanup()` like any site.

    `name` names the port in logs and in the `listener` label ("api", "admin")."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        limits: ServingLimits,
        ssl_context: ssl.SSLContext | None = None,
        name: str = "http",
        logger: logging.Logger | None = None,
        sock: socket.socket | None = None,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=limits.backlog)
        self.host = host
        self.requested_port = port
        self._given = sock  # a socket bound elsewhere (a takeover hands one over): served as is
        self.limits = limits
        self.label = name
        self.stats = ServingStats()
        self.log = LogLimiter(logger or logging.getLogger("isthmus.http"))
        self._sockets: list[socket.socket] = []
        self._tasks: set[asyncio.Task] = set()

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context is not None else "http"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def port(self) -> int:
        for sock in self._sockets:
            return sock.getsockname()[1]
        return self.requested_port

    async def start(self) -> None:
        await super().start()  # registers the site with the runner
        loop = asyncio.get_running_loop()
        try:
            if self._given is not None:
                sock = self._given.dup()  # ours to close; the caller keeps its own
                sock.setblocking(False)
                self._sockets = [sock]
            else:
                infos = await loop.getaddrinfo(
                    self.host or None, self.requested_port,
                    type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE,
                )
                self._sockets = _bind(infos, self.requested_port, self.limits.backlog)
        except OSError:
            self._runner._unreg_site(self)
            raise
        for sock in self._sockets:
            self._spawn(self._accept_loop(sock), f"accept {self.label}")

    async def stop(self) -> None:
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        for sock in self._sockets:
            sock.close()
        await asyncio.gather(*tasks, return_exceptions=True)
        await super().stop()

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(f"http-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- accepting --------------------------------------------------------------------------

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        tls = self._ssl_context is not None
        while True:
            try:
                conn, peer = await loop.sock_accept(sock)
            except OSError as e:  # e.g. out of file descriptors: say so, do not spin
                self.log.warning("accept-failed", "%s: accept failed: %s", self.label, e)
                await asyncio.sleep(0.1)
                continue
            self.stats.accepted += 1
            reason = refusal(self.stats, self.limits, "accept", tls)
            if reason is not None:
                conn.close()
                self.refused(reason, peer)
                continue
            self.stats.open += 1
            if tls:
                self.stats.handshaking += 1
                self._spawn(self._handshake(conn, peer), f"handshake {self.label}")
            else:
                await self._connect(conn, peer)

    async def _connect(self, conn: socket.socket, peer: Any) -> None:
        try:
            await asyncio.get_running_loop().connect_accepted_socket(self._protocol, conn)
        except OSError as e:  # gone before the transport was made
            conn.close()
            self.stats.open -= 1
            self.log.info("connect-failed", "%s: connection from %s lost at once: %s",
                          self.label, quote(peer), quote(e))

    async def _handshake(self, conn: socket.socket, peer: Any) -> None:
        loop = asyncio.get_running_loop()
        timeout = self.limits.handshake_timeout
        started = loop.time()
        try:
            await loop.connect_accepted_socket(
                self._protocol, conn, ssl=self._ssl_context, ssl_handshake_timeout=timeout
            )
        except asyncio.CancelledError:
            conn.close()  # no-op if the transport already closed it
            self.stats.open -= 1
            raise
        except Exception as e:  # ssl.SSLError and resets are OSErrors; count whatever it was
            conn.close()
            self.stats.open -= 1
            # asyncio and uvloop word a handshake timeout differently: go by the clock
            if loop.time() - started >= timeout * 0.95:
                self.stats.timed_out["handshake"] += 1
                self.log.info("timeout-handshake", "%s: closed %s: no TLS handshake within %gs",
                              self.label, quote(peer), timeout)
            elif _certificate_refused(e):
                self.stats.handshake_failed += 1
                self.stats.certificates_refused += 1
                self.log.warning("certificate-refused", "%s: refused the client certificate of "
                                 "%s (TLS alert sent): %s", self.label, quote(peer), quote(e))
            else:
                self.stats.handshake_failed += 1
                self.log.warning("handshake-failed", "%s: TLS handshake with %s failed: %s",
                                 self.label, quote(peer), quote(str(e) or type(e).__name__))
        finally:
            self.stats.handshaking -= 1

    def set_ssl_context(self, ctx: ssl.SSLContext) -> None:
        """The context of every handshake from now on (open connections keep theirs)."""
        if self._ssl_context is None:
            raise ValueError(f"{self.label}: a plain-HTTP site has no TLS context to replace")
        self._ssl_context = ctx

    def _protocol(self) -> _BoundedHandler:
        server = self._runner.server
        assert server is not None
        limits = self.limits
        return _BoundedHandler(
            self, server, loop=asyncio.get_running_loop(), access_log=None, logger=_MUTE,
            # aiohttp's own keep-alive timer is only a backstop behind ours
            keepalive_timeout=limits.idle_timeout + limits.header_timeout + 1.0,
        )

    # ---- events (counted, logged one line per class, rate-limited) ---------------------------

    def refused(self, reason: str, peer: Any) -> None:
        self.stats.refused[reason] += 1
        s, lim = self.stats, self.limits
        bound = {"connections": (s.open, lim.max_connections),
                 "handshakes": (s.handshaking, lim.max_handshakes),
                 "anonymous": (s.anonymous, lim.max_anonymous)}[reason]
        self.log.warning(f"refused-{reason}", "%s: refused a connection from %s: %d %s open "
                         "(the limit)", self.label, quote(peer), bound[1], reason)

    def timed_out(self, phase: str, peer: Any) -> None:
        self.stats.timed_out[phase] += 1
        what = {"header": "no complete request head", "body": "request body not read to end",
                "idle": "no new request on an idle keep-alive connection"}[phase]
        timeout = getattr(self.limits, f"{phase}_timeout")
        self.log.info(f"timeout-{phase}", "%s: closed %s: %s within %gs",
                      self.label, quote(peer), what, timeout)

    def http_error(self, status: int, exc: BaseException | None, peer: Any,
                   request: web.BaseRequest | None) -> None:
        if status == 400:
            self.stats.bad_requests += 1
            self.log.warning("bad-request", "%s: malformed request from %s: %s",
                             self.label, quote(peer), quote(exc or "bad request"))
            return
        if isinstance(exc, ConnectionError):
            return  # the client went away mid-request: nothing to answer, nothing wrong here
        self.stats.handler_errors += 1
        what = "?" if request is None else f"{request.method} {quote(request.rel_url)}"
        name = type(exc).__name__ if exc is not None else f"status {status}"
        self.log.error("handler-error", "%s: %s from %s failed: %s: %s (at %s)",
                       self.label, what, quote(peer), name, quote(exc or ""),
                       where(exc) if exc is not None else "-")


class _BoundedHandler(RequestHandler):
    """aiohttp's RequestHandler with the phase deadlines and the anonymous bound of its site."""

    def __init__(self, site: BoundedSite, manager: Any, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._site = site
        self._phase = "header"
        self._timer: asyncio.TimerHandle | None = None
        self._body: Any = None
        self._peer: Any = None
        self._anonymous = False
        self._counted = False  # connection_made ran: `open` includes us until connection_lost
        self._made = False  # ... and aiohttp's handler runs (not refused)
        self._gone = False
        self._quiet = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        site = self._site
        self._counted = True
        self._peer = transport.get_extra_info("peername")
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is None or ssl_object.getpeercert(binary_form=True) is None:
            reason = refusal(site.stats, site.limits, "established", ssl_object is not None)
            if reason is not None:
                transport.abort()
                site.refused(reason, self._peer)
                return
            self._anonymous = True
            site.stats.anonymous += 1
        self._made = True
        super().connection_made(transport)
        self._arm("header")

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._gone or not self._counted:
            return
        self._gone = True
        self._disarm()
        site = self._site
        site.stats.open -= 1
        if self._anonymous:
            site.stats.anonymous -= 1
        if self._made:
            super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._phase == "idle" and data:
            self._arm("header")
        queued = len(self._messages)
        super().data_received(data)
        if len(self._messages) > queued:  # a request head is complete
            payload = self._messages[-1][1]
            if payload.is_eof():
                self._handler_phase()
            else:
                self._body = payload
                self._arm("body")
        elif self._phase == "body" and self._body is not None and self._body.is_eof():
            self._handler_phase()

    async def finish_response(self, *args: Any, **kwargs: Any) -> Any:
        result = await super().finish_response(*args, **kwargs)
        if not self._gone and not self._messages:
            self._arm("idle")
        return result

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        self._site.http_error(status, exc, self._peer, request)
        self._quiet = True  # aiohttp's own line (traceback, raw bytes) is replaced by ours
        try:
            return super().handle_error(request, status, exc, message)
        finally:
            self._quiet = False

    def log_exception(self, *args: Any, **kwargs: Any) -> None:
        if self._quiet:
            return
        exc = kwargs.get("exc_info")
        self._site.http_error(500, exc if isinstance(exc, BaseException) else None,
                              self._peer, None)

    # ---- deadlines ----------------------------------------------------------------------------

    def _arm(self, phase: str) -> None:
        self._phase = phase
        if self._timer is not None:
            self._timer.cancel()
        timeout = getattr(self._site.limits, f"{phase}_timeout")
        self._timer = self._loop.call_later(timeout, self._expire)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _handler_phase(self) -> None:
        self._phase = "handler"
        self._body = None
        self._disarm()

    def _expire(self) -> None:
        self._timer = None
        phase = self._phase
        if phase == "body" and (self._body is None or self._body.is_eof()):
            return
        if phase == "handler" or self._messages or self._gone:
            return  # a request is being answered: the handler's time is the app's business
        self._site.timed_out(phase, self._peer)
        transport = self.transport
        if transport is not None:
            transport.abort()  # not close(): a TLS close waits on a peer that may never read


def _bind(infos: list[Any], port: int, backlog: int) -> list[socket.socket]:
    """Listening sockets for every address of `infos` (as `loop.create_server` binds a host);
    with port 0 all of them on the port the first one got."""
    socks: list[socket.socket] = []
    seen: set[tuple[int, Any]] = set()
    try:
        for family, type_, proto, _, addr in infos:
            if (family, addr) in seen:
                continue
            seen.add((family, addr))
            sock = socket.socket(family, type_, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(socks) > 1:
                addr = (addr[0], socks[0].getsockname()[1], *addr[2:])
            sock.bind(addr)
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError:
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.close()
        raise
    return socks
