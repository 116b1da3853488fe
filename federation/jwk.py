"""SPIFFE bundle keys: a CA certificate as a JWK (`use: x509-svid`, `x5c`) and back, checked.

identity.TrustBundle's wire form is a JWKS of these keys; every field a peer sends is validated
here and the error names it. Pure: no I/O.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from federation.errors import IdentityError

MAX_CERT_BYTES = 16 * 1024

_B64URL_RE = re.compile(r"[A-Za-z0-9_-]*")

_CURVES: dict[str, tuple[type[ec.EllipticCurve], int]] = {
    "P-256": (ec.SECP256R1, 32),
    "P-384": (ec.SECP384R1, 48),
    "P-521": (ec.SECP521R1, 66),
}


def _load_der(der: bytes, what: str) -> x509.Certificate:
    if not isinstance(der, bytes | bytearray):
        raise IdentityError(f"{what}: expected DER bytes, got {type(der).__name__}")
    try:
        cert = x509.load_der_x509_certificate(bytes(der))
        # parsed lazily by cryptography: a damaged extension or key would raise ValueError at
        # first use, deep in a caller (tests/federation/test_identity_fuzz.py found both)
        cert.extensions  # noqa: B018
        cert.public_key()
    except (ValueError, UnsupportedAlgorithm, x509.InvalidVersion) as e:
        raise IdentityError(f"{what}: not a DER X.509 certificate ({e})") from None
    return cert


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    return bool(bc.ca)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: Any, what: str, max_len: int = 2048) -> bytes:
    if not isinstance(text, str) or len(text) > max_len or not _B64URL_RE.fullmatch(text):
        raise IdentityError(f"{what}: expected base64url text")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise IdentityError(f"{what}: not valid base64url") from None


def authority_key(der: bytes, what: str) -> dict[str, Any]:
    """The SPIFFE bundle key (a JWK with `use: x509-svid` and `x5c`) of a CA certificate."""
    cert = _load_der(der, what)
    pub = cert.public_key()
    key: dict[str, Any] = {"use": "x509-svid"}
    if isinstance(pub, ec.EllipticCurvePublicKey):
        crv = next((n for n, (c, _) in _CURVES.items() if c.name == pub.curve.name), None)
        if crv is None:
            raise IdentityError(f"{what}: curve {pub.curve.name} is not supported")
        size = _CURVES[crv][1]
        nums = pub.public_numbers()
        key |= {
            "kty": "EC",
            "crv": crv,
            "x": _b64url(nums.x.to_bytes(size, "big")),
            "y": _b64url(nums.y.to_bytes(size, "big")),
        }
    elif isinstance(pub, rsa.RSAPublicKey):
        nums = pub.public_numbers()
        key |= {
            "kty": "RSA",
            "n": _b64url(nums.n.to_bytes((nums.n.bit_length() + 7) // 8, "big")),
            "e": _b64url(nums.e.to_bytes((nums.e.bit_length() + 7) // 8, "big")),
        }
    else:
        raise IdentityError(f"{what}: only EC and RSA keys are supported")
    key["x5c"] = [base64.b64encode(der).decode("ascii")]
    return key


def authority_of(k: dict[str, Any], kw: str) -> bytes:
    """The DER CA certificate of a SPIFFE bundle key, checked against the key's own fields."""
    kty = k.get("kty")
    if kty not in ("EC", "RSA"):
        raise IdentityError(f"{kw}.kty: {kty!r} is not 'EC' or 'RSA'")
    x5c = k.get("x5c")
    if x5c is None:
        raise IdentityError(f"{kw}.x5c: missing (an x509-svid key carries its certificate)")
    if not isinstance(x5c, list) or len(x5c) != 1:
        raise IdentityError(f"{kw}.x5c: expected a list of exactly one certificate")
    b64 = x5c[0]
    if not isinstance(b64, str):
        raise IdentityError(f"{kw}.x5c[0]: expected base64 text, got {type(b64).__name__}")
    if len(b64) > (MAX_CERT_BYTES + 2) // 3 * 4:
        raise IdentityError(f"{kw}.x5c[0]: certificate larger than {MAX_CERT_BYTES} bytes")
    try:
        der = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise IdentityError(f"{kw}.x5c[0]: not valid base64") from None
    cert = _load_der(der, f"{kw}.x5c[0]")
    if not _is_ca(cert):
        raise IdentityError(f"{kw}.x5c[0]: not a CA certificate (basicConstraints CA is not set)")
    pub = cert.public_key()
    if kty == "EC":
        crv = k.get("crv")
        if not isinstance(crv, str) or crv not in _CURVES:
            raise IdentityError(f"{kw}.crv: {crv!r} is not one of {', '.join(_CURVES)}")
        curve, size = _CURVES[crv]
        x = _b64url_decode(k.get("x"), f"{kw}.x")
        y = _b64url_decode(k.get("y"), f"{kw}.y")
        if len(x) != size or len(y) != size:
            raise IdentityError(f"{kw}: x and y must be {size} bytes for {crv}")
        ok = (
            isinstance(pub, ec.EllipticCurvePublicKey)
            and pub.curve.name == curve.name
            and pub.public_numbers().x == int.from_bytes(x, "big")
            and pub.public_numbers().y == int.from_bytes(y, "big")
        )
    else:
        n = _b64url_decode(k.get("n"), f"{kw}.n", max_len=4096)
        e = _b64url_decode(k.get("e"), f"{kw}.e", max_len=16)
        ok = (
            isinstance(pub, rsa.RSAPublicKey)
            and pub.public_numbers().n == int.from_bytes(n, "big")
            and pub.public_numbers().e == int.from_bytes(e, "big")
        )
    if not ok:
        raise IdentityError(f"{kw}: the key does not match the public key of x5c[0]")
    return der
