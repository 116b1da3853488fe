"""Added latency of a gateway hop, against a direct connection, measured side by side.

    python -m bench.hop_latency [--rounds 3] [--requests 3000]

Starts the demo topology (federation + east-1, east-2, west-1 gateways) on loopback with echo
backends only in east-2 and west-1, then, on one connection each, times serial 64-byte round
trips on three paths, interleaved round by round:
  direct        client -> east-2 endpoint
  local hop     client -> east-2 gateway import listener -> east-2 endpoint
  cross-cluster client -> east-1 gateway -> mTLS -> east-2 gateway -> east-2 endpoint
(east-1 has no live endpoint, so its import fails over to east-2, same region).
Prints p50/p99 per path (median over rounds) and the added latency per path vs direct.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from isthmus.demo import Processes, ports, start_topology

OFFSET = 900


def round_trips(port: int, n: int, size: int = 64) -> list[float]:
    payload = b"x" * size
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    out = []
    try:
        for _ in range(50):  # warm up
            s.sendall(payload)
            got = 0
            while got < size:
                got += len(s.recv(65536))
        for _ in range(n):
            t0 = time.perf_counter_ns()
            s.sendall(payload)
            got = 0
            while got < size:
                chunk = s.recv(65536)
                if not chunk:
                    raise RuntimeError(f"port {port}: connection closed")
                got += len(chunk)
            out.append((time.perf_counter_ns() - t0) / 1000)  # µs
    finally:
        s.close()
    return out


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=3000)
    args = ap.parse_args()
    state = Path(tempfile.mkdtemp(prefix="isthmus-bench-"))
    (state / "logs").mkdir()
    procs = Processes(state / "logs")
    e2, w1, e1 = ports(OFFSET, 1), ports(OFFSET, 2), ports(OFFSET, 0)
    echo = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.echo_server",
            str(e2["ep1"]),
            str(e2["ep2"]),
            str(w1["ep1"]),
            str(w1["ep2"]),
        ]
    )
    try:
        asyncio.run(start_topology(state, OFFSET, procs, None))
        time.sleep(1.0)  # let east-1's own (absent) endpoints be marked down
        paths = {
            "direct": e2["ep1"],
            "local hop": e2["import"],
            "cross-cluster (mTLS)": e1["import"],
        }
        results: dict[str, list[tuple[float, float]]] = {k: [] for k in paths}
        for _ in range(args.rounds):
            for name, port in paths.items():
                rtts = round_trips(port, args.requests)
                results[name].append((pct(rtts, 0.5), pct(rtts, 0.99)))
        base50 = statistics.median(r[0] for r in results["direct"])
        print(f"\nserial 64-byte round trips on one connection, {args.requests} per round, "
              f"median of {args.rounds} rounds (µs)\n")
        print("| path | p50 µs | p99 µs | added p50 vs direct |")
        print("|---|---|---|---|")
        for name, rs in results.items():
            p50 = statistics.median(r[0] for r in rs)
            p99 = statistics.median(r[1] for r in rs)
            added = (
                "-"
                if name == "direct"
                else f"+{p50 - base50:.0f} µs ({(p50 - base50) / 1000:.3f} ms)"
            )
            print(f"| {name} | {p50:.0f} | {p99:.0f} | {added} |")
        return 0
    finally:
        procs.stop()
        echo.terminate()
        echo.wait()


if __name__ == "__main__":
    raise SystemExit(main())
