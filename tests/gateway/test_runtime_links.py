"""Revocation through the runtime: a catalog without a cluster (its record and bundle gone, as
`isthmus federation cluster remove` leaves it) applied to a real in-process Gateway
(`apply_catalog`) cuts that cluster's links at once and refuses its new handshakes. Real
sockets and mutual TLS; nothing else of the gateway is started."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from federation.ca import CertificateAuthority
from federation.identity import gateway_id
from federation.model import Catalog, ClusterRecord
from gateway.config.schema import parse_config
from gateway.control.agent import Identity
from gateway.dataplane.dial import Dialer
from gateway.dataplane.l4 import InboundListener
from gateway.dataplane.pool import LinkPool, keep_links
from gateway.dataplane.tls import GatewayTls, TlsSnapshot
from gateway.runtime import Gateway
from tests.helpers.relay import HOST, eventually, on_uvloop

TEXT = """\
cluster: {name: east-1, region: us-east, zone: a}
federation: {url: "https://127.0.0.1:9", ca_file: ca.pem}
listen: {inbound: "127.0.0.1:15443", admin: "127.0.0.1:15000"}
state_dir: state
exports:
  - {name: echo, port: 8080, endpoints: ["127.0.0.1:19001"], allowed_consumers: [east-2]}
"""
TD_2 = "east-2.isthmus.local"


def gateway(root: Path) -> Gateway:
    """A Gateway with its identity and TLS built as start() builds them, nothing bound."""
    cfg = parse_config(TEXT, root / "gateway.yaml")
    g = Gateway(cfg)
    g.identity = Identity(cfg, time.time())
    td = cfg.cluster.trust_domain
    g.tls = GatewayTls(TlsSnapshot(g.identity.svid, {td: g.identity.bundle}, {td: "east-1"}),
                       time.time)
    g._build_routers()
    return g


@on_uvloop
async def test_a_cluster_removed_from_the_catalog_loses_its_links_at_once(stack, tmp_path):
    g = gateway(tmp_path)
    ca2 = CertificateAuthority.create(TD_2, time.time())
    record = ClusterRecord("east-2", "us-east", "b", TD_2, "127.0.0.1:9")
    g.apply_catalog(Catalog(revision=1, clusters={"east-2": record},
                            bundles={TD_2: ca2.bundle(1).to_jwks()}))
    inbound = InboundListener(g.tls, g.export_routers.get, Dialer(g.tls, 2.0),
                              max_connections=10, idle_timeout=30.0)
    await inbound.start(HOST, 0)
    stack.push_async_callback(inbound.close)
    sweeps = asyncio.get_running_loop().create_task(keep_links(g.tls, [inbound], 30.0))
    stack.callback(sweeps.cancel)
    # east-2's side: its SVID, east-1's bundle as its catalog has it
    td_1 = g.identity.bundle.trust_domain
    tls2 = GatewayTls(TlsSnapshot(ca2.issue(gateway_id(TD_2), time.time()),
                                  {TD_2: ca2.bundle(1), td_1: g.identity.bundle},
                                  {TD_2: "east-2", td_1: "east-1"}), time.time)
    pool = LinkPool(tls2, 2.0)
    stack.push_async_callback(pool.close)
    assert await pool.ping("east-1", HOST, inbound.port, 2.0)
    (link,) = inbound.links
    assert link.facts.peer == "east-2"

    t0 = time.monotonic()
    g.apply_catalog(Catalog(revision=2))  # east-2's record and bundle are gone
    await eventually(lambda: not inbound.links and not pool.links, 1.0,
                     what="east-2's link aborted on the catalog update")
    assert time.monotonic() - t0 < 1.0  # on the update itself, not on a 30 s sweep
    assert inbound.link_stats.closed == {"cluster-removed": 1}
    assert TD_2 not in g.tls.snapshot.bundles

    failed = inbound.handshake_failed
    t1 = time.monotonic()
    assert not await pool.ping("east-1", HOST, inbound.port, 2.0)
    assert time.monotonic() - t1 < 1.0
    assert inbound.handshake_failed == failed + 1  # its CA is gone from the server context
    assert not inbound.links
