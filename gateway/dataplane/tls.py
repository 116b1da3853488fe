"""The gateway's TLS material: one SVID, the bundles it trusts, contexts built from them.

A snapshot (`TlsSnapshot`) holds the SVID, the bundle of every trust domain and which cluster
owns which trust domain. An update replaces the whole snapshot; nothing is mutated under a
lock. The inbound listener's server context is rebuilt from the new snapshot whenever our SVID
or any bundle changes, so a rotated SVID or a new cluster's CA applies to new handshakes, and a
removed bundle or authority stops being accepted at the TLS layer at once (a context cannot
drop a CA in place); open connections keep the context they negotiated with (`server_side`
pairs each context with the snapshot it was built from). Outbound, each remote cluster gets a
client context that trusts *its* bundle only, cached until that bundle or our SVID changes.

Authorization is always the per-trust-domain check `verify_peer` after the handshake: the
peer must be exactly `spiffe://<td>/ns/isthmus-system/sa/gateway` of a trust domain that a
known cluster owns. What a link was authenticated with is recorded as its `LinkFacts`, and
`judge` asks gateway/core/links.py whether the link may go on now (keep, replace, close). An
update that changes anything sets `changed`, which wakes the link sweep (pool.keep_links).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

from federation.errors import IdentityError, IsthmusError
from federation.identity import Svid, TrustBundle, gateway_id, verify_svid
from federation.tls import client_context, peer_cert_der, server_context, verify_peer
from gateway.core.links import LinkFacts, LinkNow, Verdict, decide, same_bundle


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
        self._server = (server_context(snapshot.svid, snapshot.bundles.values()), snapshot)
        self._clients: dict[str, tuple[tuple, ssl.SSLContext]] = {}
        self._verified: dict[tuple, bool] = {}  # (peer cert, td, bundle) -> verifies (judge)
        self.changed = asyncio.Event()  # set by an update that changed anything

    @property
    def server_context(self) -> ssl.SSLContext:
        return self._server[0]

    def server_side(self) -> tuple[ssl.SSLContext, TlsSnapshot]:
        """The server context for a new handshake, and the snapshot it was built from."""
        return self._server

    def update(self, snapshot: TlsSnapshot) -> None:
        old = self.snapshot
        self.snapshot = snapshot
        svid_changed = snapshot.svid is not old.svid
        trust_changed = snapshot.bundles.keys() != old.bundles.keys() or any(
            not same_bundle(b, old.bundles.get(td)) for td, b in snapshot.bundles.items())
        if svid_changed or trust_changed:
            # rebuilt, not changed in place: a removed CA must stop being accepted
            self._server = (server_context(snapshot.svid, snapshot.bundles.values()), snapshot)
            self._clients = {c: v for c, v in self._clients.items()
                             if c in snapshot.owners.values()}
        if svid_changed or trust_changed or snapshot.owners != old.owners:
            self._verified.clear()
            self.changed.set()

    def identify(self, ssl_object: Any) -> str:
        """The cluster of an inbound peer, or IdentityError saying why not."""
        return self._identify(ssl_object)[0]

    def _identify(self, ssl_object: Any) -> tuple[str, str]:
        snap = self.snapshot
        sid = verify_peer(peer_cert_der(ssl_object), snap.bundles, self.clock())
        td = sid.trust_domain.name
        cluster = snap.owners.get(td)
        if cluster is None:
            raise IdentityError(f"peer {sid}: trust domain {td!r} belongs to no federated cluster")
        if sid != gateway_id(td):
            raise IdentityError(f"peer {sid} is not the gateway of {cluster} ({gateway_id(td)})")
        return cluster, td

    def identify_link(self, ssl_object: Any, presented: Svid) -> LinkFacts:
        """An inbound link's facts (its peer identified as `identify` does); `presented`: our
        SVID in the server context its handshake used (`server_side`)."""
        cluster, td = self._identify(ssl_object)
        return _facts("answerer", cluster, td, peer_cert_der(ssl_object), presented,
                      self.snapshot.bundles[td], self.clock())

    def for_peer(self, cluster: str) -> tuple[ssl.SSLContext, Callable[[Any], LinkFacts]]:
        """Client context trusting only `cluster`'s bundle, and the post-handshake check, which
        returns the link's facts."""
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
        svid = snap.svid

        def verify(ssl_object: Any) -> LinkFacts:
            der = peer_cert_der(ssl_object)
            now = self.clock()
            verify_peer(der, {td: bundle}, now, expected)
            return _facts("caller", cluster, td, der, svid, bundle, now)

        return cached[1], verify

    def judge(self, facts: LinkFacts, margin: float = 0.0) -> Verdict:
        """Whether a link authenticated with `facts` may go on now (gateway/core/links.py)."""
        snap = self.snapshot
        td = facts.trust_domain
        bundle = snap.bundles.get(td) if snap.owners.get(td) == facts.peer else None
        verifies = True
        if bundle is not None and not same_bundle(bundle, facts.bundle):
            key = (facts.peer_cert, td, bundle.sequence, bundle.authorities)
            verifies = self._verified.get(key)  # type: ignore[assignment]
            if verifies is None:
                # checked within the cert's validity: expiry is the core's own rule
                at = min(self.clock(), facts.peer_not_after)
                try:
                    verify_svid(facts.peer_cert, bundle, at)
                    verifies = True
                except IsthmusError:
                    verifies = False
                self._verified[key] = verifies
        return decide(facts, LinkNow(snap.svid.serial, bundle, verifies), self.clock(), margin)


def _facts(role: str, cluster: str, td: str, der: bytes | None, own: Svid, bundle: TrustBundle,
           now: float) -> LinkFacts:
    if der is None:  # verify_peer refused it already
        raise IdentityError("peer presented no certificate")
    cert = x509.load_der_x509_certificate(der)
    return LinkFacts(role, cluster, td, der, cert.serial_number,
                     cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp(),
                     own.serial, own.not_before, own.not_after, bundle, now)
