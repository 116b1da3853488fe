"""SPIFFE identity as values: trust domains, SPIFFE IDs, trust bundles, SVIDs (the CA: ca.py).

Theory of operation
-------------------
Every cluster is one SPIFFE trust domain with one certificate authority (a self-signed EC P-256
CA, or one the operator provides). The CA issues X.509 SVIDs **directly** -- there are no
intermediate CAs -- so verifying an SVID is one signature check: read the SPIFFE ID the
certificate claims, take the bundle of *that* trust domain, and require that one of its
authorities signed the certificate directly (`verify_svid`). The CA that issues them is
`federation.ca.CertificateAuthority`. Bundles of different trust domains
are never merged: a CA of trust domain B can never vouch for an ID in trust domain A, even if
both bundles are loaded in the same process.

Bundles travel in the SPIFFE bundle format (a JWKS with `spiffe_sequence` and
`spiffe_refresh_hint`). `TrustBundle.from_jwks` is the only way a bundle enters from the wire;
it validates every field, bounds sizes and names the field that was wrong. A bundle update
replaces the whole frozen value (`successor`): a lower sequence is refused, and so is a
changed bundle at the sequence already held.

Decisions worth knowing:
- A bundle must carry `spiffe_sequence` (we compare sequences) and at least one `x509-svid`
  authority; `jwt-svid` keys are ignored, any other `use` is an error. Authorities must be CA
  certificates.
- SVIDs start 60 s in the past (clock skew between clusters), never outlive the CA, and are due
  for rotation at half life (`Svid.rotate_at`). Validity times are whole seconds, as in the cert.
- An SVID's ID must have a path (a bare trust domain ID names no workload).
- `verify_svid` also requires the signing authority to be valid at `now`.
- Private keys are written 0600 into 0700 directories, atomically (temp file + rename), and never
  appear in a repr. If a crash leaves a mismatched cert/key pair, `load` raises IdentityError
  instead of guessing.

The clock is always a parameter (`now`, epoch seconds); this module does no I/O except the
explicit `write`/`load` helpers.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from federation.errors import BundleSequenceError, IdentityError
from federation.files import private_dir, write_atomic
from federation.jwk import (
    _is_ca,
    _load_der,
    authority_key,
    authority_of,
)

__all__ = [
    "TrustDomain",
    "SpiffeId",
    "gateway_id",
    "federation_id",
    "TrustBundle",
    "Svid",
    "spiffe_id_of",
    "verify_svid",
    "half_life",
]

SYSTEM_NAMESPACE = "isthmus-system"
CLOCK_SKEW = 60.0
MAX_BUNDLE_KEYS = 64
MAX_SPIFFE_ID = 2048
DEFAULT_SVID_TTL = 86400.0

_TD_RE = re.compile(r"[a-z0-9._-]{1,255}")
_SEGMENT_RE = re.compile(r"[A-Za-z0-9._-]+")


# ---------------------------------------------------------------------------- names


@dataclass(frozen=True, slots=True)
class TrustDomain:
    """A SPIFFE trust domain name, e.g. `east-1.isthmus.local` (lowercase a-z 0-9 . - _)."""

    name: str

    def __post_init__(self) -> None:
        name = self.name
        if not isinstance(name, str):
            raise IdentityError(f"trust domain {name!r}: expected a string")
        if not name:
            raise IdentityError("trust domain '': must not be empty")
        if len(name) > 255:
            raise IdentityError(f"trust domain {name[:40]!r}...: longer than 255 characters")
        if name.startswith("spiffe://"):
            raise IdentityError(f"trust domain {name!r}: write the name only, without 'spiffe://'")
        if not _TD_RE.fullmatch(name):
            bad = next(c for c in name if not re.fullmatch(r"[a-z0-9._-]", c))
            raise IdentityError(
                f"trust domain {name!r}: character {bad!r} is not allowed "
                "(use lowercase letters, digits, '.', '-' and '_')"
            )

    @property
    def id(self) -> SpiffeId:
        """The trust domain's own ID, `spiffe://<name>` (empty path)."""
        return SpiffeId(self, "")

    def __str__(self) -> str:
        return self.name


