"""The federation API over real TLS 1.3 on 127.0.0.1: leases, exports, the watch."""

from __future__ import annotations

import asyncio
import time

import pytest

from federation.errors import CompactedError, FederationError, FutureRevisionError
from federation.model import Catalog, Endpoint, Export
from tests.helpers.federation import Fed, make_cluster, raw_session

# ---- leases and exports ------------------------------------------------------------------------


async def test_export_needs_live_lease_and_path_must_match(fed: Fed) -> None:
    east = make_cluster("east-1")
    c = await fed.join(east)
    with pytest.raises(FederationError) as e:
        await c.put_export(east.export())
    assert e.value.status == 409 and "no live lease" in str(e.value)
    await c.grant_lease("east-1")
    async with raw_session(fed, east.svid) as s:
        async with s.put(
            f"{fed.url}/v1/clusters/east-1/exports/default/other", json=east.export().to_json()
        ) as r:
            assert r.status == 400
            assert "path" in (await r.json())["error"]


async def test_identical_export_write_is_skipped(fed: Fed) -> None:
    east = make_cluster("east-1")
    c = await fed.join(east)
    await c.grant_lease("east-1")
    r1 = await c.put_export(east.export())
    r2 = await c.put_export(east.export())
    assert r1 == r2
    r3 = await c.put_export(east.export(healthy=False))
    assert r3 > r2


async def test_an_http_export_is_published_as_http(fed: Fed) -> None:
    east = make_cluster("east-1")
    c = await fed.join(east)
    await c.grant_lease("east-1")
    web = Export("east-1", "default", "web", 8080, "http", (Endpoint("127.0.0.1", 8080),))
    await c.put_export(web)
    cat = await c.catalog()
    assert cat.exports_of(web.service) == [web]


async def test_keepalive_unknown_lease_is_false(fed: Fed) -> None:
    east = make_cluster("east-1")
    c = await fed.join(east)
    assert not await c.keepalive("east-1", 999)


async def test_lease_expiry_withdraws_live_and_exports(fed: Fed) -> None:
    east = make_cluster("east-1")
    c = await fed.join(east)
    watcher = fed.client(east.svid)
    lease, ttl = await c.grant_lease("east-1")
    granted = time.monotonic()
    rev = await c.put_export(east.export())
    deleted: set[str] = set()
    after = rev
    while len(deleted) < 2 and time.monotonic() - granted < ttl + 3:
        after, events = await watcher.watch(after, 3.0)
        deleted |= {e.key for e in events if e.type == "delete"}
    elapsed = time.monotonic() - granted
    print(f"lease ttl {ttl}s: withdrawn after {elapsed:.3f}s")
    assert deleted == {"catalog/live/east-1", "catalog/exports/east-1/default/web"}
    assert elapsed < ttl + 0.5
    assert not await c.keepalive("east-1", lease)
    cat = await c.catalog()
    assert cat.live == frozenset() and not cat.exports
    with pytest.raises(FederationError) as e:
        await c.put_export(east.export())
    assert e.value.status == 409
    await c.grant_lease("east-1")
    await c.put_export(east.export())


# ---- watch ---------------------------------------------------------------------------------


async def test_watch_resume_delivers_every_event_once_in_order(fed: Fed) -> None:
    east = make_cluster("east-1")
    c = await fed.join(east)
    await c.grant_lease("east-1")
    start = (await c.catalog()).revision
    for i in range(5):
        await c.put_export(east.export(f"svc-{i}"))
    rev1, first = await c.watch(start, 1.0)
    for i in range(5, 9):
        await c.put_export(east.export(f"svc-{i}"))
    await c.delete_export("east-1", "default", "svc-0")
    rev2, second = await c.watch(rev1, 1.0)
    seen = first + second
    expected = await fed.server.store.events("catalog/", start, 0)
    assert [(e.type, e.key, e.revision) for e in seen] == [
        (e.type, e.key, e.revision) for e in expected
    ]
    assert [e.revision for e in seen] == sorted({e.revision for e in seen})
    assert rev2 == seen[-1].revision
    # folding the events onto the snapshot gives the same catalog as a fresh snapshot
    snap = Catalog.from_json((await c.catalog()).to_json())
    folded = (await c.catalog())
    for ev in await fed.server.store.events("catalog/", rev2, 0):
        folded = folded.apply(ev.key, ev.value, ev.revision)
    assert folded.exports.keys() == snap.exports.keys()
    # nothing new: an empty answer keeps the resume point
    rev3, none = await c.watch(rev2, 0.05)
    assert none == [] and rev3 == rev2


