import base64
import copy
import os
import stat
from datetime import UTC, datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from federation.ca import CertificateAuthority
from federation.errors import BundleSequenceError, IdentityError
from federation.identity import (
    SpiffeId,
    Svid,
    TrustBundle,
    TrustDomain,
    federation_id,
    gateway_id,
    spiffe_id_of,
    verify_svid,
)

NOW = 1_700_000_000.0
TD_A = "east-1.isthmus.local"
TD_B = "west-1.isthmus.local"


@pytest.fixture(scope="module")
def ca_a():
    return CertificateAuthority.create(TD_A, NOW)


@pytest.fixture(scope="module")
def ca_b():
    return CertificateAuthority.create(TD_B, NOW)


# ------------------------------------------------------------------ names


@pytest.mark.parametrize(
    "name", ["east-1.isthmus.local", "a", "example.org", "under_score", "x" * 255, "1.2.3.4"]
)
def test_trust_domain_good(name):
    assert str(TrustDomain(name)) == name
    assert TrustDomain(name).name == name


@pytest.mark.parametrize(
    "name, needle",
    [
        ("", "empty"),
        ("East.local", "'E'"),
        ("a b", "' '"),
        ("td:8080", "':'"),
        ("spiffe://td", "without"),
        ("x" * 256, "255"),
        ("t@d", "'@'"),
    ],
)
def test_trust_domain_bad(name, needle):
    with pytest.raises(IdentityError) as e:
        TrustDomain(name)
    assert repr(name[:40]) in str(e.value)
    assert needle in str(e.value)


def test_trust_domain_not_a_string():
    with pytest.raises(IdentityError, match="expected a string"):
        TrustDomain(5)


@pytest.mark.parametrize(
    "text, td, path",
    [
        ("spiffe://east-1.isthmus.local/ns/x/sa/y", TD_A, "/ns/x/sa/y"),
        ("spiffe://example.org", "example.org", ""),
        ("spiffe://example.org/a", "example.org", "/a"),
        ("spiffe://example.org/A.b-c_d/..x/.y", "example.org", "/A.b-c_d/..x/.y"),
    ],
)
def test_spiffe_id_good(text, td, path):
    sid = SpiffeId.parse(text)
    assert sid.trust_domain == TrustDomain(td)
    assert sid.path == path
    assert str(sid) == text
    assert SpiffeId(TrustDomain(td), path) == sid


@pytest.mark.parametrize(
    "text, needle",
    [
        ("", "empty"),
        ("http://example.org/a", "must start with 'spiffe://'"),
        ("SPIFFE://example.org/a", "lowercase"),
        ("spiffe://", "trust domain is missing"),
        ("spiffe:///a", "trust domain is missing"),
        ("spiffe://example.org:443/a", "port"),
        ("spiffe://user@example.org/a", "userinfo"),
        ("spiffe://example.org/a?x=1", "query"),
        ("spiffe://example.org/a#frag", "fragment"),
        ("spiffe://example.org/", "empty path segment"),
        ("spiffe://example.org//a", "empty path segment"),
        ("spiffe://example.org/a/", "empty path segment"),
        ("spiffe://example.org/a/./b", "'.'"),
        ("spiffe://example.org/a/..", "'..'"),
        ("spiffe://example.org/a%20b", "'%'"),
        ("spiffe://example.org/a b", "' '"),
        ("spiffe://Example.org/a", "'E'"),
        ("spiffe://example.org/" + "a" * 2100, "longer"),
    ],
)
def test_spiffe_id_bad(text, needle):
    with pytest.raises(IdentityError) as e:
        SpiffeId.parse(text)
    msg = str(e.value)
    assert needle in msg
    assert repr(text[:200]) in msg or repr(text)[:100] in msg


def test_spiffe_id_from_parts_validates_and_quotes():
    with pytest.raises(IdentityError, match="spiffe://example.org/a//b"):
        SpiffeId(TrustDomain("example.org"), "/a//b")
    with pytest.raises(IdentityError, match="must start with '/'"):
        SpiffeId(TrustDomain("example.org"), "a")
    assert SpiffeId("example.org", "/a").trust_domain == TrustDomain("example.org")


def test_spiffe_id_not_a_string():
    with pytest.raises(IdentityError, match="expected a string"):
        SpiffeId.parse(None)


