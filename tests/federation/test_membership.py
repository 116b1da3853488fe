"""Membership over real TLS 1.3 on 127.0.0.1: re-join needs proof or --replace, bundle sequence
rules, record updates, cluster removal (trust withdrawn at the TLS layer too), join tokens."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from federation.errors import FederationError, InputError
from federation.identity import TrustBundle, gateway_id
from federation.model import ClusterRecord
from federation.server.tokens import MAX_TOKEN_TTL, create_token, list_tokens, revoke_tokens
from tests.helpers.federation import Fed, make_cluster

# ---- re-join ------------------------------------------------------------------------------------


async def test_ordinary_token_cannot_take_over_a_joined_cluster(fed: Fed, caplog) -> None:
    real = make_cluster("d2")
    rc = await fed.join(real, sequence=3)
    await rc.grant_lease("d2")
    impostor = make_cluster("d2")  # same name and trust domain, its own CA
    token = await fed.token("d2")
    with caplog.at_level(logging.WARNING, "isthmus.federation"), \
            pytest.raises(FederationError) as e:
        await fed.client().join(token, impostor.record, impostor.bundle(9))
    assert e.value.status == 409
    assert "--replace" in str(e.value) and "prove" in str(e.value)
    assert any("re-join of cluster 'd2' refused" in r.getMessage() for r in caplog.records)
    # nothing changed: the real d2 keeps its bundle and its lease; the impostor is refused
    cat = await rc.catalog()
    held = TrustBundle.from_jwks(real.td, dict(cat.bundles[real.td]))
    assert held.authorities == (real.ca.cert_der,) and held.sequence == 3
    await rc.grant_lease("d2")
    with pytest.raises(FederationError):
        await fed.client(impostor.svid).grant_lease("d2")
    # the token was kept for a gateway that can prove it is d2
    proved = await fed.client().join(token, real.record, real.bundle(3), prove_with=real.svid)
    assert proved["lease_ttl"] == fed.lease_ttl


async def test_rejoin_with_proof_follows_the_sequence_rules(fed: Fed) -> None:
    east = make_cluster("east-1")
    await fed.join(east, sequence=10)
    fresh_svid = east.ca.issue(gateway_id(east.td), time.time())  # same CA, a new SVID
    # a rollback by re-joining is refused, and says what is held
    token = await fed.token("east-1")
    with pytest.raises(FederationError) as e:
        await fed.client().join(token, east.record, east.bundle(1), prove_with=fresh_svid)
    assert e.value.status == 409 and e.value.body["held_sequence"] == 10
    # the same bundle at the same sequence, or a higher one, is fine
    await fed.client().join(token, east.record, east.bundle(10), prove_with=fresh_svid)
    await fed.client().join(await fed.token("east-1"), east.record, east.bundle(11),
                            prove_with=fresh_svid)


async def test_a_proof_is_bound_to_its_token_and_bundle(fed: Fed) -> None:
    east, other = make_cluster("east-1"), make_cluster("west-1")
    await fed.join(east)
    await fed.join(other)
    token = await fed.token("east-1")
    c = fed.client()
    # signed by another cluster's SVID
    with pytest.raises(FederationError) as e:
        await c.join(token, east.record, east.bundle(2), prove_with=other.svid)
    assert e.value.status == 409 and "proof" in str(e.value)
    # a proof made for another bundle cannot be moved to this one
    from federation import api
    from federation.proof import message, sign_proof

    proof = sign_proof(east.svid, message(token, "east-1", api.canonical_json(
        east.bundle(7).to_jwks())))
    body = {"token": token, "cluster": east.record.to_json(), "bundle": east.bundle(8).to_jwks(),
            "proof": proof}
    with pytest.raises(FederationError) as e:
        await c._ok("POST", "/v1/join", body)
    assert e.value.status == 409 and "signature" in str(e.value)


async def test_replace_token_is_an_explicit_logged_takeover(fed: Fed, caplog) -> None:
    old = make_cluster("d2")
    await fed.join(old, sequence=4)
    new = make_cluster("d2")
    new.record = ClusterRecord("d2", "us-east", "b", "d2-new.isthmus.local", "127.0.0.1:1")
    from federation.ca import CertificateAuthority

    new.ca = CertificateAuthority.create("d2-new.isthmus.local", time.time())
    new.svid = new.ca.issue(gateway_id("d2-new.isthmus.local"), time.time())
    new.td = "d2-new.isthmus.local"
    with caplog.at_level(logging.WARNING, "isthmus.federation"):
        c = await fed.join(new, sequence=1, replace=True)
    assert any("REPLACED" in r.getMessage() for r in caplog.records)
    await c.grant_lease("d2")
    cat = await c.catalog()
    assert old.td not in cat.bundles and new.td in cat.bundles
    with pytest.raises(FederationError):
        await fed.client(old.svid).grant_lease("d2")


# ---- bundles and records ------------------------------------------------------------------------


async def test_changed_bundle_at_the_same_sequence_is_409(fed: Fed) -> None:
    east = make_cluster("east-1")
    c = await fed.join(east, sequence=5)
    before = await c.put_bundle("east-1", east.bundle(5))  # the same again: accepted, no write
    assert before == await c.put_bundle("east-1", east.bundle(5))
    both = TrustBundle(east.td, (east.ca.cert_der, make_cluster("east-1").ca.cert_der), 5)
    with pytest.raises(FederationError) as e:
        await c.put_bundle("east-1", both)
    assert e.value.status == 409 and e.value.body["held_sequence"] == 5
    assert "higher sequence" in str(e.value)
    await c.put_bundle("east-1", TrustBundle(east.td, both.authorities, 6))


async def test_cluster_republishes_its_record(fed: Fed) -> None:
    east, west = make_cluster("east-1"), make_cluster("west-1")
    ce = await fed.join(east)
    await fed.join(west)
    moved = ClusterRecord("east-1", "us-east", "c", east.td, "127.0.0.2:16443")
    await ce.put_record(moved)
    assert (await ce.catalog()).clusters["east-1"] == moved
    with pytest.raises(FederationError) as e:
        await ce.put_record(ClusterRecord("east-1", "us-east", "c", "other.td", "127.0.0.2:1"))
    assert e.value.status == 409 and "--replace" in str(e.value)
    with pytest.raises(FederationError) as e:
        await ce.put_record(west.record)
    assert e.value.status == 403


# ---- removal ------------------------------------------------------------------------------------


async def test_operator_removes_a_cluster_and_its_trust(fed: Fed, caplog) -> None:
    east, west = make_cluster("east-1"), make_cluster("west-1")
    ce = await fed.join(east)
    cw = await fed.join(west)
    await ce.grant_lease("east-1")
    await ce.put_export(east.export())
    await fed.token("east-1")  # an unused token: revoked with the cluster
    with pytest.raises(FederationError) as e:
        await cw.remove_cluster("east-1")
    assert e.value.status == 403
    op = fed.operator()
    with pytest.raises(FederationError) as e:
        await op.remove_cluster("nope")
    assert e.value.status == 404 and "east-1" in str(e.value)
    with caplog.at_level(logging.WARNING):
        out = await op.remove_cluster("east-1")
    assert out["removed"] == "east-1" and out["revoked_tokens"] == 1
    assert out["deleted_keys"] >= 4  # export, live, bundle, record
    cat = await cw.catalog()
    assert "east-1" not in cat.clusters and east.td not in cat.bundles
    assert all(e.cluster != "east-1" for e in cat.exports.values())
    assert "east-1" not in cat.live
    # its SVID opens nothing: a new connection is refused by the rebuilt TLS context (a TLS
    # alert, counted and logged) -- not only by the request's authorization
    site = fed.server._sites["api"]
    refused = site.stats.certificates_refused
    gone = fed.client(east.svid)
    with pytest.raises(FederationError) as e:
        await gone.grant_lease("east-1")
    assert e.value.status is None
    assert site.stats.certificates_refused == refused + 1
    assert any("refused the client certificate" in r.getMessage() for r in caplog.records)
    assert any("cluster east-1 removed" in r.getMessage() for r in caplog.records)
    # it may join again, with a new token
    await fed.join(east)


# ---- tokens -------------------------------------------------------------------------------------


async def test_tokens_are_bounded_listed_revoked_one_per_cluster(fed: Fed) -> None:
    store, now = fed.server.store, time.time()
    with pytest.raises(InputError):
        await create_token(store, "east-1", MAX_TOKEN_TTL + 1, now)
    with pytest.raises(InputError):
        await create_token(store, "east-1", 0, now)
    first, _ = await create_token(store, "east-1", 60, now)
    second, revoked = await create_token(store, "east-1", 60, now)
    assert len(revoked) == 1  # the first one is gone
    await create_token(store, "west-1", 60, now, replace=True)
    tokens = await list_tokens(store)
    assert sorted((t.cluster, t.replace) for t in tokens) == [("east-1", False), ("west-1", True)]
    east = make_cluster("east-1")
    with pytest.raises(FederationError) as e:
        await fed.client().join(first, east.record, east.bundle())
    assert e.value.status == 401
    west_id = next(t.id for t in tokens if t.cluster == "west-1")
    with pytest.raises(InputError):
        await revoke_tokens(store, token_id="zz")
    assert [t.cluster for t in await revoke_tokens(store, token_id=west_id[:6])] == ["west-1"]
    assert [t.cluster for t in await revoke_tokens(store, cluster="east-1")] == ["east-1"]
    with pytest.raises(FederationError):
        await fed.client().join(second, east.record, east.bundle())
    assert await list_tokens(store) == []


async def test_trust_of_a_silent_cluster_expires(make_fed, caplog) -> None:
    fed = await make_fed(forget_silent_after=1.2)  # lease ttl 1 s; checked every 0.3 s
    east, west = make_cluster("east-1"), make_cluster("west-1")
    ce = await fed.join(east)
    cw = await fed.join(west)
    await ce.grant_lease("east-1")
    west_lease, _ = await cw.grant_lease("west-1")
    deadline = time.monotonic() + 6.0
    with caplog.at_level(logging.WARNING):
        while time.monotonic() < deadline:  # west-1 renews; east-1 went silent
            assert await cw.keepalive("west-1", west_lease)
            if "east-1" not in (await cw.catalog()).clusters:
                break
            await asyncio.sleep(0.2)
    cat = await cw.catalog()
    assert "east-1" not in cat.clusters and east.td not in cat.bundles
    assert "west-1" in cat.clusters
    assert any("silent (no lease)" in r.getMessage() for r in caplog.records)
