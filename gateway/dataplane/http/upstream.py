"""The upstream side of the HTTP proxy: one `Upstream` per dialled connection, kept alive in a
pool between requests.

Theory of operation
-------------------
An upstream connection is a Leg (legs.py) dialled by `connect_first` — plain TCP to a local
endpoint, or a stream on the mutual-TLS link to another cluster's gateway (mux.py), which relays
it to one of its endpoints — and an `Upstream` attached as that leg's other side: what the leg
reads (the response) comes to `Upstream.send`, is parsed by httptools and handed to the
exchange it answers (session.py), which writes it to the client. The request goes the other
way, `Upstream.write` -> the leg. One request at a time per connection (no upstream pipelining).

A response is relayed in one of two ways, chosen per request (`start`):
  raw     the bytes as they came, written to the client as they arrive (one write per read);
          the parser only finds where the response ends (and its status, for the counters).
          For HTTP/1.1 clients when no ResponseHeaderModifier applies, and a response that
          begins `HTTP/1.1 `: the upstream's own framing (Content-Length or chunked) is valid
          for the client as it is. Its hop-by-hop
          headers go along: a `Connection: close` the client then sees is kept, since we close
          the client connection after such a response too.
  framed  head rebuilt (hop-by-hop headers out, filters applied) and the body re-framed for the
          client (exchange.Exchange.response_head): HTTP/1.0 clients, header filters, and a
          response whose status a route policy retries (`hold`: seen in the first read's
          status line, so every other response of such a route stays raw).

After a complete response on a connection both sides keep alive, the session gives it back to
its `Pool`, keyed by (target, service): the next request to that target takes it instead of
dialling. An idle connection is closed after `IDLE_TTL` (shorter than common servers' keep-alive
timeouts, so we seldom send on one the server is closing), and at most `MAX_IDLE` wait per key.
If a reused connection ends before any byte of the response (the server closed it as we wrote:
the keep-alive race), the session may send the request again on a new connection (session.py).

Flow control is the relay's: the leg's transport asks to pause writing -> `pause_reading` here
stops reading the client; the client's transport full -> the session pauses this leg.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any, Protocol

from httptools import HttpParserError, HttpResponseParser

from federation.logs import LogLimiter
from federation.model import ServiceKey
from gateway.core.balance import Target
from gateway.dataplane.legs import Leg

limited = LogLimiter(logging.getLogger("isthmus.gateway.http"))
IDLE_TTL = 4.0  # seconds an idle upstream connection is kept
MAX_IDLE = 256  # idle connections kept per (target, service)


class Answered(Protocol):
    """The exchange an Upstream is answering (exchange.Exchange)."""

    status: int

    def raw_bytes(self, data: bytes) -> None: ...

    def response_head(self, up: Upstream, status: int, reason: bytes,
                      headers: list[tuple[bytes, bytes]], length: bytes | None,
                      chunked: bool) -> None: ...

    def response_body(self, data: bytes) -> None: ...

    def response_done(self, up: Upstream) -> None: ...

    def upstream_failed(self, up: Upstream, why: str) -> None: ...

    def pause_client(self) -> None: ...

    def resume_client(self) -> None: ...


class Upstream:
    """One upstream connection (see the module docstring): the other side of its leg."""

    # the Leg attributes the up leg reads of its other side
    eof_in = False
    lost = False
    transport = None
    activity = 0
    paused_for_other = False

    def __init__(self, leg: Leg, target: Target, service: ServiceKey) -> None:
        self.leg = leg
        self.target = target
        self.service = service
        self.key = (target.key, service)
        self.exchange: Answered | None = None
        self.full_parser = HttpResponseParser(self)
        # raw relay: a parser whose callbacks only find the response's end (fewer calls)
        self.raw_parser = HttpResponseParser(_Framing(self))
        self.parser = self.raw_parser
        self.raw = True
        self.hold: frozenset[bytes] | None = None
        self.uses = 0  # requests sent on this connection
        self.got = False  # some byte of the current response arrived
        self.head_only = False  # the current request is HEAD: its response has no body
        self.until_eof = False  # the current response's body ends with the connection
        self.idle_since = 0.0
        self._status = 0
        self._reason = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._length: bytes | None = None
        self._chunked = False
        self._done = False
        self._stale = False
        leg.attach(self)  # type: ignore[arg-type]

    # -- the session's side -------------------------------------------------------------------
    def start(self, exchange: Answered, head_only: bool, raw: bool,
              hold: frozenset[bytes] | None = None) -> None:
        """`hold`: statuses (3 ASCII digits) a route policy may retry: a raw response whose
        status line names one is relayed framed instead, so its head can be held back."""
        self.hold = hold
        if self._stale:  # a HEAD response's parser still waits for the body that never came
            self._stale = False
            self.full_parser = HttpResponseParser(self)
            self.raw_parser = HttpResponseParser(_Framing(self))
        self.exchange = exchange
        self.raw = raw
        self.parser = self.raw_parser if raw else self.full_parser
        self.uses += 1
        self.got = False
        self.head_only = head_only
        self.until_eof = False
        self._done = False

    def write(self, data: bytes) -> None:
        self.leg.send(data)

    @property
    def reusable(self) -> bool:
        return not self.lost and self._done and not self.until_eof \
            and self.parser.should_keep_alive()

    def close(self) -> None:
        """The leg was lost (called by it), or we are done with this connection."""
        if self.lost:
            return
        self.lost = True
        ex, self.exchange = self.exchange, None
        if ex is not None and self.until_eof and self.got:
            ex.response_done(self)  # a body delimited by the connection's end: complete
        elif ex is not None:
            ex.upstream_failed(self, "the upstream closed the connection")
        self.leg.close()

    def abort(self) -> None:
        self.exchange = None
        self.lost = True
        self.leg.abort()

    # -- Leg: what the up leg calls ------------------------------------------------------------
    def send(self, data: bytes) -> None:
        """The response's bytes (bytes from a TCP leg, a memoryview from a mux stream)."""
        try:
            self._received(data)
        except Exception:  # our bug must cost this connection only, never the link under it
            limited.exception("upstream-bug", "upstream %s: response handling failed; the "
                              "connection is closed", self.target.key)
            ex, self.exchange = self.exchange, None
            self.abort()
            if ex is not None:
                ex.upstream_failed(self, "internal error")

    def _received(self, data: bytes) -> None:
        ex = self.exchange
        if ex is None:  # bytes nobody asked for: this connection is not HTTP
            self.abort()
            return
        if self.raw:
            if not self.got and (data[:9] != b"HTTP/1.1 " or (
                    self.hold is not None and (len(data) < 12 or bytes(data[9:12]) in self.hold))):
                self.raw = False  # HTTP/1.0 (or odd), or a status to retry: framed
                self.parser = self.full_parser
            else:
                ex.raw_bytes(data)  # first: a response completed by this read may start the next
        self.got = True
        try:
            self.parser.feed_data(data)
        except HttpParserError as e:
            ex, self.exchange = self.exchange, None
            self.lost = True
            self.leg.abort()
            if ex is not None:
                cause = e.__context__ if e.__context__ is not None else e
                ex.upstream_failed(self, f"bad response: {cause}")

    def send_eof(self) -> None:
        self.eof_in = True
        self.close()

    def detach(self) -> None:
        self.leg = _Gone()  # type: ignore[assignment]

    def attach(self, other: Any) -> None:  # pragma: no cover - Leg protocol only
        pass

    def pause_reading(self) -> None:
        if self.exchange is not None:
            self.exchange.pause_client()

    def resume_reading(self) -> None:
        if self.exchange is not None:
            self.exchange.resume_client()

    # -- httptools callbacks ---------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._length = None
        self._chunked = False
        if not self.raw:
            self._headers = []

    def on_status(self, reason: bytes) -> None:
        if not self.raw:
            self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        n = len(name)
        if n == 14 or n == 17:  # only these two lengths can frame the body
            low = name.lower()
            if low == b"content-length":
                self._length = value
            elif low == b"transfer-encoding":
                self._chunked = value.lower().rstrip().endswith(b"chunked")
        if not self.raw:
            self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        status = self._status = self.parser.get_status_code()
        length, chunked = self._length, self._chunked
        self._length, self._chunked = None, False  # for the next message (and a 1xx's)
        reason, self._reason = self._reason, b""
        if status < 200:  # 1xx: informational, not this request's answer (ours: session.py)
            return
        ex = self.exchange
        if ex is None:
            return
        self.until_eof = (not self.head_only and length is None and not chunked
                          and status not in (204, 304))
        if self.raw:
            ex.status = status
        else:
            ex.response_head(self, status, reason, self._headers, length, chunked)
        if self.head_only:
            self._stale = True
            self._finish()

    def on_body(self, body: bytes) -> None:
        if not self.raw:
            ex = self.exchange
            if ex is not None:
                ex.response_body(body)

    def on_message_complete(self) -> None:
        if self._status < 200 or self.head_only:
            return  # a 1xx's end (the answer follows), or a HEAD finished at its head
        self._finish()

    def _finish(self) -> None:
        self._done = True
        ex, self.exchange = self.exchange, None
        if ex is not None:
            ex.response_done(self)


