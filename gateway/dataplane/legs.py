"""The two sides of a relayed connection: one `Leg` protocol, and the plain TCP legs.

Theory of operation
-------------------
A proxied connection has two legs: the *down* leg (accepted) and the *up* leg (dialled). A leg
is a plain TCP asyncio Protocol (`PlainLeg`, here) or a stream on a multiplexed link to another
gateway (`mux.Stream`); both implement `Leg`, and a leg touches the other only through it. Each
knows how to write its own wire and forwards what it reads to the other leg. So the relay
itself is four small methods:

- data: read on one leg -> `other.send(data)`; the hot path is one call and one write;
- flow control: when a leg cannot take more (its transport asks to pause writing; a stream ran
  out of credit), it calls `other.pause_reading()`: the other leg stops reading its wire (a
  stream: stops granting window credit) and notes it was paused for the other
  (`paused_for_other`), until `other.resume_reading()` once drained; so a slow reader never
  makes us buffer without bound, and nothing else resumes a leg paused that way;
- half-close: EOF read on one leg -> `other.send_eof()` (write_eof on TCP, an EOF frame on a
  stream); when both directions ended, both close;
- close: a leg lost -> the other closes after flushing what it holds (a stream sends RST);
  when both are lost, `detach()` drops the pair's reference cycle so refcounting frees it.

Before the up leg exists (while connecting), the down leg buffers what the client sends, up to
PENDING_LIMIT, then stops reading; `attach` hands the buffer on.

A leg accepted by a listener may own the task that connects it (`own`); the leg cancels that
task when it is lost (the client left: stop dialling for it).

`WatchedLeg` is the up leg to a local endpoint while outlier_detection.response_timeout is set
(health.py, "Response timeout"): the shell of `health.Response`.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Protocol

from federation.logs import LogLimiter
from gateway.core.balance import Target
from gateway.core.health import Response, Wait, client_sent, expire, response_verdict, upstream_sent

log = logging.getLogger("isthmus.gateway.l4")  # the relay's logger, as before the split
_timeout_log = LogLimiter(log)

PENDING_LIMIT = 256 * 1024


class LegTransport(Protocol):
    """What a listener reads of a leg's wire (the idle sweeper): an asyncio transport, or a
    stream's view of itself (mux._StreamTransport)."""

    def is_closing(self) -> bool: ...

    def get_write_buffer_size(self) -> int: ...


class Leg(Protocol):
    """One side of a relay (see the module docstring). Implemented by PlainLeg and mux.Stream."""

    transport: LegTransport | None
    other: Leg | None
    eof_in: bool  # the far end of this leg sent EOF
    eof_out: bool  # we half-closed this leg
    lost: bool  # this leg is over
    activity: int  # reads so far (the idle sweeper's progress)
    paused_for_other: bool  # not reading, because the other leg is full

    def send(self, data: bytes) -> None:
        """Write the other leg's bytes to this leg's wire."""

    def send_eof(self) -> None:
        """The other leg's far end sent EOF: half-close this leg's wire."""

    def close(self) -> None:
        """End this leg once what it holds is written."""

    def abort(self) -> None:
        """End this leg now."""

    def attach(self, other: Leg) -> None:
        """Relay to `other` from now on, handing it what arrived before."""

    def detach(self) -> None:
        """Forget the other leg (both are lost)."""

    def pause_reading(self) -> None:
        """The other leg is full: stop reading this leg's wire until resume_reading."""

    def resume_reading(self) -> None:
        """The other leg drained: read again, if pause_reading stopped it."""


class Reporter(Protocol):
    """Who hears a connect's outcome (the router: outlier detection)."""

    def report(self, target: Target, ok: bool) -> None: ...


class Tally(Protocol):
    """What a WatchedLeg counts (the listener's stats)."""

    def served(self, key: str) -> None: ...

    def response_timed_out(self, key: str) -> None: ...


class Host(Protocol):
    """The listener of an accepted leg: hears when it is made and when it is lost."""

    def made(self, leg: ImportLeg) -> None: ...

    def lost(self, leg: ImportLeg) -> None: ...


class PlainLeg(asyncio.Protocol, Leg):
    """A plain TCP leg: an app's connection to a local listener, or a dial to a local endpoint."""

    transport: Any = None  # the asyncio transport, from connection_made
    other: Leg | None = None
    eof_in = False
    eof_out = False
    lost = False
    activity = 0
    paused_for_other = False

    def __init__(self) -> None:
        self.pending: list[bytes] | None = []
        self.pending_size = 0

    # asyncio.Protocol --------------------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.activity += 1
        other = self.other
        if other is not None:
            other.send(data)
            return
        self.pending.append(data)  # type: ignore[union-attr]
        self.pending_size += len(data)
        if self.pending_size > PENDING_LIMIT:
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.eof_in = True
        other = self.other
        if other is not None:
            other.send_eof()
            if other.eof_in:
                return False  # both directions done: let the transport close
        return True

    def pause_writing(self) -> None:
        other = self.other
        if other is not None:
            other.pause_reading()

    def resume_writing(self) -> None:
        other = self.other
        if other is not None:
            other.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        other = self.other
        if other is not None:
            if not other.lost:
                other.close()
            else:  # both ended: drop the pair's cycle so refcounting frees it, not the GC
                self.other = None
                other.detach()

    # Leg ---------------------------------------------------------------------------------------
    def send(self, data: bytes) -> None:
        self.transport.write(data)

    def send_eof(self) -> None:
        if self.eof_out or self.transport.is_closing():
            return
        self.eof_out = True
        if self.eof_in:
            self.close()
        elif self.transport.can_write_eof():
            self.transport.write_eof()
        else:
            self.close()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def attach(self, other: Leg) -> None:
        self.other = other
        pending, self.pending = self.pending, None
        for chunk in pending or ():
            other.send(chunk)
        if self.eof_in:
            other.send_eof()
        # Resume what PENDING_LIMIT paused, unless the flush above overfilled the other leg,
        # which then paused us for flow control (it resumes us when it drains).
        if self.pending_size > PENDING_LIMIT and not self.lost and not self.paused_for_other:
            self.transport.resume_reading()

    def detach(self) -> None:
        self.other = None

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()
            self.paused_for_other = True

    def resume_reading(self) -> None:
        if self.transport is not None and self.paused_for_other:
            self.paused_for_other = False
            self.transport.resume_reading()


