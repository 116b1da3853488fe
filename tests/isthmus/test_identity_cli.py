"""`isthmus identity rotate-ca` and `identity status` on a real state dir (no gateway needed):
what they write, what they print, and their exit codes (0 ok, 1 failure, 2 usage or config)."""

from __future__ import annotations

import json
import time

from federation.ca import CertificateAuthority
from gateway.config.schema import load_config
from gateway.control.identity import Identity
from isthmus.cli import main

CONFIG = """\
cluster: {name: east-1, region: us-east, zone: a}
federation: {url: "https://127.0.0.1:7443", ca_file: fed.pem}
listen: {inbound: "127.0.0.1:15443", admin: "127.0.0.1:15000"}
state_dir: state
identity:
  bundle_refresh_hint: 2s
  rotation_overlap: 10s
"""


def write(tmp_path, extra: str = ""):
    path = tmp_path / "gw.yaml"
    path.write_text(CONFIG + extra)
    return path


def test_rotate_ca_writes_a_plan_status_shows_it_and_a_second_one_is_refused(tmp_path, capsys):
    path = write(tmp_path)
    assert main(["identity", "rotate-ca", "--config", str(path)]) == 1  # no CA yet
    assert "the gateway has not created its CA yet" in capsys.readouterr().err
    Identity(load_config(path), time.time())
    assert main(["identity", "status", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "rotation      none" in out and "bundle        sequence 1, refresh hint 2s" in out
    assert main(["identity", "rotate-ca", "--config", str(path), "--overlap", "5s"]) == 2
    assert "--overlap: 5s is shorter than 3 x the bundle refresh hint" in capsys.readouterr().err
    assert main(["identity", "rotate-ca", "--config", str(path), "--clock-skew", "3s"]) == 0
    out = capsys.readouterr().out
    d = tmp_path / "state" / "identity"
    plan = json.loads((d / "rotation.json").read_text())
    assert plan["overlap"] == 10.0 and plan["clock_skew"] == 3.0 and plan["prepared_at"] is None
    assert plan["new"] in out and plan["old"] in out
    assert (d / "ca-next-key.pem").stat().st_mode & 0o777 == 0o600
    assert main(["identity", "status", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "rotation      prepare; next: switch: waiting for the federation to accept" in out
    assert main(["identity", "status", "--config", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["phase"] == "prepare"
    assert [(a["role"], a["signs"], a["trusted"]) for a in data["authorities"]] == [
        ("old", True, True), ("new", False, True)]
    assert main(["identity", "rotate-ca", "--config", str(path)]) == 1
    assert "a CA rotation is already under way" in capsys.readouterr().err


def test_rotate_ca_refuses_an_operators_ca_and_says_how_to_overlap_by_hand(tmp_path, capsys):
    ca = CertificateAuthority.create("east-1.isthmus.local", time.time())
    ca.write(tmp_path / "ca.pem", tmp_path / "ca-key.pem")
    path = write(tmp_path, "  ca_cert_file: ca.pem\n  ca_key_file: ca-key.pem\n")
    assert main(["identity", "rotate-ca", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{path}: identity.ca_cert_file: the CA is yours")
    assert "put the new CA certificate into ca_cert_file next to the old one" in err
    assert main(["identity", "status", "--config", str(path)]) == 0
    assert f"CA from {tmp_path / 'ca.pem'}" in capsys.readouterr().out
