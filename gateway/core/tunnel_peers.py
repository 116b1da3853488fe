"""Which WireGuard peers a gateway should have: the catalog -> peers, and what to change (pure).

A peer is a live cluster (one holding its lease) other than ours whose record has a tunnel with
an overlay address: public key, underlay endpoint, and its overlay address as the one allowed
IP (so the tunnel carries exactly the traffic to and from that gateway). A cluster whose lease
expires, that leaves, or whose record loses its tunnel is removed; a changed endpoint, address
or key is an update (a new key is a removal of the old peer and a new one).

Key rotation (gateway/tunnel/rotation.py): a cluster first announces `next_public_key`; peers
add it as a second peer with no allowed IP (it can complete a handshake, it carries nothing).
When the cluster switches to it, it handshakes at once with the key every peer already knows,
and as soon as its record says `public_key` = the new key, the peers move the allowed IP to it
and drop the old one: the tunnel carries nothing only for that catalog round trip.

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
    routed: bool = True  # False: a cluster's announced next key, known but carrying nothing

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
        if t.next_public_key and t.next_public_key != t.public_key:
            out[t.next_public_key] = Peer(name, t.next_public_key, t.endpoint,
                                          t.overlay_address, routed=False)
    return out


def peer_changes(held: Mapping[str, Peer], wanted: Mapping[str, Peer]
                 ) -> tuple[list[Peer], list[Peer]]:
    """(peers to set: new or changed, peers to remove), each sorted by cluster."""
    upsert = [p for k, p in wanted.items() if held.get(k) != p]
    remove = [p for k, p in held.items() if k not in wanted]
    return sorted(upsert, key=lambda p: p.cluster), sorted(remove, key=lambda p: p.cluster)
