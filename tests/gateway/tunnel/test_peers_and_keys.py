"""gateway/core/tunnel_peers.py (pure) and gateway/tunnel/keys.py."""

from __future__ import annotations

import base64
import stat

import pytest

from federation.model import Catalog, ClusterRecord, Tunnel
from gateway.core.tunnel_peers import Peer, peer_changes, wanted_peers
from gateway.errors import GatewayError
from gateway.tunnel.keys import KEY_FILE, KeyPair, b64_to_hex, hex_to_b64, load_or_create


def key(i: int) -> str:
    return base64.b64encode(bytes([i]) * 32).decode()


def rec(name: str, k: int | None, overlay: str = "", nxt: int | None = None,
        endpoint: str = "10.77.0.1:51820") -> ClusterRecord:
    t = None if k is None else Tunnel(key(k), endpoint, overlay, key(nxt) if nxt else "")
    return ClusterRecord(name, "r", "z", f"{name}.td", "10.77.0.1:15443", t)


def cat(*records: ClusterRecord, live=None) -> Catalog:
    return Catalog(revision=1, clusters={r.name: r for r in records},
                   live=frozenset(live if live is not None else [r.name for r in records]))


def test_peers_are_live_tunneled_clusters_with_an_address_but_us():
    c = cat(rec("me", 1, "10.99.0.1"), rec("a", 2, "10.99.0.2"), rec("b", 3, ""),
            rec("c", None), rec("d", 4, "10.99.0.4"), live=["me", "a", "b", "c"])
    got = wanted_peers(c, "me")
    assert [(p.cluster, p.overlay_address, p.allowed_ip) for p in got.values()] == [
        ("a", "10.99.0.2", "10.99.0.2/32")]  # b: no address yet; c: no tunnel; d: no lease


def test_an_announced_next_key_is_a_peer_without_route():
    got = wanted_peers(cat(rec("a", 2, "fd99::2", nxt=5)), "me")
    assert [(p.public_key, p.routed, p.allowed_ip) for p in got.values()] == [
        (key(2), True, "fd99::2/128"), (key(5), False, "fd99::2/128")]


@pytest.mark.parametrize("held, wanted, upsert, remove", [
    ({}, {"k1": "a"}, ["a"], []),
    ({"k1": "a"}, {"k1": "a"}, [], []),
    ({"k1": "a"}, {}, [], ["a"]),
    ({"k1": "a"}, {"k1": "a-moved"}, ["a-moved"], []),  # new endpoint: an update
    ({"k1": "a"}, {"k2": "a-newkey"}, ["a-newkey"], ["a"]),  # new key: remove + add
])
def test_peer_changes(held, wanted, upsert, remove):
    def peer(tag: str) -> Peer:
        return Peer(tag, "k", "1.2.3.4:1" if "moved" not in tag else "1.2.3.5:1", "10.99.0.2")

    up, rm = peer_changes({k: peer(v) for k, v in held.items()},
                          {k: peer(v) for k, v in wanted.items()})
    assert [p.cluster for p in up] == upsert and [p.cluster for p in rm] == remove


def test_key_file_is_made_0600_and_read_back(tmp_path):
    pair = load_or_create(tmp_path)
    path = tmp_path / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create(tmp_path) == pair
    assert len(pair.public) == 32 and pair.public_b64.endswith("=")
    assert hex_to_b64(b64_to_hex(pair.public_b64)) == pair.public_b64
    assert base64.b64encode(pair.private).decode() not in repr(pair)


def test_a_damaged_key_file_is_an_error_naming_it(tmp_path):
    (tmp_path / KEY_FILE).write_text("not a key\n")
    with pytest.raises(GatewayError, match=KEY_FILE):
        load_or_create(tmp_path)


def test_keypair_matches_wireguards_derivation():
    # RFC 7748 section 6.1 test vector (Alice)
    priv = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    assert KeyPair.from_private(priv).public.hex() == (
        "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
