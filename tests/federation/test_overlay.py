"""Overlay addresses for WireGuard tunnels: federation/overlay.py (pure) and the federation
giving them at join and record updates, over real TLS on 127.0.0.1."""

from __future__ import annotations

import base64
import ipaddress
from dataclasses import replace

import pytest

from federation.errors import FederationError, InputError
from federation.model import ClusterRecord, Tunnel
from federation.overlay import allocate, parse_cidr
from tests.helpers.federation import make_cluster

KEY = base64.b64encode(bytes(range(32))).decode()


def test_allocate_lowest_free_keeps_own_and_skips_network_and_broadcast():
    net = parse_cidr("10.99.0.0/30")
    assert allocate(net, []) == "10.99.0.1"
    assert allocate(net, ["10.99.0.1"]) == "10.99.0.2"
    assert allocate(net, ["10.99.0.1"], wanted="10.99.0.2") == "10.99.0.2"
    assert allocate(net, ["10.99.0.2"], wanted="10.99.0.2") == "10.99.0.1"  # taken: another
    assert allocate(net, [], wanted="10.99.0.3") == "10.99.0.1"  # broadcast is not a host
    assert allocate(net, [], wanted="192.168.0.1") == "10.99.0.1"  # outside: another
    with pytest.raises(InputError, match="full"):
        allocate(net, ["10.99.0.1", "10.99.0.2"])
    assert allocate(parse_cidr("fd99::/126"), ["fd99::1"]) == "fd99::2"


@pytest.mark.parametrize("bad", ["10.99.0.1/16", "nope", "10.0.0.0/31"])
def test_bad_cidrs(bad):
    with pytest.raises(InputError, match="--overlay-cidr"):
        parse_cidr(bad)


@pytest.mark.parametrize("tunnel, error", [
    ({"public_key": "short", "endpoint": "127.0.0.1:51820"}, "public_key"),
    ({"public_key": KEY, "endpoint": "nope"}, "endpoint"),
    ({"public_key": KEY, "endpoint": "127.0.0.1:51820", "overlay_address": "x"}, "overlay"),
])
def test_tunnel_fields_are_checked(tunnel, error):
    obj = {**make_cluster("e").record.to_json(), "tunnel": tunnel}
    with pytest.raises(InputError, match=error):
        ClusterRecord.from_json(obj)


def tunneled(name: str, key: str = KEY):
    c = make_cluster(name)
    c.record = replace(c.record, tunnel=Tunnel(key, "127.0.0.1:51820", "10.200.0.9"))
    return c


async def test_joins_get_addresses_that_stay(make_fed):
    fed = await make_fed(overlay_cidr="10.99.0.0/24")
    a, b = tunneled("east-1"), tunneled("east-2")
    ca = await fed.join(a)
    cb = await fed.join(b)
    cat = await ca.catalog()
    got = {n: r.tunnel.overlay_address for n, r in cat.clusters.items()}
    assert got == {"east-1": "10.99.0.1", "east-2": "10.99.0.2"}  # what they sent is not used
    # a record update (a new endpoint) and a re-join keep the address
    await cb.put_record(replace(b.record, tunnel=Tunnel(KEY, "127.0.0.2:51821", "")))
    await fed.client().join(await fed.token("east-2"), b.record, b.bundle(1), prove_with=b.svid)
    rec = (await ca.catalog()).clusters["east-2"]
    assert rec.tunnel.overlay_address == "10.99.0.2"
    assert ipaddress.ip_address(rec.tunnel.overlay_address) in ipaddress.ip_network(
        "10.99.0.0/24")


async def test_a_tunnel_without_overlay_cidr_is_refused_and_keeps_the_token(make_fed):
    fed = await make_fed()
    a = tunneled("east-1")
    token = await fed.token("east-1")
    with pytest.raises(FederationError) as e:
        await fed.client().join(token, a.record, a.bundle(1))
    assert e.value.status == 409 and "--overlay-cidr" in str(e.value)
    plain = make_cluster("east-1")
    plain.record = replace(a.record, tunnel=None)
    await fed.client().join(token, plain.record, a.bundle(1))  # the token still works
