"""The TCP data plane's listeners, on asyncio Protocols.

Theory of operation
-------------------
A proxied connection has two legs, the accepted *down* leg and the dialled *up* leg, each a
`Leg` (legs.py: a plain TCP leg, or a stream on a multiplexed link to another gateway, mux.py);
legs.py describes the relay between them (data, flow control, half-close, close). The up leg is
dial.py's (`connect_first`: connect-time failover over the router's plan).

Listeners own their connections and the tasks that connect them: `close()` cancels the tasks
and closes the transports. An idle sweeper closes connections with no traffic for
`idle_timeout`, and a connection limit refuses connections beyond `max_connections`.

Restarts (gateway/handoff.py): a listener may be given a socket that is already bound and
listening (by the runtime, or by the process before this one) and start with `serving=False`;
`serve()` starts accepting. `stop_accepting()` stops accepting on this process's copy of the
socket (its other holders, e.g. the process taking over, keep accepting from the same queue, so
no waiting connection is lost), and `drain(timeout)` lets the open connections finish: at the
bound what is left is half-closed both ways (EOF to the client and to the target, so each side
sees a clean end), given DRAIN_GRACE, and only then closed. The inbound listener also tells
every link's caller GOAWAY (an ERR frame on stream 0): the caller opens no new streams on that
link, dials a new one (to the new process), and closes the old link after its last stream.

Link lifecycle (gateway/core/links.py): the inbound listener judges its links as the caller's
pool does (`sweep`, run by pool.keep_links). For "replace" (our SVID rotated, the caller's
bundle changed, a certificate passed its half life) it sends GOAWAY once, and the caller moves
to a new link, which gets our new SVID; for "close" (the caller's cluster was removed, its
certificate no longer verifies, a certificate expires) it aborts the link. A removed cluster's
new handshakes fail: its CA is gone from the server context (tls.py), and `identify` finds no
bundle for it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Any

from federation.drill_model import DrillMode
from federation.errors import IdentityError
from federation.logs import LogLimiter, quote
from federation.model import ServiceKey
from gateway.core.balance import Target
from gateway.core.links import Action
from gateway.dataplane import link as link_codec
from gateway.dataplane.dial import Dialer, ListenerStats, Router, connect_first
from gateway.dataplane.http.export import ExportHttp
from gateway.dataplane.http.host import DEFAULT_LIMITS, HttpLimits, merge_counters
from gateway.dataplane.http.session import Session
from gateway.dataplane.legs import ImportLeg, Leg, WatchedLeg
from gateway.dataplane.mux import MuxLink, Stream
from gateway.dataplane.pool import EXPIRY_MARGIN, LinkStats, close_link

log = logging.getLogger("isthmus.gateway.l4")
# What peers and anonymous clients cause (refused handshakes, identities, streams): one line per
# event class, rate-limited; the listener's counters (/metrics) carry the volume.
limited = LogLimiter(log)

DRAIN_GRACE = 2.0  # after the drain bound, half-closed connections get this long to end
GOAWAY = "goaway"  # ERR code on stream 0: open no new streams on this link


def _commit(up: Leg, target: Target, router: Router, stats: ListenerStats,
            timeout: float | None, loop: asyncio.AbstractEventLoop) -> None:
    """Count a connection that connect_first found as served, or let its WatchedLeg decide."""
    if timeout is not None and isinstance(up, WatchedLeg):
        up.commit(target, router, stats, timeout, loop)
    else:
        stats.served(target.key)


# ---------------------------------------------------------------------------------------------
# Listeners


def _progress(leg: Leg | None) -> tuple[int, int]:
    if leg is None or leg.transport is None:
        return (0, 0)
    return (leg.activity, leg.transport.get_write_buffer_size())


class Listener:
    """Owns a server socket, its connections and their connect tasks."""

    def __init__(self, name: str, max_connections: int, idle_timeout: float) -> None:
        self.name = name
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.stats = ListenerStats()
        self.server: asyncio.base_events.Server | None = None
        self.legs: set[Leg] = set()
        self.tasks: set[asyncio.Task] = set()
        self._sweeper: asyncio.Task | None = None
        self.loop: asyncio.AbstractEventLoop | None = None  # set by start_server
        self.draining = False  # stop_accepting() was called

    def spawn(self, coro: Any) -> asyncio.Task:
        # self.loop, not get_running_loop(): on 3.11 that is a getpid() syscall per call
        task = self.loop.create_task(coro)  # type: ignore[union-attr]
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def admit(self, leg: Leg) -> bool:
        self.stats.accepted += 1
        if len(self.legs) >= self.max_connections:
            self.stats.refused_limit += 1
            leg.abort()
            return False
        self.legs.add(leg)
        self.stats.active = len(self.legs)
        return True

    def forget(self, leg: Leg) -> None:
        self.legs.discard(leg)
        self.stats.active = len(self.legs)

    def counters(self) -> dict[str, Any]:
        """The listener's counters as plain values (/status, /metrics, workers' stats files)."""
        return dict(vars(self.stats))

    async def _sweep(self) -> None:
        """Close connections that moved no data for idle_timeout (checked every tenth of it).

        Progress is reads on either leg or a change in what either leg still has to write (a
        slow reader draining a closing leg is progress). An idle connection is closed
        gracefully; if it is still there, stuck, one idle_timeout later (its reader never
        drains what we hold, so close() can never finish), it is aborted.
        """
        step = max(0.05, min(self.idle_timeout / 10, 5.0))
        seen: dict[Leg, tuple[tuple, float]] = {}
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(step)
            now = loop.time()
            fresh: dict[Leg, tuple[tuple, float]] = {}
            for leg in list(self.legs):
                up = leg.other
                progress = (_progress(leg), _progress(up))
                last = seen.get(leg)
                since = now if last is None or last[0] != progress else last[1]
                if now - since < self.idle_timeout:
                    fresh[leg] = (progress, since)
                elif leg.transport is not None and leg.transport.is_closing():
                    leg.abort()  # closed on an earlier sweep, or by the relay, and stuck
                    if up is not None:
                        up.abort()
                else:
                    self.stats.idle_closed += 1
                    leg.close()
                    if up is not None:
                        up.close()
            seen = fresh

    async def start_server(self, factory: Callable[[], asyncio.Protocol], host: str, port: int,
                           *, sock: socket.socket | None = None, serving: bool = True,
                           **kw: Any) -> None:
        """Listen on host:port, or on `sock` (bound and listening already: the server gets a
        duplicate of it, so closing the server leaves the caller's copy open)."""
        loop = asyncio.get_running_loop()
        if sock is not None:
            self.server = await loop.create_server(factory, sock=sock.dup(), backlog=4096,
                                                   start_serving=serving)
        else:
            self.server = await loop.create_server(factory, host, port, reuse_address=True,
                                                   backlog=4096, start_serving=serving, **kw)
        self._serving()

    async def serve(self) -> None:
        """Start accepting (a listener started with serving=False)."""
        if self.server is not None and not self.draining:
            await self.server.start_serving()

    def stop_accepting(self) -> None:
        """Accept no more connections here; the open ones go on (see drain)."""
        self.draining = True
        if self.server is not None:
            self.server.close()

    def _drained(self) -> bool:
        return not self.legs and not self.tasks

    def _end_open(self) -> None:
        """The drain bound: cancel connects in progress, half-close every relayed connection
        both ways (each side reads EOF and ends it cleanly), close the rest."""
        for task in list(self.tasks):
            task.cancel()
        for leg in list(self.legs):
            up = leg.other
            if up is None:
                leg.close()
            else:
                leg.send_eof()
                up.send_eof()

    async def drain(self, timeout: float, grace: float = DRAIN_GRACE) -> int:
        """After stop_accepting(): wait up to `timeout` for the open connections to end, then
        end the rest (`_end_open`), give them `grace`, and close what is left (gracefully: what
        we hold is flushed first; close() aborts whatever still hangs). Returns how many
        connections were still open at the bound."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self._drained() and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self._drained():
            return 0
        left = len(self.legs)
        self._end_open()
        deadline = loop.time() + grace
        while not self._drained() and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for leg in list(self.legs):  # e.g. a client that never closes its side after our EOF
            leg.close()
            if leg.other is not None:
                leg.other.close()
        return left

    def _serving(self) -> None:
        """The socket is bound: remember the loop and start the idle sweeper."""
        self.loop = loop = asyncio.get_running_loop()
        self._sweeper = loop.create_task(self._sweep())

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for task in list(self.tasks):
            task.cancel()
        for leg in list(self.legs):
            leg.abort()
            if leg.other is not None:
                leg.other.abort()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.server is not None:
            await self.server.wait_closed()


class ImportListener(Listener):
    """Plain TCP from local apps for one imported service; picks targets through its router."""

    def __init__(self, service: ServiceKey, router: Router, dialer: Dialer, *,
                 max_connections: int, idle_timeout: float) -> None:
        super().__init__(f"import {service}", max_connections, idle_timeout)
        self.service = service
        self.router = router
        self.dialer = dialer

    async def start(self, host: str, port: int, reuse_port: bool = False, *,
                    sock: socket.socket | None = None, serving: bool = True) -> None:
        kw = {"reuse_port": reuse_port} if sock is None else {}
        await self.start_server(lambda: ImportLeg(self), host, port, sock=sock, serving=serving,
                                **kw)

    def made(self, leg: ImportLeg) -> None:
        if self.admit(leg):
            leg.own(self.spawn(self._connect(leg)))

    def lost(self, leg: ImportLeg) -> None:
        self.forget(leg)  # the leg cancelled its connect task

    async def _connect(self, down: ImportLeg) -> None:
        router = self.router
        timeout = router.response_timeout
        found = await connect_first(router, self.dialer, self.service, self.stats, timeout)
        down.connected()
        if found is None:
            self.stats.failed += 1
            down.abort()
            return
        target, up = found
        if down.lost:
            up.close()
            return
        _commit(up, target, router, self.stats, timeout, self.loop)  # type: ignore[arg-type]
        up.attach(down)
        down.attach(up)


class InboundListener(Listener):
    """The east-west mutual-TLS listener: remote gateways keep links here and OPEN streams on
    them to our exports. Each link is identified once, at its handshake; each stream is
    authorized (the export's allowed consumers), connected to a healthy local endpoint, relayed.
    Streams count as connections for the limit and the idle timeout.

    It accepts on its own socket and runs each TLS handshake with `connect_accepted_socket`
    rather than `create_server(ssl=...)`: a server drops a failed handshake silently, so a peer
    that OpenSSL refuses (certificate from no known CA, no client certificate, not TLS at all)
    could be neither counted nor logged. Links are few and long-lived, so a Python accept loop
    costs nothing that matters here."""

    MAX_HANDSHAKES = 256  # default of limits.inbound_max_handshakes

    def __init__(self, tls: Any, exports: Callable[[ServiceKey], Any], dialer: Dialer, *,
                 max_connections: int, idle_timeout: float,
                 http_limits: HttpLimits = DEFAULT_LIMITS,
                 max_handshakes: int = MAX_HANDSHAKES) -> None:
        super().__init__("inbound", max_connections, idle_timeout)
        # TLS handshakes in flight at once; more are closed at accept, unread, and counted in
        # handshakes_refused (a flood of connections that never finish a handshake, not peers:
        # each in-flight one ends within handshake_timeout)
        self.max_handshakes = max_handshakes
        self.handshakes_refused = 0
        self.http_limits = http_limits
        self.http_hosts: dict[ServiceKey, ExportHttp] = {}  # http exports (http/export.py)
        self.spans: Any = None  # the `tracing:` exporter, for http exports' spans
        self.tls = tls
        self.exports = exports  # service -> (federation.model.Export, Router) or None
        self.dialer = dialer
        self.denied = 0
        self.identity_refused = 0
        self.handshake_failed = 0
        self.handshaking = 0
        self.links: set[MuxLink] = set()
        self.link_stats = LinkStats()  # answerer side: "replaced" counts GOAWAYs we sent
        self.sock: socket.socket | None = None
        self._acceptor: asyncio.Task | None = None
        self.handshake_timeout = 5.0
        # Drill fault hook (set by gateway.control.drill_actor): None, or an object with `mode`
        # ("drain" | "blackhole" | "degrade"), `latency` (s), `error_rate` (0..1) and `random()`.
        # Consulted on each new OPEN and PING only; streams already open are never touched.
        self.fault: Any = None

    async def start(self, host: str, port: int, handshake_timeout: float = 5.0,
                    reuse_port: bool = False, *, sock: socket.socket | None = None,
                    serving: bool = True) -> None:
        """Listen on host:port, or on a duplicate of `sock` (bound and listening already)."""
        loop = asyncio.get_running_loop()
        if sock is not None:
            self.sock = sock.dup()
        else:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                           flags=socket.AI_PASSIVE)
            self.sock = socket.create_server((host, port), family=infos[0][0], backlog=4096,
                                             reuse_port=reuse_port)
        self.sock.setblocking(False)
        self.handshake_timeout = handshake_timeout
        self._serving()
        if serving:
            await self.serve()

    async def serve(self) -> None:
        if self._acceptor is None and not self.draining:
            loop: Any = self.loop
            self._acceptor = loop.create_task(self._accept_loop(self.handshake_timeout))

    def stop_accepting(self) -> None:
        """No new links; every link's caller is told GOAWAY (streams already open go on)."""
        self.draining = True
        if self._acceptor is not None:
            self._acceptor.cancel()
        if self.sock is not None:
            self.sock.close()
        for link in list(self.links):
            _goaway(link, RESTARTING, "restarting")

    def _drained(self) -> bool:
        return not self.legs and not self.tasks and not self.links

    def counters(self) -> dict[str, Any]:
        """Besides the connection counters: refused links and streams, and the link lifecycle
        of this process (`links`: answerer side, ours; `caller_links`: the dialer's pool)."""
        http = merge_counters([h.http_counters() for h in self.http_hosts.values()])
        return {**super().counters(), **({"http": http} if http else {}),
                "identity_refused": self.identity_refused,
                "handshake_failed": self.handshake_failed, "denied": self.denied,
                "handshaking": self.handshaking, "handshakes_refused": self.handshakes_refused,
                "links": self.link_stats.to_json(),
                "caller_links": self.dialer.pool.stats.to_json()}

    def _end_open(self) -> None:
        super()._end_open()
        for link in list(self.links):  # callers that do not know GOAWAY keep idle links open
            if not link.streams:
                link.transport.close()

    @property
    def port(self) -> int:
        assert self.sock is not None
        return self.sock.getsockname()[1]

    async def _accept_loop(self, handshake_timeout: float) -> None:
        loop, sock = self.loop, self.sock
        while True:
            try:
                conn, _ = await loop.sock_accept(sock)  # type: ignore[union-attr,arg-type]
            except OSError as e:  # e.g. out of file descriptors: say so, do not spin
                limited.warning("accept-failed", "inbound listener: accept failed: %s", e)
                await asyncio.sleep(0.1)
                continue
            if self.handshaking >= self.max_handshakes:
                self.handshakes_refused += 1
                limited.warning("handshakes-refused", "inbound listener: %d TLS handshakes in "
                                "progress (limits.inbound_max_handshakes): new connections are "
                                "closed unread", self.handshaking)
                conn.close()
                continue
            self.handshaking += 1
            self.spawn(self._handshake(conn, handshake_timeout))

    async def _handshake(self, conn: socket.socket, timeout: float) -> None:
        try:
            try:
                peer = conn.getpeername()
            except OSError:  # gone before we looked at it
                self.handshake_failed += 1
                conn.close()
                return
            ctx, snap = self.tls.server_side()  # the SVID this handshake presents: snap's
            try:
                await self.loop.connect_accepted_socket(  # type: ignore[union-attr]
                    lambda: self._new_link(snap.svid), conn, ssl=ctx,
                    ssl_handshake_timeout=timeout)
            # ssl.SSLError is an OSError; the transport closed conn
            except (OSError, TimeoutError) as e:
                self.handshake_failed += 1
                limited.warning("handshake-refused", "inbound link from %s refused in the TLS "
                                "handshake: %s", quote(peer), quote(str(e) or type(e).__name__))
        finally:
            self.handshaking -= 1

    def _new_link(self, presented: Any) -> MuxLink:
        return MuxLink("answerer", on_ready=lambda lk: self._identify(lk, presented),
                       on_open=self._open, on_lost=self.links.discard,
                       answer_ping=self._answer_ping)

    def _identify(self, link: MuxLink, presented: Any) -> bool:
        try:
            facts = self.tls.identify_link(link.transport.get_extra_info("ssl_object"), presented)
            link.facts, link.peer = facts, facts.peer
        except IdentityError as e:
            self.identity_refused += 1
            limited.warning("identity-refused", "inbound link from %s refused: %s",
                            quote(link.transport.get_extra_info("peername")), quote(e))
            return False
        self.links.add(link)
        if self.draining:  # its handshake began before we stopped accepting
            _goaway(link, RESTARTING, "restarting")
        return True

    def sweep(self) -> None:
        """Judge every link (gateway/core/links.py): GOAWAY once for "replace", abort for
        "close". The http exports' idle upstream connections are swept here too."""
        if self.loop is not None:
            now = self.loop.time()
            for host in self.http_hosts.values():
                host.pool.sweep(now)
        for link in list(self.links):
            if link.facts is None or link.closed:
                continue
            verdict = self.tls.judge(link.facts, EXPIRY_MARGIN)
            if verdict.action is Action.CLOSE:
                close_link(link, verdict.reason, self.link_stats)
            elif verdict.action is Action.REPLACE and not link.goaway:
                self.link_stats.count(self.link_stats.replaced, verdict.reason)
                _goaway(link, f"replace this link ({verdict.reason}): open new streams on a "
                        "new link", verdict.reason)

    def describe(self, now: float) -> list[dict[str, Any]]:
        """/status rows of the inbound links."""
        return [lk.describe(now) for lk in self.links]

    def _answer_ping(self) -> bool:
        fault = self.fault
        return fault is None or fault.mode != DrillMode.BLACKHOLE

    def _open(self, link: MuxLink, sid: int, request: dict) -> None:
        fault = self.fault
        if fault is not None and fault.mode == DrillMode.BLACKHOLE:
            return  # no answer at all: the caller times out (and sends RST)
        raw = request.get("service")
        ns, _, name = raw.partition("/") if isinstance(raw, str) else ("", "", "")
        service = ServiceKey(ns, name)
        entry = self.exports(service) if ns and name else None
        if entry is None:
            return _refuse(link, sid, "unknown-service",
                           f"service {raw!r} is not exported by this cluster")
        export, router = entry
        if not export.allows(link.peer):
            self.denied += 1
            limited.warning("consumer-denied", "cluster %s may not consume %s",
                            quote(link.peer), quote(service))
            return _refuse(link, sid, "forbidden", f"cluster {link.peer} may not consume {service}")
        delay = 0.0
        if fault is not None and fault.mode == DrillMode.DRAIN:
            return _refuse(link, sid, "draining", f"{service}: this cluster is draining (drill)")
        if fault is not None and fault.mode == DrillMode.DEGRADE:
            if fault.random() < fault.error_rate:
                return _refuse(link, sid, "degraded", f"{service}: refused by a degrade drill")
            delay = fault.latency
        self.stats.accepted += 1
        if len(self.legs) >= self.max_connections:
            self.stats.refused_limit += 1
            return _refuse(link, sid, "busy", "the gateway is at its connection limit")
        if export.protocol == "http":
            return self._open_http(link, sid, service, router, delay)
        stream = link.accept_stream(sid, on_close=self.forget)  # the stream cancels its task
        self.legs.add(stream)
        self.stats.active = len(self.legs)
        stream.own(self.spawn(self._connect(link, stream, service, router, delay)))

    def _open_http(self, link: MuxLink, sid: int, service: ServiceKey, router: Router,
                   delay: float) -> None:
        """An http export: an HTTP session on the stream, each request routed here to a local
        endpoint (http/export.py); refused at once if there is no endpoint to try."""
        if not router.plan():
            self.stats.failed += 1
            return _refuse(link, sid, "no-endpoint", f"no local endpoint of {service} is up")
        host = self.http_hosts.get(service)
        if host is None or host.export_router is not router:
            host = self.http_hosts[service] = ExportHttp(service, router, self.dialer,
                                                         self.http_limits, self, False)
        stream = link.accept_stream(sid, on_close=self.forget)
        self.legs.add(stream)
        self.stats.active = len(self.legs)
        if delay > 0:  # degrade drill: the OK comes `delay` later
            stream.own(self.spawn(self._http_after(link, stream, host, delay)))
            return
        link.write(link_codec.control(link_codec.OK, sid, {"endpoint": f"http {service}"}))
        stream.attach(Session(stream, host))

    async def _http_after(self, link: MuxLink, stream: Stream, host: ExportHttp,
                          delay: float) -> None:
        await asyncio.sleep(delay)
        if not stream.closed:
            link.write(link_codec.control(link_codec.OK, stream.sid,
                                          {"endpoint": f"http {host.service}"}))
            stream.attach(Session(stream, host))

    async def _connect(self, link: MuxLink, stream: Stream, service: ServiceKey, router: Router,
                       delay: float) -> None:
        if delay > 0:  # degrade drill: the OK comes `delay` later (cancelled if the stream goes)
            await asyncio.sleep(delay)
        timeout = router.response_timeout
        found = await connect_first(router, self.dialer, service, self.stats, timeout)
        if stream.closed:
            if found:
                found[1].close()
            return
        if found is None:
            self.stats.failed += 1
            _refuse(link, stream.sid, "no-endpoint",
                    f"no local endpoint of {service} could be reached")
            stream.drop()
            return
        target, up = found
        _commit(up, target, router, self.stats, timeout, self.loop)  # type: ignore[arg-type]
        link.write(link_codec.control(link_codec.OK, stream.sid, {"endpoint": target.key}))
        up.attach(stream)
        stream.attach(up)

    async def close(self) -> None:
        for host in self.http_hosts.values():
            host.pool.close()
        if self._acceptor is not None:
            self._acceptor.cancel()
        if self.sock is not None:
            self.sock.close()
        for link in list(self.links):
            link.transport.abort()
        await super().close()


def _refuse(link: MuxLink, sid: int, code: str, message: str) -> None:
    link.write(link_codec.control(link_codec.ERR, sid, {"code": code, "error": message}))


RESTARTING = "this gateway is restarting: open new streams on a new link"


def _goaway(link: MuxLink, message: str, why: str) -> None:
    """Tell the caller to open no new streams here (once per link; `why` shows in /status)."""
    if not link.goaway:
        link.goaway = why
        _refuse(link, 0, GOAWAY, message)
