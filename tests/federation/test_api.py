"""The federation service and its client, in process, over real TLS 1.3 on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from federation import api
from federation.ca import CertificateAuthority
from federation.client import FederationClient, load_federation_bundle
from federation.errors import CompactedError, FederationError, FutureRevisionError, InputError
from federation.identity import Svid, TrustBundle, gateway_id
from federation.model import Catalog, ClusterRecord, Endpoint, Export, check_name, is_drill_id
from federation.server.app import REAP_INTERVAL, FederationServer, create_token
from federation.store.sqlite import SqliteStore
from federation.tls import client_context
from federation.units import parse_duration, parse_int


@dataclass
class Cluster:
    name: str
    td: str
    ca: CertificateAuthority
    svid: Svid
    record: ClusterRecord

    def bundle(self, sequence: int = 1) -> TrustBundle:
        return self.ca.bundle(sequence)

    def export(self, name: str = "web", port: int = 8080, healthy: bool = True) -> Export:
        return Export(
            self.name, "default", name, port, "tcp",
            (Endpoint("127.0.0.1", port, healthy, 1),),
        )


def make_cluster(name: str, region: str = "us-east", zone: str = "a") -> Cluster:
    now = time.time()
    td = f"{name}.isthmus.local"
    ca = CertificateAuthority.create(td, now)
    svid = ca.issue(gateway_id(td), now)
    record = ClusterRecord(name, region, zone, td, "127.0.0.1:15443")
    return Cluster(name, td, ca, svid, record)


class Fed:
    """A running federation server plus helpers to make clients and join clusters."""

    def __init__(self, tmp: Path, history: int = 10000, lease_ttl: float = 1.0,
                 clock: Callable[[], float] = time.time):
        self.tmp = tmp
        self.history = history
        self.lease_ttl = lease_ttl
        self.clock = clock
        self.server: FederationServer | None = None
        self.clients: list[FederationClient] = []

    async def start(self) -> FederationServer:
        store = SqliteStore(str(self.tmp / "fed.db"), history=self.history, clock=self.clock)
        self.server = FederationServer(
            store, self.tmp / "state", ("127.0.0.1", 0), ("127.0.0.1", 0),
            lease_ttl=self.lease_ttl, clock=self.clock,
        )
        await self.server.start()
        return self.server

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"https://127.0.0.1:{self.server.port}"

    @property
    def admin_url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.admin_port}"

    def bundle(self) -> TrustBundle:
        return load_federation_bundle(self.tmp / "state" / "ca.pem")

    def client(self, svid: Svid | None = None) -> FederationClient:
        c = FederationClient(self.url, self.bundle(), svid, timeout=5.0)
        self.clients.append(c)
        return c

    async def token(self, cluster: str, ttl: float = 60.0, now: float | None = None) -> str:
        assert self.server is not None
        return await create_token(self.server.store, cluster, ttl, now or time.time())

    async def join(self, c: Cluster, sequence: int = 1) -> FederationClient:
        anon = self.client()
        await anon.join(await self.token(c.name), c.record, c.bundle(sequence))
        return self.client(c.svid)

    async def stop(self) -> None:
        for c in self.clients:
            await c.close()
        self.clients.clear()
        if self.server is not None:
            await self.server.stop()
            self.server = None


@pytest.fixture
async def make_fed(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Fed]]]:
    feds: list[Fed] = []

    async def make(**kw) -> Fed:
        fed = Fed(tmp_path, **kw)
        await fed.start()
        feds.append(fed)
        return fed

    yield make
    for fed in feds:
        await fed.stop()


@pytest.fixture
async def fed(make_fed) -> Fed:
    return await make_fed()


def raw_session(fed: Fed, svid: Svid | None) -> aiohttp.ClientSession:
    ctx = client_context(svid, fed.bundle())
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx))


# ---- join and tokens -------------------------------------------------------------------------


async def test_join_then_mtls_calls_work(fed: Fed) -> None:
    east = make_cluster("east-1")
    anon = fed.client()
    reply = await anon.join(await fed.token("east-1"), east.record, east.bundle())
    assert reply["federation_trust_domain"] == "federation.isthmus.local"
    assert reply["lease_ttl"] == 1.0
    fb = TrustBundle.from_jwks("federation.isthmus.local", reply["federation_bundle"])
    assert fb.authorities == fed.bundle().authorities

    c = fed.client(east.svid)
    lease, ttl = await c.grant_lease("east-1")
    assert ttl == 1.0
    assert await c.keepalive("east-1", lease)
    await c.put_export(east.export())
    cat = await c.catalog()
    assert cat.clusters["east-1"] == east.record
    assert "east-1" in cat.live
    assert [e.name for e in cat.exports.values()] == ["web"]
    assert east.td in cat.bundles
    assert await c.delete_export("east-1", "default", "web")
    assert not await c.delete_export("east-1", "default", "web")


async def test_token_reuse_is_refused(fed: Fed) -> None:
    east = make_cluster("east-1")
    token = await fed.token("east-1")
    anon = fed.client()
    await anon.join(token, east.record, east.bundle())
    with pytest.raises(FederationError) as e:
        await anon.join(token, east.record, east.bundle())
    assert e.value.status == 401
    assert "unknown or already used" in str(e.value)


async def test_expired_token_is_refused(fed: Fed) -> None:
    east = make_cluster("east-1")
    token = await fed.token("east-1", ttl=1.0, now=time.time() - 10)
    with pytest.raises(FederationError) as e:
        await fed.client().join(token, east.record, east.bundle())
    assert e.value.status == 401
    assert "expired" in str(e.value)


async def test_token_for_another_cluster_is_forbidden(fed: Fed) -> None:
    east = make_cluster("east-1")
    token = await fed.token("west-1")
    with pytest.raises(FederationError) as e:
        await fed.client().join(token, east.record, east.bundle())
    assert e.value.status == 403
    assert "west-1" in str(e.value) and "east-1" in str(e.value)


async def test_trust_domain_of_another_cluster_conflicts(fed: Fed) -> None:
    east = make_cluster("east-1")
    await fed.join(east)
    thief = make_cluster("west-1")
    thief.record = ClusterRecord("west-1", "us-west", "a", east.td, "127.0.0.1:1")
    token = await fed.token("west-1")
    with pytest.raises(FederationError) as e:
        await fed.client().join(token, thief.record, east.bundle())
    assert e.value.status == 409
    assert "east-1" in str(e.value)
    # the token survived the conflict: it may still be used for a valid join
    await fed.client().join(token, make_cluster("west-1").record, make_cluster("west-1").bundle())


async def test_rejoin_with_new_token_replaces_bundle(fed: Fed) -> None:
    east = make_cluster("east-1")
    await fed.join(east, sequence=5)
    fresh = make_cluster("east-1")  # lost its state: a new CA, sequence back to 0
    c = await fed.join(fresh, sequence=0)
    await c.grant_lease("east-1")
    old = fed.client(east.svid)
    with pytest.raises(FederationError) as e:
        await old.grant_lease("east-1")
    assert e.value.status in (None, 401)


# ---- authorization -----------------------------------------------------------------------------


async def test_cluster_may_write_only_its_own_records(fed: Fed, caplog) -> None:
    east, west = make_cluster("east-1"), make_cluster("west-1", "us-west")
    ce = await fed.join(east)
    cw = await fed.join(west)
    await cw.grant_lease("west-1")
    calls = [
        lambda: ce.put_export(west.export()),
        lambda: ce.delete_export("west-1", "default", "web"),
        lambda: ce.grant_lease("west-1"),
        lambda: ce.keepalive("west-1", 1),
        lambda: ce.put_bundle("west-1", west.bundle(9)),
    ]
    with caplog.at_level("WARNING", logger="isthmus.federation"):
        for call in calls:
            with pytest.raises(FederationError) as e:
                await call()
            assert e.value.status == 403
            assert "'east-1'" in str(e.value) and "'west-1'" in str(e.value)
    assert any("denied" in r.message for r in caplog.records)
    assert all("token" not in r.getMessage().lower() or "join token" in r.getMessage()
               for r in caplog.records)


async def test_denied_requests_are_logged_quoted_and_rate_limited(fed: Fed, caplog) -> None:
    east = make_cluster("east-1")
    await fed.join(east)
    async with raw_session(fed, east.svid) as s:
        with caplog.at_level("WARNING", logger="isthmus.federation"):
            for i in range(50):
                url = f"{fed.url}/v1/clusters/x%0Aforged-{i}/lease"
                async with s.post(url) as r:
                    assert r.status == 403
    denied = [r.getMessage() for r in caplog.records if "denied" in r.getMessage()]
    assert 1 <= len(denied) <= 5, denied  # 50 requests, a few lines
    assert all("\n" not in m and "'/v1/clusters/x\\nforged-" in m for m in denied), denied


async def test_unauthenticated_write_and_read_are_401(fed: Fed) -> None:
    east = make_cluster("east-1")
    await fed.join(east)
    anon = fed.client()
    for call in (
        lambda: anon.put_export(east.export()),
        lambda: anon.grant_lease("east-1"),
        lambda: anon.catalog(),
        lambda: anon.watch(0, 0.1),
    ):
        with pytest.raises(FederationError) as e:
            await call()
        assert e.value.status == 401
        assert "client certificate required" in str(e.value)


async def test_cert_from_unknown_ca_is_refused(fed: Fed) -> None:
    await fed.join(make_cluster("east-1"))
    stranger = make_cluster("east-1")  # same name and trust domain, a CA nobody registered
    c = fed.client(stranger.svid)
    with pytest.raises(FederationError) as e:
        await c.grant_lease("east-1")
    # refused in the handshake (status None) or, if it completed, by verify_peer
    assert e.value.status in (None, 401)


def forge_svid(signer: CertificateAuthority, spiffe_id: str) -> Svid:
    """A leaf claiming `spiffe_id` but signed by `signer` (a CA of another trust domain)."""
    now = time.time()
    key = ec.generate_private_key(ec.SECP256R1())
    import datetime as dt

    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "forged")]))
        .issuer_name(x509.load_der_x509_certificate(signer.cert_der).subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(dt.datetime.fromtimestamp(now - 60, dt.UTC))
        .not_valid_after(dt.datetime.fromtimestamp(now + 3600, dt.UTC))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=False
        )
        .sign(signer._key, hashes.SHA256())
    )
    from federation.identity import SpiffeId

    return Svid(
        SpiffeId.parse(spiffe_id),
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        now - 60,
        now + 3600,
        cert.serial_number,
    )


async def test_svid_of_registered_domain_signed_by_other_ca_is_refused(fed: Fed) -> None:
    east, west = make_cluster("east-1"), make_cluster("west-1")
    await fed.join(east)
    await fed.join(west)
    # west's CA (trusted by the TLS layer) vouches for east's gateway ID: must not pass
    forged = forge_svid(west.ca, str(gateway_id(east.td)))
    c = fed.client(forged)
    with pytest.raises(FederationError) as e:
        await c.grant_lease("east-1")
    assert e.value.status == 401
    assert "not signed" in str(e.value)


async def test_non_gateway_svid_is_forbidden(fed: Fed) -> None:
    from federation.identity import SpiffeId

    east = make_cluster("east-1")
    await fed.join(east)
    other = east.ca.issue(SpiffeId.parse(f"spiffe://{east.td}/ns/default/sa/app"), time.time())
    with pytest.raises(FederationError) as e:
        await fed.client(other).grant_lease("east-1")
    assert e.value.status == 403


async def test_bundle_lower_sequence_is_409(fed: Fed) -> None:
    east = make_cluster("east-1")
    c = await fed.join(east, sequence=1)
    await c.put_bundle("east-1", east.bundle(3))
    with pytest.raises(FederationError) as e:
        await c.put_bundle("east-1", east.bundle(2))
    assert e.value.status == 409
    assert "2" in str(e.value) and "3" in str(e.value)
    cat = await c.catalog()
    assert cat.bundles[east.td]["spiffe_sequence"] == 3


async def test_bundle_of_another_trust_domain_is_400(fed: Fed) -> None:
    east, west = make_cluster("east-1"), make_cluster("west-1")
    c = await fed.join(east)
    with pytest.raises(FederationError) as e:
        await c.put_bundle("east-1", TrustBundle(east.td, (west.ca.cert_der,), 5))
    assert e.value.status == 400
    assert west.td in str(e.value)


async def test_set_svid_uses_new_certificate(fed: Fed) -> None:
    east = make_cluster("east-1")
    c = await fed.join(east)
    await c.grant_lease("east-1")
    c.set_svid(east.ca.issue(gateway_id(east.td), time.time()))
    await c.grant_lease("east-1")
    c.set_svid(None)
    with pytest.raises(FederationError) as e:
        await c.grant_lease("east-1")
    assert e.value.status == 401


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
        for params, field in (({"after": "x"}, "after"), ({"after": "0", "timeout": "5"}, "timeout")):
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


# ---- documents, admin, input ---------------------------------------------------------------


async def test_numbers_and_addresses_are_ascii_digits_only(fed: Fed) -> None:
    """`str.isdigit()` takes '¹', `int()` takes '٣٣', ' 1', '+1' and '1_0': each was a 500 or
    was stored as is. Now each is a 400 naming the field."""
    east = make_cluster("east-1")
    c = await fed.join(east)
    await c.grant_lease("east-1")
    bad_numbers = ("¹", "²", "٣", "٣٣", "+1", " 1", "1_0", "-1", "1.0", "9" * 20, "")
    async with raw_session(fed, east.svid) as s:
        for raw in (*bad_numbers, "0"):
            if not raw:
                continue
            async with s.put(f"{fed.url}/v1/clusters/east-1/lease/{raw}") as r:
                body = await r.json()
                assert r.status == 400 and body["error"].startswith("lease"), (raw, body)
        for raw in bad_numbers:
            async with s.get(f"{fed.url}/v1/watch", params={"after": raw, "timeout": "1ms"}) as r:
                body = await r.json()
                assert r.status == 400 and body["error"].startswith("after"), (raw, body)
        for raw in bad_numbers:
            if not raw:
                continue
            url = f"{fed.url}/v1/drills/d-20250101-000000-abcd/samples/east-1/{raw}"
            async with s.put(url, json={}) as r:
                body = await r.json()
                assert r.status == 400 and body["error"].startswith("second"), (raw, body)
        for address in ("127.0.0.1:²", "127.0.0.1:٣٣", "127.0.0.1:+80", "127.0.0.1: 80"):
            export = east.export().to_json()
            export["endpoints"][0]["address"] = address
            async with s.put(f"{fed.url}/v1/clusters/east-1/exports/default/web", json=export) as r:
                body = await r.json()
                assert r.status == 400, (address, body)
                assert body["error"].startswith("export.endpoints[0].address"), body
                assert "ASCII digits" in body["error"]
        async with s.get(f"{fed.url}/v1/drills/d-20250101-000000-abcd%0A") as r:
            assert r.status == 404  # a trailing newline is not part of a drill id
    assert (await c.catalog()).exports == {}
    async with raw_session(fed, None) as s:  # unauthenticated: the join (with a token)
        for address in ("127.0.0.1:²", "127.0.0.1:٣٣"):
            body = {"token": await fed.token("west-1"),
                    "cluster": {**make_cluster("west-1").record.to_json(),
                                "gateway_address": address},
                    "bundle": make_cluster("west-1").bundle().to_jwks()}
            async with s.post(f"{fed.url}/v1/join", json=body) as r:
                answer = await r.json()
                assert r.status == 400, answer
                assert answer["error"].startswith("cluster.gateway_address"), answer
        body = {"token": await fed.token("east-1"),
                "cluster": {**east.record.to_json(), "name": "east-1\n"},
                "bundle": east.bundle().to_jwks()}
        async with s.post(f"{fed.url}/v1/join", json=body) as r:
            assert r.status == 400 and "cluster.name" in (await r.json())["error"]
    assert "west-1" not in (await c.catalog()).clusters


async def test_openapi_covers_every_route(fed: Fed) -> None:
    doc = await fed.client().openapi()
    assert doc["openapi"].startswith("3.1")
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    app = fed.server._runners[0].app
    served = {
        (r.method, r.resource.canonical)
        for r in app.router.routes()
        if r.method != "HEAD"
    }
    assert served == documented
    refs = set(re.findall(r'"#/components/schemas/(\w+)"', json.dumps(doc)))
    assert refs <= set(doc["components"]["schemas"])


async def test_openapi_parameters_have_the_schemas_the_server_enforces(fed: Fed) -> None:
    doc = await fed.client().openapi()
    schemes = doc["components"]["securitySchemes"]
    assert set(schemes) == {"svid", "operator"}  # the join token is a body field, not a scheme
    assert doc["paths"]["/v1/join"]["post"]["security"] == []
    assert "join token" in doc["components"]["schemas"]["JoinRequest"]["properties"]["token"][
        "description"]
    seen: dict[str, dict] = {}
    for path, ops in doc["paths"].items():
        for op in ops.values():
            params = op.get("parameters", [])
            assert [p["name"] for p in params if p["in"] == "path"] == api.path_params(path)
            for p in params:
                assert p["schema"] != {"type": "string"}, (path, p)  # every one constrained
                seen[p["name"]] = p["schema"]
    assert set(seen) == {"name", "namespace", "service", "lease", "id", "cluster", "second",
                         "after", "timeout"}
    assert seen["lease"] == {**seen["lease"], "type": "integer", "minimum": 1,
                             "maximum": 2**63 - 1}
    assert seen["second"]["type"] == "integer" and seen["after"]["type"] == "integer"

    def doc_accepts(schema: dict, text: str) -> bool:
        if schema["type"] == "integer":
            return (re.fullmatch("[0-9]+", text) is not None
                    and schema["minimum"] <= int(text) <= schema["maximum"])
        return re.fullmatch(schema["pattern"].removeprefix("^").removesuffix("$"), text) is not None

    def server_accepts(check: Callable[[str], object], text: str) -> bool:
        try:
            check(text)
            return True
        except InputError:
            return False

    def drill_id(text: str) -> None:
        if not is_drill_id(text):
            raise InputError(f"{text!r} is not a drill id")

    checks = {
        "name": lambda t: check_name(t, "name"),
        "lease": lambda t: parse_int(t, "lease", 1, api.MAX_ID),
        "after": lambda t: parse_int(t, "after", 0, api.MAX_ID),
        "second": lambda t: parse_int(t, "second", 0, api.MAX_SECOND),
        "timeout": parse_duration,
        "id": drill_id,
    }
    samples = ("east-1", "a", "A", "-a", "a-", "a" * 63, "a" * 64, "east-1\n", "0", "1", "٣",
               "¹", "+1", " 1", "1_0", str(2**63 - 1), str(2**63), "999999999999",
               "1000000000000", "5s", " 5 s ", "1.5m", "5", "٣s", "5s\n", "1e3s", "-1s",
               "d-20250101-000000-abcd", "d-20250101-000000-abcd\n", "d-2025-000000-abcd")
    for name, check in checks.items():
        for text in samples:
            assert doc_accepts(seen[name], text) == server_accepts(check, text), (name, text)

    async with aiohttp.ClientSession() as s:
        async with s.get(f"{fed.admin_url}/metrics") as r:
            served = r.headers["Content-Type"]
    assert list(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == [served]


_SAMPLE = re.compile(
    r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="(\\.|[^"\\])*",?)*\})? -?[0-9.e+]+$'
)


async def test_metrics_are_prometheus_text(fed: Fed) -> None:
    east = make_cluster("east-1")
    c = await fed.join(east)
    await c.grant_lease("east-1")
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{fed.admin_url}/metrics") as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/plain")
            text = await r.text()
    names = set()
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            parts = line.split(" ", 3)
            assert len(parts) == 4
            if parts[1] == "TYPE":
                assert parts[3] in ("counter", "gauge")
            continue
        assert _SAMPLE.match(line), line
        names.add(re.split(r"[ {]", line)[0])
    assert {
        "isthmus_federation_requests_total",
        "isthmus_federation_authz_denied_total",
        "isthmus_federation_watchers",
        "isthmus_federation_revision",
        "isthmus_federation_clusters",
        "isthmus_federation_live_clusters",
    } <= names
    assert 'route="/v1/join",code="200"' in text
    assert "isthmus_federation_clusters 1" in text
    assert "isthmus_federation_live_clusters 1" in text


async def test_admin_endpoints_and_status(fed: Fed) -> None:
    east, west = make_cluster("east-1"), make_cluster("west-1", "us-west", "b")
    ce = await fed.join(east)
    await fed.join(west)
    await ce.grant_lease("east-1")
    await ce.put_export(east.export())
    async with aiohttp.ClientSession() as s:
        for path in ("/healthz", "/readyz"):
            async with s.get(fed.admin_url + path) as r:
                assert r.status == 200
        async with s.get(fed.admin_url + "/status") as r:
            st = await r.json()
        async with s.get(fed.admin_url + "/v1/catalog") as r:
            assert r.status == 404  # the admin listener serves admin endpoints only
    assert st["clusters"]["east-1"]["live"] is True
    assert st["clusters"]["west-1"]["live"] is False
    assert st["clusters"]["west-1"]["region"] == "us-west"
    assert 0 <= st["clusters"]["east-1"]["lease_age_seconds"] < 5
    assert st["services"]["default/web"]["east-1"][0]["healthy"] is True
    tls_status = await ce.status()
    assert tls_status["services"] == st["services"]
    assert tls_status["clusters"].keys() == st["clusters"].keys()
    with pytest.raises(FederationError) as e:
        await fed.client().status()
    assert e.value.status == 401
    async with raw_session(fed, None) as s:
        async with s.get(fed.url + "/healthz") as r:
            assert r.status == 200


async def test_malformed_and_oversize_bodies(fed: Fed) -> None:
    east = make_cluster("east-1")
    c = await fed.join(east)
    await c.grant_lease("east-1")
    url = f"{fed.url}/v1/clusters/east-1/exports/default/web"
    async with raw_session(fed, east.svid) as s:
        async with s.put(url, data=b"{not json", headers={"Content-Type": "application/json"}) as r:
            assert r.status == 400
            assert "not valid JSON" in (await r.json())["error"]
        bad = {**east.export().to_json(), "port": 0}
        async with s.put(url, json=bad) as r:
            assert r.status == 400
            assert "export.port" in (await r.json())["error"]
        async with s.put(url, data=b"x" * (api.MAX_BODY + 10)) as r:
            assert r.status == 413
            assert "1 MiB" in (await r.json())["error"]

        async def chunks():
            for _ in range(20):
                yield b" " * 65536
            yield b"{}"

        async with s.put(url, data=chunks()) as r:  # chunked: no Content-Length
            assert r.status == 413
            assert "1 MiB" in (await r.json())["error"]
    west = make_cluster("west-1")
    token = await fed.token("west-1")
    async with raw_session(fed, None) as s:
        body = {"token": "x", "cluster": {**west.record.to_json(), "zone": "A"}}
        async with s.post(f"{fed.url}/v1/join", json=body) as r:
            assert r.status == 401  # no valid token: nothing else is looked at
            assert "join token unknown" in (await r.json())["error"]
        async with s.post(f"{fed.url}/v1/join", json={"token": token, "cluster": {"name": "A"}}) as r:
            assert r.status == 400
            assert "bundle" in (await r.json())["error"]
        body = {"token": token, "cluster": {**west.record.to_json(), "zone": "A"},
                "bundle": west.bundle().to_jwks()}
        async with s.post(f"{fed.url}/v1/join", json=body) as r:
            assert r.status == 400
            assert "cluster.zone" in (await r.json())["error"]
    # a refused body did not use the token up: a good one still joins with it
    await fed.client().join(token, west.record, west.bundle())


async def test_restart_keeps_records(tmp_path: Path) -> None:
    fed = Fed(tmp_path)
    await fed.start()
    east = make_cluster("east-1")
    c = await fed.join(east, sequence=4)
    await c.grant_lease("east-1")
    await fed.stop()

    fed2 = Fed(tmp_path)
    await fed2.start()
    try:
        c2 = fed2.client(east.svid)  # same state dir: same federation CA
        cat = await c2.catalog()
        assert cat.clusters["east-1"] == east.record
        assert cat.bundles[east.td]["spiffe_sequence"] == 4
        with pytest.raises(FederationError) as e:
            await c2.put_bundle("east-1", east.bundle(3))
        assert e.value.status == 409
        lease, _ = await c2.grant_lease("east-1")
        assert await c2.keepalive("east-1", lease)
    finally:
        await fed2.stop()


async def test_restart_after_an_outage_longer_than_the_ttl_withdraws_nothing(
    tmp_path: Path,
) -> None:
    """A restarted federation knows nothing new about liveness: every stored lease gets a full
    ttl from the restart, so the gateways' next keepalives find them alive. (It used to expire
    them all at the reaper's first tick, 0.2 s after start, before anyone could renew.)"""
    now = [time.time()]
    fed = Fed(tmp_path, lease_ttl=1.0, clock=lambda: now[0])
    await fed.start()
    east = make_cluster("east-1")
    c = await fed.join(east)
    lease, _ = await c.grant_lease("east-1")
    await c.put_export(east.export())
    await fed.stop()

    now[0] += 30.0  # down for 30 ttls
    fed2 = Fed(tmp_path, lease_ttl=1.0, clock=lambda: now[0])
    await fed2.start()
    try:
        c2 = fed2.client(east.svid)
        before = await c2.catalog()
        assert before.live == {"east-1"}
        await asyncio.sleep(3 * REAP_INTERVAL)  # the reaper ran a few times
        now[0] += 0.9  # and most of a ttl passed: the gateway's keepalive is due about now
        await asyncio.sleep(2 * REAP_INTERVAL)
        after = await c2.catalog()
        assert after.live == {"east-1"} and after.revision == before.revision
        assert [e.cluster for e in after.exports.values()] == ["east-1"]
        assert await c2.keepalive("east-1", lease)  # the same lease: nothing to re-grant

        now[0] += 1.5  # nobody renews any more: withdrawn like any lapsed lease
        async def gone() -> bool:
            return (await c2.catalog()).live == frozenset()

        deadline = time.monotonic() + 5
        while not await gone():
            assert time.monotonic() < deadline, "east-1's lease never expired"
            await asyncio.sleep(REAP_INTERVAL)
        assert (await c2.catalog()).exports == {}
    finally:
        await fed2.stop()


async def test_unreachable_federation_names_url(tmp_path: Path) -> None:
    ca = CertificateAuthority.create("federation.isthmus.local", time.time())
    c = FederationClient("https://127.0.0.1:1", ca.bundle(0), timeout=2)
    try:
        with pytest.raises(FederationError) as e:
            await c.catalog()
        assert "https://127.0.0.1:1" in str(e.value) and e.value.status is None
    finally:
        await c.close()
