"""Drills, operator identity and imports on the federation, in process, over real TLS 1.3 on
127.0.0.1 (the same harness as tests/federation/test_api.py)."""

from __future__ import annotations

import asyncio
import os
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from federation.client import FederationClient, operator_client
from federation.drill_model import Drill
from federation.drill_report import compute_report
from federation.errors import FederationError
from federation.identity import SpiffeId, Svid, verify_svid
from federation.model import FailoverPolicy, ImportRecord
from federation.server.app import FederationServer, operator_id
from federation.store.sqlite import SqliteStore
from tests.helpers.federation import Cluster, Fed, make_cluster, raw_session

SVC = "default/echo"


class World:
    """A federation with east-1, east-2 (us-east) and west-1 (us-west) joined and live; the
    east clusters export default/echo; west-1 imports it."""

    def __init__(self, fed: Fed):
        self.fed = fed
        self.east1 = make_cluster("east-1", "us-east", "a")
        self.east2 = make_cluster("east-2", "us-east", "b")
        self.west1 = make_cluster("west-1", "us-west", "a")
        self.c: dict[str, FederationClient] = {}
        self.op: FederationClient | None = None

    async def setup(self) -> World:
        for cl in (self.east1, self.east2, self.west1):
            c = await self.fed.join(cl)
            await c.grant_lease(cl.name)
            self.c[cl.name] = c
        for cl in (self.east1, self.east2):
            await self.c[cl.name].put_export(cl.export("echo"))
        await self.c["west-1"].put_import(ImportRecord("west-1", "default", "echo"))
        self.op = self.operator()
        return self

    def operator(self) -> FederationClient:
        c = operator_client(self.fed.url, self.fed.tmp / "state" / "operator")
        self.fed.clients.append(c)
        return c


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    fed = Fed(tmp_path, lease_ttl=30.0)
    await fed.start()
    try:
        yield await World(fed).setup()
    finally:
        await fed.stop()


def spec(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"scope": {"region": "us-east"}, "mode": "blackhole",
                            "duration": "30s", "baseline": "0s", "settle": "1s"}
    base.update(kw)
    return base


def sample(cluster: str, second: int, attempts: int = 20, successes: int = 20,
           served: dict[str, int] | None = None, p99: float | None = 2.0) -> dict[str, Any]:
    return {"cluster": cluster, "second": second, "services": {SVC: {
        "attempts": attempts, "successes": successes, "failures": attempts - successes,
        "latency_p50_ms": None if p99 is None else p99 / 2, "latency_p99_ms": p99,
        "served": {cluster: successes} if served is None else served,
    }}}


async def wait_for_state(op: FederationClient, drill_id: str, timeout: float) -> Drill:
    deadline = time.monotonic() + timeout
    while True:
        d, _ = await op.get_drill(drill_id)
        if d.state != "running" or time.monotonic() > deadline:
            return d
        await asyncio.sleep(0.05)


# ---- operator identity -------------------------------------------------------------------------


async def test_operator_credentials_are_written_0600_and_work(world: World) -> None:
    d = world.fed.tmp / "state" / "operator"
    assert stat.S_IMODE(os.stat(d / "svid-key.pem").st_mode) == 0o600
    assert (d / "ca.pem").read_bytes() == (world.fed.tmp / "state" / "ca.pem").read_bytes()
    svid = Svid.load(d)
    assert svid is not None
    assert str(svid.spiffe_id) == "spiffe://federation.isthmus.local/ns/isthmus-system/sa/operator"
    assert 29 * 86400 < svid.not_after - time.time() <= 30 * 86400
    verify_svid(svid.cert_der(), world.fed.bundle(), time.time())
    cat = await world.op.catalog()  # the operator reads the catalog (drill plan)
    assert {i.cluster for i in cat.imports.values()} == {"west-1"}
    assert await world.op.list_drills() == []
    assert "east-1" in (await world.op.status())["clusters"]


