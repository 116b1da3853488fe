"""Overlay addresses for WireGuard tunnels (`federation serve --overlay-cidr`), pure.

Each cluster that runs a tunnel gets one address of the CIDR, held in its cluster record
(so durably in the store, and kept across re-joins and record updates); the lowest address
no other record holds is given to a newcomer. The CIDR's network and broadcast addresses
(IPv4) are never given. A full CIDR is an error the join reports (409).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from federation.errors import InputError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
MAX_PREFIX_HOSTS = 1 << 20  # /12 for IPv4: more clusters than a federation will have


def parse_cidr(text: str) -> Network:
    """`--overlay-cidr`: a network like 10.99.0.0/16 (host bits must be zero)."""
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as e:
        raise InputError(f"--overlay-cidr: {text!r} is not a network like 10.99.0.0/16: "
                         f"{e}") from None
    if net.num_addresses < 4:
        raise InputError(f"--overlay-cidr: {text!r} has room for fewer than 2 clusters")
    return net


def allocate(net: Network, held: Iterable[str], wanted: str = "") -> str:
    """`wanted` if it is in `net` and free (the cluster's own, kept), else the lowest free
    address. InputError if `net` is full."""
    taken = {ipaddress.ip_address(a) for a in held if a}
    if wanted:
        w = ipaddress.ip_address(wanted)
        if w in net and w not in taken and _usable(net, w):
            return str(w)
    for i, host in enumerate(net.hosts()):
        if i >= MAX_PREFIX_HOSTS:
            break
        if host not in taken:
            return str(host)
    raise InputError(f"overlay CIDR {net} is full ({len(taken)} addresses held)")


def _usable(net: Network, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(net, ipaddress.IPv4Network) and net.prefixlen < 31:
        return ip not in (net.network_address, net.broadcast_address)
    return True
