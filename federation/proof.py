"""Proof of possession for a re-join: "I am cluster C" shown with C's current SVID.

A join token alone must never let a gateway take over a cluster that already exists (it could
be an impostor's copy of the token). A gateway that re-joins — it lost `joined.json` but kept
its CA — proves it is the cluster by signing the join with its current SVID's key. The proof
travels in the join body, not as a TLS client certificate: the federation's TLS layer trusts
only the CAs of joined clusters, and a new cluster's certificate would fail the handshake.

    proof = {"svid": <PEM certificate>, "signature": <base64url ECDSA/RSA signature>}

The signature covers `message(token, cluster, bundle)`: a fixed label, the token's sha256, the
cluster name and the canonical JSON of the bundle being published. So a proof is good for one
token (single use) and one bundle: it cannot be replayed, nor moved to another bundle. The
federation checks it with `verify_proof` against the bundle it holds for that cluster: the
SVID must verify there (signed by a current authority, not expired) and be the cluster's
gateway ID, and the signature must verify with the SVID's public key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from federation.errors import IdentityError
from federation.identity import SpiffeId, Svid, TrustBundle, verify_svid
from federation.jwk import MAX_CERT_BYTES

LABEL = b"isthmus re-join proof v1\n"
MAX_SIGNATURE = 1024


def message(token: str, cluster: str, bundle_json: bytes) -> bytes:
    """What a proof signs: the label, the token's sha256, the cluster, the bundle's JSON."""
    digest = hashlib.sha256(token.encode()).hexdigest()
    return b"".join((LABEL, digest.encode(), b"\n", cluster.encode(), b"\n", bundle_json))


def sign_proof(svid: Svid, msg: bytes) -> dict[str, str]:
    key = serialization.load_pem_private_key(svid.key_pem, password=None)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        sig = key.sign(msg, ec.ECDSA(hashes.SHA256()))
    elif isinstance(key, rsa.RSAPrivateKey):
        sig = key.sign(msg, padding.PKCS1v15(), hashes.SHA256())
    else:
        raise IdentityError(f"SVID {svid.spiffe_id}: only EC and RSA keys can sign a proof")
    return {"svid": svid.cert_pem.decode("ascii"),
            "signature": base64.urlsafe_b64encode(sig).decode("ascii")}


def verify_proof(proof: Any, bundle: TrustBundle, expected: SpiffeId, now: float,
                 msg: bytes) -> SpiffeId:
    """The proven SPIFFE ID, or IdentityError saying what was wrong (field names included)."""
    if not isinstance(proof, dict):
        raise IdentityError(f"proof: expected an object, got {type(proof).__name__}")
    pem, sig64 = proof.get("svid"), proof.get("signature")
    if not isinstance(pem, str) or len(pem) > 2 * MAX_CERT_BYTES:
        raise IdentityError("proof.svid: expected a PEM certificate")
    if not isinstance(sig64, str) or len(sig64) > 2 * MAX_SIGNATURE:
        raise IdentityError("proof.signature: expected base64url text")
    try:
        cert = x509.load_pem_x509_certificate(pem.encode("ascii", "replace"))
        sig = base64.urlsafe_b64decode(sig64 + "=" * (-len(sig64) % 4))
    except (ValueError, binascii.Error) as e:
        raise IdentityError(f"proof: not a PEM certificate and a base64url signature ({e})") \
            from None
    sid = verify_svid(cert.public_bytes(serialization.Encoding.DER), bundle, now)
    if sid != expected:
        raise IdentityError(f"proof.svid: is {sid}, expected {expected}")
    pub = cert.public_key()
    try:
        if isinstance(pub, ec.EllipticCurvePublicKey):
            pub.verify(sig, msg, ec.ECDSA(hashes.SHA256()))
        elif isinstance(pub, rsa.RSAPublicKey):
            pub.verify(sig, msg, padding.PKCS1v15(), hashes.SHA256())
        else:
            raise IdentityError("proof.svid: only EC and RSA keys are supported")
    except InvalidSignature:
        raise IdentityError("proof.signature: does not verify for this token and bundle with "
                            "the SVID's key") from None
    return sid