def _as_td(td: str | TrustDomain) -> TrustDomain:
    return td if isinstance(td, TrustDomain) else TrustDomain(td)


def _check_path(path: Any, quoted: str) -> None:
    if not isinstance(path, str):
        raise IdentityError(f"SPIFFE ID {quoted}: path {path!r} is not a string")
    if path == "":
        return
    if not path.startswith("/"):
        raise IdentityError(f"SPIFFE ID {quoted}: path {path!r} must start with '/'")
    if "?" in path:
        raise IdentityError(f"SPIFFE ID {quoted}: a query is not allowed")
    if "#" in path:
        raise IdentityError(f"SPIFFE ID {quoted}: a fragment is not allowed")
    for seg in path[1:].split("/"):
        if seg == "":
            raise IdentityError(
                f"SPIFFE ID {quoted}: empty path segment (no '//' and no trailing '/')"
            )
        if seg in (".", ".."):
            raise IdentityError(f"SPIFFE ID {quoted}: path segment {seg!r} is not allowed")
        if not _SEGMENT_RE.fullmatch(seg):
            bad = next(c for c in seg if not re.fullmatch(r"[A-Za-z0-9._-]", c))
            raise IdentityError(
                f"SPIFFE ID {quoted}: character {bad!r} is not allowed in the path "
                "(use letters, digits, '.', '-' and '_')"
            )


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """`spiffe://<trust domain><path>`. Construct from parts or with `SpiffeId.parse`."""

    trust_domain: TrustDomain
    path: str

    def __post_init__(self) -> None:
        if not isinstance(self.trust_domain, TrustDomain):
            object.__setattr__(self, "trust_domain", _as_td(self.trust_domain))
        _check_path(self.path, repr(f"spiffe://{self.trust_domain.name}{self.path}"))
        if len(str(self)) > MAX_SPIFFE_ID:
            raise IdentityError(f"SPIFFE ID {str(self)[:60]!r}...: longer than {MAX_SPIFFE_ID}")

    @classmethod
    def parse(cls, text: Any) -> SpiffeId:
        if not isinstance(text, str):
            raise IdentityError(f"SPIFFE ID {text!r}: expected a string")
        q = repr(text) if len(text) <= 200 else repr(text[:200]) + "..."
        if not text:
            raise IdentityError("SPIFFE ID '': must not be empty")
        if len(text) > MAX_SPIFFE_ID:
            raise IdentityError(f"SPIFFE ID {q}: longer than {MAX_SPIFFE_ID} characters")
        if not text.startswith("spiffe://"):
            if text.lower().startswith("spiffe://"):
                raise IdentityError(f"SPIFFE ID {q}: the scheme must be lowercase 'spiffe'")
            raise IdentityError(f"SPIFFE ID {q}: must start with 'spiffe://'")
        rest = text[len("spiffe://") :]
        if "#" in rest:
            raise IdentityError(f"SPIFFE ID {q}: a fragment is not allowed")
        if "?" in rest:
            raise IdentityError(f"SPIFFE ID {q}: a query is not allowed")
        authority, slash, path = rest.partition("/")
        if not authority:
            raise IdentityError(f"SPIFFE ID {q}: the trust domain is missing")
        if "@" in authority:
            raise IdentityError(f"SPIFFE ID {q}: userinfo is not allowed")
        if ":" in authority:
            raise IdentityError(f"SPIFFE ID {q}: a port is not allowed")
        try:
            td = TrustDomain(authority)
        except IdentityError as e:
            raise IdentityError(f"SPIFFE ID {q}: {e}") from None
        path = slash + path
        _check_path(path, q)
        return cls(td, path)

    def member_of(self, td: str | TrustDomain) -> bool:
        return self.trust_domain == _as_td(td)

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain.name}{self.path}"