async def test_long_poll_wakes_quickly_after_put(fed: Fed) -> None:
    east = make_cluster("east-1")
    c = await fed.join(east)
    w = fed.client(east.svid)
    await c.grant_lease("east-1")
    after = (await c.catalog()).revision
    delays = []
    for i in range(3):
        task = asyncio.ensure_future(w.watch(after, 10.0))
        await asyncio.sleep(0.2)
        assert not task.done()
        await c.put_export(east.export(f"s{i}"))
        t0 = time.monotonic()
        after, events = await task
        delays.append(time.monotonic() - t0)
        assert [e.key for e in events] == [f"catalog/exports/east-1/default/s{i}"]
    print(f"long-poll wake after put: {', '.join(f'{d * 1000:.1f}ms' for d in delays)}")
    assert max(delays) < 0.5


async def test_watch_compacted_is_410(make_fed) -> None:
    fed = await make_fed(history=5)
    east = make_cluster("east-1")
    c = await fed.join(east)
    await c.grant_lease("east-1")
    for i in range(10):
        await c.put_export(east.export(f"s{i}"))
    with pytest.raises(CompactedError) as e:
        await c.watch(1, 0.1)
    assert e.value.compacted > 1
    async with raw_session(fed, east.svid) as s:
        async with s.get(f"{fed.url}/v1/watch", params={"after": "1", "timeout": "100ms"}) as r:
            assert r.status == 410
            body = await r.json()
            assert "compacted" in body and "error" in body
    cat = await c.catalog()
    rev, events = await c.watch(cat.revision, 0.05)
    assert events == []


async def test_watch_bad_parameters_are_400(fed: Fed) -> None:
    east = make_cluster("east-1")
    await fed.join(east)
    async with raw_session(fed, east.svid) as s:
        cases = (({"after": "x"}, "after"), ({"after": "0", "timeout": "5"}, "timeout"))
        for params, field in cases:
            async with s.get(f"{fed.url}/v1/watch", params=params) as r:
                assert r.status == 400
                assert (await r.json())["error"].startswith(field)


async def test_stop_ends_long_polls(fed: Fed) -> None:
    east = make_cluster("east-1")
    c = await fed.join(east)
    rev = (await c.catalog()).revision
    task = asyncio.ensure_future(c.watch(rev, 30.0))
    await asyncio.sleep(0.2)
    t0 = time.monotonic()
    server, fed.server = fed.server, None
    await server.stop()
    try:
        rev2, events = await asyncio.wait_for(task, 5)
        assert events == [] and rev2 == rev
    except FederationError:
        pass
    print(f"stop with a pending long-poll took {time.monotonic() - t0:.3f}s")
    assert time.monotonic() - t0 < 2


async def test_watch_after_a_future_revision_is_400(fed: Fed) -> None:
    """As etcd refuses a future revision: answering {"revision": 1000000} to a store at 44 would
    make the caller skip every change up to 1000000."""
    east = make_cluster("east-1")
    c = await fed.join(east)
    rev = (await c.catalog()).revision
    async with raw_session(fed, east.svid) as s:
        async with s.get(f"{fed.url}/v1/watch", params={"after": "1000000"}) as r:
            body = await r.json()
            assert r.status == 400, body
    assert body["error"].startswith("after: revision 1000000 is a future revision")
    assert body["revision"] == rev
    with pytest.raises(FutureRevisionError) as e:
        await c.watch(rev + 1, 5.0)
    assert (e.value.requested, e.value.current) == (rev + 1, rev)
    assert await c.watch(rev, 0.05) == (rev, [])  # the current revision is fine
