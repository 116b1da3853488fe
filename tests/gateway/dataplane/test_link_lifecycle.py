"""Links outlive no certificate and no federation membership (gateway/core/links.py decides,
pool.py and l4.py act): replacement make-before-break on rotation (either side), GOAWAY, closing
on removal, revocation and expiry; on real sockets and real mutual TLS under uvloop (harness:
tests/helpers/mux.py). The decision's own table: tests/gateway/core/test_links.py.
"""

from __future__ import annotations

import asyncio
import time

from federation.ca import CertificateAuthority
from federation.identity import gateway_id
from gateway.dataplane.pool import EXPIRY_MARGIN, keep_links
from gateway.dataplane.tls import GatewayTls, TlsSnapshot
from tests.helpers.mux import gateways, only_link, until
from tests.helpers.relay import (
    HOST,
    SERVICE,
    closed_by_peer,
    connect,
    echo_server,
    on_uvloop,
    roundtrip,
)
from tests.helpers.tls import TD_A, TD_B, ca


def rotate(tls: GatewayTls, td: str, ttl: float = 86400.0):
    """A new SVID for `tls` (what the rotation loop does at half life)."""
    snap = tls.snapshot
    svid = ca(td).issue(gateway_id(td), time.time(), ttl)
    tls.update(TlsSnapshot(svid, snap.bundles, snap.owners))
    return svid


def remove(tls: GatewayTls, td: str) -> None:
    """The catalog no longer has the cluster of `td` (its record and bundle are gone)."""
    snap = tls.snapshot
    tls.update(TlsSnapshot(snap.svid, {k: v for k, v in snap.bundles.items() if k != td},
                           {k: v for k, v in snap.owners.items() if k != td}))


def keeping(stack, tls: GatewayTls, *sides, interval: float = 30.0) -> None:
    """Run the link sweep of `sides`; a long interval: only TLS changes wake it."""
    task = asyncio.get_running_loop().create_task(keep_links(tls, sides, interval))
    stack.callback(task.cancel)


@on_uvloop
async def test_our_rotation_replaces_the_link_first_and_the_old_stream_flows_to_its_end(stack):
    g = await gateways(stack, {SERVICE: await echo_server(stack)})
    keeping(stack, g.tls_a, g.pool)
    r1, w1 = await connect(stack, g.a[SERVICE].port)
    await roundtrip(r1, w1)
    old = only_link(g.pool)
    new_svid = rotate(g.tls_a, TD_A)
    await until(lambda: only_link(g.pool) is not old, what="a new link dialled")
    new = only_link(g.pool)
    assert new.facts.own_serial == new_svid.serial != old.facts.own_serial
    assert old.retired and not old.closed and old in g.pool.retired
    assert g.pool.stats.replaced == {"own-svid-rotated": 1}
    assert len(g.b.links) == 2
    for i in range(5):  # the stream stays on the retired link, still relaying
        await roundtrip(r1, w1, b"old stream %d" % i)
    assert len(old.streams) == 1 and not new.streams
    r2, w2 = await connect(stack, g.a[SERVICE].port)
    await roundtrip(r2, w2, b"new stream")
    assert len(new.streams) == 1
    rows = g.pool.describe(time.time())
    assert [r["state"] for r in rows] == ["active", "retired"]
    assert rows[1]["replaced_for"] == "own-svid-rotated"
    w1.write_eof()
    assert await asyncio.wait_for(r1.read(), 2.0) == b""
    await until(lambda: old.closed and len(g.b.links) == 1,
                what="the retired link closed after its last stream")
    assert not g.pool.retired and g.pool.stats.closed == {}
    await roundtrip(r2, w2, b"new link unaffected")


