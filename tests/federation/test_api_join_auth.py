"""The federation API over real TLS 1.3 on 127.0.0.1: join, tokens, authorization, bundles."""

from __future__ import annotations

import time

import pytest

from federation.errors import FederationError
from federation.identity import TrustBundle, gateway_id
from federation.model import ClusterRecord
from tests.helpers.federation import Fed, forge_svid, make_cluster, raw_session

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
    assert "already used" in str(e.value)


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


async def test_rejoin_with_replace_token_replaces_bundle(fed: Fed) -> None:
    east = make_cluster("east-1")
    await fed.join(east, sequence=5)
    fresh = make_cluster("east-1")  # lost its state: a new CA; an operator's --replace token
    c = await fed.join(fresh, sequence=6, replace=True)
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
