"""Tests of gateway.config: health checks, many problems at once, duplicates, warnings, and
`isthmus config validate`."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from federation.errors import IsthmusError
from gateway.config.schema import (
    parse_config,
)
from gateway.errors import ConfigError, GatewayError
from tests.gateway.config.samples import EXPORT, IMPORT, ROOT, SRC, cfg, problems


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
        "examples/east-1.yaml:14: imports[0].listen: '127.0.0.1:99999': "
        "port '99999' is not in 1..65535"
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
