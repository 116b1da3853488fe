"""Tests of gateway.config: the examples load, defaults apply, paths resolve, values are frozen."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from gateway.config.schema import (
    TIERS,
    GatewayConfig,
    load_config,
    parse_config,
)
from tests.gateway.config.samples import EXAMPLES, EXPORT, IMPORT, SRC, cfg

# --- the examples ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["east-1", "east-2", "west-1"])
def test_examples_load(name: str) -> None:
    cfg_ = load_config(EXAMPLES / f"{name}.yaml")
    assert cfg_.cluster.name == name
    assert cfg_.cluster.trust_domain == f"{name}.isthmus.local"
    assert cfg_.federation.url == "https://127.0.0.1:17443"
    assert cfg_.federation.ca_file == EXAMPLES / "state" / "federation" / "ca.pem"
    assert cfg_.federation.token_file == EXAMPLES / "state" / f"{name}.token"
    assert cfg_.state_dir == EXAMPLES / "state" / name
    assert [e.name for e in cfg_.exports] == ["echo"]
    assert [i.name for i in cfg_.imports] == ["echo"]
    assert len(cfg_.exports[0].endpoints) == 2
    ports = [cfg_.listen.inbound[1], cfg_.listen.admin[1], cfg_.imports[0].listen[1]]
    ports += [e.port for e in cfg_.exports[0].endpoints]
    assert all(p < 32768 for p in ports)


def test_examples_topology() -> None:
    cfgs = {n: load_config(EXAMPLES / f"{n}.yaml") for n in ("east-1", "east-2", "west-1")}
    assert {n: (c.cluster.region, c.cluster.zone) for n, c in cfgs.items()} == {
        "east-1": ("us-east", "a"),
        "east-2": ("us-east", "b"),
        "west-1": ("us-west", "a"),
    }
    # No two gateways of the demo bind the same port on the one host it runs on.
    bound = []
    for c in cfgs.values():
        bound += [c.listen.inbound, c.listen.admin, *(i.listen for i in c.imports)]
        bound += [(e.host, e.port) for x in c.exports for e in x.endpoints]
    assert len(bound) == len(set(bound))


# --- defaults and paths ---------------------------------------------------------------------


def test_defaults_applied() -> None:
    c = parse_config(cfg(EXPORT + IMPORT), SRC)
    assert isinstance(c, GatewayConfig)
    assert c.source == SRC
    assert c.cluster.trust_domain == "east-1.isthmus.local"
    assert c.federation.token_file is None
    assert c.listen.advertise == "127.0.0.1:15443"
    assert c.identity.svid_ttl == 86400.0
    assert c.identity.ca_cert_file is None and c.identity.ca_key_file is None
    assert (c.limits.max_connections, c.limits.connect_timeout, c.limits.idle_timeout) == (
        10000,
        1.0,
        3600.0,
    )
    assert dataclasses.astuple(c.outlier_detection) == (2, 2.0, 60.0, None)
    assert dataclasses.astuple(c.peer_probe) == (0.5, 0.5, 2, 2)
    (exp,) = c.exports
    assert (exp.namespace, exp.protocol, exp.allowed_consumers) == ("default", "tcp", None)
    assert exp.endpoints[0].weight == 1
    assert dataclasses.astuple(exp.health_check) == ("tcp", None, 1.0, 0.5, 2, 2, None, None, 400)
    (imp,) = c.imports
    assert imp.namespace == "default"
    assert imp.failover.tiers == TIERS
    assert imp.failover.region_preference == ()
    assert (imp.failover.failback_after, imp.failover.max_attempts) == (2.0, 4)


def test_null_optional_fields_mean_default() -> None:
    c = parse_config(
        cfg("identity:\n  svid_ttl: null\n  ca_cert_file: null\n  ca_key_file: null\nimports:\n"),
        SRC,
    )
    assert c.identity.svid_ttl == 86400.0 and c.identity.ca_cert_file is None
    assert c.imports == ()


def test_everything_set() -> None:
    text = cfg(
        """\
identity: {svid_ttl: 1h, ca_cert_file: /pki/ca.pem, ca_key_file: ../pki/ca.key}
limits: {max_connections: 5, connect_timeout: 250ms, idle_timeout: 10m,
         inbound_max_handshakes: 16, inbound_handshake_timeout: 2s}
