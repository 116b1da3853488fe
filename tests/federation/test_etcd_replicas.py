"""Two federation replicas (real `isthmus federation serve` processes) on one 3-member etcd,
while things fail under a stream of export changes from three clusters:

1. replica A is killed (SIGKILL, by its PID): writers and watchers that named A first move to
   B (their clients name both replicas) and go on from the revision they had;
2. then the etcd leader is killed (and brought back): writes are refused for an election,
   then go on.

Every watcher (the gateways' own `FederationClient.watch`, half of them starting on A, half on
B) must see every acknowledged change exactly once and in revision order, and all of them the
same history (no gap: a change written but not acknowledged is seen by all or none); a lease
renewed all along is still alive after the leader change, and one granted before it and never
renewed ends by itself (etcd expires it; the catalog drops that cluster). A second test: the same
join token sent to both replica processes at the same moment joins exactly once.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from federation.client import FederationClient, load_federation_bundle
from federation.errors import FederationError
from federation.model import EXPORTS
from federation.server.tokens import create_token
from federation.store.base import open_store
from tests.helpers.etcd import Etcd, EtcdCluster, FedReplica, require_etcd
from tests.helpers.federation import Cluster, make_cluster

pytestmark = pytest.mark.integration

WRITERS = ("east-1", "east-2", "west-1")
WATCHERS = 6
STREAM = 14.0  # seconds of export changes


@pytest.fixture
def etcd3(tmp_path):
    require_etcd()
    c = EtcdCluster(tmp_path / "etcd")
    c.start()
    yield c
    c.stop()


@pytest.fixture
def replicas(tmp_path, request):
    started: list[FedReplica] = []

    def make(store_url: str, n: int = 2) -> list[FedReplica]:
        first = FedReplica(tmp_path, "fed-a", store_url)
        first.start()
        started.append(first)
        for i in range(1, n):
            r = FedReplica(tmp_path, f"fed-{chr(97 + i)}", store_url, ca_from=first.state)
            r.start()
            started.append(r)
        return started

    yield make
    for r in started:
        r.stop()


async def _token(store_url: str, cluster: str) -> str:
    store = open_store(store_url)
    await store.open()
    try:
        token, _ = await create_token(store, cluster, 60.0, time.time())
    finally:
        await store.close()
    return token


async def _join(urls: list[str], bundle, store_url: str, c: Cluster) -> FederationClient:
    async with FederationClient(urls[0], bundle, timeout=5.0) as anon:
        await anon.join(await _token(store_url, c.name), c.record, c.bundle(1))
    return FederationClient(urls, bundle, c.svid, timeout=3.0)


async def test_replica_and_leader_killed_every_watcher_sees_every_change_once(etcd3, replicas):
    a, b = replicas(etcd3.url)
    bundle = load_federation_bundle(a.state / "ca.pem")
    clusters = {n: make_cluster(n) for n in (*WRITERS, "south-1")}
    writers = {n: await _join([a.url, b.url] if i % 2 == 0 else [b.url, a.url], bundle,
                              etcd3.url, c) for i, (n, c) in enumerate(clusters.items())}
    leases = {n: (await w.grant_lease(n))[0] for n, w in writers.items()}
    # south-1 holds a lease granted now and never renewed: it must end by itself.
    start = (await writers["east-1"].catalog()).revision
    watchers = [FederationClient([a.url, b.url] if i % 2 == 0 else [b.url, a.url], bundle,
                                 clusters[WRITERS[i % 3]].svid, timeout=3.0)
                for i in range(WATCHERS)]
    acked: dict[str, list[int]] = {n: [] for n in WRITERS}
    refused = 0
    seen: list[list[tuple[int, str, str]]] = [[] for _ in watchers]
    writing = asyncio.Event()
    writing.set()

    async def write(name: str) -> None:
        nonlocal refused
        c, w, i = clusters[name], writers[name], 0
        end = time.monotonic() + STREAM
        while time.monotonic() < end:
            i += 1
            try:
                acked[name].append(await w.put_export(c.export("web", 10000 + i)))
            except FederationError:
                refused += 1  # not acknowledged: may or may not have been written
            await asyncio.sleep(0.05)

    async def renew(name: str) -> None:
        while writing.is_set():
            try:
                assert await writers[name].keepalive(name, leases[name]), f"{name}'s lease ended"
            except FederationError:
                pass  # a replica or etcd away: the next renewal goes on
            await asyncio.sleep(1.0)

    async def watch(i: int) -> None:
        after = start
        while True:
            try:
                after, events = await watchers[i].watch(after, 2.0)
            except FederationError:
                await asyncio.sleep(0.1)
                continue
            seen[i] += [(e.revision, e.type, e.key) for e in events]
            last = max((r[-1] for r in acked.values() if r), default=0)
            if not writing.is_set() and after >= last:
                return

    tasks = [asyncio.create_task(write(n)) for n in WRITERS]
    renewals = [asyncio.create_task(renew(n)) for n in WRITERS]
    watches = [asyncio.create_task(watch(i)) for i in range(WATCHERS)]
    try:
        await asyncio.sleep(3.0)
        a.proc.kill()  # SIGKILL replica A by its PID
        await asyncio.sleep(3.0)
        leader = etcd3.leader()
        leader.proc.kill()
        await asyncio.sleep(3.0)
        leader.proc.start()
        leader.start_wait()
        await asyncio.gather(*tasks)
        writing.clear()
        await asyncio.wait_for(asyncio.gather(*watches), 60.0)
        await asyncio.gather(*renewals)
        for n in WRITERS:  # renewed all along, across the leader change: alive
            assert await writers[n].keepalive(n, leases[n]), f"{n}'s lease"
        # south-1's lease was never renewed: etcd ends it (its live key is deleted)
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:
            cat = await writers["east-1"].catalog()
            if "south-1" not in cat.live:
                break
            await asyncio.sleep(0.5)
        assert "south-1" not in cat.live, "a lease never renewed outlived its ttl"
        assert all(n in cat.live for n in WRITERS)
    finally:
        for t in [*tasks, *renewals, *watches]:
            t.cancel()
        for c in [*writers.values(), *watchers]:
            await c.close()
    every = sorted(r for rs in acked.values() for r in rs)
    moved = [w.moves for w in watchers]
    for i, s in enumerate(seen):
        revs = [r for r, _, _ in s]
        assert revs == sorted(set(revs)), f"watcher {i}: out of order or twice"
        exports = {r for r, t, k in s if k.startswith(EXPORTS) and t == "put"}
        missing = sorted(set(every) - exports)
        assert not missing, f"watcher {i} never saw acknowledged revisions {missing[:10]}"
    upto = min(s[-1][0] for s in seen)  # up to there, every watcher saw the same history
    assert len({tuple(e for e in s if e[0] <= upto) for s in seen}) == 1, "a gap somewhere"
    assert all(m >= 1 for m in moved[::2]), f"watchers that started on A moved: {moved}"
    print(f"\n{len(every)} changes acknowledged from {len(WRITERS)} clusters ({refused} "
          f"refused while a replica or the etcd leader was away); {WATCHERS} watchers each saw "
          f"all of them once, in order; watcher moves {moved}")


async def test_one_token_at_two_replica_processes_at_once_joins_once(tmp_path, replicas):
    require_etcd()
    etcd = Etcd(tmp_path / "etcd1")
    etcd.start()
    try:
        a, b = replicas(etcd.url)
        bundle = load_federation_bundle(a.state / "ca.pem")
        for round_ in range(5):
            c = make_cluster(f"race-{round_}")
            token = await _token(etcd.url, c.name)
            async with (FederationClient(a.url, bundle, timeout=5.0) as ca,
                        FederationClient(b.url, bundle, timeout=5.0) as cb):
                got = await asyncio.gather(ca.join(token, c.record, c.bundle(1)),
                                           cb.join(token, c.record, c.bundle(1)),
                                           return_exceptions=True)
            ok = [g for g in got if not isinstance(g, BaseException)]
            refused = [g for g in got if isinstance(g, FederationError)]
            assert len(ok) == 1 and len(refused) == 1, got
            assert refused[0].status in (401, 403, 409), refused[0]
    finally:
        etcd.stop()


async def test_joins_at_one_replica_are_trusted_at_the_other_with_few_trust_rebuilds(
        tmp_path, make_fed):
    """30 clusters join at replica A at once: A adds each new trust domain to its TLS context
    in place (no rebuild per join), B follows and rebuilds its trust at most once a second,
    and every cluster is served by B within seconds; a cluster removed at A is then refused
    by B."""
    from tests.helpers.traffic import wait_for

    require_etcd()
    etcd = Etcd(tmp_path / "etcd1")
    etcd.start()
    try:
        a = await make_fed(store_url=etcd.url)
        b = await make_fed(store_url=etcd.url)
        rebuilds = {"a": 0, "b": 0}
        for name, fed in (("a", a), ("b", b)):
            creds = fed.server.credentials

            def counted(rebuild=creds.reload_trust, name=name) -> None:
                rebuilds[name] += 1
                rebuild()

            creds.reload_trust = counted
        clusters = [make_cluster(f"c{i}") for i in range(30)]
        await asyncio.gather(*(a.join(c) for c in clusters))
        at_b = [b.client(c.svid) for c in clusters]

        async def all_served() -> bool:
            for c in at_b:
                try:
                    await c.catalog()
                except FederationError:
                    return False
            return True

        took = await wait_for(all_served, 10.0, interval=0.2, what="every cluster served by B")
        # not one rebuild per join: A adds first joins in place (it may still rebuild when it
        # reads its own write before its handler installed it), B at most once a second
        assert rebuilds["a"] <= 2 + took and 1 <= rebuilds["b"] <= 2 + took, (rebuilds, took)
        await a.operator().remove_cluster("c0")

        async def refused() -> bool:
            try:
                await at_b[0].catalog()
            except FederationError:
                return await at_b[0].refuses_our_certificate()
            return False

        await wait_for(refused, 10.0, interval=0.2, what="B refusing a removed cluster")
    finally:
        etcd.stop()


async def test_leases_granted_at_once_are_all_live_for_their_next_write(tmp_path, make_fed):
    """60 clusters take a lease at the same time and write an export right after: while the
    replica follows its own writes in the store, no lease it just installed is lost."""
    require_etcd()
    etcd = Etcd(tmp_path / "etcd1")
    etcd.start()
    try:
        fed = await make_fed(store_url=etcd.url)
        clusters = [make_cluster(f"l{i}") for i in range(60)]
        clients = await asyncio.gather(*(fed.join(c) for c in clusters))

        async def lease_then_write(c: Cluster, client: FederationClient) -> int:
            await client.grant_lease(c.name)
            return await client.put_export(c.export("web"))

        got = await asyncio.gather(*(lease_then_write(c, cl)
                                     for c, cl in zip(clusters, clients, strict=True)),
                                   return_exceptions=True)
        failed = [g for g in got if isinstance(g, BaseException)]
        assert not failed, failed[:3]
    finally:
        etcd.stop()
