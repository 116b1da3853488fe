"""A trust domain's certificate authority: create or load it, and issue SVIDs from it.

Every cluster is one SPIFFE trust domain with one CA (a self-signed EC P-256 CA made at the
first start, or one the operator provides as a cert + key file pair). The CA issues X.509 SVIDs
**directly**, with no intermediate CAs, so verifying an SVID (`identity.verify_svid`) is one
signature check. An SVID starts 60 s in the past (clock skew between clusters), never outlives
the CA, and gets a fresh P-256 key. The CA's key is written 0600 into a 0700 directory,
atomically; a half-present pair is an error naming the missing file, never a new CA (that would
break federation trust). The clock is a parameter (`now`, epoch seconds).

A certificate file may hold several CA certificates (`load_ca_set`): the one whose public key is
the key file's signs, every one is trusted (an operator's own overlap while replacing a CA). Each
is checked (a CA, keyCertSign, the trust domain if it names one, not expired) and an error names
the file and the certificate's place in it; nothing in the file is dropped.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from federation.errors import IdentityError
from federation.files import private_dir, write_atomic
from federation.identity import (
    CLOCK_SKEW,
    DEFAULT_SVID_TTL,
    SpiffeId,
    Svid,
    TrustBundle,
    TrustDomain,
    _as_td,
    _dt,
    _key_pem,
    _load_key,
    _load_pair,
    _same_public_key,
    _uri_sans,
)
from federation.jwk import _is_ca

__all__ = ["CertificateAuthority", "DEFAULT_CA_VALIDITY", "fingerprint", "load_ca_set"]

DEFAULT_CA_VALIDITY = 10 * 365 * 86400.0
MAX_CA_CERTS = 16  # certificates in one CA file (a bundle holds at most MAX_BUNDLE_KEYS)
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END \1-----", re.DOTALL)


def fingerprint(der: bytes) -> str:
    """SHA-256 of a certificate's DER, lowercase hex (what `openssl x509 -fingerprint -sha256`
    prints, without the colons)."""
    return hashlib.sha256(der).hexdigest()


class CertificateAuthority:
    """One trust domain's CA. Issues SVIDs directly (no intermediates)."""

    CERT_FILE = "ca.pem"
    KEY_FILE = "ca-key.pem"

    trust_domain: TrustDomain
    cert_der: bytes

    def __init__(self, trust_domain: TrustDomain, cert: x509.Certificate, key: Any):
        self.trust_domain = trust_domain
        self._cert = cert
        self._key = key
        self.cert_der = cert.public_bytes(serialization.Encoding.DER)

    def __repr__(self) -> str:
        return (
            f"CertificateAuthority(trust_domain={self.trust_domain.name!r}, "
            f"serial={self._cert.serial_number}, not_after={self.not_after:.0f})"
        )

    @property
    def not_before(self) -> float:
        return self._cert.not_valid_before_utc.timestamp()

    @property
    def not_after(self) -> float:
        return self._cert.not_valid_after_utc.timestamp()

    @property
    def cert_pem(self) -> bytes:
        return self._cert.public_bytes(serialization.Encoding.PEM)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert_der)

    def write(self, cert_path: str | os.PathLike[str], key_path: str | os.PathLike[str]) -> None:
        """The key (0600, first) and the certificate (0644), each written atomically; the
        directory is made 0700 if missing."""
        private_dir(Path(key_path).parent)
        write_atomic(key_path, _key_pem(self._key), 0o600)
        write_atomic(cert_path, self.cert_pem, 0o644)

    @classmethod
    def create(
        cls, trust_domain: str | TrustDomain, now: float, validity: float = DEFAULT_CA_VALIDITY
    ) -> CertificateAuthority:
        td = _as_td(trust_domain)
        if validity <= 0:
            raise IdentityError(f"CA for {td.name!r}: validity must be positive")
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Isthmus"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"Isthmus CA {td.name}"[:64]),
            ]
        )
        pub = key.public_key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(pub)
            .serial_number(x509.random_serial_number())
            .not_valid_before(_dt(math.floor(now - CLOCK_SKEW)))
            .not_valid_after(_dt(math.floor(now + validity)))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(td.id))]),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(td, cert, key)

    @classmethod
    def load(
        cls, cert_pem: bytes, key_pem: bytes, trust_domain: str | TrustDomain
    ) -> CertificateAuthority:
        td = _as_td(trust_domain)
        w = f"CA for {td.name!r}"
        cert, key = _load_pair(cert_pem, key_pem, w, "certificate", "key")
        if not _is_ca(cert):
            raise IdentityError(f"{w}: the certificate is not a CA (basicConstraints CA not set)")
        try:
            ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
            if not ku.key_cert_sign:
                raise IdentityError(f"{w}: the certificate's key usage lacks keyCertSign")
        except x509.ExtensionNotFound:
            pass
        for uri in _uri_sans(cert):
            if uri.startswith("spiffe://") and SpiffeId.parse(uri).trust_domain != td:
                raise IdentityError(f"{w}: the certificate names {uri!r}, another trust domain")
        return cls(td, cert, key)

    @classmethod
    def load_or_create(
        cls,
        directory: str | os.PathLike[str],
        trust_domain: str | TrustDomain,
        now: float,
        cert_file: str | os.PathLike[str] | None = None,
        key_file: str | os.PathLike[str] | None = None,
    ) -> CertificateAuthority:
        """Operator-provided files if given; else directory/ca.pem + ca-key.pem, made if absent."""
        td = _as_td(trust_domain)
        if (cert_file is None) != (key_file is None):
            raise IdentityError(f"CA for {td.name!r}: give both the cert file and the key file")
        if cert_file is not None and key_file is not None:
            return cls.load(_read(cert_file), _read(key_file), td)
        d = Path(directory)
        cert_path, key_path = d / cls.CERT_FILE, d / cls.KEY_FILE
        have_cert, have_key = cert_path.exists(), key_path.exists()
        if have_cert and have_key:
            return cls.load(_read(cert_path), _read(key_path), td)
        if have_cert or have_key:
            missing = key_path if have_cert else cert_path
            raise IdentityError(
                f"CA for {td.name!r}: {missing} is missing while its pair exists; "
                "restore it (or remove both to create a new CA, which breaks federation trust)"
            )
        ca = cls.create(td, now)
        ca.write(cert_path, key_path)
        return ca

    def issue(
        self,
        spiffe_id: SpiffeId,
        now: float,
        ttl: float = DEFAULT_SVID_TTL,
        dns_names: Iterable[str] = (),
        ip_addresses: Iterable[str | ipaddress.IPv4Address | ipaddress.IPv6Address] = (),
    ) -> Svid:
        """A fresh P-256 key and leaf SVID for `spiffe_id`, valid now-60s .. min(now+ttl,
        CA end)."""
        q = f"SVID {str(spiffe_id)!r}"
        if spiffe_id.trust_domain != self.trust_domain:
            raise IdentityError(
                f"{q}: this CA issues only for trust domain {self.trust_domain.name!r}"
            )
        if not spiffe_id.path:
            raise IdentityError(f"{q}: a trust domain ID names no workload")
        if ttl <= 0:
            raise IdentityError(f"{q}: ttl must be positive, got {ttl}")
        nb = max(math.floor(now - CLOCK_SKEW), math.ceil(self.not_before))
        na = min(math.floor(now + ttl), math.floor(self.not_after))
        if na <= now:
            raise IdentityError(
                f"{q}: the CA of {self.trust_domain.name!r} expired at "
                f"{_dt(self.not_after).isoformat()}; replace it"
            )
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(spiffe_id))]
        sans += [x509.DNSName(n) for n in dns_names]
        try:
            sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
        except ValueError as e:
            raise IdentityError(f"{q}: {e}") from None
        key = ec.generate_private_key(ec.SECP256R1())
        pub = key.public_key()
        serial = x509.random_serial_number()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Isthmus")]))
            .issuer_name(self._cert.subject)
            .public_key(pub)
            .serial_number(serial)
            .not_valid_before(_dt(nb))
            .not_valid_after(_dt(na))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        return Svid(
            spiffe_id,
            cert.public_bytes(serialization.Encoding.PEM),
            _key_pem(key),
            float(nb),
            float(na),
            serial,
        )

    def bundle(self, sequence: int, refresh_hint: int = 300) -> TrustBundle:
        return TrustBundle(self.trust_domain.name, (self.cert_der,), sequence, refresh_hint)


