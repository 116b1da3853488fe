"""The gateway's identity shell with real files and certificates and a fake clock: several CAs in
one file, the bundle sequence, and a CA rotation plan followed from prepare to retire by a
primary and a worker (gateway/control/identity.py; the rule itself: core/ca_rotation.py)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest

from federation.ca import CertificateAuthority, fingerprint
from federation.errors import InputError
from federation.identity import TrustBundle, gateway_id, verify_svid
from gateway.config.schema import parse_config
from gateway.control.identity import Identity, describe_state, plan_rotation
from gateway.errors import ConfigError, GatewayError

TD = "east-1.isthmus.local"
CONFIG = """\
cluster: {name: east-1, region: us-east, zone: a}
federation: {url: "https://127.0.0.1:7443", ca_file: fed.pem}
listen: {inbound: "127.0.0.1:15443", admin: "127.0.0.1:15000"}
state_dir: state
identity:
  svid_ttl: 1m
  bundle_refresh_hint: 2s
  rotation_overlap: 10s
"""
NOW = time.time()


def config(tmp_path: Path, extra: str = ""):
    path = tmp_path / "gw.yaml"
    path.write_text(CONFIG + extra)
    return parse_config(path.read_text(), path)


def ids(tmp_path: Path) -> Path:
    return tmp_path / "state" / "identity"


def signed_by(identity: Identity, ca_der: bytes, now: float) -> bool:
    try:
        verify_svid(identity.svid.cert_der(), TrustBundle(TD, (ca_der,), 0), now)
        return True
    except Exception:
        return False


def files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


# -- several CAs in ca_cert_file ------------------------------------------------------------


def two_cas(tmp_path: Path, signing: int = 1) -> tuple[CertificateAuthority, CertificateAuthority]:
    old, new = CertificateAuthority.create(TD, NOW), CertificateAuthority.create(TD, NOW)
    old.write(tmp_path / "old.pem", tmp_path / "old-key.pem")
    new.write(tmp_path / "new.pem", tmp_path / "new-key.pem")
    (tmp_path / "cas.pem").write_bytes(old.cert_pem + new.cert_pem)
    key = tmp_path / ("new-key.pem" if signing else "old-key.pem")
    (tmp_path / "ca-key.pem").write_bytes(key.read_bytes())
    return old, new


OWN_CA = "  ca_cert_file: cas.pem\n  ca_key_file: ca-key.pem\n"


@pytest.mark.parametrize("signing", [0, 1])
def test_two_certificates_in_ca_cert_file_are_both_trusted_and_the_keys_one_signs(tmp_path,
                                                                                 signing):
    old, new = two_cas(tmp_path, signing)
    ident = Identity(config(tmp_path, OWN_CA), NOW)
    assert ident.bundle.authorities == (old.cert_der, new.cert_der)  # file order, none dropped
    signer = (old, new)[signing]
    assert ident.ca.fingerprint == signer.fingerprint
    assert signed_by(ident, signer.cert_der, NOW)
    assert ident.bundle.refresh_hint == 2
    status = ident.status()
    assert [a["signs"] for a in status["authorities"]] == [not signing, bool(signing)]
    with pytest.raises(ConfigError) as e:  # rotate-ca leaves the operator's CA alone
        plan_rotation(config(tmp_path, OWN_CA), NOW)
    assert e.value.problems[0].path == "identity.ca_cert_file"
    assert "put the new CA certificate into ca_cert_file next to the old one" in str(e.value)


def test_every_bad_certificate_in_ca_cert_file_is_named_by_file_and_place(tmp_path):
    old, new = two_cas(tmp_path)
    leaf = new.issue(gateway_id(TD), NOW, 3600)
    expired = CertificateAuthority.create(TD, NOW - 7200, validity=3600)
    other = CertificateAuthority.create("west-1.isthmus.local", NOW)
    key_block = (tmp_path / "old-key.pem").read_bytes()
    cases = [
        (old.cert_pem + leaf.cert_pem, "certificate 2 of 2: not a CA certificate"),
        (expired.cert_pem + new.cert_pem, "certificate 1 of 2: expired at"),
        (other.cert_pem + new.cert_pem, "certificate 1 of 2: names 'spiffe://west-1"),
        (new.cert_pem + key_block, "certificate 2 of 2: a 'PRIVATE KEY' block"),
        (new.cert_pem + new.cert_pem, "certificate 2 of 2: the same certificate as certificate 1"),
        (old.cert_pem, "the private key belongs to none of the 1 certificate(s)"),
        (b"hello", "no PEM certificate in it"),
    ]
    for pem, phrase in cases:
        (tmp_path / "cas.pem").write_bytes(pem)
        with pytest.raises(ConfigError) as e:
            Identity(config(tmp_path, OWN_CA), NOW)
        (p,) = e.value.problems
        assert p.path == "identity.ca_cert_file" and phrase in p.message, (phrase, p.message)
        assert str(tmp_path / ("ca-key.pem" if "private key" in phrase else "cas.pem")) in p.message


# -- the bundle sequence --------------------------------------------------------------------


def test_a_state_dir_from_before_keeps_its_sequence_and_a_raise_is_persisted(tmp_path):
    cfg = config(tmp_path)
    first = Identity(cfg, NOW)
    assert first.bundle.sequence == 1
    der = first.ca.cert_der
    (ids(tmp_path) / "bundle.json").write_text(json.dumps({"sequence": 7, "ca": der.hex()[-64:]}))
    again = Identity(cfg, NOW)
    assert again.bundle.sequence == 7  # the old format's CA is the same CA: no new sequence
    meta = json.loads((ids(tmp_path) / "bundle.json").read_text())
    assert meta == {"sequence": 7, "authorities": [fingerprint(der)]}
    again.raise_sequence(12)
    assert again.bundle.sequence == 12 and Identity(cfg, NOW).bundle.sequence == 12
    again.raise_sequence(3)  # never down
    assert again.bundle.sequence == 12


# -- a rotation, from the plan to its end ----------------------------------------------------


def test_a_rotation_prepare_switch_retire_in_a_primary_and_a_worker(tmp_path, caplog):
    caplog.set_level(logging.INFO, "isthmus.gateway.identity")
    cfg = config(tmp_path)
    primary = Identity(cfg, NOW)
    old_der, seq = primary.ca.cert_der, primary.bundle.sequence
    worker = Identity(cfg, NOW, persist=False)
    plan, current = plan_rotation(cfg, NOW + 1)
    assert current.cert_der == old_der and plan.prepared_at is None
    d = ids(tmp_path)
    assert (d / "ca-next-key.pem").stat().st_mode & 0o777 == 0o600
    new_der = (d / "ca-next.pem").read_bytes()
    new_der = CertificateAuthority.load(new_der, (d / "ca-next-key.pem").read_bytes(), TD).cert_der

    # prepare: both trusted, sequence + 1, the old CA still signs; no switch time yet
    for ident in (primary, worker):
        assert ident.refresh(NOW + 2) is False
        assert ident.bundle.authorities == (old_der, new_der)
        assert ident.bundle.sequence == seq + 1
        assert signed_by(ident, old_der, NOW + 2)
    assert describe_state(cfg, NOW + 2)["phase"] == "prepare"
    assert primary.refresh(NOW + 1000) is False  # never switches before the federation has it
    assert primary.published(primary.bundle, NOW + 3) is True  # the federation took it
    assert worker.published(worker.bundle, NOW + 3) is False  # workers never write
    assert json.loads((d / "rotation.json").read_text())["prepared_at"] == NOW + 3
    on_disk = files(d)

    # switch at prepared + overlap (10 s): the new CA signs, SVIDs reissued; both still trusted
    for ident in (primary, worker):
        assert ident.refresh(NOW + 12.9) is False
        assert ident.refresh(NOW + 13) is True
        assert signed_by(ident, new_der, NOW + 13) and not signed_by(ident, old_der, NOW + 13)
        assert ident.bundle.authorities == (old_der, new_der)
        assert ident.bundle.sequence == seq + 1
    assert primary.status()["rotation"]["phase"] == "switch"
    assert primary.status()["rotation"]["retire_at"] == NOW + 13 + 60 + 60  # ttl + skew 60 s

    # a restarted primary resumes where the plan is
    resumed = Identity(cfg, NOW + 20)
    assert signed_by(resumed, new_der, NOW + 20) and resumed.bundle.sequence == seq + 1

    # retire (the worker first: it sees it in memory, writes nothing)
    retire = NOW + 133
    assert worker.refresh(retire - 0.1) is False and worker.bundle.authorities == (old_der,
                                                                                   new_der)
    before = files(d)
    worker.refresh(retire)
    assert worker.bundle.authorities == (new_der,) and worker.bundle.sequence == seq + 2
    assert files(d) == before
    primary.refresh(retire)
    assert primary.bundle.authorities == (new_der,) and primary.bundle.sequence == seq + 2
    assert not (d / "rotation.json").exists() and not (d / "ca-next.pem").exists()
    assert CertificateAuthority.load((d / "ca.pem").read_bytes(), (d / "ca-key.pem").read_bytes(),
                                     TD).cert_der == new_der
    archived = sorted(p.name for p in (d / "archive").iterdir())
    assert archived == [f"ca-{fingerprint(old_der)[:16]}-key.pem",
                        f"ca-{fingerprint(old_der)[:16]}.pem"]
    assert (d / "archive" / archived[0]).stat().st_mode & 0o777 == 0o600
    assert (d / "archive" / archived[1]).read_bytes() == on_disk["ca.pem"]
    assert json.loads((d / "bundle.json").read_text())["sequence"] == seq + 2
    # the worker sees the plan gone and reads the new CA from ca.pem: nothing else changes
    assert worker.refresh(retire + 1) is False
    assert worker.bundle.authorities == (new_der,) and worker.plan is None
    assert Identity(cfg, retire + 2).bundle.sequence == seq + 2
    assert describe_state(cfg, retire + 2)["phase"] is None
    said = [r.getMessage() for r in caplog.records
            if r.name == "isthmus.gateway.identity" and r.levelname == "INFO"
            and "CA rotation" in r.getMessage()]
    assert [m.split(":")[1].split(";")[0].strip() for m in said] == [
        "prepare", "the federation holds bundle sequence 2 with the new CA", "switch", "switch",
        "retire"]  # once per phase change (the resumed primary says its switch again)


def test_a_retire_due_while_stopped_or_cut_short_is_finished_at_the_next_start(tmp_path):
    cfg = config(tmp_path)
    Identity(cfg, NOW)
    plan, _ = plan_rotation(cfg, NOW)
    d = ids(tmp_path)
    Identity(cfg, NOW).published(Identity(cfg, NOW).bundle, NOW)
    assert json.loads((d / "rotation.json").read_text())["prepared_at"] == NOW
    # a crash in the middle of the retire: the new key is in place, ca.pem is still the old one
    (d / "archive").mkdir(mode=0o700)
    (d / "archive" / f"ca-{plan.old[:16]}.pem").write_bytes((d / "ca.pem").read_bytes())
    (d / "archive" / f"ca-{plan.old[:16]}-key.pem").write_bytes((d / "ca-key.pem").read_bytes())
    (d / "ca-key.pem").write_bytes((d / "ca-next-key.pem").read_bytes())
    later = Identity(cfg, NOW + 10**4)
    assert later.ca.fingerprint == plan.new and later.bundle.authorities == (later.ca.cert_der,)
    assert not (d / "rotation.json").exists()


def test_rotate_ca_refuses_what_it_cannot_do_and_says_why(tmp_path):
    cfg = config(tmp_path)
    with pytest.raises(GatewayError, match="has not created its CA yet"):
        plan_rotation(cfg, NOW)
    Identity(cfg, NOW)
    with pytest.raises(InputError, match=r"--overlap: 5s is shorter than 3 x the bundle refresh "
                                         r"hint \(2s\), 6s"):
        plan_rotation(cfg, NOW, overlap=5.0)
    plan_rotation(cfg, NOW, overlap=6.0)
    with pytest.raises(GatewayError, match="a CA rotation is already under way .* phase prepare"):
        plan_rotation(cfg, NOW)


def test_the_config_refuses_an_overlap_under_three_refresh_hints(tmp_path):
    path = tmp_path / "gw.yaml"
    with pytest.raises(ConfigError) as e:
        parse_config(CONFIG.replace("rotation_overlap: 10s", "rotation_overlap: 5s"), path)
    (p,) = e.value.problems
    assert (p.line, p.path) == (8, "identity.rotation_overlap")
    assert p.message.startswith("5s is shorter than 3 x the bundle refresh hint (2s), 6s")


def test_a_malformed_plan_is_logged_and_ignored(tmp_path, caplog):
    cfg = config(tmp_path)
    ident = Identity(cfg, NOW)
    (ids(tmp_path) / "rotation.json").write_text("{nope")
    assert ident.refresh(NOW + 1) is False and ident.plan is None
    assert "ignoring the CA rotation plan" in caplog.text and "not JSON" in caplog.text
    assert Identity(cfg, NOW).bundle.authorities == (ident.ca.cert_der,)
