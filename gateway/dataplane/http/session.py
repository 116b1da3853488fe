"""The client side of the HTTP proxy: one `Session` per client connection, parsed by httptools.

Theory of operation
-------------------
A session is the other side of the client's leg (legs.py): what the client sends comes to
`Session.send` and is fed to an httptools request parser; each request becomes an `Exchange`.
Requests are served one at a time, in order: a pipelined request waits (its head and body
buffered, bounded: reading the client pauses beyond PENDING_LIMIT or MAX_PIPELINE) until the
one before it has its whole response. Limits are checked as the head arrives: the target
(414), the header count and bytes (431); anything the parser refuses is a 400; after any of
them the connection is closed, since its framing can no longer be trusted.

One exchange, top to bottom (`Session._begin`):
  decide        the listener's routing (core/routes.decide: route -> filters -> backend), a
                404 / 500 / redirect answered here
  policy        the route rule's policy, when its import has any (enforce.py: request timer,
                JWT, OpenAPI with the body held until complete, the retry budget)
  trace         core/trace.continue_trace: the caller's trace with our new span, or a new one
  head          hop-by-hop headers out (head.py), header filters, Host rewrite, traceparent
  upstream      a pooled keep-alive connection to the router's first target, or
                connect_first over the router's plan (locality failover, as for TCP), in a task
  relay         head and body to the upstream (Content-Length as it came, or re-chunked);
                `Expect: 100-continue` answered here once the upstream is connected;
                the response comes back through upstream.Upstream, framed for the client
  done          counters, access log, the connection back to the pool, the next request

A reused upstream connection that ends before any byte of the response (the server closed it
as we wrote) is tried once more on a new connection, if the request can be sent again (no body,
or all of it still held). A policy's retries (enforce.failed) come next: a connect failure, a
reset before the response head, a per-try timeout or a retryable status in the (then framed)
response head is tried again on another endpoint when core/retry.decide says so. Otherwise: no
upstream reachable -> 503, the upstream failed before its response began -> 502; after it
began, the client connection is aborted (the response cannot be completed honestly).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any, Protocol

from httptools import HttpParserCallbackError, HttpParserError, HttpParserUpgrade, HttpRequestParser

from federation.logs import LogLimiter
from federation.model import ServiceKey
from gateway.core import routes as rt
from gateway.core.trace import continue_trace
from gateway.dataplane.dial import connect_first
from gateway.dataplane.http import enforce
from gateway.dataplane.http import head as h
from gateway.dataplane.http.exchange import Exchange
from gateway.dataplane.http.upstream import Upstream
from gateway.dataplane.legs import PENDING_LIMIT, Leg

limited = LogLimiter(logging.getLogger("isthmus.gateway.http"))
MAX_PIPELINE = 32  # requests parsed ahead of the one being served


class TooLarge(Exception):
    def __init__(self, status: int, what: str) -> None:
        super().__init__(what)
        self.status = status


class Host(Protocol):
    """What a session needs of its listener (listener.py)."""

    loop: asyncio.AbstractEventLoop
    max_header_bytes: int
    max_headers: int
    max_target_bytes: int
    routes: rt.CompiledRoutes
    default: rt.Decision  # what decide() answers when there are no routes
    needs_headers: bool  # some route matches on headers: give decide() a header map
    stats: Any  # dial.ListenerStats (connect_first's counters)
    http: Any  # listener.HttpStats
    pool: Any
    dialer: Any
    policies: dict[tuple[str, str | None], enforce.Enforcement] | None  # None: no policy at all
    budgets: Any  # core.retry.BudgetBook
    random: Any

    def decide(self, method: str, target: str, headers: dict[str, str], host: str
               ) -> rt.Decision: ...

    def router(self, service: ServiceKey) -> Any: ...

    def spawn(self, coro: Any) -> asyncio.Task: ...

    def rand_bits(self, n: int) -> int: ...

    def finished(self, ex: Exchange) -> None: ...

    def refused(self, status: int, why: str) -> None: ...


class Session:
    """One client connection (see the module docstring): the other side of its leg."""

    # the Leg attributes the client leg reads of its other side
    eof_in = False
    lost = False
    paused_for_other = False
    idle_timer: asyncio.TimerHandle | None = None  # a policy's idle timeout, between requests
    idle_at = 0.0  # loop time the connection is idle enough to close (with idle_timer)

    def __init__(self, down: Leg, host: Host) -> None:
        self.down = down
        self.host = host
        self.parser = HttpRequestParser(self)
        self.queue: deque[Exchange] = deque()
        self.current: Exchange | None = None
        self.parsing: Exchange | None = None
        self.held = 0  # bytes of queued bodies held
        self.paused = False
        self.closing = False
        self.client_eof = False
        self.transport = self  # the idle sweeper reads activity through this
        self.activity = 0
        self._target = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._hbytes = 0
        self._special: dict[bytes, Any] = {}
        # since when a request head is awaited and not complete (the connection's start, or the
        # first byte of a request): the listener's sweep answers 408 past http_header_timeout
        self.head_since: float | None = host.loop.time()

    # -- what the idle sweeper reads -------------------------------------------------------------
    def is_closing(self) -> bool:
        return self.lost

    def get_write_buffer_size(self) -> int:
        return 0

    # -- Leg: what the client's leg calls -----------------------------------------------------
    def send(self, data: bytes) -> None:
        """What the client sent (bytes from a TCP leg, a memoryview from a mux stream)."""
        try:
            self._received(data)
        except Exception:  # our bug must cost this connection only, never the link under it
            limited.exception("session-bug", "HTTP session: request handling failed; the "
                              "connection is closed")
            self.abort()

    def _received(self, data: bytes) -> None:
        if self.closing:
            return
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade:
            self._refuse(501, "protocol upgrades are not proxied")
        except HttpParserCallbackError as e:
            cause = e.__context__
            if isinstance(cause, TooLarge):
                self._refuse(cause.status, str(cause))
            else:
                raise
        except HttpParserError as e:
            self._refuse(400, f"bad request: {e}")

    def send_eof(self) -> None:
        """The client half-closed: answer what it asked, then close (done() sees it). Not
        `eof_in`, which would tell the client's leg both directions are over."""
        self.client_eof = True
        if self.current is None and not self.queue:
            self.close()

    def close(self) -> None:
        """The client's leg was lost, or we end the connection."""
        if self.lost:
            return
        self.lost = True
        for ex in self.queue:
            ex.finished = True
            if ex.upstream is not None:
                ex.upstream.abort()
                ex.upstream = None
        self.queue.clear()
        self.current = None
        self.down.close()

    def abort(self) -> None:
        self.close()
        self.down.abort()

    def attach(self, other: Any) -> None:  # pragma: no cover - Leg protocol only
        pass

    def detach(self) -> None:
        pass

    def pause_reading(self) -> None:
        """The client is not reading: stop reading the upstream that writes to it."""
        ex = self.current
        if ex is not None and ex.upstream is not None:
            ex.upstream.leg.pause_reading()

    def resume_reading(self) -> None:
        ex = self.current
        if ex is not None and ex.upstream is not None:
            ex.upstream.leg.resume_reading()

    # -- httptools callbacks ---------------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.head_since is None:
            self.head_since = self.host.loop.time()
        self._target = b""
        self._headers = []
        self._hbytes = 0
        self._special = {}

    def on_url(self, url: bytes) -> None:
        self._target += url
        if len(self._target) > self.host.max_target_bytes:
            raise TooLarge(414, f"request target longer than {self.host.max_target_bytes} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._hbytes += len(name) + len(value) + 4
        if self._hbytes > self.host.max_header_bytes:
            raise TooLarge(431, f"request headers larger than {self.host.max_header_bytes} bytes")
        if len(self._headers) >= self.host.max_headers:
            raise TooLarge(431, f"more than {self.host.max_headers} request headers")
        name = name.lower()
        if name in _SPECIAL:
            self._special.setdefault(name, []).append(value)
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        p = self.parser
        ex = Exchange(self, p.get_method(), self._target, self._headers, self.host.loop.time())
        ex.version = p.get_http_version()
        ex.keep_alive = p.should_keep_alive()
        sp = self._special
        if sp:
            ex.host = sp.get(b"host", (b"",))[0]
            ex.length = sp.get(b"content-length", (None,))[0]
            te = sp.get(b"transfer-encoding")
            ex.chunked_in = te is not None
            if not ex.chunked_in and ex.length in (None, b"0"):
                ex.body_done = True  # no body: complete (and resendable) already
            ex.expect = b"100-continue" in (v.lower() for v in sp.get(b"expect", ()))
            ex.traceparents = [v.decode("latin-1") for v in sp.get(b"traceparent", ())]
            ex.tracestates = [v.decode("latin-1") for v in sp.get(b"tracestate", ())]
            conn = sp.get(b"connection")
            ex.connection = b",".join(conn) if conn else None
        self.parsing = ex
        self.head_since = None
        self.queue.append(ex)
        if self.current is None:
            self._next()
        elif len(self.queue) > MAX_PIPELINE and not self.paused:
            self.paused = True
            self.down.pause_reading()

    def on_body(self, body: bytes) -> None:
        ex = self.parsing
        if ex is not None:
            ex.body_chunk(body)

    def on_message_complete(self) -> None:
        ex, self.parsing = self.parsing, None
        if ex is not None:
            ex.body_end()

    # -- serving -----------------------------------------------------------------------------
    def buffered(self, n: int) -> None:
        self.held += n
        cur = self.current
        if cur is not None and cur.waiting_body:  # bounded by the policy's max_body_bytes
            return
        if self.held > PENDING_LIMIT and not self.paused:
            self.paused = True
            self.down.pause_reading()

    def _next(self) -> None:
        while self.queue and not self.lost:
            ex = self.queue[0]
            self.current = ex
            if self.paused and self.held <= PENDING_LIMIT and len(self.queue) <= MAX_PIPELINE:
                self.paused = False
                self.down.resume_reading()
            self._begin(ex)
            if self.current is ex:  # in flight: its response calls done()
                return
        self.current = None

    def _begin(self, ex: Exchange) -> None:
        host = self.host
        policies = host.policies
        if not host.routes.entries:  # no routes: everything to the import's service, as it came
            d = ex.decision = host.default
            if policies is None:
                ex.trace = continue_trace(ex.traceparents, ex.tracestates, host.rand_bits)
                self.connect(ex)
                return
            target = ""
        else:
            target = ex.target.decode("latin-1")
            headers = _header_map(ex.headers) if host.needs_headers else _NO_HEADERS
            d = ex.decision = host.decide(ex.method.decode("latin-1"), target, headers,
                                          ex.host.decode("latin-1"))
        if d.kind != rt.PROXY:
            if d.kind == rt.REDIRECT:
                self.answer(ex, d.status, "", [(b"location", d.location.encode("latin-1"))])
            elif d.kind == rt.NOT_FOUND:
                self.answer(ex, 404, f"no route for {ex.method.decode('latin-1')} {target}\n")
            else:
                self.answer(ex, 500, f"route {d.route!r} has no backend with weight > 0\n")
            return
        if policies is not None:
            enf = ex.enf = policies.get((d.route, d.rule))
            if enf is not None and not enforce.admit(self, ex, enf):
                return  # answered, or its body is awaited (enforce.body_complete)
        ex.trace = continue_trace(ex.traceparents, ex.tracestates, host.rand_bits)
        self.connect(ex)

    def proceed(self, ex: Exchange) -> None:
        """Its policy admitted `ex` once the body was whole (enforce.body_complete)."""
        ex.trace = continue_trace(ex.traceparents, ex.tracestates, self.host.rand_bits)
        self.connect(ex)

    def retry(self, ex: Exchange) -> None:
        """A policy's retry of `ex` (enforce.failed), after its backoff."""
        ex.try_timer = None
        if not ex.finished and not self.lost:
            self.connect(ex)

    def request_head(self, ex: Exchange) -> bytes:
        d = ex.decision
        drop = h.HOP_BY_HOP_AND_TRACE if ex.connection is None else \
            h.dropped_with(ex.connection) | _TRACE
        out = [hv for hv in ex.headers if hv[0] not in drop]
        if d.request_headers is not None:
            out = h.modify_headers(out, d.request_headers)
        if d.host is not None:
            out = [(b"host", d.host.encode("latin-1")) if n == b"host" else (n, v)
                   for n, v in out]
        tr = ex.trace
        out.append((b"traceparent", tr.traceparent.encode()))
        if tr.tracestate:
            out.append((b"tracestate", tr.tracestate.encode("latin-1")))
        if ex.chunked_in:
            out.append((b"transfer-encoding", b"chunked"))
        target = ex.target if d.path is None else d.path.encode("latin-1")
        return h.request_head(ex.method, target, out)

    def connect(self, ex: Exchange, fresh: bool = False) -> None:
        """Send `ex` on a pooled connection to the router's first target, else dial (a task)."""
        host = self.host
        backend = ex.decision.backend
        router = host.router(backend)
        if router is None:  # a reload removed it meanwhile
            self.answer(ex, 503, f"no backend {backend}\n")
            return
        if ex.tried:
            router = enforce.Avoiding(router, ex.tried)
        if not fresh:
            plan = router.plan()
            if plan:
                up = host.pool.take(plan[0], backend, host.loop.time())
                if up is not None:
                    self._send(ex, up)
                    return
        host.spawn(self._dial(ex, router))

    async def _dial(self, ex: Exchange, router: Any) -> None:
        host = self.host
        found = await connect_first(router, host.dialer, ex.decision.backend, host.stats)
        if ex.finished or self.lost:
            if found is not None:
                found[1].close()
            return
        if found is None:
            if ex.enf is not None and enforce.failed(
                    self, ex, enforce.Outcome(enforce.CONNECT_FAILURE), None):
                return
            ex.error = "no endpoint reachable"
            self.answer(ex, 503, f"no endpoint of {ex.decision.backend} could be reached\n")
            return
        target, leg = found
        host.pool.dialled += 1
        self._send(ex, Upstream(leg, target, ex.decision.backend))

    def _send(self, ex: Exchange, up: Upstream) -> None:
        ex.upstream = up
        ex.cluster = up.target.locality.cluster
        ex.connected_at = self.host.loop.time()
        enf = ex.enf
        up.start(ex, ex.method == b"HEAD",
                 ex.version == "1.1" and ex.decision.response_headers is None,
                 enf.hold if enf is not None else None)
        if enf is not None:
            enforce.sent(self, ex, up)
        up.write(self.request_head(ex))
        if ex.expect and not ex.body_size and not ex.body_done and not ex.retried:
            self.down.send(h.CONTINUE)
        body = ex.body
        if body:
            for chunk in body:
                up.write(h.chunk(chunk) if ex.chunked_in else chunk)
            if not ex.released:
                ex.released = True
                self.held -= ex.body_size
        if ex.body_done:  # all of it sent, and still held: the request can be sent again
            if ex.chunked_in:
                up.write(h.CHUNKED_END)
        else:
            ex.body = None  # the rest goes straight up: no resend from here on
            ex.sent_body = bool(body)

    def answer(self, ex: Exchange, status: int, text: str | bytes,
               headers: list[tuple[bytes, bytes]] = ()) -> None:  # type: ignore[assignment]
        """A response made here (no upstream): errors, redirects, a policy's refusals."""
        ex.status = status
        ex.responded = True
        if not ex.body_done:
            ex.dropped = True
            ex.keep_alive = False  # we do not wait for a body we are not going to send
        body = text.encode() if isinstance(text, str) else text
        self.down.send(h.local_response(status, body, headers, close=not ex.keep_alive,
                                        head=ex.method == b"HEAD"))
        self.done(ex)

    def abort_client(self, ex: Exchange) -> None:
        if ex.enf is not None:
            ex.stop_timers()
        ex.finished = True
        self.host.finished(ex)
        self.abort()

    def done(self, ex: Exchange) -> None:
        """`ex` has its whole response: count it, log it, go on with the next request."""
        if ex.enf is not None:
            ex.stop_timers()
        ex.finished = True
        self.host.finished(ex)
        if self.queue and self.queue[0] is ex:
            self.queue.popleft()
        if self.held < 0:
            self.held = 0
        if not ex.keep_alive or (self.client_eof and not self.queue):
            self.closing = True
            self.current = None
            self.down.close()
            return
        if self.current is ex:
            self.current = None
            self._next()
        if ex.enf is not None and self.current is None and not self.lost:
            idle = ex.enf.policy.timeouts.idle
            if idle is not None:  # the policy's idle limit for the connection
                loop = self.host.loop
                at = self.idle_at = loop.time() + idle
                timer = self.idle_timer
                if timer is None or at < timer.when():  # one timer per idle period at most
                    if timer is not None:
                        timer.cancel()
                    self.idle_timer = loop.call_later(idle, self._idle)

    def _idle(self) -> None:
        """The idle timer: close when nothing came since `idle_at` was set; when a request
        is in flight, its `done` arms the timer again."""
        self.idle_timer = None
        if self.current is not None or self.queue or self.lost:
            return
        left = self.idle_at - self.host.loop.time()
        if left > 0:
            self.idle_timer = self.host.loop.call_later(left, self._idle)
            return
        self.closing = True
        self.close()

    def head_timed_out(self, timeout: float) -> bool:
        """The listener's sweep: a head awaited longer than `timeout` (slowloris, or a client
        that connected and never asked) -> 408 and close, unless a request is in flight."""
        since = self.head_since
        if since is None or self.current is not None or self.lost or self.closing \
                or self.host.loop.time() - since < timeout:
            return False
        self._refuse(408, f"no complete request head within {timeout:g}s")
        return True

    def _refuse(self, status: int, why: str) -> None:
        """The request cannot be parsed or is over a limit: answer, then close."""
        self.closing = True
        self.host.refused(status, why)
        if self.current is None or not self.current.responded:
            for ex in self.queue:
                ex.finished = True
                if ex.upstream is not None:
                    ex.upstream.abort()
            self.queue.clear()
            self.current = None
            self.down.send(h.local_response(status, (why + "\n").encode(), close=True))
            self.down.close()
        else:
            self.abort()


_SPECIAL = frozenset({b"host", b"content-length", b"transfer-encoding", b"expect", b"connection",
                      b"traceparent", b"tracestate"})
_TRACE = frozenset({b"traceparent", b"tracestate"})
_NO_HEADERS: dict[str, str] = {}


def _header_map(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """Lowercase name -> value (several values joined with ","), for header matches."""
    out: dict[str, str] = {}
    for n, v in headers:
        name, value = n.decode("latin-1"), v.decode("latin-1")
        out[name] = f"{out[name]},{value}" if name in out else value
    return out
