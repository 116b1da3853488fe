"""Which WireGuard peers a gateway should have: the catalog -> peers, and what to change (pure).

A peer is a live cluster (one holding its lease) other than ours whose record has a tunnel with
an overlay address: public key, underlay endpoint, and its overlay address as the one allowed
IP (so the tunnel carries exactly the traffic to and from that gateway). A cluster whose lease
expires, that leaves, or whose record loses its tunnel is removed; a changed endpoint, address
or key is an update (a new key is a removal of the old peer and a new one).

    wanted_peers(catalog, me)  -> {public_key: Peer}
    peer_changes(held, wanted) -> (to add or update, to remove)
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from federation.model import Catalog

__all__ = ["Peer", "peer_changes", "wanted_peers"]


@dataclass(frozen=True, slots=True)
class Peer:
    cluster: str
    public_key: str  # base64
    endpoint: str  # host:port
    overlay_address: str

    @property
    def allowed_ip(self) -> str:
        ip = ipaddress.ip_address(self.overlay_address)
        return f"{ip}/{ip.max_prefixlen}"


def wanted_peers(catalog: Catalog, me: str) -> dict[str, Peer]:
    out: dict[str, Peer] = {}
    for name in sorted(catalog.live):
        rec = catalog.clusters.get(name)
        if name == me or rec is None or rec.tunnel is None or not rec.tunnel.overlay_address:
            continue
        t = rec.tunnel
        out[t.public_key] = Peer(name, t.public_key, t.endpoint, t.overlay_address)
    return out


def peer_changes(held: Mapping[str, Peer], wanted: Mapping[str, Peer]
                 ) -> tuple[list[Peer], list[Peer]]:
    """(peers to set: new or changed, peers to remove), each sorted by cluster."""
    upsert = [p for k, p in wanted.items() if held.get(k) != p]
    remove = [p for k, p in held.items() if k not in wanted]
    return sorted(upsert, key=lambda p: p.cluster), sorted(remove, key=lambda p: p.cluster)
