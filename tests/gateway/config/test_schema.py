"""Tests of gateway.config.schema: the examples load, bad configs name file, line and field."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from federation.errors import IsthmusError
from federation.units import format_duration, parse_duration
from gateway.config.schema import (
    TIERS,
    GatewayConfig,
    load_config,
    parse_config,
)
from gateway.errors import ConfigError, GatewayError, Problem

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = ROOT / "examples" / "three-clusters"
SRC = Path("/etc/isthmus/gw.yaml")

# A minimal valid config; the line numbers below are relied on by the table of cases.
MINIMAL = """\
cluster:
  name: east-1
  region: us-east
  zone: a
federation:
  url: https://127.0.0.1:7443
  ca_file: ca.pem
listen:
  inbound: 127.0.0.1:15443
  admin: 127.0.0.1:15000
state_dir: state
"""
# Line 12 onwards is whatever a case appends.

EXPORT = """\
exports:
  - name: echo
    port: 8080
    endpoints:
      - 127.0.0.1:19001
"""  # lines 12..16

IMPORT = """\
imports:
  - name: echo
    listen: 127.0.0.1:16001
"""  # lines 12..14


def cfg(extra: str = "", **replace: str) -> str:
    text = MINIMAL
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new, 1)
    return text + extra


def problems(text: str) -> list[Problem]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, SRC)
    return info.value.problems


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
limits: {max_connections: 5, connect_timeout: 250ms, idle_timeout: 10m}
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
    assert dataclasses.astuple(c.limits) == (5, 0.25, 600.0, 30.0, 30.0)
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


# --- bad configs: one problem each, with path, line and a distinctive phrase ----------------

CASES: list[tuple[str, str, str, int, str]] = [
    # id, config text, field path, line, phrase
    ("unknown-top", cfg("colour: red\n"), "colour", 12, "unknown field 'colour'"),
    (
        "unknown-nested",
        cfg(**{"  zone: a\n": "  zone: a\n  zonee: b\n"}),
        "cluster.zonee",
        5,
        "allowed here: name, region, zone, trust_domain",
    ),
    ("missing-section", cfg(**{"state_dir: state\n": ""}), "state_dir", 1, "missing required"),
    (
        "missing-field",
        cfg(**{"  region: us-east\n": ""}),
        "cluster.region",
        2,
        "missing required field",
    ),
    ("empty-required", cfg(**{"  zone: a": "  zone:"}), "cluster.zone", 4, "required, but empty"),
    (
        "duplicate-field",
        cfg(**{"  zone: a\n": "  zone: a\n  zone: b\n"}),
        "cluster.zone",
        5,
        "duplicate field (first set on line 4)",
    ),
    ("bad-name", cfg(**{"name: east-1": "name: East_1"}), "cluster.name", 2, "not a valid name"),
    (
        "int-as-string",
        cfg(**{"zone: a": "zone: 1"}),
        "cluster.zone",
        4,
        "expected a string, got integer 1",
    ),
    (
        "bad-trust-domain",
        cfg(**{"  zone: a\n": "  zone: a\n  trust_domain: Not A Domain\n"}),
        "cluster.trust_domain",
        5,
        "not a valid trust domain",
    ),
    (
        "url-not-https",
        cfg(**{"https://127": "http://127"}),
        "federation.url",
        6,
        "is not an https:// URL",
    ),
    (
        "url-bad-port",
        cfg(**{"7443": "99999"}),
        "federation.url",
        6,
        "is not a valid URL",
    ),
    ("bad-address", cfg(**{"127.0.0.1:15000": "127.0.0.1"}), "listen.admin", 10, "not host:port"),
    (
        "address-port-range",
        cfg(IMPORT.replace("16001", "99999")),
        "imports[0].listen",
        14,
        "'127.0.0.1:99999': port '99999' is not in 1..65535",
    ),
    (
        "listener-clash",
        cfg(**{"127.0.0.1:15000": "127.0.0.1:15443"}),
        "listen.admin",
        10,
        "clashes with listen.inbound",
    ),
    (
        "listener-clash-wildcard",
        cfg(IMPORT.replace("127.0.0.1:16001", "127.0.0.1:15000")).replace(
            "admin: 127.0.0.1", "admin: 0.0.0.0"
        ),
        "imports[0].listen",
        14,
        "clashes with listen.admin (0.0.0.0:15000)",
    ),
    (
        "advertise-needed",
        cfg(**{"inbound: 127.0.0.1": "inbound: 0.0.0.0"}),
        "listen.advertise",
        9,
        "required when listen.inbound is a wildcard",
    ),
    (
        "advertise-wildcard",
        cfg(**{"  admin: 127.0.0.1:15000\n": "  admin: 127.0.0.1:15000\n  advertise: '[::]:1'\n"}),
        "listen.advertise",
        11,
        "cannot dial",
    ),
    (
        "state-dir-type",
        cfg(**{"state_dir: state": "state_dir: [a]"}),
        "state_dir",
        11,
        "expected a string, got a list",
    ),
    (
        "duration-no-unit",
        cfg("identity:\n  svid_ttl: 3600\n"),
        "identity.svid_ttl",
        13,
        "write it with a unit",
    ),
    (
        "duration-garbage",
        cfg("limits:\n  idle_timeout: soon\n"),
        "limits.idle_timeout",
        13,
        "is not a duration",
    ),
    (
        "svid-ttl-short",
        cfg("identity:\n  svid_ttl: 30s\n"),
        "identity.svid_ttl",
        13,
        "too short: at least 60s",
    ),
    (
        "svid-ttl-long",
        cfg("identity:\n  svid_ttl: 721h\n"),
        "identity.svid_ttl",
        13,
        "too long: at most 720h",
    ),
    (
        "ca-cert-without-key",
        cfg("identity:\n  ca_cert_file: ca.pem\n"),
        "identity.ca_key_file",
        13,
        "give both the CA certificate and its key",
    ),
    (
        "bool-as-number",
        cfg("limits:\n  max_connections: true\n"),
        "limits.max_connections",
        13,
        "expected a whole number, got boolean true",
    ),
    (
        "max-connections-range",
        cfg("limits:\n  max_connections: 1000001\n"),
        "limits.max_connections",
        13,
        "1000001 is not in 1..1000000",
    ),
    (
        "connect-timeout-zero",
        cfg("limits:\n  connect_timeout: 0s\n"),
        "limits.connect_timeout",
        13,
        "must be more than 0",
    ),
    (
        "connect-timeout-long",
        cfg("limits:\n  connect_timeout: 61s\n"),
        "limits.connect_timeout",
        13,
        "at most 60s",
    ),
    (
        "ejection-order",
        cfg("outlier_detection:\n  base_ejection: 10s\n  max_ejection: 5s\n"),
        "outlier_detection.max_ejection",
        14,
        "shorter than base_ejection",
    ),
    (
        "failures-zero",
        cfg("outlier_detection:\n  consecutive_failures: 0\n"),
        "outlier_detection.consecutive_failures",
        13,
        "0 is not in 1..1000",
    ),
    (
        "probe-timeout-over-interval",
        cfg("peer_probe:\n  interval: 500ms\n  timeout: 600ms\n"),
        "peer_probe.timeout",
        14,
        "must be at most the interval",
    ),
    (
        "probe-threshold-negative",
        cfg("peer_probe:\n  healthy_threshold: -1\n"),
        "peer_probe.healthy_threshold",
        13,
        "-1 is not in 1..100",
    ),
    ("section-not-mapping", cfg("limits: 5\n"), "limits", 12, "expected a mapping"),
    (
        "exports-not-list",
        cfg("exports: {name: echo}\n"),
        "exports",
        12,
        "expected a list of exports",
    ),
    (
        "export-missing-port",
        cfg(EXPORT.replace("    port: 8080\n", "")),
        "exports[0].port",
        13,
        "missing required field",
    ),
    (
        "export-port-range",
        cfg(EXPORT.replace("8080", "0")),
        "exports[0].port",
        14,
        "0 is not in 1..65535",
    ),
    (
        "export-protocol",
        cfg(EXPORT.replace("    port: 8080\n", "    port: 8080\n    protocol: udp\n")),
        "exports[0].protocol",
        15,
        "'udp' is not a supported protocol",
    ),
    (
        "no-endpoints",
        cfg(EXPORT.replace("    endpoints:\n      - 127.0.0.1:19001\n", "    endpoints: []\n")),
        "exports[0].endpoints",
        15,
        "at least one endpoint",
    ),
    (
        "duplicate-endpoint",
        cfg(EXPORT + "      - {address: 127.0.0.1:19001, weight: 3}\n"),
        "exports[0].endpoints[1]",
        17,
        "duplicate endpoint '127.0.0.1:19001' (also exports[0].endpoints[0])",
    ),
    (
        "endpoint-weight",
        cfg(EXPORT + "      - {address: 127.0.0.1:19002, weight: 1001}\n"),
        "exports[0].endpoints[1].weight",
        17,
        "1001 is not in 1..1000",
    ),
    (
        "endpoint-unknown-field",
        cfg(EXPORT + "      - {address: 127.0.0.1:19002, wieght: 2}\n"),
        "exports[0].endpoints[1].wieght",
        17,
        "allowed here: address, weight",
    ),
    (
        "endpoint-is-own-listener",
        cfg(EXPORT + "      - 127.0.0.1:15443\n"),
        "exports[0].endpoints[1]",
        17,
        "this gateway's own listen.inbound",
    ),
    (
        "duplicate-export",
        cfg(EXPORT + "  - {name: echo, port: 9090, endpoints: [127.0.0.1:1]}\n"),
        "exports[1]",
        17,
        "service default/echo is already exported by exports[0]",
    ),
    (
        "duplicate-import",
        cfg(IMPORT + "  - {name: echo, namespace: default, listen: 127.0.0.1:16002}\n"),
        "imports[1]",
        15,
        "service default/echo is already imported by imports[0]",
    ),
    (
        "health-kind",
        cfg(EXPORT + "    health_check: {kind: grpc}\n"),
        "exports[0].health_check.kind",
        17,
        "'grpc' is not a supported health check kind (use 'tcp' or 'http')",
    ),
    (
        "health-path-on-tcp",
        cfg(EXPORT + "    health_check:\n      kind: tcp\n      path: /healthz\n"),
        "exports[0].health_check.path",
        19,
        "only http checks have a path",
    ),
    (
        "health-path-slash",
        cfg(EXPORT + "    health_check:\n      kind: http\n      path: healthz\n"),
        "exports[0].health_check.path",
        19,
        "must start with '/'",
    ),
    (
        "health-timeout-equals-interval",
        cfg(EXPORT + "    health_check:\n      interval: 1s\n      timeout: 1000ms\n"),
        "exports[0].health_check.timeout",
        19,
        "must be shorter than the interval",
    ),
    (
        "health-threshold-zero",
        cfg(EXPORT + "    health_check:\n      unhealthy_threshold: 0\n"),
        "exports[0].health_check.unhealthy_threshold",
        18,
        "0 is not in 1..100",
    ),
    (
        "health-send-without-expect",
        cfg(EXPORT + '    health_check:\n      send: "PING\\r\\n"\n'),
        "exports[0].health_check.expect",
        18,
        "required with send",
    ),
    (
        "health-send-on-http",
        cfg(EXPORT + "    health_check:\n      kind: http\n      send: PING\n"),
        "exports[0].health_check.send",
        19,
        "only tcp checks send and expect bytes",
    ),
    (
        "health-expect-not-a-string",
        cfg(EXPORT + "    health_check:\n      expect: 42\n"),
        "exports[0].health_check.expect",
        18,
        "expected a string",
    ),
    (
        "health-expect-empty",
        cfg(EXPORT + '    health_check:\n      expect: ""\n'),
        "exports[0].health_check.expect",
        18,
        "must not be empty",
    ),
    (
        "health-expect-too-long",
        cfg(EXPORT + f"    health_check:\n      expect: {'x' * 255}é\n"),
        "exports[0].health_check.expect",
        18,
        "257 bytes (UTF-8), at most 256 allowed",
    ),
    (
        "health-send-too-long",
        cfg(EXPORT + f"    health_check:\n      send: {'x' * 1025}\n      expect: x\n"),
        "exports[0].health_check.send",
        18,
        "1025 bytes (UTF-8), at most 1024 allowed",
    ),
    (
        "health-send-lone-surrogate",
        cfg(EXPORT + '    health_check:\n      send: "\\ud800"\n      expect: x\n'),
        "exports[0].health_check.send",
        18,
        "not valid Unicode",
    ),
    (
        "protocol-unknown",
        cfg(EXPORT + "    protocol: grpc\n"),
        "exports[0].protocol",
        17,
        "'grpc' is not a supported protocol (use 'tcp' or 'http')",
    ),
    (
        "response-timeout-zero",
        cfg("outlier_detection:\n  response_timeout: 0s\n"),
        "outlier_detection.response_timeout",
        13,
        "must be more than 0",
    ),
    (
        "response-timeout-too-long",
        cfg("outlier_detection:\n  response_timeout: 2h\n"),
        "outlier_detection.response_timeout",
        13,
        "too long",
    ),
    (
        "consumer-bad-name",
        cfg(EXPORT + "    allowed_consumers: [west-1, West_2]\n"),
        "exports[0].allowed_consumers[1]",
        17,
        "not a valid name",
    ),
    (
        "consumer-twice",
        cfg(EXPORT + "    allowed_consumers: [west-1, west-1]\n"),
        "exports[0].allowed_consumers[1]",
        17,
        "listed twice",
    ),
    (
        "tier-unknown",
        cfg(IMPORT + "    failover:\n      tiers: [cluster, planet]\n"),
        "imports[0].failover.tiers[1]",
        16,
        "'planet' is not a supported tier",
    ),
    (
        "tier-duplicate",
        cfg(IMPORT + "    failover:\n      tiers: [zone, zone]\n"),
        "imports[0].failover.tiers[1]",
        16,
        "tier 'zone' is listed twice",
    ),
    (
        "tiers-empty",
        cfg(IMPORT + "    failover:\n      tiers: []\n"),
        "imports[0].failover.tiers",
        16,
        "at least one tier",
    ),
    (
        "region-preference-without-any",
        cfg(IMPORT + "    failover:\n      tiers: [cluster]\n      region_preference: [us-west]\n"),
        "imports[0].failover.region_preference",
        17,
        "has no effect without the 'any' tier",
    ),
    (
        "max-attempts",
        cfg(IMPORT + "    failover:\n      max_attempts: 17\n"),
        "imports[0].failover.max_attempts",
        16,
        "17 is not in 1..16",
    ),
    (
        "failback-negative",
        cfg(IMPORT + "    failover:\n      failback_after: -1s\n"),
        "imports[0].failover.failback_after",
        16,
        "is not a duration",
    ),
    (
        "import-missing-listen",
        cfg(IMPORT.replace("    listen: 127.0.0.1:16001\n", "")),
        "imports[0].listen",
        13,
        "missing required field",
    ),
    (
        "too-many-endpoints",
        cfg(
            EXPORT.replace(
                "      - 127.0.0.1:19001\n",
                "".join(f"      - 10.0.{i // 250}.{i % 250 + 1}:80\n" for i in range(1001)),
            )
        ),
        "exports[0].endpoints",
        16,
        "1001 endpoints, at most 1000",
    ),
    (
        "too-many-exports",
        cfg("exports:\n" + "  - {}\n" * 1001),
        "exports",
        13,
        "1001 exports, at most 1000",
    ),
    (
        "too-many-imports",
        cfg("imports:\n" + "  - {}\n" * 1001),
        "imports",
        13,
        "1001 imports, at most 1000",
    ),
    ("not-yaml", cfg("exports: [\n"), "", 13, "not valid YAML"),
    ("not-a-mapping", "- cluster\n", "", 1, "expected a mapping with fields cluster"),
    ("key-not-string", cfg("1: x\n"), "", 12, "field names must be strings"),
    ("multi-document", cfg("---\na: 1\n"), "", 12, "not valid YAML"),
    # numbers and names are ASCII: '²' passes str.isdigit() (then int() raised a traceback),
    # '٣٣' passes int() (and was taken as port 33), a trailing newline passed `$`
    ("port-superscript", cfg(**{"inbound: 127.0.0.1:15443": 'inbound: "127.0.0.1:²"'}),
     "listen.inbound", 9, "port '²' is not in 1..65535 (a port is written in ASCII digits 0-9)"),
    ("port-arabic-indic", cfg(**{"inbound: 127.0.0.1:15443": 'inbound: "127.0.0.1:٣٣"'}),
     "listen.inbound", 9, "port '٣٣' is not in 1..65535 (a port is written in ASCII digits"),
    ("endpoint-port-arabic-indic", cfg(EXPORT.replace("19001", "١٩٠٠١")),
     "exports[0].endpoints[0]", 16, "ASCII digits"),
    ("duration-arabic-indic", cfg("limits:\n  connect_timeout: ٣s\n"),
     "limits.connect_timeout", 13, "is not a duration"),
    ("name-trailing-newline", cfg(**{"name: east-1": 'name: "east-1\\n"'}),
     "cluster.name", 2, "is not a valid name"),
    ("trust-domain-trailing-newline",
     cfg(**{"zone: a": 'zone: a\n  trust_domain: "east-1.isthmus.local\\n"'}),
     "cluster.trust_domain", 5, "not a valid trust domain"),
]


@pytest.mark.parametrize(
    ("text", "path", "line", "phrase"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_config(text: str, path: str, line: int, phrase: str) -> None:
    found = problems(text)
    assert len(found) == 1, "\n".join(map(str, found))
    (p,) = found
    assert (p.file, p.path, p.line) == (str(SRC), path, line)
    assert phrase in p.message
    rendered = f"{SRC}:{line}: {path}: " if path else f"{SRC}:{line}: "
    assert str(p).startswith(rendered)


def _health(extra: str):
    (exp,) = parse_config(cfg(EXPORT + extra), SRC).exports
    return exp.health_check


def test_tcp_check_send_and_expect_are_bytes_with_yaml_escapes() -> None:
    hc = _health('    health_check:\n      send: "PING\\r\\n"\n      expect: "+PONG"\n')
    assert (hc.kind, hc.send, hc.expect) == ("tcp", b"PING\r\n", b"+PONG")
    hc = _health('    health_check: {send: "\\n", expect: "é"}\n')
    assert (hc.send, hc.expect) == (b"\n", "é".encode())  # whitespace-only is a payload; UTF-8
    hc = _health("    health_check: {expect: SSH-2.0}\n")  # a banner: expect alone
    assert (hc.send, hc.expect) == (None, b"SSH-2.0")


def test_http_export_defaults_to_an_http_check_of_healthz() -> None:
    assert _health("    protocol: http\n") == dataclasses.replace(
        _health("    health_check: {kind: http}\n")
    )
    hc = _health("    protocol: http\n")
    assert dataclasses.astuple(hc) == ("http", "/healthz", 1.0, 0.5, 2, 2, None, None, 500)
    # a health_check section of an http export is an http check unless it says otherwise
    hc = _health("    protocol: http\n    health_check: {interval: 2s}\n")
    assert (hc.kind, hc.path, hc.interval) == ("http", "/healthz", 2.0)
    assert hc.healthy_status_below == 500
    hc = _health("    protocol: http\n    health_check: {kind: tcp, expect: HTTP}\n")
    assert (hc.kind, hc.path, hc.expect) == ("tcp", None, b"HTTP")


def test_http_check_with_a_path_needs_2xx_or_3xx() -> None:
    assert _health("    health_check: {kind: http, path: /ready}\n").healthy_status_below == 400
    assert _health("    health_check: {kind: http, path: /healthz}\n").healthy_status_below == 400
    assert _health("    health_check: {kind: http}\n").healthy_status_below == 500
    assert _health("").kind == "tcp"  # tcp exports keep the tcp default


def test_send_and_expect_on_an_http_export_name_both_fields() -> None:
    found = problems(cfg(EXPORT + "    protocol: http\n    health_check: {send: a, expect: b}\n"))
    assert [p.path for p in found] == [
        "exports[0].health_check.send",
        "exports[0].health_check.expect",
    ]
    assert all("set kind: tcp" in p.message for p in found)


def test_response_timeout() -> None:
    assert parse_config(cfg(), SRC).outlier_detection.response_timeout is None
    c = parse_config(cfg("outlier_detection:\n  response_timeout: 750ms\n"), SRC)
    assert c.outlier_detection.response_timeout == 0.75
    assert dataclasses.astuple(c.outlier_detection) == (2, 2.0, 60.0, 0.75)
    c = parse_config(cfg("outlier_detection:\n  response_timeout: null\n"), SRC)
    assert c.outlier_detection.response_timeout is None


def test_message_format_matches_the_contract() -> None:
    text = cfg(IMPORT.replace("16001", "99999"))
    with pytest.raises(ConfigError) as info:
        parse_config(text, Path("examples/east-1.yaml"))
    assert str(info.value) == (
        "examples/east-1.yaml:14: imports[0].listen: '127.0.0.1:99999': port '99999' is not in 1..65535"
    )


def test_config_validate_refuses_unicode_digits_with_exit_2(tmp_path: Path) -> None:
    """`isthmus config validate` printed a traceback and exited 1 for listen.inbound
    "127.0.0.1:²"; now: exit 2 and FILE:LINE: field: message."""
    path = tmp_path / "gw.yaml"
    path.write_text(cfg(**{"inbound: 127.0.0.1:15443": 'inbound: "127.0.0.1:²"'}))
    r = subprocess.run([sys.executable, "-m", "isthmus.cli", "config", "validate", str(path)],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"{path}:9: listen.inbound: '127.0.0.1:²': port '²'"), r.stderr
    assert "Traceback" not in r.stderr


def test_config_error_is_an_isthmus_error() -> None:
    assert issubclass(ConfigError, GatewayError)
    assert issubclass(GatewayError, IsthmusError)
    with pytest.raises(ValueError):
        ConfigError([])


def test_many_problems_reported_at_once() -> None:
    text = """\
