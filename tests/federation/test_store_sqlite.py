"""Tests of the embedded SQLite store (federation/store/sqlite.py)."""

from __future__ import annotations

import asyncio
import os
import stat
import tempfile
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from federation.errors import CompactedError, FutureRevisionError, StoreError
from federation.store.base import KV, Event, open_store
from federation.store.sqlite import MAX_KEY_BYTES, MAX_VALUE_BYTES, SqliteStore, _prefix_end


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def store(tmp_path):
    s = SqliteStore(str(tmp_path / "db" / "fed.sqlite"))
    await s.open()
    yield s
    await s.close()


async def test_put_get_delete_and_revisions(store):
    assert await store.revision() == 0
    assert await store.get("a") is None
    assert await store.put("a", b"1") == 1
    assert await store.put("b", b"2") == 2
    assert await store.put("a", b"3") == 3
    assert await store.get("a") == KV("a", b"3", 3, None)
    assert await store.revision() == 3
    assert await store.delete("a") == KV("a", b"3", 3, None)
    assert await store.revision() == 4
    assert await store.delete("a") is None
    assert await store.revision() == 4  # deleting nothing is not a write
    assert await store.get("a") is None
    kvs, rev = await store.range("")
    assert kvs == [KV("b", b"2", 2, None)] and rev == 4


async def test_same_value_put_is_still_a_revision(store):
    assert await store.put("k", b"v") == 1
    assert await store.put("k", b"v") == 2
    assert [e.revision for e in await store.events("", 0, 0)] == [1, 2]


async def test_range_prefix_is_exact(store):
    for key in [
        "catalog/exports/a",
        "catalog/exports/ab",
        "catalog/exports/a/x",
        "catalog/exportsX",
        "catalog/exports%",
        "catalog/exports_1",
        "catalog/export",
        "tokens/t",
    ]:
        await store.put(key, key.encode())
    keys = [kv.key for kv in (await store.range("catalog/exports/a"))[0]]
    assert keys == ["catalog/exports/a", "catalog/exports/a/x", "catalog/exports/ab"]
    keys = [kv.key for kv in (await store.range("catalog/exports/a/"))[0]]
    assert keys == ["catalog/exports/a/x"]
    keys = [kv.key for kv in (await store.range("catalog/exports%"))[0]]
    assert keys == ["catalog/exports%"]
    keys = [kv.key for kv in (await store.range("catalog/exports_"))[0]]
    assert keys == ["catalog/exports_1"]
    kvs, rev = await store.range("")
    assert [kv.key for kv in kvs] == sorted(kv.key for kv in kvs) and len(kvs) == 8
    assert rev == 8


def test_prefix_end():
    assert _prefix_end("") is None
    assert _prefix_end("ab") == "ac"
    assert _prefix_end("a\U0010ffff") == "b"
    assert _prefix_end("\U0010ffff") is None
    assert _prefix_end("a\ud7ff") == "a\ue000"


async def test_events_in_order_after_revision(store):
    await store.put("catalog/a", b"1")
    await store.put("other/x", b"2")
    await store.put("catalog/b", b"3")
    await store.delete("catalog/a")
    assert await store.events("", 0, 0) == [
        Event("put", "catalog/a", b"1", 1),
        Event("put", "other/x", b"2", 2),
        Event("put", "catalog/b", b"3", 3),
        Event("delete", "catalog/a", None, 4),
    ]
    assert await store.events("catalog/", 1, 0) == [
        Event("put", "catalog/b", b"3", 3),
        Event("delete", "catalog/a", None, 4),
    ]
    assert await store.events("", 4, 0) == []


async def test_long_poll_wakes_on_put(store):
    await store.put("catalog/a", b"0")
    loop = asyncio.get_running_loop()

    async def writer():
        await asyncio.sleep(0.2)
        t = loop.time()
        await store.put("catalog/a", b"1")
        return t

    start = loop.time()
    watched, written_at = await asyncio.gather(store.events("catalog/", 1, 5.0), writer())
    woke = loop.time()
    assert watched == [Event("put", "catalog/a", b"1", 2)]
    assert woke - written_at < 0.1
    assert woke - start < 1.0


async def test_long_poll_times_out_empty(store):
    await store.put("a", b"1")
    loop = asyncio.get_running_loop()
    start = loop.time()
    assert await store.events("", 1, 0.2) == []
    elapsed = loop.time() - start
    assert 0.18 <= elapsed < 1.0


