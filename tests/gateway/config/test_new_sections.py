"""Config sections added with live reload, DNS, tunnels, xDS and federation replicas."""

from __future__ import annotations

import pytest

from gateway.config.schema import parse_config
from tests.gateway.config.samples import SRC, cfg, problems


def test_federation_url_may_list_replicas():
    c = parse_config(cfg(**{"url: https://127.0.0.1:7443":
                            "url: [https://a:7443, https://b:7443/]"}), SRC)
    assert c.federation.url == "https://a:7443"
    assert c.federation.replicas == ("https://a:7443", "https://b:7443")
    assert parse_config(cfg(), SRC).federation.replicas == ("https://127.0.0.1:7443",)


@pytest.mark.parametrize("value, message", [
    ("[]", "at least one"),
    ("[https://a:1, https://a:1]", "twice"),
    ("[http://a:1]", "https"),
])
def test_bad_replica_lists(value, message):
    got = problems(cfg(**{"url: https://127.0.0.1:7443": f"url: {value}"}))
    assert got and got[0].path.startswith("federation.url") and message in got[0].message


@pytest.mark.parametrize("extra, path, message", [
    ("dns:\n  listen: 127.0.0.1:15000\n", "dns.listen", "clashes"),
    ("dns:\n  listen: 127.0.0.1:15353\n  ttl: 1500ms\n", "dns.ttl", "whole number"),
    ("dns:\n  listen: 127.0.0.1:15353\n  zone: bad_zone\n", "dns.zone", "zone name"),
    ("xds:\n  listen: 127.0.0.1:15443\n", "xds.listen", "clashes"),
    ("tunnel:\n  kind: wireguard\n", "tunnel", "0.0.0.0"),
    ("reload:\n  watch: off\n", "reload.watch", "string"),
])
def test_problems_name_the_field(extra, path, message):
    got = problems(cfg(extra))
    assert any(p.path == path and message in p.message for p in got), got


def test_tunnel_on_a_wildcard_inbound():
    c = parse_config(cfg("tunnel:\n  kind: wireguard\n  interface: wg0\n  rotate_every: 1h\n",
                         **{"inbound: 127.0.0.1:15443": "inbound: 0.0.0.0:15443",
                            "admin: 127.0.0.1:15000": "admin: 127.0.0.1:15000\n  advertise: "
                                                       "10.0.0.1:15443"}), SRC)
    assert c.tunnel.interface == "wg0" and c.tunnel.rotate_every == 3600.0
