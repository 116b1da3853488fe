"""The gateway file's sections for what runs beside the data path: `reload`, `dns`, `tunnel`
and `xds` — their field tables and the builders of their values (schema.py's `_Schema` is a
SideSections, and its TOP table names these). Pure, like schema.py.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

from yaml.nodes import Node

from federation.units import format_duration, format_hostport
from gateway.config.reader import (
    DAY,
    Field,
    Reader,
    Table,
    _is_wildcard,
    choice,
    duration,
    integer,
)
from gateway.config.values import DnsConfig, TunnelConfig

_hostport = Reader.hostport
WATCH_MODES = ("auto", "inotify", "poll", "sighup")
_IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")
_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
MAX_DNS_ADDRESSES = 64

RELOAD: Table = (
    Field("watch", choice(WATCH_MODES, "a watch mode"), "auto",
          doc="auto (inotify, else polling), inotify, poll, or sighup (SIGHUP only)"),
    Field("poll_interval", duration(minimum=0.1, maximum=60.0), 1.0,
          doc="how often `poll` looks at the files"),
    Field("debounce", duration(maximum=10.0, zero_ok=True), 0.2,
          doc="writes within this are one reload"),
    Field("drain_timeout", duration(maximum=DAY, zero_ok=True), 30.0,
          doc="a removed import's open connections may last this long, then are closed"),
)

DNS: Table = (
    Field("listen", _hostport, doc="UDP and TCP, one port"),
    Field("ttl", duration(maximum=3600.0, zero_ok=True), 5.0,
          doc="of every answer, and of negative answers (SOA minimum); whole seconds"),
    Field("zone", lambda r, n, p: SideSections.zone(r, n, p), "clusterset.local"),
    Field("addresses", lambda r, n, p: SideSections.addresses(r, n, p), (),
          doc="answered for imports listening on 0.0.0.0 / ::"),
)

TUNNEL: Table = (
    Field("kind", choice(("wireguard",), "a tunnel kind"), doc="wireguard"),
    Field("listen_port", integer(1, 65535), 51820, doc="UDP, on every address"),
    Field("interface", lambda r, n, p: SideSections.interface(r, n, p), "isthmus0",
          doc="unique on the machine"),
    Field("endpoint", _hostport, None,
          doc="host:port peers send to; default: listen.advertise's host and listen_port"),
    Field("rotate_every", duration(maximum=365 * DAY, zero_ok=True), DAY,
          doc="a new key pair this often; 0s: never"),
    Field("rotation_overlap", duration(minimum=1.0, maximum=DAY), 10.0,
          doc="the next key is announced this long before it is used"),
)

XDS: Table = (
    Field("listen", _hostport, doc="plaintext gRPC (ADS); this cluster's apps only"),
)
TRACING: Table = (
    Field("otlp_endpoint", lambda r, n, p: SideSections.otlp_url(r, n, p),
          doc="OTLP/HTTP traces URL, e.g. http://127.0.0.1:4318/v1/traces"),
    Field("service_name", Reader.name, "isthmus-gateway",
          doc="the spans' service.name (the cluster is an attribute)"),
    Field("flush_interval", duration(minimum=0.05, maximum=60.0), 1.0,
          doc="spans are sent in one batch this often"),
    Field("max_queue", integer(1, 1_000_000), 4096,
          doc="spans waiting beyond this are dropped (counted)"),
)


class SideSections(Reader):
    """Builders of the side sections' values (a part of schema._Schema)."""

    def otlp_url(self, node: Node, path: str) -> str | None:
        """http(s)://host[:port]/path, nothing else (spans leave the process here)."""
        value = self.string(node, path)
        if value is None:
            return None
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError as e:
            self.problem(node, path, f"{value!r} is not a valid URL ({e})")
            return None
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query \
                or parts.fragment or parts.username or parts.password:
            self.problem(node, path, f"{value!r}: write http(s)://host:port/v1/traces (OTLP/HTTP,"
                         " no user, query or #)")
            return None
        return value

    def dns(self, node: Node, path: str) -> DnsConfig | None:
        sec = self.section(node, path, DNS)
        if sec is None or not sec.ok:
            return None
        v = sec.values
        ttl = v["ttl"]
        if ttl != int(ttl):
            self.problem(sec.nodes["ttl"], f"{path}.ttl", f"{format_duration(ttl)} is not a "
                         "whole number of seconds (DNS TTLs are seconds)")
            return None
        return DnsConfig(v["listen"], int(ttl), v["zone"], v["addresses"])

    def tunnel(self, node: Node, path: str) -> TunnelConfig | None:
        sec = self.section(node, path, TUNNEL)
        if sec is None or not sec.ok:
            return None
        v = sec.values
        endpoint = format_hostport(*v["endpoint"]) if v["endpoint"] is not None else ""
        if v["endpoint"] is not None and _is_wildcard(v["endpoint"][0]):
            self.problem(sec.nodes["endpoint"], f"{path}.endpoint", f"{endpoint!r} is a "
                         "wildcard address peers cannot send to; write this host's address")
            return None
        if v["rotate_every"] and v["rotate_every"] <= v["rotation_overlap"]:
            self.problem(sec.nodes.get("rotate_every", node), f"{path}.rotate_every",
                         f"{format_duration(v['rotate_every'])} must be longer than "
                         f"rotation_overlap ({format_duration(v['rotation_overlap'])})")
            return None
        return TunnelConfig(v["kind"], v["listen_port"], v["interface"], endpoint,
                            v["rotate_every"], v["rotation_overlap"])

    def interface(self, node: Node, path: str) -> str | None:
        name = self.string(node, path)
        if name is not None and (not _IFNAME.fullmatch(name) or name in (".", "..")):
            self.problem(node, path, f"{name!r} is not an interface name (1..15 letters, "
                         "digits, '_', '.', '-')")
            return None
        return name

    def zone(self, node: Node, path: str) -> str | None:
        text = self.string(node, path)
        if text is None:
            return None
        zone = text.lower().removesuffix(".")
        labels = zone.split(".")
        if len(zone) > 200 or not all(_DNS_LABEL.fullmatch(x) for x in labels):
            self.problem(node, path, f"{text!r} is not a DNS zone name (dot-separated labels of "
                         "letters, digits and '-', like clusterset.local)")
            return None
        return zone

    def addresses(self, node: Node, path: str) -> tuple[str, ...] | None:
        nodes = self.items(node, path, "IP addresses", MAX_DNS_ADDRESSES)
        if nodes is None:
            return None
        out: list[str] = []
        for i, n in enumerate(nodes):
            text = self.string(n, f"{path}[{i}]")
            if text is None:
                return None
            try:
                ip = ipaddress.ip_address(text)
            except ValueError:
                self.problem(n, f"{path}[{i}]", f"{text!r} is not an IP address")
                return None
            if ip.is_unspecified:
                self.problem(n, f"{path}[{i}]", f"{text!r} is a wildcard; write an address "
                             "apps can connect to")
                return None
            out.append(str(ip))
        return tuple(out)
