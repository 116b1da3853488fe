"""Multiplexed east-west links: many proxied connections over one long-lived mutual-TLS link.

Theory of operation
-------------------
A full TLS handshake per proxied connection costs more CPU than everything else a gateway does
for that connection (two asymmetric signatures and a Python SVID check on each side). So a
gateway keeps ONE long-lived TLS 1.3 link to each peer gateway (`pool.LinkPool`), verified once at
the handshake (both SVIDs against the bundle of the claimed trust domain, exactly as before),
and carries every proxied connection to that peer as a *stream* on it.

The frames are gateway/dataplane/link.py's: OPEN / OK / ERR set a stream up, DATA / EOF / RST
carry and end it, WINDOW returns credit, PING / PONG (stream 0) check liveness.

Flow control is per stream, as in HTTP/2: each side may have at most WINDOW_SIZE bytes of a
stream in flight. A receiver grants credit back (WINDOW) as it hands data to the local socket,
and stops granting while that socket's buffer is full; a sender that runs out of credit stops
reading its local socket. So one slow reader never stalls the other streams of its link, and
buffers stay bounded (window + the transports' own high-water marks). When the TLS transport
itself asks to pause writing, every stream on the link stops reading its source until it drains.

Connect-time failover is unchanged: the caller commits the client's connection only after OK,
so an ERR or a silent peer (no OK within connect_timeout) moves the client to its next candidate.
A link that dies takes its streams with it (their local legs are closed); the next OPEN to that
peer dials a new link. An answerer that restarts sends GOAWAY (ERR on stream 0, code "goaway"):
the caller retires that link (no new streams; closed after its last one) and the next OPEN
dials a new link, which reaches the process that took over.

Links are replaced for identity, not age: each link records what it was authenticated with at
its handshake (`facts`: both certificates, the peer's bundle), and gateway/core/links.py judges
every link again when our TLS material changes and on a sweep about once a second
(pool.keep_links). When our SVID rotated, the peer's bundle changed or a certificate of the
link passed its half life, the caller dials a new link first and then retires the old one (its
streams finish there), and the answerer sends GOAWAY so its caller does the same; so a rotated
SVID reaches every peer within a second, and no stream is dropped by a replacement. When the
peer's cluster left the federation, its certificate no longer verifies, or a certificate of the
link is about to expire, the link is aborted (`close_now`): its streams are reset and counted.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Any

from federation.errors import IdentityError
from federation.logs import LogLimiter, quote
from gateway.core.links import LinkFacts
from gateway.dataplane.legs import Leg
from gateway.dataplane.link import (
    CREDIT,
    DATA,
    EOF,
    ERR,
    HEADER,
    MAX_STREAM_ID,
    MAX_STREAMS,
    OK,
    OPEN,
    PING,
    PONG,
    RST,
    VERSION,
    WINDOW,
    WINDOW_SIZE,
    FrameReader,
    check_open_id,
    control,
    frame,
    parse_control,
    parse_open,
)
from gateway.errors import LinkProtocolError, OpenRefused, StreamRefused

log = logging.getLogger("isthmus.gateway.mux")
# What peers send (refused identities, protocol violations): one line per event class,
# rate-limited, quoted.
limited = LogLimiter(log)

_pack = HEADER.pack


# ---------------------------------------------------------------------------------------------
# Streams


class _StreamTransport:
    """A stream's legs.LegTransport: what its listener's idle sweeper reads of it."""

    __slots__ = ("stream",)

    def __init__(self, stream: Stream) -> None:
        self.stream = stream

    def is_closing(self) -> bool:
        return self.stream.closed or self.stream.closing

    def get_write_buffer_size(self) -> int:
        return sum(map(len, self.stream.pending_out))


class Stream(Leg):
    """One proxied connection on a link: a Leg of the relay (legs.py) whose wire is the link."""

    def __init__(
        self, link: MuxLink, sid: int, on_close: Callable[[Stream], None] | None = None
    ) -> None:
        self.link = link
        self.sid = sid
        self.transport = _StreamTransport(self)
        self.other: Leg | None = None
        self.eof_in = False
        self.eof_out = False
        self.lost = False
        self.closed = False
        self.closing = False  # ended cleanly both ways; still flushing pending_out, then EOF
        self.activity = 0
        self.paused_for_other = False
        self.credit = WINDOW_SIZE  # bytes we may still send
        self.recv_window = WINDOW_SIZE  # bytes the peer may still send us
        self.unacked = 0  # received and handed on, not yet granted back
        self.held = False  # our consumer is full: withhold credit
        self.pending_out: list[bytes] = []
        self.pending_in: list[bytes] = []  # received before attach (at most one window)
        self.eof_pending = False
        self.source_paused = False
        self.ready: asyncio.Future | None = None  # caller side: OK/ERR
        self.on_close = on_close  # answerer: the listener forgets the stream
        self._connecting: asyncio.Task | None = None  # answerer: the task that connects it

    # Leg --------------------------------------------------------------------------------------
    def attach(self, other: Leg) -> None:
        """Connect the other leg, handing it what the peer sent before we had one: the answerer
        writes OK and the backend's first bytes (even its EOF, or an RST) back to back, and the
        caller attaches the client only a few loop turns after OK."""
        self.other = other
        pending, self.pending_in = self.pending_in, []
        for chunk in pending:
            if other.lost:
                break
            other.send(chunk)
            self.unacked += len(chunk)
        if self.closed:
            if not other.lost:
                other.close()
            return
        if self.unacked and not self.held:
            self.grant()
        if self.eof_in:
            self._eof_to_other()

    def send(self, data: bytes) -> None:
        """Data from the local side, to the peer, within credit; the rest waits for WINDOW."""
        if self.closed:
            return
        n = len(data)
        if not self.pending_out and n <= self.credit:
            self.credit -= n
            self.link.write_data(self.sid, data)
            return
        if not self.pending_out and self.credit > 0:
            head, data = data[: self.credit], data[self.credit :]
            self.link.write_data(self.sid, head)
            self.credit = 0
        self.pending_out.append(data)
        self._pause_source()

    def send_eof(self) -> None:
        if self.eof_out or self.closed:
            return
        self.eof_out = True
        if self.pending_out:
            self.eof_pending = True
        else:
            self.link.write(frame(EOF, self.sid))
        if self.eof_in:
            self.close()

    def close(self) -> None:
        """End the stream: RST unless both directions already ended cleanly. If they did but
        we still hold bytes beyond the peer's credit, those go first (as WINDOWs come), then
        EOF, and only then is the stream over — as closing a TCP transport flushes it."""
        if self.closed:
            return
        if self.eof_in and self.eof_out and self.pending_out and not self.link.closed:
            self.closing = True
            return
        self._finish()

    def abort(self) -> None:
        """End the stream now, whatever it still holds (RST unless it ended cleanly)."""
        if not self.closed:
            self._finish()

    def _finish(self) -> None:
        self.closed = True
        self.closing = False
        self.lost = True
        if not (self.eof_in and self.eof_out and not self.pending_out):
            self.link.write(frame(RST, self.sid))
        self.pending_out.clear()
        self.link.forget(self)
        self._ended()
        other = self.other
        if other is not None and not other.lost:
            other.close()

    def drop(self) -> None:
        """Forget a stream the peer already knows is over (we answered ERR): no RST."""
        self.closed = self.lost = True
        self.pending_out.clear()
        self.link.forget(self)
        self._ended()

    def _ended(self) -> None:
        if self.on_close is not None:
            self.on_close(self)
        task, self._connecting = self._connecting, None
        if task is not None and not task.done():
            task.cancel()

    def own(self, task: asyncio.Task) -> None:
        """The task that connects this (answerer's) stream: cancelled if the stream ends first."""
        self._connecting = task

    def detach(self) -> None:
        self.other = None

    def pause_reading(self) -> None:
        """The other leg is full: withhold credit (the peer stops sending)."""
        self.held = True
        self.paused_for_other = True

    def resume_reading(self) -> None:
        if self.paused_for_other:
            self.paused_for_other = False
            self.held = False
            if self.unacked:
                self.grant()

    # from the link --------------------------------------------------------------------------
    def _pause_source(self) -> None:
        """Stop reading the other leg (no credit, or the link's transport is full). Like a
        transport's pause_writing for a PlainLeg: the source pauses as paused_for_other, so
        nothing else (PlainLeg.attach resuming what PENDING_LIMIT paused) resumes it behind our
        back."""
        other = self.other
        if other is not None and other.transport is not None:
            self.source_paused = True
            other.pause_reading()

    def resume_source(self) -> None:
        if self.source_paused and not self.pending_out and not self.link.write_paused:
            other = self.other
            self.source_paused = False
            if other is not None:
                other.resume_reading()

    def on_window(self, n: int) -> None:
        self.credit += n
        pending = self.pending_out
        while pending and self.credit > 0:
            chunk = pending[0]
            if len(chunk) <= self.credit:
                pending.pop(0)
                self.credit -= len(chunk)
                self.link.write_data(self.sid, chunk)
            else:
                self.link.write_data(self.sid, chunk[: self.credit])
                pending[0] = chunk[self.credit :]
                self.credit = 0
        if not pending:
            if self.eof_pending:
                self.eof_pending = False
                self.link.write(frame(EOF, self.sid))
            if self.closing:
                self._finish()
            else:
                self.resume_source()

    def on_data(self, payload: bytes) -> None:
        self.activity += 1
        n = len(payload)
        self.recv_window -= n
        if self.recv_window < 0:
            raise LinkProtocolError(
                f"stream {self.sid} sent {-self.recv_window} bytes beyond its window"
            )
        other = self.other
        if other is None:
            self.pending_in.append(payload)  # bounded: no credit is granted before attach
            return
        if other.lost:
            return
        other.send(payload)
        self.unacked += n
        if not self.held and self.unacked >= WINDOW_SIZE // 4:
            self.grant()

    def grant(self) -> None:
        n, self.unacked = self.unacked, 0
        self.recv_window += n
        self.link.write(_pack(WINDOW, self.sid, 4) + CREDIT.pack(n))

    def on_eof(self) -> None:
        self.eof_in = True
        if self.other is not None:  # else attach() passes it on
            self._eof_to_other()

    def _eof_to_other(self) -> None:
        other = self.other
        other.send_eof()
        if other.eof_in and self.eof_out:
            self.close()
            other.close()

    def on_rst(self) -> None:
        if self.closed:
            return
        if self.ready is not None and not self.ready.done():
            self.ready.set_exception(StreamRefused("reset", "the peer reset the stream"))
        self.eof_in = self.eof_out = True  # nothing more either way: no RST back
        self.pending_out.clear()
        self.close()


# ---------------------------------------------------------------------------------------------
# Links


class MuxLink(asyncio.Protocol):
    """One TLS connection to or from a peer gateway, carrying many streams."""

    def __init__(self, role: str, *, verify: Callable[[Any], LinkFacts | None] | None = None,
                 on_open: Callable[[MuxLink, int, dict], None] | None = None,
                 on_ready: Callable[[MuxLink], bool] | None = None,
                 on_lost: Callable[[MuxLink], None] | None = None,
                 on_goaway: Callable[[MuxLink], None] | None = None,
                 answer_ping: Callable[[], bool] = lambda: True) -> None:
        self.role = role  # "caller" | "answerer"
        self.verify = verify  # caller: checks the answerer's identity, returns the link's facts
        self.on_open = on_open  # answerer: a new OPEN
        self.on_ready = on_ready  # answerer: identify/admit the peer (sets facts); False -> abort
        self.on_lost = on_lost
        self.on_goaway = on_goaway  # caller: the answerer sent GOAWAY (we retired the link)
        self.answer_ping = answer_ping
        self.transport: Any = None
        self.reader = FrameReader()
        self.streams: dict[int, Stream] = {}
        self.next_sid = 1  # caller: the next id it opens
        self.last_open = 0  # answerer: the highest id the caller opened
        self.write_paused = False
        self.closed = False
        self.retired = False  # replaced in its pool: close once the last stream ends
        self.peer: Any = None  # answerer: the peer's cluster
        self.facts: LinkFacts | None = None  # what the handshake authenticated (core/links.py)
        self.replacing = ""  # caller: why a replacement is being dialled
        self.goaway = ""  # answerer: why we sent GOAWAY (replace) / caller: "goaway" received
        self.created = 0.0
        self.pings: dict[bytes, asyncio.Future] = {}
        self.ready: asyncio.Future | None = None
        self.activity = 0

    # asyncio.Protocol -------------------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        loop = asyncio.get_running_loop()
        self.created = loop.time()
        try:
            if self.verify is not None:
                self.facts = self.verify(transport.get_extra_info("ssl_object"))
            if self.on_ready is not None and not self.on_ready(self):
                transport.abort()
                self.closed = True
                return
        except IdentityError as e:
            limited.warning("link-refused", "link with %s refused: %s",
                            quote(transport.get_extra_info("peername")), quote(e))
            transport.abort()
            self.closed = True
            if self.ready is not None and not self.ready.done():
                self.ready.set_exception(e)
            return
        if self.ready is not None and not self.ready.done():
            self.ready.set_result(self)

    def data_received(self, data: bytes) -> None:
        self.activity += 1
        try:
            for kind, sid, payload in self.reader.feed(data):
                if kind == DATA:
                    s = self.streams.get(sid)
                    if s is not None:
                        s.on_data(payload)
                    elif sid % 2 == 0 or sid > (
                        self.next_sid - 2 if self.role == "caller" else self.last_open
                    ):
                        raise LinkProtocolError(f"DATA on stream {sid} that was never opened")
                    continue
                self._control(kind, sid, payload)
        except LinkProtocolError as e:
            peer = self.peer or self.transport.get_extra_info("peername")
            limited.warning("link-protocol", "link with %s broke protocol: %s",
                            quote(peer), quote(e))
            self.transport.abort()

    def _control(self, kind: int, sid: int, payload: bytes) -> None:
        if kind == WINDOW:
            if len(payload) != 4:
                raise LinkProtocolError("WINDOW frame without a 4-byte increment")
            s = self.streams.get(sid)
            if s is not None:
                s.on_window(CREDIT.unpack(payload)[0])
        elif kind == EOF:
            s = self.streams.get(sid)
            if s is not None:
                s.on_eof()
        elif kind == RST:
            s = self.streams.get(sid)
            if s is not None:
                s.on_rst()
        elif kind == PING:
            if len(payload) > 64:
                raise LinkProtocolError("PING payload over 64 bytes")
            if self.answer_ping():
                self.write(frame(PONG, 0, payload))
        elif kind == PONG:
            fut = self.pings.pop(payload, None)
            if fut is not None and not fut.done():
                fut.set_result(True)
        elif kind == OPEN:  # a bad id cuts the link, a bad version only refuses (link.py)
            if self.role != "answerer":
                raise LinkProtocolError(f"OPEN with stream id {sid} sent to the caller of the link")
            check_open_id(sid, self.last_open)
            self.last_open = sid
            try:
                request = parse_open(sid, payload)
            except OpenRefused as e:
                self.write(control(ERR, sid, {"code": e.code, "error": str(e)}))
                return
            if len(self.streams) >= MAX_STREAMS:
                self.write(
                    control(ERR, sid, {"code": "busy", "error": "too many streams on this link"})
                )
                return
            self.on_open(self, sid, request)
        elif kind == ERR and sid == 0:  # about the link: GOAWAY (the answerer is restarting)
            info = parse_control(kind, payload)
            if self.role == "caller" and info.get("code") == "goaway":
                self.goaway = "goaway"
                self.retire()  # no new streams here; the pool dials a new link
                if self.on_goaway is not None:
                    self.on_goaway(self)
        elif kind in (OK, ERR):
            s = self.streams.get(sid)
            if s is None or s.ready is None or s.ready.done():
                return  # a late answer to a stream we gave up on (we sent RST)
            info = parse_control(kind, payload)
            if kind == OK:
                s.ready.set_result(info)
            else:
                s.ready.set_exception(StreamRefused(info.get("code"), info.get("error")))
                s.drop()

    def pause_writing(self) -> None:
        self.write_paused = True
        for s in self.streams.values():
            s._pause_source()

    def resume_writing(self) -> None:
        self.write_paused = False
        for s in list(self.streams.values()):
            if s.credit > 0:
                s.resume_source()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        for s in list(self.streams.values()):
            if s.ready is not None and not s.ready.done():
                s.ready.set_exception(ConnectionError(f"link lost: {exc or 'closed'}"))
            s.on_rst()
        self.streams.clear()
        for fut in self.pings.values():
            if not fut.done():
                fut.set_result(False)
        self.pings.clear()
        if self.ready is not None and not self.ready.done():
            self.ready.set_exception(
                ConnectionError(f"link closed during setup: {exc or 'closed'}")
            )
        if self.on_lost is not None:
            self.on_lost(self)

    # helpers ----------------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)

    def write_data(self, sid: int, data: bytes) -> None:
        if not self.closed:
            self.transport.writelines((_pack(DATA, sid, len(data)), data))

    def forget(self, stream: Stream) -> None:
        self.streams.pop(stream.sid, None)
        if self.retired and not self.streams and not self.closed:
            self.transport.close()

    def retire(self) -> None:
        """No new streams here (the pool has a newer link): close after the last one ends."""
        self.retired = True
        if not self.streams and not self.closed:
            self.transport.close()

    def close_now(self) -> int:
        """Abort the link (its certificates expire, its peer was removed): every stream on it
        is reset. Returns how many streams that was."""
        n = len(self.streams)
        if not self.closed and self.transport is not None:
            self.retired = True
            self.transport.abort()
        return n

    def usable(self) -> bool:
        return (not self.closed and not self.retired and not self.transport.is_closing()
                and self.next_sid < MAX_STREAM_ID - 2 and len(self.streams) < MAX_STREAMS)

    @property
    def state(self) -> str:
        """active | retired (no new streams: replaced, or GOAWAY sent) | closing"""
        if self.closed or self.transport is None or self.transport.is_closing():
            return "closing"
        return "retired" if self.retired or self.goaway else "active"

    def describe(self, now: float) -> dict[str, Any]:
        """One row of /status (`now`: epoch seconds)."""
        f = self.facts
        row: dict[str, Any] = {"role": self.role, "peer": f.peer if f else self.peer,
                               "state": self.state, "streams": len(self.streams)}
        if f is not None:
            row |= {"age_seconds": round(now - f.made_at, 1),
                    "peer_serial": f"{f.peer_serial:x}", "peer_not_after": f.peer_not_after,
                    "peer_expires_in": round(f.peer_not_after - now, 1),
                    "own_serial": f"{f.own_serial:x}", "own_not_after": f.own_not_after,
                    "bundle_sequence": f.bundle.sequence}
        if self.replacing or self.goaway:
            row["replaced_for"] = self.replacing or self.goaway
        return row

    def open_stream(self, service: str) -> Stream:
        sid = self.next_sid
        self.next_sid += 2
        s = Stream(self, sid)
        s.ready = asyncio.get_running_loop().create_future()
        self.streams[sid] = s
        self.write(control(OPEN, sid, {"v": VERSION, "service": service}))
        return s

    def accept_stream(self, sid: int, on_close: Callable[[Stream], None] | None = None) -> Stream:
        s = Stream(self, sid, on_close)
        self.streams[sid] = s
        return s

    async def ping(self, timeout: float) -> bool:
        token = os.urandom(8)
        fut = asyncio.get_running_loop().create_future()
        self.pings[token] = fut
        self.write(frame(PING, 0, token))
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            return False
        finally:
            self.pings.pop(token, None)