async def test_long_poll_ignores_other_prefixes(store):
    loop = asyncio.get_running_loop()

    async def writer():
        for i in range(5):
            await asyncio.sleep(0.03)
            await store.put(f"other/{i}", b"x")
        await asyncio.sleep(0.05)
        await store.put("catalog/a", b"1")

    start = loop.time()
    watched, _ = await asyncio.gather(store.events("catalog/", 0, 5.0), writer())
    assert watched == [Event("put", "catalog/a", b"1", 6)]
    assert loop.time() - start >= 0.15

    # Only unrelated writes: the waiter keeps waiting until its timeout and returns [].
    start = loop.time()

    async def noise():
        for i in range(4):
            await asyncio.sleep(0.03)
            await store.put(f"other/n{i}", b"x")

    watched, _ = await asyncio.gather(store.events("catalog/", 6, 0.3), noise())
    assert watched == []
    assert loop.time() - start >= 0.28


async def test_compaction(tmp_path):
    s = SqliteStore(str(tmp_path / "c.sqlite"), history=5)
    await s.open()
    try:
        for i in range(12):
            await s.put(f"k{i}", b"v")
        # Revisions 1..7 are discarded; 8..12 are kept.
        events = await s.events("", 7, 0)
        assert [e.revision for e in events] == [8, 9, 10, 11, 12]
        with pytest.raises(CompactedError) as info:
            await s.events("", 6, 0)
        assert info.value.requested == 6
        assert info.value.compacted == 8  # the oldest revision still kept
        with pytest.raises(CompactedError):
            await s.events("", 0, 1.0)
        assert await s.revision() == 12
        kvs, rev = await s.range("")
        assert len(kvs) == 12 and rev == 12
    finally:
        await s.close()


async def test_leases_put_keepalive_expire(tmp_path):
    clock = FakeClock()
    s = SqliteStore(str(tmp_path / "l.sqlite"), clock=clock)
    await s.open()
    try:
        lease = await s.grant_lease(10.0)
        other = await s.grant_lease(10.0)
        assert lease != other
        await s.put("catalog/live/east-1", b"{}", lease=lease)
        await s.put("catalog/exports/east-1/ns/a", b"{}", lease=lease)
        await s.put("catalog/clusters/east-1", b"{}")
        assert (await s.get("catalog/live/east-1")).lease == lease

        clock.now += 8
        assert await s.keepalive(lease) is True  # deadline now +18 from start
        clock.now += 8
        assert await s.expire_leases() == 1  # `other` expired, `lease` was renewed
        assert await s.keepalive(other) is False
        with pytest.raises(StoreError, match="lease"):
            await s.put("x", b"1", lease=other)
        assert await s.get("catalog/live/east-1") is not None

        rev = await s.revision()
        clock.now += 3
        assert await s.keepalive(lease) is False  # past its deadline, not yet reaped
        with pytest.raises(StoreError):
            await s.put("x", b"1", lease=lease)
        assert await s.revision() == rev
        assert await s.expire_leases() == 1
        assert await s.expire_leases() == 0
        kvs, rev2 = await s.range("")
        assert [kv.key for kv in kvs] == ["catalog/clusters/east-1"]
        assert rev2 == rev + 2  # each deleted key its own revision
        deletes = await s.events("", rev, 0)
        assert [(e.type, e.key, e.revision) for e in deletes] == [
            ("delete", "catalog/exports/east-1/ns/a", rev + 1),
            ("delete", "catalog/live/east-1", rev + 2),
        ]
        with pytest.raises(StoreError):
            await s.put("x", b"1", lease=12345)
        with pytest.raises(StoreError):
            await s.grant_lease(0)
    finally:
        await s.close()


async def test_lease_expiry_real_time(store):
    lease = await store.grant_lease(0.2)
    await store.put("catalog/live/a", b"{}", lease=lease)
    assert await store.expire_leases() == 0
    await asyncio.sleep(0.3)
    assert await store.keepalive(lease) is False
    assert await store.expire_leases() == 1
    assert await store.get("catalog/live/a") is None
    assert (await store.events("", 1, 0))[0].type == "delete"


async def test_revoke(store):
    lease = await store.grant_lease(60)
    await store.put("a", b"1", lease=lease)
    await store.put("b", b"2", lease=lease)
    await store.put("c", b"3")
    await store.revoke(lease)
    kvs, rev = await store.range("")
    assert [kv.key for kv in kvs] == ["c"] and rev == 5
    assert [(e.type, e.key) for e in await store.events("", 3, 0)] == [
        ("delete", "a"),
        ("delete", "b"),
    ]
    assert await store.keepalive(lease) is False
    await store.revoke(lease)  # revoking an ended lease is a no-op
    assert await store.revision() == 5