outlier_detection: {consecutive_failures: 3, base_ejection: 1s, max_ejection: 1s}
peer_probe: {interval: 1s, timeout: 200ms, healthy_threshold: 1, unhealthy_threshold: 3}
exports:
  - name: web
    namespace: shop
    port: 443
    protocol: tcp
    endpoints: [10.0.0.1:8443, {address: '[::1]:8443', weight: 7}]
    health_check: {kind: http, interval: 2s, timeout: 1s}
    allowed_consumers: [west-1]
  - name: web
    namespace: other
    port: 443
    endpoints: [10.0.0.1:8443]
    health_check: {kind: http, path: /ready}
imports:
  - name: web
    namespace: shop
    listen: 127.0.0.1:16002
    failover: {tiers: [zone, any], region_preference: [us-west, eu-1], failback_after: 0s,
               max_attempts: 16}
""",
        **{
            "  zone: a\n": "  zone: a\n  trust_domain: corp.example\n",
            "state_dir: state": "state_dir: /var/lib/isthmus",
            "  admin: 127.0.0.1:15000\n": "  admin: 127.0.0.1:15000\n  advertise: gw.example:443\n",
        },
    )
    c = parse_config(text, SRC)
    assert c.cluster.trust_domain == "corp.example"
    assert c.listen.advertise == "gw.example:443"
    assert c.state_dir == Path("/var/lib/isthmus")
    assert c.identity.svid_ttl == 3600.0
    assert c.identity.ca_cert_file == Path("/pki/ca.pem")
    assert c.identity.ca_key_file == Path("/etc/pki/ca.key")
    assert dataclasses.astuple(c.limits)[:8] == (5, 0.25, 600.0, 30.0, 30.0, 65536, 100, 8192)
    assert c.limits.http_header_timeout == 10.0
    assert (c.limits.inbound_max_handshakes, c.limits.inbound_handshake_timeout) == (16, 2.0)
    assert dataclasses.astuple(c.outlier_detection) == (3, 1.0, 1.0, None)
    assert dataclasses.astuple(c.peer_probe) == (1.0, 0.2, 1, 3)
    web, other = c.exports
    assert [(e.host, e.port, e.weight) for e in web.endpoints] == [
        ("10.0.0.1", 8443, 1),
        ("::1", 8443, 7),
    ]
    assert web.endpoints[1].address == "[::1]:8443"
    assert web.health_check.kind == "http" and web.health_check.path == "/healthz"
    assert web.allowed_consumers == ("west-1", "east-1")  # own cluster always allowed
    assert other.health_check.path == "/ready"
    (imp,) = c.imports
    assert imp.failover.tiers == ("zone", "any")
    assert imp.failover.region_preference == ("us-west", "eu-1")
    assert imp.failover.failback_after == 0.0 and imp.failover.max_attempts == 16


def test_relative_paths_resolved_against_config_dir(tmp_path: Path, monkeypatch) -> None:
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    (conf_dir / "gw.yaml").write_text(
        cfg(
            "identity: {ca_cert_file: pki/ca.pem, ca_key_file: pki/ca.key}\n",
            **{
                "  ca_file: ca.pem\n": "  ca_file: ../fed/ca.pem\n  token_file: gw.token\n",
                "state_dir: state": "state_dir: ./state/east-1",
            },
        )
    )
    monkeypatch.chdir(tmp_path)  # relative to the file, not to the working directory
    c = load_config("conf/gw.yaml")
    assert c.source == conf_dir / "gw.yaml"
    assert c.federation.ca_file == tmp_path / "fed" / "ca.pem"
    assert c.federation.token_file == conf_dir / "gw.token"
    assert c.state_dir == conf_dir / "state" / "east-1"
    assert c.identity.ca_cert_file == conf_dir / "pki" / "ca.pem"
    assert c.identity.ca_key_file == conf_dir / "pki" / "ca.key"
    for p in (c.federation.ca_file, c.state_dir, c.identity.ca_key_file):
        assert p is not None and p.is_absolute()


def test_parse_config_with_relative_source() -> None:
    c = parse_config(cfg(), Path("conf/gw.yaml"))
    assert c.source.is_absolute()
    assert c.state_dir == c.source.parent / "state"


def test_config_values_are_frozen() -> None:
    c = parse_config(cfg(), SRC)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.cluster.name = "x"  # type: ignore[misc]
