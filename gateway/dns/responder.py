"""The gateway's DNS responder: UDP and TCP on one port, answers from gateway/dns/answers.py.

One asyncio DatagramProtocol and one Protocol per TCP connection, on the gateway's event loop
(no thread per query); dnspython parses and writes the messages. Per query:

- shorter than a DNS header (12 bytes), or a response (QR set): dropped, counted malformed;
- not parseable (bad labels, compression loops, truncated sections, ...): FORMERR with the
  query's ID, counted malformed; never an exception out of the protocol;
- opcode other than QUERY: NOTIMP; not exactly one question: FORMERR; EDNS version > 0:
  BADVERS;
- otherwise `answers.resolve` on the current `Records` (replaced whole whenever the catalog or
  the imports change, so an answer always comes from one consistent view), authoritative (AA),
  no recursion (RA clear). With EDNS the response advertises a 1232-byte payload; over UDP it
  is cut to the client's payload (512 without EDNS, at most 1232) with TC set, and the client
  retries over TCP, where up to 65535 bytes go.

The fast path: the response is a function of the query's bytes after its ID and the Records,
so a plain query (one question, at most an OPT record) answered before from the same Records is
answered from a cache: by its exact bytes (the cached response with the query's ID), or else by
everything the response depends on (header flags, the name in lowercase, type and class, EDNS
payload, version and padding, the size bound), then with the query's own question name (the
case as asked, 0x20-style; the answer's names point at it). Each cache holds CACHE_SIZE
responses and starts over when full; `set_records` empties both.

Bounds for anonymous clients: at most MAX_TCP connections (more are closed at once), each idle
at most TCP_IDLE seconds and at most TCP_QUERIES queries; a client that does not read its
answers (more than TCP_BACKLOG bytes waiting) is cut off. Metric labels are bounded: the query
type is one of a known set or "other".
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from bisect import bisect_left
from collections import Counter
from typing import Any

import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype

from federation.logs import LogLimiter
from gateway.dns.answers import Records, resolve

log = logging.getLogger("isthmus.gateway.dns")

PAYLOAD = 1232  # our EDNS payload size (the DNS flag day 2020 value)
MAX_TCP = 256
TCP_IDLE = 10.0
TCP_QUERIES = 1000
TCP_BACKLOG = 256 * 1024
QTYPES = frozenset({"A", "AAAA", "SRV", "SOA", "NS", "ANY", "TXT", "CNAME", "PTR", "MX",
                    "HTTPS", "SVCB"})
CACHE_SIZE = 4096
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)


class DnsStats:
    """Counters for /metrics: queries by transport, type and rcode; malformed; truncated; TCP
    connections refused; the time spent answering (a histogram)."""

    BUCKETS = BUCKETS

    def __init__(self) -> None:
        self.queries: Counter[tuple[str, str, str]] = Counter()
        self.malformed: Counter[str] = Counter()
        self.truncated = 0
        self.tcp_refused = 0
        self.buckets = [0] * len(BUCKETS)
        self.seconds = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.count += 1
        self.seconds += seconds
        i = bisect_left(BUCKETS, seconds)
        if i < len(BUCKETS):
            self.buckets[i] += 1


def _cache_key(wire: bytes, limit: int | None) -> tuple[tuple, int] | None:
    """(cache key, end of the question name) of a plain query: opcode QUERY, one question
    with an uncompressed name, no answer or authority records, at most an OPT record and
    nothing after it. None for anything else (the full path reads it)."""
    n = len(wire)
    if n < 17 or n > 512 or wire[4:10] != b"\x00\x01\x00\x00\x00\x00" or wire[2] & 0xF8:
        return None
    arcount = wire[10] << 8 | wire[11]
    i = 12
    while True:
        if i >= n:
            return None
        length = wire[i]
        if length == 0:
            break
        if length > 63:  # a compression pointer, or not a label
            return None
        i += length + 1
    end = i  # the root label of the question name
    i += 5
    if i > n:
        return None
    edns: tuple = ()
    if arcount == 1:
        if n < i + 11 or wire[i] != 0 or wire[i + 1:i + 3] != b"\x00\x29":
            return None
        rdlen = wire[i + 9] << 8 | wire[i + 10]
        options, j, padded = wire[i + 11:], 0, False
        if len(options) != rdlen:
            return None
        while j + 4 <= rdlen:
            padded |= options[j:j + 2] == b"\x00\x0c"
            j += 4 + (options[j + 2] << 8 | options[j + 3])
        if j != rdlen:
            return None
        edns = (wire[i + 3] << 8 | wire[i + 4], wire[i + 6], padded)  # payload, version, pad
    elif arcount != 0 or i != n:
        return None
    key = (wire[2:4], wire[12:end].lower(), wire[end + 1:end + 5], edns, limit)
    return key, end


def _error(wire: bytes, rcode: int) -> bytes:
    """A bare response header for a query we could not read (or answer): its ID, opcode and
    RD, QR set, `rcode`, no sections (all we can say about a message we cannot read)."""
    flags = 0x8000 | (wire[2] & 0x79) << 8 | rcode
    return wire[:2] + flags.to_bytes(2, "big") + bytes(8)


class DnsResponder:
    """Answers queries on one UDP and one TCP socket of the same address."""

    def __init__(self, records: Records) -> None:
        self.records = records
        self.stats = DnsStats()
        self.events = LogLimiter(log, interval=30.0, burst=3)
        self.udp: asyncio.DatagramTransport | None = None
        self.tcp: asyncio.base_events.Server | None = None
        self.conns: set[_TcpConn] = set()
        self.address: tuple[str, int] | None = None
        # Responses computed from `records` (module docstring: the fast path): by the exact
        # bytes after the ID, and by (flags, name in lowercase, type and class, EDNS, size).
        self._exact: dict[tuple, tuple[bytes, tuple[str, str, str], bool]] = {}
        self._cache: dict[tuple, tuple[bytes, tuple[str, str, str], bool]] = {}
        self._last: tuple[str, str] | None = None  # what _respond counted (qtype, rcode)

    def set_records(self, records: Records) -> None:
        """Answer from `records` from now on (the catalog or the imports changed)."""
        self.records = records
        self._exact.clear()
        self._cache.clear()

    # -- answering -------------------------------------------------------------------------
    def respond(self, wire: bytes, transport: str, limit: int | None) -> bytes | None:
        """The response to one message (None: drop it). `limit`: UDP's size bound from the
        query's EDNS (None over TCP)."""
        started = time.perf_counter()
        try:
            exact = (wire[2:], limit)
            hit = self._exact.get(exact)
            if hit is not None:
                return self._hit(wire[:2] + hit[0], hit)
            key = _cache_key(wire, limit)
            if key is not None:
                hit = self._cache.get(key[0])
                if hit is not None:
                    end = key[1]
                    return self._hit(wire[:2] + hit[0][:10] + wire[12:end] + hit[0][end - 2:],
                                     hit)
            out = self._respond(wire, transport, limit)
            if key is not None and out is not None and self._last is not None:
                entry = (out[2:], (transport, *self._last), bool(out[2] & 0x02))
                for cache, k in ((self._exact, exact), (self._cache, key[0])):
                    if len(cache) >= CACHE_SIZE:
                        cache.clear()  # random names from a client: start over, bounded
                    cache[k] = entry
            return out
        except Exception as e:  # a bug of ours: SERVFAIL, one log line, never a dead responder
            self.events.error("servfail", "DNS query failed (%s: %s); answered SERVFAIL",
                              type(e).__name__, e)
            return _error(wire, dns.rcode.SERVFAIL) if len(wire) >= 12 else None
        finally:
            self.stats.observe(time.perf_counter() - started)

    def _hit(self, out: bytes, hit: tuple[bytes, tuple[str, str, str], bool]) -> bytes:
        self.stats.queries[hit[1]] += 1
        self.stats.truncated += hit[2]
        return out

    def _respond(self, wire: bytes, transport: str, limit: int | None) -> bytes | None:
        self._last = None
        if len(wire) < 12 or wire[2] & 0x80:  # no header, or a response: nothing to answer
            self.stats.malformed[transport] += 1
            return None
        if (wire[2] >> 3) & 0x0F != dns.opcode.QUERY:  # UPDATE, NOTIFY, ...: not ours to do
            self._count(transport, "other", dns.rcode.NOTIMP)
            return _error(wire, dns.rcode.NOTIMP)
        try:
            q = dns.message.from_wire(wire)
        except Exception:  # noqa: BLE001 - whatever the bytes make the parser raise
            self.stats.malformed[transport] += 1
            self._count(transport, "other", dns.rcode.FORMERR)
            return _error(wire, dns.rcode.FORMERR)
        r = dns.message.make_response(q, our_payload=PAYLOAD)
        r.flags |= dns.flags.AA
        r.flags &= ~dns.flags.RA
        qtype = "other"
        if len(q.question) != 1:
            r.set_rcode(dns.rcode.FORMERR)
        elif q.edns > 0:
            r.set_rcode(dns.rcode.BADVERS)
        else:
            question = q.question[0]
            name = dns.rdatatype.to_text(question.rdtype)
            qtype = name if name in QTYPES else "other"
            got = resolve(self.records, question.name, question.rdtype, question.rdclass)
            r.set_rcode(got.rcode)
            if got.rcode == dns.rcode.REFUSED:
                r.flags &= ~dns.flags.AA
            r.answer, r.authority, r.additional = (list(got.answer), list(got.authority),
                                                   list(got.additional))
        self._count(transport, qtype, r.rcode())
        if limit is None:
            return r.to_wire(max_size=65535)
        size = max(512, min(q.payload, PAYLOAD)) if q.edns >= 0 else 512
        out = r.to_wire(max_size=size, prefer_truncation=True)
        if out[2] & 0x02:
            self.stats.truncated += 1
        return out

    def _count(self, transport: str, qtype: str, rcode: int) -> None:
        self._last = (qtype, dns.rcode.to_text(rcode))
        self.stats.queries[(transport, *self._last)] += 1

    # -- serving ---------------------------------------------------------------------------
    async def start(self, host: str, port: int, *, reuse_port: bool = True) -> None:
        """Bind UDP, then TCP on the same port (port 0: the port UDP got). SO_REUSEPORT, so
        a gateway taking over from this one (restart.py) can bind while this one still
        answers."""
        loop = asyncio.get_running_loop()
        for attempt in range(20 if port == 0 else 1):  # port 0: until TCP gets UDP's port too
            udp, tcp = _bind_pair(host, port, reuse_port, last=attempt == 19 or port != 0)
            if udp is not None:
                break
        self.udp, _ = await loop.create_datagram_endpoint(lambda: _Udp(self), sock=udp)
        self.tcp = await loop.create_server(lambda: _TcpConn(self), sock=tcp)
        self.address = (host, udp.getsockname()[1])

    def describe(self) -> dict[str, Any]:
        r = self.records
        return {"listen": f"{self.address[0]}:{self.address[1]}" if self.address else None,
                "zone": r.zone.to_text(omit_final_dot=True), "ttl": r.ttl,
                "names": list(r.services)}

    async def close(self) -> None:
        if self.udp is not None:
            self.udp.close()
            self.udp = None
        if self.tcp is not None:
            self.tcp.close()
            for c in list(self.conns):
                c.transport.abort()
            await self.tcp.wait_closed()
            self.tcp = None