async def test_operator_svid_reused_then_reissued_past_half_life(tmp_path: Path) -> None:
    async def start(clock) -> FederationServer:
        s = FederationServer(SqliteStore(str(tmp_path / "fed.db")), tmp_path / "state",
                             ("127.0.0.1", 0), clock=clock)
        await s.start()
        await s.stop()
        return s

    first = await start(time.time)
    second = await start(time.time)
    assert second.operator_svid.serial == first.operator_svid.serial
    later = await start(lambda: time.time() + 16 * 86400)
    assert later.operator_svid.serial != first.operator_svid.serial
    assert Svid.load(tmp_path / "state" / "operator").serial == later.operator_svid.serial


async def test_operator_client_names_missing_file(tmp_path: Path, world: World) -> None:
    src = world.fed.tmp / "state" / "operator"
    for missing in ("svid.pem", "svid-key.pem", "ca.pem"):
        d = tmp_path / f"creds-{missing}"
        d.mkdir()
        for f in ("svid.pem", "svid-key.pem", "ca.pem"):
            if f != missing:
                (d / f).write_bytes((src / f).read_bytes())
        with pytest.raises(FederationError) as e:
            operator_client(world.fed.url, d)
        assert str(d / missing) in str(e.value)


async def test_other_ids_of_federation_domain_are_forbidden(world: World) -> None:
    ca = world.fed.server.ca
    other = ca.issue(SpiffeId.parse("spiffe://federation.isthmus.local/ns/x/sa/y"), time.time())
    with pytest.raises(FederationError) as e:
        await world.fed.client(other).catalog()
    assert e.value.status == 403 and str(operator_id("federation.isthmus.local")) in str(e.value)


async def test_cluster_cannot_join_with_federation_trust_domain(world: World) -> None:
    bad = make_cluster("north-1")
    bad.record = bad.record.__class__(
        "north-1", "eu", "a", "federation.isthmus.local", "127.0.0.1:1"
    )
    with pytest.raises(FederationError) as e:
        await world.fed.client().join(await world.fed.token("north-1"), bad.record, bad.bundle())
    assert e.value.status == 400 and "federation's own" in str(e.value)


# ---- authorization ---------------------------------------------------------------------------


async def test_cluster_cannot_create_or_abort_drills(world: World) -> None:
    c = world.c["west-1"]
    with pytest.raises(FederationError) as e:
        await c.create_drill(spec())
    assert e.value.status == 403 and "operator only" in str(e.value)
    d = await world.op.create_drill(spec())
    with pytest.raises(FederationError) as e:
        await c.abort_drill(d.id)
    assert e.value.status == 403
    # clusters may read drills
    assert [x.id for x in await c.list_drills()] == [d.id]
    assert (await c.get_drill(d.id))[0] == d
    await c.drill_report(d.id)


async def test_operator_cannot_write_cluster_records(world: World) -> None:
    op = world.op
    calls = [
        lambda: op.put_export(world.east1.export("echo")),
        lambda: op.delete_export("east-1", "default", "echo"),
        lambda: op.put_import(ImportRecord("west-1", "default", "echo")),
        lambda: op.delete_import("west-1", "default", "echo"),
        lambda: op.grant_lease("east-1"),
        lambda: op.put_bundle("east-1", world.east1.bundle(9)),
    ]
    for call in calls:
        with pytest.raises(FederationError) as e:
            await call()
        assert e.value.status == 403 and "operator" in str(e.value)
    d = await op.create_drill(spec())
    with pytest.raises(FederationError) as e:
        await op.put_sample(d.id, "west-1", int(d.created_at), sample("west-1", int(d.created_at)))
    assert e.value.status == 403


async def test_unauthenticated_drill_calls_are_401(world: World) -> None:
    anon = world.fed.client()
    for call in (lambda: anon.list_drills(), lambda: anon.create_drill(spec())):
        with pytest.raises(FederationError) as e:
            await call()
        assert e.value.status == 401


# ---- create ----------------------------------------------------------------------------------


