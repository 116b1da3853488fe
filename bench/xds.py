"""xDS benchmark (issue 13): `python -m bench.xds [--flips 20] [--clients 1000]`.

1. Failover through xDS: the gateway's `XdsServer` + `Pusher` serve one service whose priority
   0 is gRPC echo server "a" and priority 1 server "b" (both real grpcio servers, processes of
   their own); a real proxyless grpcio client calls every 50 ms (tests/helpers/grpc_xds_client).
   Each flip marks "a" unhealthy (or healthy again) the way a health check does (a new snapshot
   through the coalescing queue); measured: from the flip to the client's first call answered
   by the other server (median, max). This is the xDS path only: a gateway adds its health
   check's detection time (interval x threshold) before it.
2. Fan-out: 1,000 ADS streams from 4 processes (grpc.aio, subscribe to the four types and ACK
   every response); 5 changes of the endpoints; measured per change: time from the change to
   each stream's ACK of it (p50, p99, max), and the server process's CPU and RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import uvloop

from federation.model import Locality, ServiceKey
from gateway.core.balance import Target
from gateway.core.priorities import Priority
from gateway.xds.resources import XdsService, snapshot
from gateway.xds.server import Pusher, XdsServer

ME = Locality("us-east", "a", "east-1")
NAME = "grpc.default.svc.clusterset.local"
PORTS = {"a": 27701, "b": 27702}


def _snap(a_healthy: bool, extra: int = 0):
    a = Target("local:a", ME, "127.0.0.1", PORTS["a"], 1, a_healthy, False)
    b = Target("listener:b", ME, "127.0.0.1", PORTS["b"], 1 + extra, True, False)
    return snapshot([XdsService(ServiceKey("default", "grpc"),
                                (Priority(ME, (a,)), Priority(ME, (b,))))])


def _spawn(args: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    root = str(Path(__file__).resolve().parents[1])
    e = {**(env or os.environ), "PYTHONPATH": root}
    return subprocess.Popen([sys.executable, *args], stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, env=e)


def _stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _calls(log: Path) -> list[tuple[float, str]]:
    out = []
    for line in log.read_text().splitlines():
        t, _, rep = line.partition(" ")
        try:
            out.append((float(t), rep))
        except ValueError:
            pass
    return out


async def flips(tmp: Path, n: int) -> dict:
    servers = [_spawn(["-m", "tests.helpers.grpc_echo", k, str(p)], tmp / f"echo-{k}.log")
               for k, p in PORTS.items()]
    server = XdsServer(_snap(True))
    await server.start("127.0.0.1", 0)
    healthy = [True]
    pusher = Pusher(server, lambda: _snap(healthy[0]))
    push = asyncio.create_task(pusher.run())
    boot = {"xds_servers": [{"server_uri": f"127.0.0.1:{server.port}",
                             "channel_creds": [{"type": "insecure"}],
                             "server_features": ["xds_v3"]}], "node": {"id": "bench"}}
    log = tmp / "client.log"
    client = _spawn(["-m", "tests.helpers.grpc_xds_client", NAME], log,
                    {**os.environ, "GRPC_XDS_BOOTSTRAP_CONFIG": json.dumps(boot)})
    times: list[float] = []
    failed = 0
    try:
        deadline = time.monotonic() + 20
        while not (_calls(log)[-3:] and all(r == "a" for _, r in _calls(log)[-3:])):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the client never reached a: {log.read_text()[-500:]}")
            await asyncio.sleep(0.1)
        for i in range(n):
            healthy[0] = not healthy[0]
            want = "a" if healthy[0] else "b"
            t0 = time.monotonic()
            pusher.mark()
            while True:
                got = [(t, r) for t, r in _calls(log) if t >= t0]
                hit = next((t for t, r in got if r == want), None)
                if hit is not None:
                    times.append(hit - t0)
                    failed += sum(1 for _, r in got if r.startswith("ERR"))
                    break
                if time.monotonic() - t0 > 10:
                    raise RuntimeError(f"flip {i}: calls did not move to {want}")
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)
    finally:
        _stop(client)
        push.cancel()
        await server.close()
        for s in servers:
            _stop(s)
    return {"flips": n, "median_ms": statistics.median(times) * 1000,
            "max_ms": max(times) * 1000, "failed_calls": failed}


FAKE_CLIENT = r'''
import asyncio, sys
import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from gateway.xds.resources import TYPES
NAME = "grpc.default.svc.clusterset.local"

async def one(channel, i):
    stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
    q = asyncio.Queue()
    for t in TYPES:
        q.put_nowait(discovery_pb2.DiscoveryRequest(type_url=t, resource_names=[NAME],
                                                    node={"id": f"sim-{i}"}))
    async def reqs():
        while True:
            yield await q.get()
    async for resp in stub.StreamAggregatedResources(reqs()):
        q.put_nowait(discovery_pb2.DiscoveryRequest(
            type_url=resp.type_url, resource_names=[NAME], version_info=resp.version_info,
            response_nonce=resp.nonce))

async def main(port, n):
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(8)]
    await asyncio.gather(*(one(channels[i % 8], i) for i in range(n)))

asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
'''


async def fanout(tmp: Path, clients: int, procs: int = 4, changes: int = 5) -> dict:
    server = XdsServer(_snap(True))
    await server.start("127.0.0.1", 0)
    script = tmp / "fake_client.py"
    script.write_text(FAKE_CLIENT)
    kids = [_spawn([str(script), str(server.port), str(clients // procs)], tmp / f"sim{i}.log")
            for i in range(procs)]
    try:
        deadline = time.monotonic() + 60
        while server.stats.acks < clients * 4:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {server.stats.acks} ACKs of {clients * 4} at start")
            await asyncio.sleep(0.1)
        ru0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
        per_change: list[list[float]] = []
        for i in range(changes):
            server.stats.ack_seconds.clear()
            before = server.stats.acks
            server.update(_snap(True, extra=i + 1))
            deadline = time.monotonic() + 30
            while server.stats.acks < before + clients:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"change {i}: {server.stats.acks - before} ACKs")
                await asyncio.sleep(0.002)
            per_change.append(sorted(server.stats.ack_seconds))
            await asyncio.sleep(0.5)
        ru1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    finally:
        for k in kids:
            _stop(k)
        await server.close()
    allv = sorted(v for c in per_change for v in c)
    last = [c[-1] for c in per_change]
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    return {"clients": clients, "changes": changes,
            "p50_ms": allv[len(allv) // 2] * 1000, "p99_ms": allv[int(len(allv) * 0.99)] * 1000,
            "last_ack_median_ms": statistics.median(last) * 1000,
            "cpu_per_change_ms": cpu / changes * 1000, "wall_s": t1 - t0,
            "rss_mib": ru1.ru_maxrss / 1024}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flips", type=int, default=20)
    ap.add_argument("--clients", type=int, default=1000)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="isthmus-bench-xds-") as d:
        f = uvloop.run(flips(Path(d), a.flips))
        g = uvloop.run(fanout(Path(d), a.clients))
    print(f"xDS failover, {f['flips']} health flips: traffic moved after median "
          f"{f['median_ms']:.0f} ms, max {f['max_ms']:.0f} ms; {f['failed_calls']} failed calls")
    print(f"xDS fan-out, {g['clients']} ADS streams, {g['changes']} endpoint changes: change -> "
          f"ACK p50 {g['p50_ms']:.0f} ms, p99 {g['p99_ms']:.0f} ms, last ACK median "
          f"{g['last_ack_median_ms']:.0f} ms; server CPU {g['cpu_per_change_ms']:.0f} ms per "
          f"change, RSS {g['rss_mib']:.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