@on_uvloop
async def test_the_answerers_rotation_sends_goaway_and_the_caller_moves_to_its_new_svid(stack):
    g = await gateways(stack, {SERVICE: await echo_server(stack)})
    keeping(stack, g.tls_b, g.b)
    r1, w1 = await connect(stack, g.a[SERVICE].port)
    await roundtrip(r1, w1)
    old = only_link(g.pool)
    new_svid = rotate(g.tls_b, TD_B)
    await until(lambda: old.retired and only_link(g.pool) is not old,
                what="GOAWAY, and a new link dialled at once")
    new = only_link(g.pool)
    assert new.facts.peer_serial == new_svid.serial != old.facts.peer_serial
    assert g.b.link_stats.replaced == {"own-svid-rotated": 1}
    assert g.pool.stats.replaced == {"goaway": 1}
    await roundtrip(r1, w1, b"old stream, old link")
    r2, w2 = await connect(stack, g.a[SERVICE].port)
    await roundtrip(r2, w2, b"new stream")
    assert len(old.streams) == 1 and len(new.streams) == 1
    await asyncio.sleep(0.2)
    assert g.b.link_stats.replaced == {"own-svid-rotated": 1}  # one GOAWAY per link
    w1.close()
    await until(lambda: old.closed, what="the retired link closed after its last stream")


@on_uvloop
async def test_an_idle_link_told_goaway_is_followed_by_a_new_one_at_once(stack):
    """No stream holds the old link open (it closes on GOAWAY): the pool dials its successor
    anyway, without waiting for the next OPEN, and counts the replacement."""
    g = await gateways(stack, {SERVICE: await echo_server(stack)})
    keeping(stack, g.tls_b, g.b)
    assert await g.pool.ping("cluster-b", HOST, g.b.port, 2.0)
    old = only_link(g.pool)
    new_svid = rotate(g.tls_b, TD_B)
    await until(lambda: old.closed and g.pool.links and only_link(g.pool) is not old,
                what="the idle link closed and a new one dialled")
    assert only_link(g.pool).facts.peer_serial == new_svid.serial
    assert g.pool.stats.replaced == {"goaway": 1}


@on_uvloop
async def test_a_replaced_link_without_streams_closes_at_once_and_the_pool_closes_all(stack):
    g = await gateways(stack, {SERVICE: await echo_server(stack)})
    keeping(stack, g.tls_a, g.pool)
    assert await g.pool.ping("cluster-b", HOST, g.b.port, 2.0)
    idle = only_link(g.pool)
    rotate(g.tls_a, TD_A)
    await until(lambda: idle.closed and only_link(g.pool) is not idle,
                what="the idle link replaced and closed")
    r1, w1 = await connect(stack, g.a[SERVICE].port)
    await roundtrip(r1, w1)
    busy = only_link(g.pool)
    rotate(g.tls_a, TD_A)
    await until(lambda: only_link(g.pool) is not busy, what="the busy link replaced")
    assert not busy.closed
    await g.pool.close()
    await until(lambda: busy.closed and not g.b.links, what="every link of the pool closed")
    assert await closed_by_peer(r1)


@on_uvloop
async def test_a_removed_cluster_is_cut_off_at_once_and_refused(stack):
    """The answerer's catalog loses cluster-a: its links are aborted on that update (not on a
    later sweep), the stream on it is reset and counted, and a new handshake fails at the TLS
    layer (its CA is no longer in the server context)."""
    g = await gateways(stack, {SERVICE: await echo_server(stack)})
    keeping(stack, g.tls_b, g.b)
    r1, w1 = await connect(stack, g.a[SERVICE].port)
    await roundtrip(r1, w1)
    ctx_before = g.tls_b.server_context
    t0 = time.monotonic()
    remove(g.tls_b, TD_A)
    assert g.tls_b.server_context is not ctx_before
    assert await closed_by_peer(r1)
    assert time.monotonic() - t0 < 1.0
    assert g.b.link_stats.closed == {"cluster-removed": 1}
    assert g.b.link_stats.streams_reset == 1 and not g.b.links
    failed = g.b.handshake_failed
    t1 = time.monotonic()
    r2, w2 = await connect(stack, g.a[SERVICE].port)
    w2.write(b"refused")
    assert await closed_by_peer(r2)
    assert time.monotonic() - t1 < 1.0  # refused at once, not after connect_timeout (2 s)
    assert g.b.handshake_failed == failed + 1 and not g.b.links
    assert g.a[SERVICE].stats.failed == 1


