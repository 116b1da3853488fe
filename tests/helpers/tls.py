"""Test trust domains and gateway TLS: one CA per trust domain, SVIDs issued now."""

from __future__ import annotations

import time

from federation.ca import CertificateAuthority
from federation.identity import TrustBundle, gateway_id
from gateway.dataplane.tls import GatewayTls, TlsSnapshot

TD_A, TD_B = "a.isthmus.local", "b.isthmus.local"


NOW = time.time()
_CAS: dict[str, CertificateAuthority] = {}


def ca(td: str) -> CertificateAuthority:
    if td not in _CAS:
        _CAS[td] = CertificateAuthority.create(td, NOW)
    return _CAS[td]


def snapshot(own_td: str, bundles: dict[str, TrustBundle], owners: dict[str, str], svid_ca=None):
    svid = (svid_ca or ca(own_td)).issue(gateway_id(own_td), NOW)
    return TlsSnapshot(svid, bundles, owners)


def tls_pair() -> tuple[GatewayTls, GatewayTls]:
    bundles = {TD_A: ca(TD_A).bundle(1), TD_B: ca(TD_B).bundle(1)}
    owners = {TD_A: "cluster-a", TD_B: "cluster-b"}
    return (
        GatewayTls(snapshot(TD_A, bundles, owners), time.time),
        GatewayTls(snapshot(TD_B, bundles, owners), time.time),
    )