class _Framing:
    """The raw relay's parser callbacks: only where the response ends, and its status (the
    bytes went to the client already, as they came). Without header callbacks it cannot tell
    a close-delimited body from a framed one at its head, so a response counts as "until EOF"
    until its end is parsed; one that ends with the connection instead is complete then (a
    truncated one the client itself sees short of its Content-Length), and the client
    connection is closed after it either way."""

    __slots__ = ("up",)

    def __init__(self, up: Upstream) -> None:
        self.up = up

    def on_headers_complete(self) -> None:
        up = self.up
        status = up._status = up.parser.get_status_code()
        ex = up.exchange
        if status < 200 or ex is None:  # a 1xx: the answer follows
            return
        ex.status = status
        up.until_eof = not up.head_only and status not in (204, 304)
        if up.head_only:
            up._stale = True
            up._finish()

    def on_message_complete(self) -> None:
        up = self.up
        if up._status < 200 or up.head_only:
            return
        up.until_eof = False
        up._finish()


class _Gone:
    """A detached leg: both sides are over, nothing to write to."""

    def send(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


class Pool:
    """Idle keep-alive upstream connections by (target key, service); see the module docstring."""

    def __init__(self) -> None:
        self.idle: dict[tuple[str, ServiceKey], deque[Upstream]] = {}
        self.reused = 0
        self.dialled = 0
        self.expired = 0

    def take(self, target: Target, service: ServiceKey, now: float) -> Upstream | None:
        q = self.idle.get((target.key, service))
        while q:
            up = q.pop()  # the most recently used: the least likely to be closing
            if not up.lost and now - up.idle_since < IDLE_TTL:
                self.reused += 1
                return up
            self.expired += not up.lost
            up.abort()
        return None

    def give(self, up: Upstream, now: float) -> None:
        q = self.idle.get(up.key)
        if q is None:
            q = self.idle[up.key] = deque()
        if len(q) >= MAX_IDLE:
            up.abort()
            return
        up.idle_since = now
        q.append(up)

    def sweep(self, now: float) -> None:
        """Close what idled past IDLE_TTL or was lost meanwhile."""
        for key, q in list(self.idle.items()):
            while q and (q[0].lost or now - q[0].idle_since >= IDLE_TTL):
                up = q.popleft()
                self.expired += not up.lost
                up.abort()
            if not q:
                del self.idle[key]

    def count(self) -> int:
        return sum(len(q) for q in self.idle.values())

    def close(self) -> None:
        for q in self.idle.values():
            for up in q:
                up.abort()
        self.idle.clear()