@on_uvloop
async def test_the_caller_drops_its_links_to_a_removed_cluster_and_dials_none(stack):
    g = await gateways(stack, {SERVICE: await echo_server(stack)})
    keeping(stack, g.tls_a, g.pool)
    r1, w1 = await connect(stack, g.a[SERVICE].port)
    await roundtrip(r1, w1)
    remove(g.tls_a, TD_B)
    assert await closed_by_peer(r1)
    assert g.pool.stats.closed == {"cluster-removed": 1} and g.pool.stats.streams_reset == 1
    await until(lambda: not g.pool.links and not g.b.links, what="the link gone on both sides")
    assert not await g.pool.ping("cluster-b", HOST, g.b.port, 1.0)  # no bundle: no dial
    assert not g.b.links


@on_uvloop
async def test_a_peer_whose_authority_was_replaced_is_revoked(stack):
    """cluster-a's bundle now holds another CA: its SVID no longer verifies, so its link is
    closed as revoked, and a new handshake with that SVID fails."""
    g = await gateways(stack, {SERVICE: await echo_server(stack)})
    keeping(stack, g.tls_b, g.b)
    r1, w1 = await connect(stack, g.a[SERVICE].port)
    await roundtrip(r1, w1)
    snap = g.tls_b.snapshot
    other = CertificateAuthority.create(TD_A, time.time()).bundle(2)
    g.tls_b.update(TlsSnapshot(snap.svid, {**snap.bundles, TD_A: other}, snap.owners))
    assert await closed_by_peer(r1)
    assert g.b.link_stats.closed == {"revoked": 1}
    r2, w2 = await connect(stack, g.a[SERVICE].port)
    w2.write(b"refused")
    assert await closed_by_peer(r2)
    assert not g.b.links


@on_uvloop
async def test_a_link_is_closed_before_a_certificate_of_it_expires(stack):
    """a's SVID lives 6 s and is never rotated: its link is replaced at half life (the new one
    has the same certificate, and is not replaced again), and both are closed EXPIRY_MARGIN
    before it expires; the stream still open is reset then, never carried past expiry."""
    g = await gateways(stack, {SERVICE: await echo_server(stack)})
    svid = rotate(g.tls_a, TD_A, ttl=6)
    keeping(stack, g.tls_a, g.pool, interval=0.1)
    r1, w1 = await connect(stack, g.a[SERVICE].port)
    await roundtrip(r1, w1)
    last_ok = time.time()
    while True:
        try:
            await roundtrip(r1, w1, b"tick")
            last_ok = time.time()
        except (AssertionError, ConnectionError, asyncio.IncompleteReadError):
            break
        await asyncio.sleep(0.05)
        assert time.time() < svid.not_after + 1, "the stream outlived the certificate"
    cut = time.time()
    print(f"\nSVID expires {svid.not_after - cut:.2f} s after the stream was cut (last reply "
          f"{svid.not_after - last_ok:.2f} s before); {g.pool.stats}")
    assert cut < svid.not_after and svid.not_after - cut < EXPIRY_MARGIN + 0.5
    assert g.pool.stats.replaced == {"half-life": 1}
    assert g.pool.stats.closed.get("own-cert-expired", 0) >= 1
    assert g.pool.stats.streams_reset >= 1


def test_gateway_tls_update_rebuilds_the_server_context_only_on_a_change():
    tls_a = gateways_tls()
    ctx, snap = tls_a.server_side()
    tls_a.update(TlsSnapshot(snap.svid, dict(snap.bundles), dict(snap.owners)))  # same catalog
    assert tls_a.server_context is ctx and not tls_a.changed.is_set()
    remove(tls_a, TD_B)
    assert tls_a.server_context is not ctx and tls_a.changed.is_set()
    assert TD_B not in tls_a.server_side()[1].bundles


def gateways_tls() -> GatewayTls:
    from tests.helpers.tls import tls_pair

    return tls_pair()[0]
