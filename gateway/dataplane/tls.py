"""The gateway's TLS material: one SVID, the bundles it trusts, contexts built from them.

A snapshot (`TlsSnapshot`) holds the SVID, the bundle of every trust domain and which cluster
owns which trust domain. An update replaces the whole snapshot; nothing is mutated under a
lock. The inbound listener has one server context, changed in place (`reload_server_context`)
so a rotated SVID or a new cluster's CA applies to new handshakes while open connections keep
theirs. Outbound, each remote cluster gets a client context that trusts *its* bundle only,
cached until that bundle or our SVID changes.

Authorization is always the per-trust-domain check `verify_peer` after the handshake: the
peer must be exactly `spiffe://<td>/ns/isthmus-system/sa/gateway` of a trust domain that a
known cluster owns.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from federation.errors import IdentityError
from federation.identity import Svid, TrustBundle, gateway_id
from federation.tls import (
    client_context,
    peer_cert_der,
    reload_server_context,
    server_context,
    verify_peer,
)


@dataclass(frozen=True)
class TlsSnapshot:
    svid: Svid
    bundles: Mapping[str, TrustBundle]  # trust domain -> bundle
    owners: Mapping[str, str] = field(default_factory=dict)  # trust domain -> cluster name

    def trust_domain_of(self, cluster: str) -> str:
        for td, owner in self.owners.items():
            if owner == cluster:
                return td
        raise LookupError(f"no trust domain known for cluster {cluster!r}")


class GatewayTls:
    def __init__(self, snapshot: TlsSnapshot, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.snapshot = snapshot
        self.server_context = server_context(snapshot.svid, snapshot.bundles.values())
        self._clients: dict[str, tuple[tuple, ssl.SSLContext]] = {}

    def update(self, snapshot: TlsSnapshot) -> None:
        old = self.snapshot
        self.snapshot = snapshot
        added = [b for td, b in snapshot.bundles.items() if old.bundles.get(td) != b]
        svid = snapshot.svid if snapshot.svid is not old.svid else None
        if added or svid is not None:
            reload_server_context(self.server_context, svid=svid, trust=added)

    def identify(self, ssl_object: Any) -> str:
        """The cluster of an inbound peer, or IdentityError saying why not."""
        snap = self.snapshot
        sid = verify_peer(peer_cert_der(ssl_object), snap.bundles, self.clock())
        td = sid.trust_domain.name
        cluster = snap.owners.get(td)
        if cluster is None:
            raise IdentityError(f"peer {sid}: trust domain {td!r} belongs to no federated cluster")
        if sid != gateway_id(td):
            raise IdentityError(f"peer {sid} is not the gateway of {cluster} ({gateway_id(td)})")
        return cluster

    def for_peer(self, cluster: str) -> tuple[ssl.SSLContext, Callable[[Any], None]]:
        """Client context trusting only `cluster`'s bundle, and the post-handshake check."""
        snap = self.snapshot
        td = snap.trust_domain_of(cluster)
        bundle = snap.bundles.get(td)
        if bundle is None:
            raise LookupError(f"no trust bundle for cluster {cluster!r} ({td})")
        version = (bundle.sequence, bundle.authorities, snap.svid.serial)
        cached = self._clients.get(cluster)
        if cached is None or cached[0] != version:
            cached = (version, client_context(snap.svid, bundle))
            self._clients[cluster] = cached
        expected = gateway_id(td)

        def verify(ssl_object: Any) -> None:
            verify_peer(peer_cert_der(ssl_object), {td: bundle}, self.clock(), expected)

        return cached[1], verify