async def test_put_moves_key_off_lease(store):
    lease = await store.grant_lease(60)
    await store.put("a", b"1", lease=lease)
    await store.put("a", b"2")  # no longer attached
    await store.revoke(lease)
    assert await store.get("a") == KV("a", b"2", 2, None)


async def test_persistence_across_reopen(tmp_path):
    path = str(tmp_path / "p.sqlite")
    clock = FakeClock()
    s = SqliteStore(path, clock=clock)
    await s.open()
    lease = await s.grant_lease(5)
    await s.put("catalog/live/a", b"{}", lease=lease)
    await s.put("catalog/clusters/a", b"rec")
    await s.close()

    clock.now += 10  # the lease's deadline passes while the process is down
    s2 = SqliteStore(path, clock=clock)
    await s2.open()
    try:
        assert await s2.revision() == 2
        assert await s2.get("catalog/clusters/a") == KV("catalog/clusters/a", b"rec", 2, None)
        assert await s2.get("catalog/live/a") is not None
        assert await s2.expire_leases() == 1
        assert await s2.get("catalog/live/a") is None
        assert await s2.revision() == 3
        assert await s2.put("x", b"y") == 4
        assert await s2.grant_lease(5) != lease  # lease ids are not reused
    finally:
        await s2.close()


async def test_renew_all_leases_after_an_outage_longer_than_the_ttl(tmp_path):
    """A restarted federation renews every stored lease for a full ttl from its start: open()
    alone keeps the deadlines (`isthmus federation token create` opens the file too)."""
    path = str(tmp_path / "r.sqlite")
    clock = FakeClock()
    s = SqliteStore(path, clock=clock)
    await s.open()
    short = await s.grant_lease(2)
    long = await s.grant_lease(600)
    await s.put("catalog/live/a", b"{}", lease=short)
    await s.put("catalog/live/b", b"{}", lease=long)
    await s.close()

    clock.now += 30  # down for 30 s: `short` is 28 s past its deadline
    s2 = SqliteStore(path, clock=clock)
    await s2.open()
    try:
        assert await s2.renew_all_leases() == 2
        rev = await s2.revision()
        clock.now += 1.9
        assert await s2.expire_leases() == 0  # a full ttl (2 s) of grace from the renewal
        assert await s2.keepalive(short) is True  # the gateway's keepalive lands in time
        clock.now += 1.9
        assert await s2.expire_leases() == 0
        assert await s2.revision() == rev  # renewals are not revisions: watchers see nothing
        clock.now += 2.1  # now nobody renews `short`
        assert await s2.expire_leases() == 1
        assert await s2.get("catalog/live/a") is None
        assert await s2.get("catalog/live/b") is not None  # never shortened: 600 s from grant
        clock.now += 600
        assert await s2.expire_leases() == 1
    finally:
        await s2.close()


async def test_open_alone_does_not_renew_leases(tmp_path):
    path = str(tmp_path / "o.sqlite")
    clock = FakeClock()
    s = SqliteStore(path, clock=clock)
    await s.open()
    lease = await s.grant_lease(2)
    await s.close()
    clock.now += 30
    s2 = SqliteStore(path, clock=clock)
    await s2.open()
    try:
        assert await s2.keepalive(lease) is False
    finally:
        await s2.close()


async def test_events_after_a_future_revision_are_refused(store):
    await store.put("a", b"1")
    await store.put("a", b"2")
    assert await store.events("", 2, 0) == []  # the current revision: wait for the next
    with pytest.raises(FutureRevisionError) as e:
        await store.events("", 1_000_000, 5.0)  # refused at once, not after the timeout
    assert (e.value.requested, e.value.current) == (1_000_000, 2)
    assert "1000000 is a future revision (the store is at revision 2)" in str(e.value)


async def test_persistence_with_wall_clock(tmp_path):
    path = str(tmp_path / "w.sqlite")
    s = SqliteStore(path)
    await s.open()
    lease = await s.grant_lease(0.2)
    await s.put("k", b"v", lease=lease)
    await s.close()
    await asyncio.sleep(0.3)
    s2 = SqliteStore(path)
    await s2.open()
    try:
        assert await s2.expire_leases() == 1
        assert await s2.get("k") is None
    finally:
        await s2.close()