def gateway_id(td: str | TrustDomain) -> SpiffeId:
    """spiffe://<td>/ns/isthmus-system/sa/gateway"""
    return SpiffeId(_as_td(td), f"/ns/{SYSTEM_NAMESPACE}/sa/gateway")


def federation_id(td: str | TrustDomain) -> SpiffeId:
    """spiffe://<td>/ns/isthmus-system/sa/federation"""
    return SpiffeId(_as_td(td), f"/ns/{SYSTEM_NAMESPACE}/sa/federation")


# ---------------------------------------------------------------------------- helpers


def _dt(t: float) -> datetime:
    return datetime.fromtimestamp(t, tz=UTC)






def _uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def _same_public_key(a: Any, b: Any) -> bool:
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    return a.public_bytes(enc, fmt) == b.public_bytes(enc, fmt)






def _key_pem(key: Any) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_key(key_pem: bytes, what: str) -> Any:
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise IdentityError(f"{what}: not an unencrypted PEM private key ({e})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise IdentityError(f"{what}: only EC and RSA keys are supported")
    return key


def _load_pem_cert(cert_pem: bytes, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(cert_pem)
    except ValueError as e:
        raise IdentityError(f"{what}: not a PEM X.509 certificate ({e})") from None


def _load_pair(
    cert_pem: bytes, key_pem: bytes, what: str, cert_part: str, key_part: str
) -> tuple[x509.Certificate, Any]:
    """A certificate and its private key, checked to belong together."""
    cert = _load_pem_cert(cert_pem, f"{what}: {cert_part}")
    key = _load_key(key_pem, f"{what}: {key_part}")
    if not _same_public_key(key.public_key(), cert.public_key()):
        raise IdentityError(f"{what}: the private key does not match the certificate")
    return cert, key


# ---------------------------------------------------------------------------- bundles


@dataclass(frozen=True)
class TrustBundle:
    """The X.509 authorities of one trust domain, at one sequence number. Never merged."""

    trust_domain: str
    authorities: tuple[bytes, ...]  # DER X.509 CA certificates
    sequence: int
    refresh_hint: int = 300  # seconds

    def __post_init__(self) -> None:
        TrustDomain(self.trust_domain)
        object.__setattr__(self, "authorities", tuple(bytes(a) for a in self.authorities))
        for name in ("sequence", "refresh_hint"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise IdentityError(f"bundle {self.trust_domain}: {name} {v!r} is not an int >= 0")

    def to_jwks(self) -> dict[str, Any]:
        keys = []
        for i, der in enumerate(self.authorities):
            keys.append(authority_key(der, f"bundle {self.trust_domain}: authorities[{i}]"))
        return {
            "keys": keys,
            "spiffe_sequence": self.sequence,
            "spiffe_refresh_hint": self.refresh_hint,
        }

    @classmethod
    def from_jwks(cls, trust_domain: str, obj: Any) -> TrustBundle:
        """Validate a SPIFFE bundle (JWKS) received from the wire. Errors name the field."""
        try:
            TrustDomain(trust_domain)
        except IdentityError as e:
            raise IdentityError(f"bundle: {e}") from None
        w = f"bundle {trust_domain}"
        if not isinstance(obj, dict):
            raise IdentityError(f"{w}: expected a JSON object, got {type(obj).__name__}")
        seq = obj.get("spiffe_sequence")
        if seq is None:
            raise IdentityError(f"{w}: spiffe_sequence: missing")
        if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < 2**63:
            raise IdentityError(f"{w}: spiffe_sequence: {seq!r} is not an integer >= 0")
        hint = obj.get("spiffe_refresh_hint", 300)
        if isinstance(hint, bool) or not isinstance(hint, int) or not 0 <= hint < 2**31:
            raise IdentityError(f"{w}: spiffe_refresh_hint: {hint!r} is not an integer >= 0")
        keys = obj.get("keys")
        if not isinstance(keys, list):
            raise IdentityError(f"{w}: keys: expected a list, got {type(keys).__name__}")
        if len(keys) > MAX_BUNDLE_KEYS:
            raise IdentityError(f"{w}: keys: {len(keys)} keys, at most {MAX_BUNDLE_KEYS}")
        authorities: list[bytes] = []
        for i, k in enumerate(keys):
            kw = f"{w}: keys[{i}]"
            if not isinstance(k, dict):
                raise IdentityError(f"{kw}: expected an object, got {type(k).__name__}")
            use = k.get("use")
            if use == "jwt-svid":
                continue
            if use != "x509-svid":
                raise IdentityError(f"{kw}.use: {use!r} is not 'x509-svid' or 'jwt-svid'")
            der = authority_of(k, kw)
            if der not in authorities:
                authorities.append(der)
        if not authorities:
            raise IdentityError(f"{w}: keys: no x509-svid authority")
        return cls(trust_domain, tuple(authorities), seq, hint)

    def to_pem(self) -> str:
        """All authorities as concatenated PEM (for `ssl` cadata)."""
        out = []
        for i, der in enumerate(self.authorities):
            cert = _load_der(der, f"bundle {self.trust_domain}: authorities[{i}]")
            out.append(cert.public_bytes(serialization.Encoding.PEM).decode("ascii"))
        return "".join(out)

    def same_keys(self, other: TrustBundle) -> bool:
        """The same authorities (in any order) and refresh hint: the same trust."""
        return (set(self.authorities) == set(other.authorities)
                and self.refresh_hint == other.refresh_hint)

    def successor(self, new: TrustBundle) -> TrustBundle:
        """The bundle to hold after receiving `new`: `new` itself, or an error. A changed
        bundle must carry a higher sequence; the same one may come again at the same."""
        if new.trust_domain != self.trust_domain:
            raise IdentityError(
                f"bundle {self.trust_domain}: an update for trust domain "
                f"{new.trust_domain!r} cannot replace it"
            )
        if new.sequence < self.sequence:
            raise BundleSequenceError(
                f"bundle {self.trust_domain}: sequence {new.sequence} is lower than the "
                f"{self.sequence} already held; refusing the update"
            )
        if new.sequence == self.sequence and not self.same_keys(new):
            raise BundleSequenceError(
                f"bundle {self.trust_domain}: different keys at the sequence {new.sequence} "
                "already held; a changed bundle must carry a higher sequence"
            )
        return new


# ---------------------------------------------------------------------------- SVIDs


def half_life(not_before: float, not_after: float) -> float:
    """When a certificate valid not_before..not_after is due for rotation: at half life, counted
    from issuance. not_before is backdated by CLOCK_SKEW for peers with slow clocks, and counting
    from it would rotate a short-lived SVID at once."""
    issued = min(not_before + CLOCK_SKEW, not_after)
    return issued + (not_after - issued) / 2


@dataclass(frozen=True)
class Svid:
    """An X.509 SVID with its private key. The key never appears in repr or logs."""

    spiffe_id: SpiffeId
    cert_pem: bytes
    key_pem: bytes = field(repr=False)
    not_before: float
    not_after: float
    serial: int

    CERT_FILE = "svid.pem"
    KEY_FILE = "svid-key.pem"

    def __repr__(self) -> str:
        return (
            f"Svid({str(self.spiffe_id)!r}, serial={self.serial:x}, "
            f"not_before={self.not_before:.0f}, not_after={self.not_after:.0f})"
        )

    @property
    def rotate_at(self) -> float:
        """Half life (`half_life`), when this SVID is due for rotation."""
        return half_life(self.not_before, self.not_after)

    def rotation_due(self, now: float) -> bool:
        return now >= self.rotate_at

    def expired(self, now: float) -> bool:
        return now > self.not_after

    def cert_der(self) -> bytes:
        return _load_pem_cert(self.cert_pem, f"SVID {self.spiffe_id}").public_bytes(
            serialization.Encoding.DER
        )

    def write(self, directory: str | os.PathLike[str]) -> tuple[Path, Path]:
        """Write svid.pem (0644) and svid-key.pem (0600) atomically; directory made 0700."""
        d = private_dir(directory)
        cert_path, key_path = d / self.CERT_FILE, d / self.KEY_FILE
        write_atomic(key_path, self.key_pem, 0o600)
        write_atomic(cert_path, self.cert_pem, 0o644)
        return cert_path, key_path

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> Svid | None:
        """The SVID written by `write`, or None if there is none. IdentityError if corrupt."""
        d = Path(directory)
        cert_path, key_path = d / cls.CERT_FILE, d / cls.KEY_FILE
        if not cert_path.exists() and not key_path.exists():
            return None
        try:
            cert_pem = cert_path.read_bytes()
            key_pem = key_path.read_bytes()
        except OSError as e:
            raise IdentityError(
                f"SVID in {d}: cannot read ({e}); delete both files to reissue"
            ) from None
        return cls.from_pem(cert_pem, key_pem, f"SVID in {d}")

    @classmethod
    def from_pem(cls, cert_pem: bytes, key_pem: bytes, what: str = "SVID") -> Svid:
        cert, _ = _load_pair(cert_pem, key_pem, what, cls.CERT_FILE, cls.KEY_FILE)
        sid = spiffe_id_of(cert.public_bytes(serialization.Encoding.DER))
        return cls(
            sid,
            cert_pem,
            key_pem,
            cert.not_valid_before_utc.timestamp(),
            cert.not_valid_after_utc.timestamp(),
            cert.serial_number,
        )


def spiffe_id_of(cert_der: bytes) -> SpiffeId:
    """The SPIFFE ID a certificate claims (its single URI SAN). Does NOT verify anything."""
    cert = _load_der(cert_der, "certificate")
    uris = _uri_sans(cert)
    if not uris:
        raise IdentityError("certificate has no URI SAN, so no SPIFFE ID")
    if len(uris) > 1:
        raise IdentityError(
            f"certificate has {len(uris)} URI SANs ({', '.join(map(repr, uris[:4]))}); "
            "an SVID has exactly one"
        )
    return SpiffeId.parse(uris[0])


def verify_svid(cert_der: bytes, bundle: TrustBundle, now: float) -> SpiffeId:
    """Verify an SVID against the bundle of its own trust domain; returns its SPIFFE ID."""
    cert = _load_der(cert_der, "SVID")
    sid = spiffe_id_of(cert_der)
    q = f"SVID {str(sid)!r}"
    if sid.trust_domain.name != bundle.trust_domain:
        raise IdentityError(
            f"{q}: trust domain {sid.trust_domain.name!r} is not the bundle's "
            f"{bundle.trust_domain!r}"
        )
    if _is_ca(cert):
        raise IdentityError(f"{q}: is a CA certificate, not a leaf SVID")
    if not sid.path:
        raise IdentityError(f"{q}: a trust domain ID names no workload")
    nb, na = cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp()
    if now < nb:
        raise IdentityError(f"{q}: not valid yet (not before {_dt(nb).isoformat()})")
    if now > na:
        raise IdentityError(f"{q}: expired at {_dt(na).isoformat()}")
    for der in bundle.authorities:
        ca = _load_der(der, f"bundle {bundle.trust_domain}: authority")
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        if not ca.not_valid_before_utc.timestamp() <= now <= ca.not_valid_after_utc.timestamp():
            raise IdentityError(f"{q}: the issuing authority is not valid at this time")
        return sid
    raise IdentityError(
        f"{q}: not signed by any authority in the bundle of {bundle.trust_domain!r} "
        f"(sequence {bundle.sequence})"
    )
