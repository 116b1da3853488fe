"""A bounded fixed-rate HTTP/1.1 load generator (wrk cannot pace; wrk2 is not in Debian).

    python -m bench.loadgen --port P --rate 1000 --seconds 5 [--conns 20]

Opens `--conns` keep-alive connections, then issues GET / at `--rate` requests per second for
`--seconds` (open loop: the schedule does not slow down when responses do). uvloop timers tick
in milliseconds, so each wake-up sends every request that has come due. Latency of a request
is measured from the moment it is written; a request that found no idle connection waits in a
queue and its latency is counted from when it came due (so queueing is not hidden —
no coordinated omission). Prints one JSON line: sent, ok, errors, achieved rate, p50/p99/p999/max
in µs. Bounded: at most rate*seconds requests, and at most 3 s of draining at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import deque

import uvloop

REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"


class Conn(asyncio.Protocol):
    def __init__(self, gen: Gen) -> None:
        self.gen = gen
        self.buf = bytearray()
        self.t0 = 0.0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport

    def send(self, t0: float) -> None:
        self.t0 = t0
        self.transport.write(REQUEST)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(buf[:end]).lower()
        length = 0
        i = head.find(b"content-length:")
        if i >= 0:
            j = head.find(b"\r\n", i)
            length = int(head[i + 15:j if j >= 0 else len(head)])
        if len(buf) < end + 4 + length:
            return
        ok = head.startswith(b"http/1.1 200")
        del buf[:end + 4 + length]
        self.gen.done(self, ok)

    def connection_lost(self, exc: Exception | None) -> None:
        self.gen.lost(self)


class Gen:
    def __init__(self) -> None:
        self.idle: deque[Conn] = deque()
        self.backlog: deque[float] = deque()
        self.latencies: list[float] = []
        self.errors = 0
        self.inflight: set[Conn] = set()

    def done(self, conn: Conn, ok: bool) -> None:
        now = time.perf_counter()
        self.inflight.discard(conn)
        if ok:
            self.latencies.append(now - conn.t0)
        else:
            self.errors += 1
        if self.backlog:
            self.inflight.add(conn)
            conn.send(self.backlog.popleft())
        else:
            self.idle.append(conn)

    def lost(self, conn: Conn) -> None:
        if conn in self.inflight:
            self.inflight.discard(conn)
            self.errors += 1
        try:
            self.idle.remove(conn)
        except ValueError:
            pass

    def issue(self, due: float) -> None:
        if self.idle:
            conn = self.idle.popleft()
            self.inflight.add(conn)
            conn.send(time.perf_counter())
        else:
            self.backlog.append(due)


def pct(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


async def run(port: int, rate: float, seconds: float, conns: int) -> dict:
    loop = asyncio.get_running_loop()
    gen = Gen()
    for _ in range(conns):
        _, c = await loop.create_connection(lambda: Conn(gen), "127.0.0.1", port)
        c.transport.get_extra_info("socket").setsockopt(
            6, 1, 1
        )  # TCP_NODELAY (once per connection)
        gen.idle.append(c)
    total = int(rate * seconds)
    issued = 0
    start = time.perf_counter()
    while issued < total:
        now = time.perf_counter()
        due_count = min(total, int((now - start) * rate) + 1)
        while issued < due_count:
            gen.issue(start + issued / rate)
            issued += 1
        await asyncio.sleep(0.0005)
    elapsed = time.perf_counter() - start
    deadline = time.perf_counter() + 3.0
    while (gen.inflight or gen.backlog) and time.perf_counter() < deadline:
        await asyncio.sleep(0.01)
    unanswered = len(gen.inflight) + len(gen.backlog)
    for c in list(gen.idle) + list(gen.inflight):
        c.transport.close()
    lat = sorted(x * 1e6 for x in gen.latencies)
    return {
        "sent": issued, "ok": len(lat), "errors": gen.errors + unanswered,
        "rate": round(len(lat) / elapsed, 1),
        "p50_us": round(pct(lat, 0.50), 1), "p99_us": round(pct(lat, 0.99), 1),
        "p999_us": round(pct(lat, 0.999), 1), "max_us": round(lat[-1], 1) if lat else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--rate", type=float, required=True)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--conns", type=int, default=20)
    a = ap.parse_args()
    if not (0 < a.rate <= 100_000 and 0 < a.seconds <= 120 and 0 < a.conns <= 1000):
        raise SystemExit("loadgen: rate 1..100000, seconds ..120, conns 1..1000")
    print(json.dumps(uvloop.run(run(a.port, a.rate, a.seconds, a.conns))))


if __name__ == "__main__":
    main()