cluster:
  name: East_1
  region: us-east
federation:
  url: http://fed:7443
  ca_file: ca.pem
listen:
  inbound: 127.0.0.1:15443
  admin: 127.0.0.1:15443
state_dir: state
limits: {connect_timeout: 5, max_connections: yes}
exports:
  - name: echo
    port: 8080
    endpoints: [127.0.0.1:1, 127.0.0.1:1]
imports:
  - {name: echo, listen: 127.0.0.1:70000, failover: {tiers: [any, any]}}
frobnicate: true
"""
    found = problems(text)
    got = [(p.line, p.path) for p in found]
    assert got == [
        (2, "cluster.zone"),
        (2, "cluster.name"),
        (5, "federation.url"),
        (9, "listen.admin"),
        (11, "limits.max_connections"),
        (11, "limits.connect_timeout"),
        (15, "exports[0].endpoints[1]"),
        (17, "imports[0].listen"),
        (17, "imports[0].failover.tiers[1]"),
        (18, "frobnicate"),
    ]
    # Sorted by line, one line of text each.
    assert len(str(ConfigError(found)).splitlines()) == len(found)


@pytest.mark.parametrize(
    ("entries", "want"),
    [
        (  # the repeated entry has another problem too
            "  - {name: echo, port: 8080, endpoints: [127.0.0.1:1]}\n"
            "  - {name: echo, port: 99999, endpoints: [127.0.0.1:2]}\n",
            [(14, "exports[1].port", "not in 1..65535"),
             (14, "exports[1]", "service default/echo is already exported by exports[0]")],
        ),
        (  # the first entry has a problem, the second repeats its service
            "  - {name: echo, port: 0, endpoints: [127.0.0.1:1]}\n"
            "  - {name: echo, namespace: default, port: 8080, endpoints: [127.0.0.1:2]}\n",
            [(13, "exports[0].port", "not in 1..65535"),
             (14, "exports[1]", "service default/echo is already exported by exports[0]")],
        ),
        (  # both have problems; a bad name is not a service to compare
            "  - {name: echo, namespace: shop, port: 8080, endpoints: []}\n"
            "  - {name: echo, namespace: shop, port: 8080, endpoints: [127.0.0.1:2], x: 1}\n"
            "  - {name: Echo, port: 8080, endpoints: [127.0.0.1:3]}\n",
            [(13, "exports[0].endpoints", "at least one endpoint"),
             (14, "exports[1].x", "unknown field"),
             (14, "exports[1]", "service shop/echo is already exported by exports[0]"),
             (15, "exports[2].name", "not a valid name")],
        ),
    ],
    ids=["repeat-is-bad", "first-is-bad", "both-bad"],
)
def test_duplicate_export_is_reported_beside_the_entrys_other_problems(entries, want) -> None:
    found = problems(cfg("exports:\n" + entries))
    got = [(p.line, p.path) for p in found]
    assert got == [(line, path) for line, path, _ in want], "\n".join(map(str, found))
    for p, (_, _, phrase) in zip(found, want, strict=True):
        assert phrase in p.message, p


def test_duplicate_import_is_reported_beside_the_entrys_other_problems() -> None:
    found = problems(cfg(
        "imports:\n"
        "  - {name: echo, listen: 127.0.0.1:16001, failover: {max_attempts: 99}}\n"
        "  - {name: echo, listen: 127.0.0.1:70000}\n"
    ))
    assert [(p.line, p.path) for p in found] == [
        (13, "imports[0].failover.max_attempts"),
        (14, "imports[1].listen"),
        (14, "imports[1]"),
    ], "\n".join(map(str, found))
    assert "service default/echo is already imported by imports[0]" in found[2].message


@pytest.mark.parametrize("host", ["0.0.0.0", "[::]"])
def test_admin_on_every_interface_is_a_warning_not_an_error(host: str) -> None:
    config = parse_config(cfg(**{"admin: 127.0.0.1:15000": f"admin: '{host}:15000'"}), SRC)
    (w,) = config.warnings
    assert (w.file, w.line, w.path) == (str(SRC), 10, "listen.admin")
    assert w.warning().startswith(f"{SRC}:10: warning: listen.admin: '{host}:15000' serves the ")
    assert "every interface" in w.message and "127.0.0.1" in w.message


def test_admin_on_loopback_or_one_address_is_no_warning() -> None:
    assert parse_config(cfg(), SRC).warnings == ()
    text = cfg(**{"admin: 127.0.0.1:15000": "admin: 10.1.2.3:15000"})
    assert parse_config(text, SRC).warnings == ()


def test_warnings_come_with_the_errors_of_a_bad_file() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(cfg("bogus: 1\n", **{"admin: 127.0.0.1": "admin: 0.0.0.0"}), SRC)
    assert [p.path for p in info.value.problems] == ["bogus"]
    assert [w.path for w in info.value.warnings] == ["listen.admin"]


def test_config_validate_prints_warnings_and_exits_0(tmp_path: Path, capsys) -> None:
    from isthmus.cli import main

    good = tmp_path / "gw.yaml"
    good.write_text(cfg(**{"admin: 127.0.0.1": "admin: 0.0.0.0"}))
    assert main(["config", "validate", str(good)]) == 0
    out, err = capsys.readouterr()
    assert err.startswith(f"{good}:10: warning: listen.admin: '0.0.0.0:15000' serves the ")
    assert len(err.splitlines()) == 1
    assert out == f"{good}: ok (cluster east-1, 0 export(s), 0 import(s), 1 warning(s))\n"
    bad = tmp_path / "bad.yaml"
    bad.write_text(cfg("bogus: 1\n", **{"admin: 127.0.0.1": "admin: 0.0.0.0"}))
    assert main(["config", "validate", str(bad)]) == 2
    _, err = capsys.readouterr()
    assert err.splitlines()[0].startswith(f"{bad}:12: bogus: unknown field")
    assert err.splitlines()[1].startswith(f"{bad}:10: warning: listen.admin: ")


# --- load_config: the file itself ---------------------------------------------------------


def _load_problem(path: Path | str) -> Problem:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (p,) = info.value.problems
    return p


def test_load_missing_file(tmp_path: Path) -> None:
    p = _load_problem(tmp_path / "nope.yaml")
    assert p.message == "file not found" and p.line is None


def test_load_directory(tmp_path: Path) -> None:
    assert "is a directory" in _load_problem(tmp_path).message


def test_load_too_big(tmp_path: Path) -> None:
    f = tmp_path / "big.yaml"
    f.write_text("# " + "x" * (1024 * 1024) + "\n")
    assert "larger than 1 MiB" in _load_problem(f).message


def test_load_not_utf8(tmp_path: Path) -> None:
    f = tmp_path / "latin1.yaml"
    f.write_bytes(b"cluster:\n  name: caf\xe9\n")
    p = _load_problem(f)
    assert p.line == 2 and "not UTF-8" in p.message


def test_load_empty(tmp_path: Path) -> None:
    f = tmp_path / "empty.yaml"
    f.write_text("# nothing here\n")
    assert "empty" in _load_problem(f).message


def test_load_control_character(tmp_path: Path) -> None:
    f = tmp_path / "ctl.yaml"
    f.write_text("cluster:\n  name: a\x01\n")
    p = _load_problem(f)
    assert p.line == 2 and "not valid YAML" in p.message


def test_load_problem_names_the_path_as_given(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("gw.yaml").write_text(cfg("bogus: 1\n"))
    assert str(_load_problem("gw.yaml")).startswith("gw.yaml:12: bogus: unknown field")


# --- properties -----------------------------------------------------------------------------

_MAX_DURATION_S = 30 * 86400  # the longest duration a config accepts (identity.svid_ttl)
_DURATIONS = st.sampled_from([("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)]).flatmap(
    lambda u: st.tuples(
        st.integers(min_value=1, max_value=int(_MAX_DURATION_S / u[1])), st.just(u[0])
    )
)


@given(_DURATIONS)
def test_duration_round_trip(d: tuple[int, str]) -> None:
    # Durations in the range configs accept survive format -> parse (to format's precision).
    # (Above ~1e6 hours format_duration writes '1e+06h', which parse_duration refuses.)
    n, unit = d
    seconds = parse_duration(f"{n}{unit}")
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds, rel=1e-3, abs=5e-4)


@settings(max_examples=50, deadline=None)
@given(st.integers(min_value=1, max_value=60_000))
def test_connect_timeout_accepts_any_valid_duration(ms: int) -> None:
    c = parse_config(cfg(f"limits:\n  connect_timeout: {ms}ms\n"), SRC)
    assert c.limits.connect_timeout == pytest.approx(ms / 1000)


_SECTIONS = {
    # section path in the document -> allowed keys there
    (): {
        "cluster",
        "federation",
        "listen",
        "state_dir",
        "identity",
        "limits",
        "outlier_detection",
        "peer_probe",
        "exports",
        "imports",
    },
    ("cluster",): {"name", "region", "zone", "trust_domain"},
    ("federation",): {"url", "ca_file", "token_file"},
    ("listen",): {"inbound", "admin", "advertise"},
    ("exports", 0): {
        "name",
        "namespace",
        "port",
        "protocol",
        "endpoints",
        "health_check",
        "allowed_consumers",
    },
    ("exports", 0, "health_check"): {
        "kind",
        "path",
        "send",
        "expect",
        "interval",
        "timeout",
        "healthy_threshold",
        "unhealthy_threshold",
    },
    ("imports", 0): {"name", "namespace", "listen", "failover"},
    ("imports", 0, "failover"): {"tiers", "region_preference", "failback_after", "max_attempts"},
}


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(sorted(_SECTIONS, key=str)),
    st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,15}", fullmatch=True),
    st.one_of(st.integers(), st.text(max_size=10), st.booleans(), st.none()),
)
def test_unknown_keys_always_rejected(section: tuple, key: str, value: object) -> None:
    if key in _SECTIONS[section]:
        return
    doc = yaml.safe_load(
        cfg(
            EXPORT
            + "    health_check: {kind: tcp}\n"
            + IMPORT
            + "    failover: {max_attempts: 2}\n"
        )
    )
    target = doc
    for part in section:
        target = target[part]
    target[key] = value
    found = problems(yaml.safe_dump(doc, sort_keys=False))
    dotted = ".".join(f"[{p}]" if isinstance(p, int) else p for p in section).replace(".[", "[")
    where = f"{dotted}.{key}" if dotted else key
    assert [(p.path, p.message.split(" (")[0]) for p in found] == [
        (where, f"unknown field {key!r}")
    ]


def test_reference_doc_full_example_is_valid() -> None:
    doc = (ROOT / "README.md").read_text()
    block = doc.split("### Full example", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    c = parse_config(block, SRC)
    assert c.exports[0].health_check.path == "/healthz"
    assert c.exports[0].allowed_consumers == ("east-2", "west-1", "east-1")