async def test_create_is_seen_in_the_watch_quickly(world: World) -> None:
    w = world.c["west-1"]
    after = (await w.catalog()).revision
    task = asyncio.ensure_future(w.watch(after, 5.0))
    await asyncio.sleep(0.1)
    t0 = time.monotonic()
    d = await world.op.create_drill(spec(mode="degrade", latency="200ms", error_rate=0.3,
                                         abort_on="success<90%:3s"))
    _, events = await task
    elapsed = time.monotonic() - t0
    print(f"drill record reached the watcher after {elapsed * 1000:.1f} ms")
    assert elapsed < 0.5
    assert [e.key for e in events] == [f"catalog/drills/{d.id}"]
    cat = await w.catalog()
    seen = cat.drills[d.id]
    assert seen == d and seen.clusters_in_scope == ("east-1", "east-2")
    assert seen.services == (SVC,) and seen.mode == "degrade" and seen.latency == 0.2
    assert dict(seen.regions)["west-1"] == "us-west"


async def test_unknown_scope_and_bad_spec_are_400(world: World) -> None:
    for scope, known in (({"region": "eu-west"}, "us-east, us-west"),
                         ({"cluster": "north-9"}, "east-1, east-2, west-1")):
        with pytest.raises(FederationError) as e:
            await world.op.create_drill(spec(scope=scope))
        assert e.value.status == 400
        assert next(iter(scope.values())) in str(e.value) and known in str(e.value)
    for bad, quoted in (({"mode": "nuke"}, "'nuke'"), ({"duration": "2h"}, "'2h'"),
                        ({"abort_on": "success<<1"}, "'success<<1'")):
        with pytest.raises(FederationError) as e:
            await world.op.create_drill(spec(**bad))
        assert e.value.status == 400 and quoted in str(e.value)
    assert await world.op.list_drills() == []


async def test_overlapping_drill_is_409_naming_it(world: World) -> None:
    d = await world.op.create_drill(spec())
    with pytest.raises(FederationError) as e:
        await world.op.create_drill(spec(scope={"cluster": "west-1"}))
    assert e.value.status == 409 and d.id in str(e.value)
    await world.op.abort_drill(d.id)
    with pytest.raises(FederationError) as e:  # still observing for `settle` (1 s)
        await world.op.create_drill(spec())
    assert e.value.status == 409 and "observing" in str(e.value)
    await asyncio.sleep(1.1)
    d2 = await world.op.create_drill(spec())
    assert [x.id for x in await world.op.list_drills()] == [d2.id, d.id]  # newest first


# ---- samples ---------------------------------------------------------------------------------


async def test_samples_only_own_cluster_and_sorted(world: World) -> None:
    d = await world.op.create_drill(spec(scope={"cluster": "east-1"}))
    s0 = int(d.created_at)
    w, e2, e1 = world.c["west-1"], world.c["east-2"], world.c["east-1"]
    with pytest.raises(FederationError) as e:
        await w.put_sample(d.id, "east-2", s0, sample("east-2", s0))
    assert e.value.status == 403 and "'west-1'" in str(e.value) and "'east-2'" in str(e.value)
    with pytest.raises(FederationError) as e:  # in scope: not an observer
        await e1.put_sample(d.id, "east-1", s0, sample("east-1", s0))
    assert e.value.status == 403
    with pytest.raises(FederationError) as e:
        await w.put_sample("d-20200101-000000-zzzz", "west-1", s0, sample("west-1", s0))
    assert e.value.status == 404
    with pytest.raises(FederationError) as e:
        await w.put_sample(d.id, "west-1", s0, {**sample("west-1", s0), "second": s0 + 1})
    assert e.value.status == 400 and "sample.second" in str(e.value)
    bad = sample("west-1", s0)
    bad["services"][SVC]["successes"] = 50
    with pytest.raises(FederationError) as e:
        await w.put_sample(d.id, "west-1", s0, bad)
    assert e.value.status == 400 and "successes (50)" in str(e.value)
    for late in (s0 - 5, int(d.fault_end + d.settle) + 10):
        with pytest.raises(FederationError) as e:
            await w.put_sample(d.id, "west-1", late, sample("west-1", late))
        assert e.value.status == 409 and "window" in str(e.value)
    for sec, cl, c in ((s0 + 2, "west-1", w), (s0 + 1, "west-1", w), (s0 + 1, "east-2", e2),
                       (s0, "west-1", w)):
        await c.put_sample(d.id, cl, sec, sample(cl, sec))
    await w.put_sample(d.id, "west-1", s0, sample("west-1", s0, 10, 10))  # a retry replaces
    _, samples = await world.op.get_drill(d.id)
    assert [(s["second"], s["cluster"]) for s in samples] == [
        (s0, "west-1"), (s0 + 1, "east-2"), (s0 + 1, "west-1"), (s0 + 2, "west-1")]
    assert samples[0]["services"][SVC]["attempts"] == 10
    async with raw_session(world.fed, world.west1.svid) as s:
        async with s.put(f"{world.fed.url}/v1/drills/{d.id}/samples/west-1/abc", json={}) as r:
            assert r.status == 400 and "second" in (await r.json())["error"]