def test_well_known_ids():
    assert str(gateway_id(TD_A)) == f"spiffe://{TD_A}/ns/isthmus-system/sa/gateway"
    assert (
        str(federation_id(TrustDomain(TD_A))) == f"spiffe://{TD_A}/ns/isthmus-system/sa/federation"
    )
    assert gateway_id(TD_A).member_of(TD_A)
    assert not gateway_id(TD_A).member_of(TD_B)
    assert len({gateway_id(TD_A), gateway_id(TD_A), federation_id(TD_A)}) == 2


# ------------------------------------------------------------------ bundles


def test_bundle_jwks_round_trip(ca_a):
    b = ca_a.bundle(7, refresh_hint=60)
    j = b.to_jwks()
    assert j["spiffe_sequence"] == 7 and j["spiffe_refresh_hint"] == 60
    (k,) = j["keys"]
    assert k["use"] == "x509-svid" and k["kty"] == "EC" and k["crv"] == "P-256"
    assert base64.b64decode(k["x5c"][0]) == ca_a.cert_der
    assert TrustBundle.from_jwks(TD_A, j) == b


def test_bundle_ignores_jwt_keys_and_dedupes(ca_a, ca_b):
    j = ca_a.bundle(1).to_jwks()
    j["keys"].append({"use": "jwt-svid", "kty": "EC", "crv": "P-256", "kid": "k", "x": "", "y": ""})
    j["keys"].append(copy.deepcopy(j["keys"][0]))
    b = TrustBundle.from_jwks(TD_A, j)
    assert b.authorities == (ca_a.cert_der,)
    del j["spiffe_refresh_hint"]
    assert TrustBundle.from_jwks(TD_A, j).refresh_hint == 300


def test_bundle_to_pem_loads_in_ssl(ca_a, ca_b):
    import ssl

    two = TrustBundle(TD_A, (ca_a.cert_der, CertificateAuthority.create(TD_A, NOW).cert_der), 1)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=two.to_pem())
    assert two.to_pem().count("BEGIN CERTIFICATE") == 2


def _mutate(ca, fn):
    j = ca.bundle(1).to_jwks()
    fn(j)
    return j


@pytest.mark.parametrize(
    "fn, needle",
    [
        (lambda j: j.update(keys="nope"), "keys: expected a list"),
        (lambda j: j.pop("spiffe_sequence"), "spiffe_sequence: missing"),
        (lambda j: j.update(spiffe_sequence="1"), "spiffe_sequence: '1'"),
        (lambda j: j.update(spiffe_sequence=True), "spiffe_sequence"),
        (lambda j: j.update(spiffe_sequence=-1), "spiffe_sequence"),
        (lambda j: j.update(spiffe_refresh_hint=1.5), "spiffe_refresh_hint"),
        (lambda j: j["keys"].__setitem__(0, "k"), "keys[0]: expected an object"),
        (lambda j: j["keys"][0].pop("x5c"), "keys[0].x5c: missing"),
        (lambda j: j["keys"][0].update(x5c=[]), "keys[0].x5c: expected a list of exactly one"),
        (
            lambda j: j["keys"][0].update(x5c=j["keys"][0]["x5c"] * 2),
            "keys[0].x5c: expected a list of exactly one",
        ),
        (lambda j: j["keys"][0].update(x5c=[5]), "keys[0].x5c[0]: expected base64"),
        (lambda j: j["keys"][0].update(x5c=["!!not base64!!"]), "keys[0].x5c[0]: not valid base64"),
        (
            lambda j: j["keys"][0].update(x5c=[base64.b64encode(b"garbage").decode()]),
            "keys[0].x5c[0]: not a DER",
        ),
        (lambda j: j["keys"][0].update(x5c=["A" * 30000]), "larger than"),
        (lambda j: j["keys"][0].update(use="sig"), "keys[0].use: 'sig'"),
        (lambda j: j["keys"][0].pop("use"), "keys[0].use: None"),
        (lambda j: j["keys"][0].update(kty="oct"), "keys[0].kty"),
        (lambda j: j["keys"][0].update(crv="P-999"), "keys[0].crv"),
        (lambda j: j["keys"][0].update(x="!!"), "keys[0].x: expected base64url"),
        (lambda j: j["keys"][0].update(x=j["keys"][0]["y"]), "keys[0]: the key does not match"),
        (lambda j: j["keys"].__setitem__(slice(None), [j["keys"][0]] * 65), "65 keys"),
        (lambda j: j.update(keys=[]), "no x509-svid authority"),
    ],
)
def test_bundle_from_jwks_rejects(ca_a, fn, needle):
    j = _mutate(ca_a, fn)
    with pytest.raises(IdentityError) as e:
        TrustBundle.from_jwks(TD_A, j)
    assert str(e.value).startswith(f"bundle {TD_A}: ")
    assert needle in str(e.value)


