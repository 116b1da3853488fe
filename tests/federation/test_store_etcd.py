"""The Store on a real etcd (federation/store/etcd.py), one member on 127.0.0.1 started by the
test; and a federation serving from it."""

from __future__ import annotations

import asyncio

import pytest

from federation.errors import CompactedError, FutureRevisionError, InputError
from federation.store.base import KV, open_store
from federation.store.etcd import parse_etcd_url
from tests.helpers.etcd import Etcd, require_etcd


@pytest.fixture
def etcd(tmp_path):
    require_etcd()
    e = Etcd(tmp_path)
    e.start()
    yield e
    e.stop()


@pytest.fixture
async def store(etcd):
    s = open_store(etcd.url)
    await s.open()
    yield s
    await s.close()


def test_urls():
    assert parse_etcd_url("etcd://a:1,[::1]:2") == [("a", 1), ("::1", 2)]
    for bad in ("etcd://", "etcd://a", "etcd://a:x", "etcd://a:0"):
        with pytest.raises(InputError, match="etcd"):
            parse_etcd_url(bad)


async def test_put_get_range_delete(store):
    r0 = await store.revision()
    r1 = await store.put("catalog/a", b"1")
    assert r1 == r0 + 1
    await store.put("catalog/b", b"2")
    await store.put("other/c", b"3")
    assert await store.get("catalog/a") == KV("catalog/a", b"1", r1, None)
    kvs, rev = await store.range("catalog/")
    assert [kv.key for kv in kvs] == ["catalog/a", "catalog/b"] and rev == r0 + 3
    assert (await store.delete("catalog/a")).value == b"1"
    assert await store.delete("catalog/a") is None
    assert await store.get("catalog/a") is None


async def test_events_history_then_long_poll(store):
    r0 = await store.revision()
    await store.put("catalog/a", b"1")
    await store.delete("catalog/a")
    evs = await store.events("catalog/", r0, 1.0)
    assert [(e.type, e.key, e.value) for e in evs] == [("put", "catalog/a", b"1"),
                                                       ("delete", "catalog/a", None)]
    last = evs[-1].revision

    async def later():
        await asyncio.sleep(0.2)
        await store.put("catalog/b", b"2")

    task = asyncio.create_task(later())
    got = await store.events("catalog/", last, 5.0)
    await task
    assert [(e.key, e.value) for e in got] == [("catalog/b", b"2")]
    assert await store.events("catalog/", got[-1].revision, 0.2) == []
    with pytest.raises(FutureRevisionError):
        await store.events("catalog/", got[-1].revision + 100, 0.1)


async def test_compaction_is_a_compacted_error(store):
    r0 = await store.revision()
    for i in range(5):
        await store.put("catalog/k", str(i).encode())
    await store.client.compact(await store.revision())
    with pytest.raises(CompactedError):
        await store.events("catalog/", r0, 0.5)


async def test_leases_expire_by_themselves_and_revoke(store):
    lease = await store.grant_lease(1.0)
    await store.put("live/a", b"", lease=lease)
    assert (await store.get("live/a")).lease == lease
    assert await store.keepalive(lease)
    await asyncio.sleep(3.0)  # etcd's own expiry (1 s ttl, checked every 500 ms)
    assert await store.get("live/a") is None
    assert not await store.keepalive(lease)
    other = await store.grant_lease(30.0)
    await store.put("live/b", b"", lease=other)
    await store.revoke(other)
    assert await store.get("live/b") is None


async def test_a_delete_has_one_winner(store):
    await store.put("tokens/t", b"secret")
    got = await asyncio.gather(*(store.delete("tokens/t") for _ in range(8)))
    assert sum(kv is not None for kv in got) == 1


async def test_unreachable_etcd_is_a_store_error(tmp_path):
    from federation.errors import StoreError
    from tests.helpers.processes import free_port

    s = open_store(f"etcd://127.0.0.1:{free_port()}")
    with pytest.raises(StoreError, match="no etcd endpoint answered"):
        await s.open()


async def test_a_federation_serves_from_etcd(etcd, make_fed):
    """Join, lease, export and watch with the federation on etcd; the lease's expiry (etcd's)
    withdraws the cluster; a second federation process on the same etcd sees it all."""
    from tests.helpers.federation import make_cluster

    fed = await make_fed(store_url=etcd.url, lease_ttl=1.0)
    east = make_cluster("east-1")
    c = await fed.join(east)
    lease, _ = await c.grant_lease("east-1")
    await c.put_export(east.export("web"))
    cat = await c.catalog()
    assert "east-1" in cat.live and any(e.name == "web" for e in cat.exports.values())
    rev, events = await c.watch(cat.revision, 0.2)
    assert events == []
    other = await make_fed(store_url=etcd.url, lease_ttl=1.0)  # a second replica
    seen = await other.client(east.svid).catalog()
    assert "east-1" in seen.clusters and seen.revision >= cat.revision
    await asyncio.sleep(3.0)  # no keepalive: etcd expires the lease
    cat = await c.catalog()
    assert "east-1" not in cat.live