async def test_report_endpoint_is_compute_report(world: World) -> None:
    d = await world.op.create_drill(spec(baseline="2s"))
    w = world.c["west-1"]
    fs = int(d.fault_start)
    plan = {fs - 2: {"east-1": 20}, fs - 1: {"east-1": 20},
            fs: {"west-1": 15}, fs + 1: {"west-1": 20}}
    for sec, served in plan.items():
        ok = sum(served.values())
        await w.put_sample(d.id, "west-1", sec, sample("west-1", sec, 20, ok, served))
    report = await world.op.drill_report(d.id)
    drill, samples = await world.op.get_drill(d.id)
    assert report == compute_report(drill, samples)
    got = (report["detection_s"], report["shift_s"], report["failed_during_shift"])
    assert got == (0.0, 1.0, 5)
    with pytest.raises(FederationError) as e:
        await world.op.drill_report("d-20200101-000000-zzzz")
    assert e.value.status == 404
    with pytest.raises(FederationError) as e:
        await world.op.get_drill("nonsense")
    assert e.value.status == 404


# ---- ending ----------------------------------------------------------------------------------


async def test_deadline_ends_the_drill(world: World) -> None:
    d = await world.op.create_drill(spec(duration="1s"))
    assert d.state == "running"
    ended = await wait_for_state(world.op, d.id, d.fault_end - time.time() + 2)
    lag = ended.ended_at - d.fault_end
    print(f"deadline to ended: {lag * 1000:.0f} ms")
    assert ended.state == "ended" and ended.end_reason == "deadline"
    assert 0 <= lag < 0.5
    with pytest.raises(FederationError) as e:
        await world.op.abort_drill(d.id)
    assert e.value.status == 409 and "already ended" in str(e.value)


async def test_abort_by_operator(world: World) -> None:
    d = await world.op.create_drill(spec())
    aborted = await world.op.abort_drill(d.id, "aborted: CLI interrupted")
    assert aborted.state == "aborted" and aborted.end_reason == "aborted: CLI interrupted"
    assert aborted.fault_stop == aborted.ended_at < d.fault_end
    cat = await world.c["west-1"].catalog()
    assert cat.drills[d.id] == aborted
    with pytest.raises(FederationError) as e:
        await world.op.abort_drill(d.id)
    assert e.value.status == 409
    await asyncio.sleep(1.1)  # past settle
    d3 = await world.op.create_drill(spec())
    assert (await world.op.abort_drill(d3.id)).end_reason == "aborted by operator"


