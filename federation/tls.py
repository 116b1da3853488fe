"""TLS 1.3 contexts from SVIDs and trust bundles, and peer authorization after the handshake.

Theory of operation
-------------------
OpenSSL checks the chain during the handshake; `verify_peer` then decides who the peer is. A
server needs one CA store to request and check client certificates, so `server_context` loads
the authorities of every trusted trust domain into it. That store alone would let a CA of trust
domain B vouch for an ID in trust domain A, so it is NOT the authorization: after the handshake
the caller runs `verify_peer`, which takes the SPIFFE ID the certificate claims and checks it
against the bundle of *that* trust domain only (bundles are never merged).

A client dials one known peer, so `client_context` trusts that peer's bundle only; callers still
run `verify_peer(..., expected=...)` to pin the peer's SPIFFE ID (hostname checks are off: SVIDs
name workloads, not hosts).

`reload_server_context` changes a live context in place: a new SVID (rotation) applies to new
handshakes while open connections keep the one they negotiated, and new bundles add CAs for
newly joined clusters. CAs cannot be removed in place; a CA left in the store after its cluster
leaves only lets a handshake finish -- `verify_peer` with the current bundle map still refuses
the peer. Rebuild the context to drop CAs.

`ssl` loads keys only from files, so `_load_svid` writes the SVID into a fresh private
directory (0700, key 0600), loads it and deletes both at once.
"""

from __future__ import annotations

import shutil
import ssl
import tempfile
from collections.abc import Iterable, Mapping
from typing import Any

from federation.errors import IdentityError
from federation.identity import SpiffeId, Svid, TrustBundle, spiffe_id_of, verify_svid

__all__ = [
    "server_context",
    "reload_server_context",
    "client_context",
    "peer_cert_der",
    "verify_peer",
]


def _tls13(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    return ctx


def _load_svid(ctx: ssl.SSLContext, svid: Svid) -> None:
    """Load the SVID's cert and key into ctx through a private temp dir, removed right after."""
    tmp = tempfile.mkdtemp(prefix="isthmus-svid-")  # created 0700
    try:
        cert_path, key_path = svid.write(tmp)  # key written 0600
        ctx.load_cert_chain(cert_path, key_path)
    except ssl.SSLError as e:
        raise IdentityError(
            f"SVID {svid.spiffe_id}: TLS refused the certificate/key: {e}"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_trust(ctx: ssl.SSLContext, trust: Iterable[TrustBundle]) -> None:
    pem = "".join(b.to_pem() for b in trust)
    if pem:
        ctx.load_verify_locations(cadata=pem)


def server_context(
    svid: Svid, trust: Iterable[TrustBundle], require_client_cert: bool = True
) -> ssl.SSLContext:
    """A TLS 1.3 server context presenting `svid` and asking clients for certs from `trust`.

    An empty `trust` loads no CA: with `require_client_cert` every client then fails.
    """
    ctx = _tls13(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    _load_trust(ctx, trust)
    _load_svid(ctx, svid)
    return ctx


def reload_server_context(
    ctx: ssl.SSLContext, svid: Svid | None = None, trust: Iterable[TrustBundle] = ()
) -> None:
    """In place: `svid` for new handshakes (open connections keep theirs); add `trust` CAs."""
    _load_trust(ctx, trust)
    if svid is not None:
        _load_svid(ctx, svid)


def client_context(svid: Svid | None, peer_bundle: TrustBundle) -> ssl.SSLContext:
    """A TLS 1.3 client context trusting `peer_bundle` only; presents `svid` if given."""
    ctx = _tls13(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    ctx.verify_mode = ssl.CERT_REQUIRED
    _load_trust(ctx, [peer_bundle])
    if svid is not None:
        _load_svid(ctx, svid)
    return ctx


def peer_cert_der(ssl_object: Any) -> bytes | None:
    """The peer's certificate (DER) from an `ssl.SSLObject`/`SSLSocket`, or None."""
    if ssl_object is None:
        return None
    return ssl_object.getpeercert(binary_form=True)


def verify_peer(
    cert_der: bytes | None,
    bundles: Mapping[str, TrustBundle],
    now: float,
    expected: SpiffeId | None = None,
) -> SpiffeId:
    """The peer's verified SPIFFE ID, checked against the bundle of its own trust domain."""
    if cert_der is None:
        raise IdentityError("peer presented no certificate")
    claimed = spiffe_id_of(cert_der)
    td = claimed.trust_domain.name
    bundle = bundles.get(td)
    if bundle is None:
        raise IdentityError(f"peer {str(claimed)!r}: no bundle for trust domain {td!r}")
    sid = verify_svid(cert_der, bundle, now)
    if expected is not None and sid != expected:
        raise IdentityError(f"peer is {str(sid)!r}, expected {str(expected)!r}")
    return sid