def load_ca_set(
    cert_pem: bytes, key_pem: bytes, trust_domain: str | TrustDomain, now: float,
    cert_name: str = "certificate file", key_name: str = "key file",
) -> tuple[CertificateAuthority, tuple[bytes, ...]]:
    """The CA that signs (the certificate in `cert_pem` whose public key is `key_pem`'s; of
    several with that key, the one valid longest) and the DER of every certificate in
    `cert_pem`, in file order (the signer among them): all of them are trusted. Errors name
    `cert_name` and the certificate as `certificate I of N`."""
    td = _as_td(trust_domain)
    blocks = _PEM_BLOCK.findall(cert_pem)
    if not blocks:
        raise IdentityError(f"{cert_name}: no PEM certificate in it")
    if len(blocks) > MAX_CA_CERTS:
        raise IdentityError(f"{cert_name}: {len(blocks)} PEM blocks, at most {MAX_CA_CERTS}")
    certs: list[x509.Certificate] = []
    ders: list[bytes] = []
    for i, (label, body) in enumerate(blocks):
        w = f"{cert_name}: certificate {i + 1} of {len(blocks)}"
        if label != b"CERTIFICATE":
            raise IdentityError(f"{w}: a {label.decode()!r} block, not a CERTIFICATE")
        pem = b"-----BEGIN CERTIFICATE-----" + body + b"-----END CERTIFICATE-----\n"
        try:
            cert = x509.load_pem_x509_certificate(pem)
        except ValueError as e:
            raise IdentityError(f"{w}: not a PEM X.509 certificate ({e})") from None
        _check_ca_cert(cert, td, now, w)
        der = cert.public_bytes(serialization.Encoding.DER)
        if der in ders:
            raise IdentityError(f"{w}: the same certificate as certificate {ders.index(der) + 1}")
        certs.append(cert)
        ders.append(der)
    key = _load_key(key_pem, key_name)
    mine = [c for c in certs if _same_public_key(key.public_key(), c.public_key())]
    if not mine:
        raise IdentityError(f"{key_name}: the private key belongs to none of the {len(certs)} "
                            f"certificate(s) in {cert_name}")
    signer = max(mine, key=lambda c: c.not_valid_after_utc)
    if signer.not_valid_before_utc.timestamp() > now:
        raise IdentityError(f"{cert_name}: certificate {certs.index(signer) + 1} of "
                            f"{len(certs)} (the key's) is not valid before "
                            f"{signer.not_valid_before_utc.isoformat()}")
    return CertificateAuthority(td, signer, key), tuple(ders)


def _check_ca_cert(cert: x509.Certificate, td: TrustDomain, now: float, w: str) -> None:
    if not _is_ca(cert):
        raise IdentityError(f"{w}: not a CA certificate (basicConstraints CA not set)")
    try:
        if not cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign:
            raise IdentityError(f"{w}: its key usage lacks keyCertSign")
    except x509.ExtensionNotFound:
        pass
    for uri in _uri_sans(cert):
        if not uri.startswith("spiffe://"):
            continue
        try:
            other = SpiffeId.parse(uri).trust_domain != td
        except IdentityError as e:
            raise IdentityError(f"{w}: {e}") from None
        if other:
            raise IdentityError(f"{w}: names {uri!r}, not trust domain {td.name!r}")
    if cert.not_valid_after_utc.timestamp() <= now:
        raise IdentityError(f"{w}: expired at {cert.not_valid_after_utc.isoformat()}; remove it")


def _read(path: str | os.PathLike[str]) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise IdentityError(f"cannot read {path}: {e}") from None
