"""One writer process of `bench.churn`: `python -m bench.churn_writer SPEC.json`.

SPEC names the federation URLs, its CA, the clusters this process writes for (name, SVID
files), services per cluster, endpoints per export, the churn phases ([[writes per second,
seconds], ...]) and the files to write. Theory of operation:

1. every cluster (its own `FederationClient`, mutual TLS with its SVID) takes a lease;
2. load: each cluster puts SERVICES exports of ENDPOINTS endpoints, at most LOAD_CONCURRENCY
   writes in flight, a refused one tried again (LOAD_TRIES in all, counted); then it writes
   `loaded` (seconds it took) and waits for the `go` file, which holds the wall-clock start
   of the first phase (every writer starts together);
3. churn: per phase an open-loop schedule of `rate` writes per second, each one export of a
   random cluster with one endpoint's port moved (endpoint churn); at most MAX_INFLIGHT writes
   in flight: a write that comes due while all are busy is skipped and counted (the schedule
   never waits, so it shows when the write path saturates);
4. out: every acknowledged write as [revision, wall-clock ack time, phase], and per phase the
   writes refused and skipped.
Leases are renewed every third of their ttl from their grant on (the load outlasts a ttl).
Everything is bounded by the phases.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from pathlib import Path

import uvloop

from federation.client import FederationClient, load_federation_bundle
from federation.errors import FederationError
from federation.identity import Svid
from federation.model import Endpoint, Export

LOAD_CONCURRENCY = 16
LOAD_TRIES = 5
MAX_INFLIGHT = 64


def export(cluster: str, service: int, endpoints: int, moved: int = 0) -> Export:
    eps = tuple(Endpoint("127.0.0.1", 20000 + service * 100 + i + (moved if i == 0 else 0),
                         True, 1) for i in range(endpoints))
    return Export(cluster, "default", f"svc-{service}", 8080, "tcp", eps)


async def main(spec_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    bundle = load_federation_bundle(Path(spec["ca"]))
    clients = {c["name"]: FederationClient(spec["urls"], bundle, Svid.from_pem(
        Path(c["cert"]).read_bytes(), Path(c["key"]).read_bytes()), timeout=30.0)
        for c in spec["clusters"]}
    services, endpoints = spec["services"], spec["endpoints"]
    gate = asyncio.Semaphore(LOAD_CONCURRENCY)
    leases: dict[str, int] = {}

    retries = 0

    async def regrant(name: str) -> None:
        leases[name], _ = await clients[name].grant_lease(name)

    async def retried(name: str, call) -> object:
        """A load call, tried up to LOAD_TRIES times, counted; after a 409 (no live lease: the
        federation dropped it when a store write failed) with a new lease first, as a gateway
        does."""
        nonlocal retries
        for attempt in range(LOAD_TRIES):
            try:
                async with gate:
                    return await call()
            except FederationError as e:
                if attempt == LOAD_TRIES - 1:
                    raise
                retries += 1
                await asyncio.sleep(0.5)
                if e.status == 409:
                    await retried(name, lambda: regrant(name))
        return None

    async def lease(name: str) -> None:
        await retried(name, lambda: regrant(name))

    async def load(name: str, svc: int) -> None:
        await retried(name, lambda: clients[name].put_export(export(name, svc, endpoints)))

    t = time.monotonic()
    await asyncio.gather(*(lease(n) for n in clients))

    async def renew() -> None:
        while True:
            await asyncio.sleep(spec["lease_ttl"] / 3)
            for n, lid in leases.items():
                try:
                    await clients[n].keepalive(n, lid)
                except FederationError:
                    pass

    renewer = asyncio.create_task(renew())  # from the grant on: the load outlasts a ttl
    await asyncio.gather(*(load(n, s) for n in clients for s in range(services)))
    Path(spec["loaded"]).write_text(json.dumps({"seconds": time.monotonic() - t,
                                                "puts": len(clients) * services,
                                                "retries": retries}))

    go = Path(spec["go"])
    while not go.exists():
        await asyncio.sleep(0.05)
    start = float(go.read_text())
    acks: list[list] = []
    refused = [0] * len(spec["phases"])
    skipped = [0] * len(spec["phases"])
    why: list[list[str]] = [[] for _ in spec["phases"]]  # the first refusals' messages
    inflight: set[asyncio.Task] = set()
    names = list(clients)
    rng = random.Random(spec["seed"])

    async def write(phase: int, name: str, svc: int) -> None:
        try:
            rev = await clients[name].put_export(export(name, svc, endpoints,
                                                        rng.randint(1, 50)))
            acks.append([rev, time.time(), phase])
        except FederationError as e:
            refused[phase] += 1
            if len(why[phase]) < 3:
                why[phase].append(str(e)[:200])
            if e.status == 409:  # no live lease: take a new one, as a gateway does
                try:
                    await regrant(name)
                except FederationError:
                    pass

    at = start
    for phase, (rate, seconds) in enumerate(spec["phases"]):
        end, step = at + seconds, 1.0 / rate
        while at < end:
            delay = at - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(inflight) >= MAX_INFLIGHT:
                skipped[phase] += 1
            else:
                task = asyncio.create_task(write(phase, rng.choice(names),
                                                 rng.randrange(services)))
                inflight.add(task)
                task.add_done_callback(inflight.discard)
            at += step
        at = end
    if inflight:
        await asyncio.wait(inflight, timeout=30.0)
    renewer.cancel()
    Path(spec["out"]).write_text(json.dumps({"acks": acks, "refused": refused,
                                             "skipped": skipped, "why": why}))
    for c in clients.values():
        await c.close()


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1]))
