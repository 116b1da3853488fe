"""Memory: gateway RSS with many idle connections; federation RSS holding a large catalog.

Gateway: the demo topology (isthmus.demo.start_topology, backends = the suite's nginx on
east-2's endpoint ports). This process opens N idle connections to east-2's import listener
(each relayed to nginx, so the gateway holds 2 sockets per connection) in batches, and reads
the gateway's VmRSS at 0, N/2 and N connections after a short settle. N is 10,000 unless the
gateway's RLIMIT_NOFILE cannot hold 2 sockets per connection (this container's hard limit is
20,000 and cannot be raised without CAP_SYS_RESOURCE); then N is the most that fits and the RSS
at 10k is extrapolated linearly from the slope between N/2 and N (reported as such).

Federation: its own `isthmus federation serve` process; this process joins as cluster `bulk`
with a join token (the real /v1/join), grants a lease, and publishes S services × 10 endpoints
through the HTTP API (`PUT /v1/clusters/bulk/exports/...`, 32 in flight, mutual TLS with the
cluster's SVID), keeping the lease alive. Reports VmRSS before, after publishing, and after
one full catalog read (`GET /v1/catalog`), plus the peak (VmHWM) and the publish rate.
"""

from __future__ import annotations

import asyncio
import resource
import time
from pathlib import Path
from typing import Any

import isthmus.demo as demo
from bench.infra import fd_count, rss_mib
from isthmus.demo import Processes, http_json, ports, wait_until

OFFSET = 8800  # ports 23901..27102 (tests use 15xxx-22999; keep below 32768)
FED_PORT, FED_ADMIN = 27743, 27780


class Idle(asyncio.Protocol):
    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


async def open_idle(port: int, n: int, held: list) -> None:
    loop = asyncio.get_running_loop()
    # the import listener's accept backlog is asyncio's default (100): bigger bursts stall in
    # SYN retries
    batch = 50
    for i in range(0, n, batch):
        got = await asyncio.gather(*(loop.create_connection(Idle, "127.0.0.1", port)
                                     for _ in range(min(batch, n - i))), return_exceptions=True)
        for g in got:
            if isinstance(g, BaseException):
                raise RuntimeError(f"opening idle connections: {g}")
            held.append(g[0])


async def gateway_idle(state: Path, target: int, log: Any) -> dict:
    (state / "logs").mkdir(parents=True, exist_ok=True)
    procs = Processes(state / "logs")
    e2 = ports(OFFSET, 1)
    held: list = []
    try:
        await demo.start_topology(state, OFFSET, procs, None)
        gw = dict(procs.procs)["east-2"].pid
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        base_fds = fd_count(gw)
        n = min(target, (soft - base_fds - 64) // 2)
        await asyncio.sleep(1.0)
        points = [(0, rss_mib(gw))]
        for goal in (n // 2, n):
            await open_idle(e2["import"], goal - len(held), held)

            async def relayed(goal: int = goal) -> bool:
                return fd_count(gw) >= base_fds + 2 * goal

            await wait_until(f"{goal} relayed connections", relayed, procs, 30)
            await asyncio.sleep(2.0)
            alive = sum(1 for t in held if not t.is_closing())
            if alive != goal:
                raise RuntimeError(f"only {alive} of {goal} idle connections stayed open")
            points.append((goal, rss_mib(gw)))
            log(f"memory: {goal} idle connections -> gateway RSS {points[-1][1]:.1f} MiB")
        (n1, r1), (n2, r2) = points[1], points[2]
        slope = (r2 - r1) / (n2 - n1)  # MiB per connection
        at10k = r2 + (target - n2) * slope
        return {"n": n, "target": target, "rss": points, "kib_per_conn": slope * 1024,
                "rss_at_target": at10k, "extrapolated": n < target, "nofile": soft}
    finally:
        for t in held:
            t.abort()
        procs.stop()


async def federation_catalog(state: Path, services: int, log: Any) -> dict:
    from federation.ca import CertificateAuthority
    from federation.client import FederationClient, load_federation_bundle
    from federation.identity import gateway_id
    from federation.model import ClusterRecord, Endpoint, Export
    from federation.server.app import create_token
    from federation.store.sqlite import SqliteStore

    fed_dir = state / "federation"
    (state / "logs").mkdir(parents=True, exist_ok=True)
    procs = Processes(state / "logs")
    try:
        fed = procs.start("federation", "federation", "serve", "--state-dir", str(fed_dir),
                          "--listen", f"127.0.0.1:{FED_PORT}", "--admin", f"127.0.0.1:{FED_ADMIN}",
                          "--lease-ttl", "6s")
        await wait_until("the federation", lambda: http_json(FED_ADMIN, "/readyz"), procs)
        store = SqliteStore(str(fed_dir / "federation.db"))
        await store.open()
        try:
            token, _ = await create_token(store, "bulk", 600, time.time())
        finally:
            await store.close()
        td = "bulk.isthmus.local"
        now = time.time()
        ca = CertificateAuthority.create(td, now)
        svid = ca.issue(gateway_id(td), now, 3600)
        client = FederationClient(
            f"https://127.0.0.1:{FED_PORT}", load_federation_bundle(fed_dir / "ca.pem")
        )
        try:
            await client.join(
                token, ClusterRecord("bulk", "us-east", "a", td, "127.0.0.1:1"), ca.bundle(1)
            )
            client.set_svid(svid)
            lease, ttl = await client.grant_lease("bulk")
            rss_before = rss_mib(fed.pid)

            async def keepalive() -> None:
                while True:
                    await asyncio.sleep(ttl / 3)
                    if not await client.keepalive("bulk", lease):
                        raise RuntimeError(
                            "federation lease of cluster bulk expired during the benchmark"
                        )

            ka = asyncio.create_task(keepalive())
            sem = asyncio.Semaphore(32)

            async def put(i: int) -> None:
                eps = tuple(
                    Endpoint(f"10.{i // 250 % 250}.{i % 250}.{j + 1}", 8080) for j in range(10)
                )
                async with sem:
                    await client.put_export(Export("bulk", "default", f"svc-{i}", 8080, "tcp", eps))

            t0 = time.perf_counter()
            try:
                for i in range(0, services, 1000):
                    await asyncio.gather(*(put(k) for k in range(i, min(services, i + 1000))))
                publish_s = time.perf_counter() - t0
                await asyncio.sleep(1.0)
                rss_published = rss_mib(fed.pid)
                t1 = time.perf_counter()
                cat = await client.catalog()
                catalog_s = time.perf_counter() - t1
                if len(cat.exports) < services:
                    raise RuntimeError(
                        f"catalog holds {len(cat.exports)} exports, expected {services}"
                    )
                await asyncio.sleep(1.0)
                rss_after_read = rss_mib(fed.pid)
                hwm = rss_mib(fed.pid, "VmHWM")
            finally:
                ka.cancel()
        finally:
            await client.close()
        db = sum(p.stat().st_size for p in fed_dir.glob("federation.db*"))
        log(
            f"memory: federation with {services} services x 10 endpoints: "
            f"RSS {rss_published:.1f} MiB "
            f"(after a catalog read {rss_after_read:.1f}, peak {hwm:.1f})"
        )
        return {"services": services, "rss_before": rss_before, "rss_published": rss_published,
                "rss_after_read": rss_after_read, "hwm": hwm, "publish_per_s": services / publish_s,
                "catalog_read_s": catalog_s, "db_mib": db / 2**20}
    finally:
        procs.stop()


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard
