"""One request and its response on an HTTP session (session.py): the client's body on its
way up, the upstream's response on its way down (upstream.Answered), and the outcome — done,
retried by a policy (enforce.py), or failed.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from gateway.core import routes as rt
from gateway.core.trace import Trace
from gateway.dataplane.http import enforce
from gateway.dataplane.http import head as h
from gateway.dataplane.http.upstream import Upstream

if TYPE_CHECKING:
    from gateway.dataplane.http.session import Session


class Exchange:
    """One request and its response. Attributes not set in __init__ keep their class defaults
    (most requests never change them: cheaper than setting each per request)."""

    host = b""
    version = "1.1"
    keep_alive = True
    length: bytes | None = None
    chunked_in = False
    expect = False
    body_size = 0
    body_done = False
    dropped = False  # answered already: the rest of its body is read and dropped
    decision: rt.Decision | None = None
    trace: Trace | None = None
    upstream: Upstream | None = None
    connected_at = 0.0
    status = 0
    responded = False  # the response (head) went to the client
    chunked_out = False
    finished = False
    retried = False
    cluster = ""  # the backend cluster that answered
    sent_body = False  # some of the body went upstream (and so cannot be resent)
    error = ""
    traceparents: list[str] = []  # replaced per request, never mutated
    tracestates: list[str] = []
    connection: bytes | None = None
    released = False  # its held body left the session's buffer count
    enf: enforce.Enforcement | None = None  # its route rule's policy (None: no policy at all)
    waiting_body = False  # held until complete for the policy's OpenAPI check
    timer: asyncio.TimerHandle | None = None  # the policy's request timeout
    try_timer: asyncio.TimerHandle | None = None  # the per-try timeout, or a retry's backoff
    tries = 0  # retries made by the policy
    tried: tuple[str, ...] = ()  # target keys a try failed on (a retry avoids them)

    def __init__(self, session: Session, method: bytes, target: bytes,
                 headers: list[tuple[bytes, bytes]], started: float) -> None:
        self.session = session
        self.method = method
        self.target = target
        self.headers = headers
        self.started = started
        self.body: list[bytes] | None = []  # held until the upstream is connected (and resend)

    # -- body from the client --------------------------------------------------------------------
    def body_chunk(self, data: bytes) -> None:
        if self.dropped or self.finished:
            return
        up = self.upstream
        if up is not None and self.session.current is self:
            up.write(h.chunk(data) if self.chunked_in else data)
            self.sent_body = True
            self.body = None  # no longer resendable
            return
        if self.body is not None:
            self.body.append(data)
        self.body_size += len(data)
        self.session.buffered(len(data))
        if self.waiting_body and \
                self.body_size > self.enf.openapi.settings.max_body_bytes:  # type: ignore
            enforce.too_large(self.session, self, self.enf)  # type: ignore[arg-type]

    def body_end(self) -> None:
        self.body_done = True
        if self.waiting_body:
            enforce.body_complete(self.session, self)
            return
        up = self.upstream
        if up is not None and self.session.current is self and not self.dropped \
                and self.chunked_in:
            up.write(h.CHUNKED_END)

    # -- the response (upstream.Answered) -----------------------------------------------------
    def raw_bytes(self, data: bytes) -> None:
        self.responded = True
        self.session.down.send(data)

    def response_head(self, up: Upstream, status: int, reason: bytes,
                      headers: list[tuple[bytes, bytes]], length: bytes | None,
                      chunked: bool) -> None:
        s = self.session
        enf = self.enf
        if enf is not None and enf.framed and (status >= 500 or status in enf.retry.codes):
            after = next((v for n, v in headers if n == b"retry-after"), None)
            if enforce.failed(s, self, enforce.Outcome.response(status), up.target,
                              after.decode("latin-1") if after is not None else None):
                self.upstream = None
                up.abort()  # the rest of this response goes nowhere
                return
        self.status = status
        conn = next((v for n, v in headers if n == b"connection"), None)
        out = h.strip_hop_by_hop(headers, conn)
        mod = self.decision.response_headers  # type: ignore[union-attr]
        if mod is not None:
            out = h.modify_headers(out, mod)
        bodyless = self.method == b"HEAD" or status in (204, 304)
        if not bodyless and length is None:
            if self.version == "1.1":
                self.chunked_out = True
                out.append((b"transfer-encoding", b"chunked"))
            else:
                self.keep_alive = False  # HTTP/1.0: the body ends with the connection
        if not self.keep_alive:
            out.append((b"connection", b"close"))
        self.responded = True
        s.down.send(h.response_head(status, reason, out))

    def response_body(self, data: bytes) -> None:
        if data:
            self.session.down.send(h.chunk(data) if self.chunked_out else data)

    def response_done(self, up: Upstream) -> None:
        if self.try_timer is not None:
            self.try_timer.cancel()
        if self.chunked_out:
            self.session.down.send(h.CHUNKED_END)
        s = self.session
        if up.reusable and self.body_done and not self.dropped:
            s.host.pool.give(up, s.host.loop.time())
        else:
            if up.raw:  # the client saw the upstream's own framing: close-delimited, or close
                self.keep_alive = False
            if not up.lost:
                up.abort()
        self.upstream = None
        s.done(self)

    def upstream_failed(self, up: Upstream, why: str) -> None:
        s = self.session
        self.upstream = None
        if self.finished:
            return
        if not self.responded:
            resend = (self.body is not None and not self.sent_body and not self.retried)
            if up.uses > 1 and not up.got and resend:
                self.retried = True  # the keep-alive race: once more, on a new connection
                s.host.http.retries += 1
                s.connect(self, fresh=True)
                return
            router = s.host.router(up.service)
            if up.uses <= 1 and router is not None:  # a fresh connection failed: the endpoint
                router.report(up.target, False)
            if self.enf is not None and enforce.failed(s, self, enforce.Outcome(enforce.RESET),
                                                       up.target):
                return
            self.error = why
            s.answer(self, 502, f"upstream {up.target.key} failed: {why}\n")
            return
        self.error = why
        self.keep_alive = False
        s.abort_client(self)

    def pause_client(self) -> None:
        self.session.down.pause_reading()

    def resume_client(self) -> None:
        self.session.down.resume_reading()

    def stop_timers(self) -> None:
        """Its policy's request and per-try timers (enforce.py), when it is over."""
        if self.timer is not None:
            self.timer.cancel()
        if self.try_timer is not None:
            self.try_timer.cancel()