def test_bundle_from_jwks_key_cert_mismatch(ca_a, ca_b):
    j = ca_a.bundle(1).to_jwks()
    j["keys"][0]["x5c"] = ca_b.bundle(1).to_jwks()["keys"][0]["x5c"]
    with pytest.raises(IdentityError, match=r"keys\[0\]: the key does not match"):
        TrustBundle.from_jwks(TD_A, j)


def test_bundle_from_jwks_refuses_leaf_as_authority(ca_a):
    leaf = ca_a.issue(gateway_id(TD_A), NOW)
    j = ca_a.bundle(1).to_jwks()
    j["keys"][0]["x5c"] = [base64.b64encode(leaf.cert_der()).decode()]
    with pytest.raises(IdentityError, match="not a CA certificate"):
        TrustBundle.from_jwks(TD_A, j)


def test_bundle_from_jwks_not_object_and_bad_td(ca_a):
    with pytest.raises(IdentityError, match=f"bundle {TD_A}: expected a JSON object"):
        TrustBundle.from_jwks(TD_A, [])
    with pytest.raises(IdentityError, match="'BAD'"):
        TrustBundle.from_jwks("BAD", ca_a.bundle(1).to_jwks())


def test_successor(ca_a, ca_b):
    b5 = ca_a.bundle(5)
    assert b5.successor(ca_a.bundle(5)) == ca_a.bundle(5)
    b6 = ca_a.bundle(6)
    assert b5.successor(b6) is b6
    with pytest.raises(BundleSequenceError, match="sequence 4 is lower than the 5"):
        b5.successor(ca_a.bundle(4))
    with pytest.raises(IdentityError, match=TD_B) as e:
        b5.successor(ca_b.bundle(9))
    assert not isinstance(e.value, BundleSequenceError)


# ------------------------------------------------------------------ CA


def test_load_or_create_persists(tmp_path):
    d = tmp_path / "ca"
    ca = CertificateAuthority.load_or_create(d, TD_A, NOW)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(d / "ca-key.pem").st_mode) == 0o600
    again = CertificateAuthority.load_or_create(d, TD_A, NOW + 100)
    assert again.cert_der == ca.cert_der
    assert again.trust_domain == TrustDomain(TD_A)
    # the reloaded CA signs SVIDs that the original's bundle verifies
    svid = again.issue(gateway_id(TD_A), NOW)
    assert verify_svid(svid.cert_der(), ca.bundle(1), NOW) == gateway_id(TD_A)
    assert "PRIVATE" not in repr(again)
    assert [p.name for p in d.iterdir() if p.name.endswith(".tmp")] == []


def test_load_or_create_half_pair_refused(tmp_path):
    CertificateAuthority.load_or_create(tmp_path, TD_A, NOW)
    (tmp_path / "ca-key.pem").unlink()
    with pytest.raises(IdentityError, match="ca-key.pem is missing"):
        CertificateAuthority.load_or_create(tmp_path, TD_A, NOW)


def test_ca_created_properties(ca_a):
    cert = x509.load_der_x509_certificate(ca_a.cert_der)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://{TD_A}"]
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)


def _self_signed(ca: bool):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "operator")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(datetime.fromtimestamp(NOW - 3600, UTC))
        .not_valid_after(datetime.fromtimestamp(NOW + 86400 * 30, UTC))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def test_user_provided_ca_files(tmp_path):
    cert_pem, key_pem = _self_signed(ca=True)
    (tmp_path / "my-ca.pem").write_bytes(cert_pem)
    (tmp_path / "my-ca.key").write_bytes(key_pem)
    ca = CertificateAuthority.load_or_create(
        tmp_path / "state",
        TD_A,
        NOW,
        cert_file=tmp_path / "my-ca.pem",
        key_file=tmp_path / "my-ca.key",
    )
    assert not (tmp_path / "state").exists()
    svid = ca.issue(gateway_id(TD_A), NOW)
    assert verify_svid(svid.cert_der(), ca.bundle(1), NOW) == gateway_id(TD_A)
    # the bundle of an operator CA round-trips too
    assert TrustBundle.from_jwks(TD_A, ca.bundle(2).to_jwks()) == ca.bundle(2)
    with pytest.raises(IdentityError, match="both"):
        CertificateAuthority.load_or_create(tmp_path, TD_A, NOW, cert_file=tmp_path / "my-ca.pem")