async def test_a_client_moves_to_another_replica_and_resumes_its_watch(etcd, make_fed):
    """Two federation replicas on one etcd (same CA). A gateway's client names both; replica A
    stops: the next call fails and moves the client to B; the retry is served by B, the lease
    is kept alive there, and the watch resumes at its revision with every change in order,
    none twice."""
    from federation.client import FederationClient
    from federation.errors import FederationError
    from tests.helpers.federation import make_cluster

    a = await make_fed(store_url=etcd.url, lease_ttl=3.0)
    b = await make_fed(store_url=etcd.url, lease_ttl=3.0)
    east, west = make_cluster("east-1"), make_cluster("west-1")
    await a.join(east)
    cw = await b.join(west)
    await cw.grant_lease("west-1")
    both = FederationClient([a.url, b.url], a.bundle(), east.svid, timeout=3.0)
    try:
        lease, _ = await both.grant_lease("east-1")
        rev = (await both.catalog()).revision
        await cw.put_export(west.export("web", 8080))
        _, first = await both.watch(rev, 2.0)
        assert [e.key for e in first] == ["catalog/exports/west-1/default/web"]
        rev = first[-1].revision
        await a.stop()  # replica A goes away
        await cw.put_export(west.export("web", 8081))
        await cw.put_export(west.export("api", 9090))
        with pytest.raises(FederationError):
            await both.keepalive("east-1", lease)  # A does not answer: the client moves
        assert both.url == b.url and both.moves == 1
        assert await both.keepalive("east-1", lease)  # B keeps the same lease alive
        seen = []
        while len(seen) < 2:
            rev2, evs = await both.watch(rev, 2.0)
            seen += evs
            rev = rev2
        assert [e.key for e in seen] == ["catalog/exports/west-1/default/web",
                                         "catalog/exports/west-1/default/api"]
        assert len({e.revision for e in seen}) == 2 and seen[0].revision < seen[1].revision
    finally:
        await both.close()


async def test_a_token_joins_once_even_at_two_replicas_at_once(etcd, make_fed):
    from federation.errors import FederationError
    from tests.helpers.federation import make_cluster

    a = await make_fed(store_url=etcd.url)
    b = await make_fed(store_url=etcd.url)
    east = make_cluster("east-1")
    token = await a.token("east-1")
    got = await asyncio.gather(
        a.client().join(token, east.record, east.bundle(1)),
        b.client().join(token, east.record, east.bundle(1)), return_exceptions=True)
    ok = [g for g in got if not isinstance(g, BaseException)]
    refused = [g for g in got if isinstance(g, FederationError)]
    assert len(ok) == 1 and len(refused) == 1, got
    assert refused[0].status in (401, 403, 409), refused[0]


async def test_status_lists_the_store_members_and_replicas(etcd, make_fed):
    import aiohttp

    from isthmus.status import render_status
    from tests.helpers.traffic import wait_for

    a = await make_fed(store_url=etcd.url)
    await make_fed(store_url=etcd.url)

    async def both() -> dict | None:
        async with aiohttp.ClientSession() as s, s.get(a.admin_url + "/status") as r:
            data = await r.json()
        return data if len(data["store"].get("replicas", [])) == 2 else None

    await wait_for(both, 10.0, what="two replicas in /status")
    data = await both()
    st = data["store"]
    assert st["kind"] == "etcd" and [m["leader"] for m in st["members"]] == [True]
    import io

    out = io.StringIO()
    render_status(data, out)
    assert "store: etcd" in out.getvalue() and "federation replicas: 127.0.0.1:" in out.getvalue()


async def test_a_range_is_read_in_pages_at_one_revision(store, monkeypatch):
    """Pages of RANGE_PAGE keys (3 here), every page at the first page's revision; a page too
    large for gRPC's 4 MiB answer limit (six 1 MiB values) is asked again smaller."""
    import federation.store.etcd as etcd_store

    monkeypatch.setattr(etcd_store, "RANGE_PAGE", 3)
    for i in range(10):
        await store.put(f"catalog/k{i:02d}", str(i).encode())
    await store.put("catalog0", b"outside the prefix")
    kvs, rev = await store.range("catalog/")
    assert [kv.key for kv in kvs] == [f"catalog/k{i:02d}" for i in range(10)]
    assert rev == await store.revision()
    monkeypatch.setattr(etcd_store, "RANGE_PAGE", 2000)
    big = b"x" * (1 << 20)
    for i in range(6):
        await store.put(f"big/{i}", big)
    kvs, _ = await store.range("big/")
    assert len(kvs) == 6 and all(kv.value == big for kv in kvs)