async def test_concurrent_delete_has_one_winner(store):
    await store.put("tokens/abc", b"hash")
    results = await asyncio.gather(*(store.delete("tokens/abc") for _ in range(10)))
    winners = [r for r in results if r is not None]
    assert winners == [KV("tokens/abc", b"hash", 1, None)]
    assert await store.revision() == 2


async def test_size_bounds(store):
    with pytest.raises(StoreError, match="key"):
        await store.put("k" * (MAX_KEY_BYTES + 1), b"")
    await store.put("k" * MAX_KEY_BYTES, b"")
    with pytest.raises(StoreError, match="big"):
        await store.put("big", b"x" * (MAX_VALUE_BYTES + 1))
    await store.put("big", b"x" * MAX_VALUE_BYTES)
    with pytest.raises(StoreError):
        await store.put("", b"")
    with pytest.raises(StoreError):
        await store.put("bad\ud800", b"")
    with pytest.raises(StoreError):
        await store.put("k", "not bytes")  # type: ignore[arg-type]
    assert await store.revision() == 2


async def test_file_mode_is_owner_only(tmp_path):
    path = tmp_path / "sub" / "dir" / "f.sqlite"
    s = SqliteStore(str(path))
    await s.open()
    try:
        await s.put("tokens/t", b"hash")
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        for suffix in ("-wal", "-shm"):
            side = str(path) + suffix
            if os.path.exists(side):
                assert stat.S_IMODE(os.stat(side).st_mode) & 0o077 == 0
    finally:
        await s.close()


async def test_existing_file_is_tightened(tmp_path):
    path = tmp_path / "loose.sqlite"
    path.touch(mode=0o644)
    os.chmod(path, 0o644)
    s = SqliteStore(str(path))
    await s.open()
    await s.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


async def test_closed_store_refuses(tmp_path):
    s = SqliteStore(str(tmp_path / "x.sqlite"))
    await s.open()
    waiter = asyncio.ensure_future(s.events("", 0, 5.0))
    await asyncio.sleep(0.05)
    await s.close()
    with pytest.raises(StoreError):
        await waiter
    with pytest.raises(StoreError):
        await s.get("a")
    await s.close()  # idempotent


async def test_open_store_url(tmp_path):
    s = open_store(f"sqlite:{tmp_path / 'u.sqlite'}")
    assert isinstance(s, SqliteStore)
    await s.open()
    assert await s.put("a", b"b") == 1
    await s.close()


async def test_writes_do_not_block_the_loop(store):
    """The event loop keeps ticking while writes run on the worker thread."""
    ticks = 0
    stop = False

    async def ticker():
        nonlocal ticks
        while not stop:
            ticks += 1
            await asyncio.sleep(0)

    t = asyncio.ensure_future(ticker())
    start = time.monotonic()
    for i in range(20):
        await store.put(f"k{i}", b"v" * 1000)
    stop = True
    await t
    assert ticks >= 20
    assert time.monotonic() - start < 30


# ---- property: folding the event log reproduces the snapshot -----------------------------------

_keys = st.sampled_from(["a", "a/b", "ab", "a%", "a_", "b", "catalog/x", "catalog/xy", "é", "日本"])
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), _keys, st.binary(max_size=8)),
        st.tuples(st.just("delete"), _keys, st.none()),
    ),
    max_size=30,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_ops, prefix=st.sampled_from(["", "a", "a/", "a%", "catalog/x", "z", "é"]))
async def test_fold_of_events_is_range(ops, prefix):
    async def run(path: str) -> None:
        s = SqliteStore(path)
        await s.open()
        try:
            model: dict[str, bytes] = {}
            for op, key, value in ops:
                if op == "put":
                    await s.put(key, value)
                    model[key] = value
                else:
                    old = await s.delete(key)
                    assert (old is None) == (key not in model)
                    model.pop(key, None)
            folded: dict[str, bytes] = {}
            events = await s.events("", 0, 0)
            assert [e.revision for e in events] == list(range(1, len(events) + 1))
            for e in events:
                if e.type == "put":
                    assert e.value is not None
                    folded[e.key] = e.value
                else:
                    folded.pop(e.key)
            kvs, rev = await s.range("")
            assert {kv.key: kv.value for kv in kvs} == folded == model
            assert rev == len(events)
            sub, _ = await s.range(prefix)
            assert [kv.key for kv in sub] == sorted(k for k in model if k.startswith(prefix))
            sub_events = await s.events(prefix, 0, 0)
            assert sub_events == [e for e in events if e.key.startswith(prefix)]
        finally:
            await s.close()

    with tempfile.TemporaryDirectory() as d:
        await run(os.path.join(d, "prop.sqlite"))