def test_non_ca_refused():
    cert_pem, key_pem = _self_signed(ca=False)
    with pytest.raises(IdentityError, match="not a CA"):
        CertificateAuthority.load(cert_pem, key_pem, TD_A)


def test_mismatched_ca_key_refused(ca_a):
    cert_pem, _ = _self_signed(ca=True)
    _, other_key = _self_signed(ca=True)
    with pytest.raises(IdentityError, match="does not match"):
        CertificateAuthority.load(cert_pem, other_key, TD_A)


def test_ca_of_other_trust_domain_refused(tmp_path):
    ca = CertificateAuthority.load_or_create(tmp_path, TD_B, NOW)
    with pytest.raises(IdentityError, match="another trust domain"):
        CertificateAuthority.load_or_create(tmp_path, TD_A, NOW)
    assert ca.trust_domain.name == TD_B


# ------------------------------------------------------------------ issue


def test_issue_san_and_validity(ca_a):
    sid = gateway_id(TD_A)
    svid = ca_a.issue(sid, NOW, ttl=3600, dns_names=["gw.east-1"], ip_addresses=["127.0.0.1"])
    cert = x509.load_pem_x509_certificate(svid.cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [str(sid)]
    assert san.get_values_for_type(x509.DNSName) == ["gw.east-1"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {x509.ExtendedKeyUsageOID.SERVER_AUTH, x509.ExtendedKeyUsageOID.CLIENT_AUTH}
    assert svid.not_before == NOW - 60
    assert svid.not_after == NOW + 3600
    assert cert.not_valid_after_utc.timestamp() == svid.not_after
    assert cert.serial_number == svid.serial
    assert spiffe_id_of(svid.cert_der()) == sid
    assert svid.spiffe_id == sid


def test_issue_fresh_key_each_time(ca_a):
    a = ca_a.issue(gateway_id(TD_A), NOW)
    b = ca_a.issue(gateway_id(TD_A), NOW)
    assert a.key_pem != b.key_pem and a.serial != b.serial


def test_issue_ttl_capped_at_ca_expiry():
    ca = CertificateAuthority.create(TD_A, NOW, validity=7200)
    svid = ca.issue(gateway_id(TD_A), NOW, ttl=86400)
    assert svid.not_after == NOW + 7200
    with pytest.raises(IdentityError, match="expired"):
        ca.issue(gateway_id(TD_A), NOW + 7200)


def test_issue_refuses_other_trust_domain(ca_a):
    with pytest.raises(IdentityError, match=f"spiffe://{TD_B}"):
        ca_a.issue(gateway_id(TD_B), NOW)
    with pytest.raises(IdentityError, match="names no workload"):
        ca_a.issue(TrustDomain(TD_A).id, NOW)


def test_rotation_due_at_half_life(ca_a):
    svid = ca_a.issue(gateway_id(TD_A), NOW, ttl=86400)
    issued = svid.not_before + 60  # not_before is backdated for clock skew
    half = issued + (svid.not_after - issued) / 2
    assert svid.rotate_at == half
    assert not svid.rotation_due(NOW)
    assert not svid.rotation_due(half - 1)
    assert svid.rotation_due(half)
    assert svid.rotation_due(NOW + 86400)


def test_short_svid_rotates_at_half_its_lifetime_not_at_once(ca_a):
    svid = ca_a.issue(gateway_id(TD_A), NOW, ttl=60)
    assert not svid.rotation_due(NOW + 1)
    assert svid.rotation_due(NOW + 31)
    assert 29 <= svid.rotate_at - NOW <= 31


def test_svid_repr_hides_key(ca_a):
    svid = ca_a.issue(gateway_id(TD_A), NOW)
    assert "PRIVATE" not in repr(svid) and "key" not in repr(svid)
    assert str(gateway_id(TD_A)) in repr(svid)


def test_svid_write_load(tmp_path, ca_a):
    svid = ca_a.issue(gateway_id(TD_A), NOW)
    d = tmp_path / "svid"
    assert Svid.load(d) is None
    cert_path, key_path = svid.write(d)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    assert Svid.load(d) == svid
    # overwrite keeps the mode and the pair
    svid2 = ca_a.issue(gateway_id(TD_A), NOW + 10)
    svid2.write(d)
    assert Svid.load(d) == svid2
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    assert sorted(p.name for p in d.iterdir()) == ["svid-key.pem", "svid.pem"]


def test_svid_load_corrupt(tmp_path, ca_a):
    svid = ca_a.issue(gateway_id(TD_A), NOW)
    other = ca_a.issue(gateway_id(TD_A), NOW)
    cert_path, key_path = svid.write(tmp_path)
    key_path.write_bytes(other.key_pem)
    with pytest.raises(IdentityError, match="does not match"):
        Svid.load(tmp_path)
    cert_path.write_bytes(b"garbage")
    with pytest.raises(IdentityError, match="not a PEM"):
        Svid.load(tmp_path)
    key_path.unlink()
    with pytest.raises(IdentityError, match="cannot read"):
        Svid.load(tmp_path)


# ------------------------------------------------------------------ verify


def test_verify_good(ca_a):
    svid = ca_a.issue(gateway_id(TD_A), NOW)
    assert verify_svid(svid.cert_der(), ca_a.bundle(1), NOW + 10) == gateway_id(TD_A)


def test_verify_bundle_with_several_authorities(ca_a):
    other = CertificateAuthority.create(TD_A, NOW)
    svid = ca_a.issue(gateway_id(TD_A), NOW)
    bundle = TrustBundle(TD_A, (other.cert_der, ca_a.cert_der), 2)
    assert verify_svid(svid.cert_der(), bundle, NOW) == gateway_id(TD_A)


def test_verify_other_ca_same_trust_domain_name(ca_a):
    impostor = CertificateAuthority.create(TD_A, NOW)
    svid = impostor.issue(gateway_id(TD_A), NOW)
    with pytest.raises(
        IdentityError, match=f"'spiffe://{TD_A}/ns/isthmus-system/sa/gateway'.*not signed"
    ):
        verify_svid(svid.cert_der(), ca_a.bundle(1), NOW)


def test_verify_other_trust_domain(ca_a, ca_b):
    svid = ca_b.issue(gateway_id(TD_B), NOW)
    with pytest.raises(IdentityError, match="is not the bundle's"):
        verify_svid(svid.cert_der(), ca_a.bundle(1), NOW)


def test_verify_ca_b_forging_id_of_a(ca_a, ca_b):
    """CA B signs a leaf claiming an ID of trust domain A: A's bundle must refuse it."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(x509.load_der_x509_certificate(ca_b.cert_der).subject)
        .public_key(key.public_key())
        .serial_number(2)
        .not_valid_before(datetime.fromtimestamp(NOW - 60, UTC))
        .not_valid_after(datetime.fromtimestamp(NOW + 3600, UTC))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(gateway_id(TD_A)))]),
            critical=True,
        )
        .sign(ca_b._key, hashes.SHA256())
    )
    der = cert.public_bytes(serialization.Encoding.DER)
    with pytest.raises(IdentityError, match="not signed"):
        verify_svid(der, ca_a.bundle(1), NOW)


def test_verify_expired_and_not_yet_valid(ca_a):
    svid = ca_a.issue(gateway_id(TD_A), NOW, ttl=600)
    with pytest.raises(IdentityError, match="expired"):
        verify_svid(svid.cert_der(), ca_a.bundle(1), NOW + 601)
    with pytest.raises(IdentityError, match="not valid yet"):
        verify_svid(svid.cert_der(), ca_a.bundle(1), NOW - 61)


def test_verify_ca_cert_as_leaf(ca_a):
    with pytest.raises(IdentityError, match="is a CA certificate"):
        verify_svid(ca_a.cert_der, ca_a.bundle(1), NOW)


def test_spiffe_id_of_errors():
    with pytest.raises(IdentityError, match="no URI SAN"):
        spiffe_id_of(
            x509.load_pem_x509_certificate(_self_signed(True)[0]).public_bytes(
                serialization.Encoding.DER
            )
        )
    with pytest.raises(IdentityError, match="not a DER"):
        spiffe_id_of(b"nope")