async def test_abort_on_trips_from_samples(world: World) -> None:
    d = await world.op.create_drill(spec(abort_on="success<99%:3s"))
    w = world.c["west-1"]
    fs = int(d.fault_start)
    await asyncio.sleep(max(0.0, fs + 3.05 - time.time()))  # seconds are counted once begun
    for i, ok in enumerate((20, 10, 10)):  # the first second is fine
        await w.put_sample(d.id, "west-1", fs + i, sample("west-1", fs + i, 20, ok))
    assert (await world.op.get_drill(d.id))[0].state == "running"
    await w.put_sample(d.id, "west-1", fs + 3, sample("west-1", fs + 3, 20, 0, {}))
    drill, _ = await world.op.get_drill(d.id)
    assert drill.state == "aborted"
    assert drill.end_reason == "aborted: SLO success<99% for 3s tripped"
    # samples keep coming during settle; the drill stays aborted
    await w.put_sample(d.id, "west-1", fs + 4, sample("west-1", fs + 4, 20, 0, {}))
    assert (await world.op.get_drill(d.id))[0].end_reason == drill.end_reason


async def test_restart_mid_drill_ends_it_and_keeps_record(tmp_path: Path) -> None:
    fed = Fed(tmp_path, lease_ttl=30.0)
    await fed.start()
    w = await World(fed).setup()
    d = await w.op.create_drill(spec(duration="1s"))
    await fed.stop()  # the federation dies mid-drill
    await asyncio.sleep(max(0.0, d.fault_end - time.time()) + 0.2)
    fed2 = Fed(tmp_path, lease_ttl=30.0)
    await fed2.start()
    try:
        op = operator_client(fed2.url, tmp_path / "state" / "operator")
        fed2.clients.append(op)
        drill, _ = await op.get_drill(d.id)  # ended at start, before the first request
        assert drill.state == "ended" and drill.end_reason == "deadline"
        assert drill.id == d.id and drill.fault_end == d.fault_end and drill.ended_at > d.fault_end
        assert [x.id for x in await op.list_drills()] == [d.id]
    finally:
        await fed2.stop()


# ---- imports ---------------------------------------------------------------------------------


async def test_imports_publish_delete_and_authz(world: World) -> None:
    e1, w = world.c["east-1"], world.c["west-1"]
    rec = ImportRecord(
        "east-1", "default", "echo", FailoverPolicy(("zone", "region", "any"), ("us-west",), 3.0, 2)
    )
    r1 = await e1.put_import(rec)
    assert await e1.put_import(rec) == r1  # identical: skipped
    cat = await w.catalog()
    assert cat.imports[rec.key] == rec
    with pytest.raises(FederationError) as e:
        await w.put_import(rec)
    assert e.value.status == 403 and "'west-1'" in str(e.value) and "'east-1'" in str(e.value)
    with pytest.raises(FederationError) as e:
        await w.delete_import("east-1", "default", "echo")
    assert e.value.status == 403
    async with raw_session(world.fed, world.east1.svid) as s:
        url = f"{world.fed.url}/v1/clusters/east-1/imports/default/other"
        async with s.put(url, json=rec.to_json()) as r:
            assert r.status == 400 and "path" in (await r.json())["error"]
        bad = {**rec.to_json(), "failover": {**rec.to_json()["failover"], "tiers": ["moon"]}}
        async with s.put(f"{world.fed.url}/v1/clusters/east-1/imports/default/echo", json=bad) as r:
            assert r.status == 400 and "tiers" in (await r.json())["error"]
    assert await e1.delete_import("east-1", "default", "echo")
    assert not await e1.delete_import("east-1", "default", "echo")
    assert rec.key not in (await w.catalog()).imports


async def test_import_needs_live_lease_and_is_withdrawn_with_it(tmp_path: Path) -> None:
    fed = Fed(tmp_path, lease_ttl=0.5)
    await fed.start()
    try:
        west: Cluster = make_cluster("west-1", "us-west")
        c = await fed.join(west)
        rec = ImportRecord("west-1", "default", "echo")
        with pytest.raises(FederationError) as e:
            await c.put_import(rec)
        assert e.value.status == 409 and "no live lease" in str(e.value)
        await c.grant_lease("west-1")
        await c.put_import(rec)
        assert rec.key in (await c.catalog()).imports
        await asyncio.sleep(1.0)  # the lease expires: the import goes with it
        assert rec.key not in (await c.catalog()).imports
    finally:
        await fed.stop()