@dataclass(frozen=True, slots=True)
class _Watch:
    """Who hears the verdict of a WatchedLeg: the listener that committed the connection."""

    target: Target
    router: Reporter
    stats: Tally
    timeout: float
    loop: asyncio.AbstractEventLoop


class WatchedLeg(PlainLeg):
    """The up leg to a local endpoint while outlier_detection.response_timeout is set: the shell
    of health.Response. Until `commit` it is a PlainLeg that remembers whether the endpoint
    spoke. After it: the client's first bytes (or EOF) written here start the clock, the
    endpoint's first bytes (or EOF) stop it, and the verdict goes out once — answered: served,
    reported ok; silent until the deadline: reported failed, counted as a response timeout, both
    legs reset; closed before either: served, no report (nothing was learnt)."""

    def __init__(self) -> None:
        super().__init__()
        self.response = Response()
        self.watch: _Watch | None = None
        self.settled = False
        self.timer: asyncio.TimerHandle | None = None

    def commit(self, target: Target, router: Reporter, stats: Tally, timeout: float,
               loop: asyncio.AbstractEventLoop) -> None:
        """The listener relays the client's connection over this leg (instead of counting it as
        served at once); a banner the endpoint sent already is its answer."""
        self.watch = _Watch(target, router, stats, timeout, loop)
        self._settle()

    def send(self, data: bytes) -> None:
        self.transport.write(data)
        if self.response.wait is Wait.QUIET:
            self._asked()

    def send_eof(self) -> None:
        PlainLeg.send_eof(self)
        if self.response.wait is Wait.QUIET:  # a client that half-closes has asked, and waits
            self._asked()

    def _asked(self) -> None:
        w = self.watch
        if w is not None:
            self.response = r = client_sent(self.response, w.loop.time(), w.timeout)
            self.timer = w.loop.call_at(r.deadline, self._expire)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        if not self.settled:
            self.response = upstream_sent(self.response)
            self._settle()
        PlainLeg.data_received(self, data)

    def eof_received(self) -> bool:
        if not self.settled:  # only a running app closes its side: a FIN is an answer too
            self.response = upstream_sent(self.response)
            self._settle()
        return PlainLeg.eof_received(self)

    def _expire(self) -> None:
        self.timer = None
        w = self.watch
        assert w is not None
        self.response = r = expire(self.response, w.loop.time())
        if r.wait is Wait.WAITING:  # the timer ran a hair early: wait out the real deadline
            self.timer = w.loop.call_at(r.deadline, self._expire)  # type: ignore[arg-type]
            return
        self._settle()

    def _settle(self) -> None:
        """Act on the verdict, once, when there is one and someone to tell."""
        w = self.watch
        verdict = response_verdict(self.response)
        if w is None or verdict is None or self.settled:
            return
        self.settled = True
        self._cancel_timer()
        if verdict:
            w.stats.served(w.target.key)
            w.router.report(w.target, True)
            return
        w.stats.response_timed_out(w.target.key)
        w.router.report(w.target, False)
        _timeout_log.warning(
            "response-timeout", "%s sent nothing within %gs of the client's first bytes; its "
            "connection is reset (L4 cannot replay it elsewhere)", w.target.key, w.timeout)
        other = self.other
        self.abort()
        if other is not None:
            other.abort()

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        w = self.watch
        if not self.settled and w is not None:
            self.settled = True  # ended before a verdict: relayed, nothing learnt
            self._cancel_timer()
            w.stats.served(w.target.key)
        PlainLeg.connection_lost(self, exc)


class ImportLeg(PlainLeg):
    """An app's connection to an import listener, which admits it and connects it."""

    def __init__(self, listener: Host) -> None:
        super().__init__()
        self.listener = listener
        self._connecting: asyncio.Task | None = None

    def own(self, task: asyncio.Task) -> None:
        """The task that connects this leg: cancelled if the leg is lost first."""
        self._connecting = task

    def connected(self) -> None:
        """The connect task is done with this leg: drop it (no cycle left for the GC)."""
        self._connecting = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.listener.made(self)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        task, self._connecting = self._connecting, None
        if task is not None and not task.done():
            task.cancel()
        self.listener.lost(self)