def _bind_pair(host: str, port: int, reuse_port: bool, last: bool) -> tuple[Any, Any]:
    """A UDP and a TCP socket on host:port (port 0: the port UDP got); (None, None) if TCP
    could not have that port and this is not the `last` try (then the error is raised)."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0][0]
    udp = socket.socket(family, socket.SOCK_DGRAM)
    try:
        udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, int(reuse_port))
        udp.bind((host, port))
        got = udp.getsockname()[1]
        try:
            tcp = socket.create_server((host, got), family=family, backlog=1024,
                                       reuse_port=reuse_port)
        except OSError:
            if last:
                raise
            udp.close()
            return None, None
    except BaseException:
        udp.close()
        raise
    return udp, tcp


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: DnsResponder) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        out = self.server.respond(data, "udp", PAYLOAD)
        if out is not None and self.transport is not None:
            self.transport.sendto(out, addr)

    def error_received(self, exc: Exception) -> None:  # e.g. ICMP port unreachable: ignore
        pass


class _TcpConn(asyncio.Protocol):
    """One TCP client: 2-byte length-prefixed messages, answered in order."""

    def __init__(self, server: DnsResponder) -> None:
        self.server = server
        self.buf = bytearray()
        self.queries = 0
        self.transport: Any = None
        self.idle: asyncio.TimerHandle | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        s = self.server
        if len(s.conns) >= MAX_TCP:
            s.stats.tcp_refused += 1
            transport.abort()
            return
        s.conns.add(self)
        self._arm()

    def _arm(self) -> None:
        if self.idle is not None:
            self.idle.cancel()
        self.idle = asyncio.get_running_loop().call_later(TCP_IDLE, self.transport.abort)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while len(self.buf) >= 2:
            n = int.from_bytes(self.buf[:2], "big")
            if len(self.buf) < 2 + n:
                break
            msg = bytes(self.buf[2:2 + n])
            del self.buf[:2 + n]
            out = self.server.respond(msg, "tcp", None)
            if out is not None:
                self.transport.write(len(out).to_bytes(2, "big") + out)
            self.queries += 1
            if (self.queries >= TCP_QUERIES
                    or self.transport.get_write_buffer_size() > TCP_BACKLOG):
                self.transport.close()
                return
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.idle is not None:
            self.idle.cancel()
        self.server.conns.discard(self)
