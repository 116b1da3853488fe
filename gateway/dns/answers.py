"""DNS answers for the clusterset zone: the catalog and this gateway's imports -> records (pure).

Theory of operation
-------------------
The Kubernetes multi-cluster services API names an imported service
`<service>.<namespace>.svc.<zone>` (zone `clusterset.local` by default). A gateway answers for
the services *it imports*: an app that resolves the name gets the address of the import's local
listener, and connects there as it would to the address in the config.

`build()` turns (settings, imports, catalog) into a `Records` view, rebuilt whenever the
catalog or the imports change; `resolve()` answers one question from it:

    name                                          type    data
    <zone>                                        SOA     ns.<zone> hostmaster.<zone> serial ...
    <zone>                                        NS      ns.<zone>
    ns.<zone>                                     A/AAAA  the DNS listener's address (if not a
                                                          wildcard)
    <svc>.<ns>.svc.<zone>                         A/AAAA  the import's listen address
    <svc>.<ns>.svc.<zone>                         SRV     0 100 <listen port> <svc>.<ns>.svc.<zone>
    _<port-name>._tcp.<svc>.<ns>.svc.<zone>       SRV     the same; port-name is the service's
                                                          protocol as exported (tcp, http)

A service's names exist only while at least one live cluster exports it to us (the catalog
holds only live clusters' exports as candidates; `allowed_consumers` must admit us), as a
ServiceImport exists only while the service is exported. An import listening on a wildcard
address (0.0.0.0, ::) is answered with `dns.addresses` (default: the DNS listener's address
when that is not a wildcard; else the name has no A/AAAA, only SRV).

Answers, as an authoritative server without recursion gives them:
- a name outside the zone, or a class other than IN: REFUSED;
- a name that exists, asked for a type it has: NOERROR with the records (SRV with the target's
  A/AAAA as additional records); `ANY` gets every type the name has;
- a name that exists (or is the parent of one that does: `svc.<zone>`, `<ns>.svc.<zone>`)
  without that type: NOERROR, no answer, the SOA in the authority section (NODATA);
- any other name in the zone: NXDOMAIN with the SOA in the authority section (negative
  caching for the SOA's minimum, which is the TTL).
Names compare case-insensitively (dns.name.Name does); answers carry the name as asked.

Pure: values in, values out (dnspython's rdata and names are values); no I/O.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from federation.model import Catalog, ServiceKey
from gateway.config.reader import _is_wildcard
from gateway.config.values import ImportConfig

__all__ = ["DnsSettings", "Records", "Resolution", "build", "resolve"]

A, AAAA, SRV, SOA, NS, ANY = (dns.rdatatype.A, dns.rdatatype.AAAA, dns.rdatatype.SRV,
                              dns.rdatatype.SOA, dns.rdatatype.NS, dns.rdatatype.ANY)
IN = dns.rdataclass.IN
NOERROR, NXDOMAIN, REFUSED = 0, 3, 5


@dataclass(frozen=True, slots=True)
class DnsSettings:
    zone: str = "clusterset.local"
    ttl: int = 5
    listen_host: str = "127.0.0.1"  # the DNS listener's host (ns.<zone>'s address)
    addresses: tuple[str, ...] = ()  # for imports on a wildcard address (empty: listen_host)


@dataclass(frozen=True, slots=True)
class Resolution:
    rcode: int
    answer: tuple[dns.rrset.RRset, ...] = ()
    authority: tuple[dns.rrset.RRset, ...] = ()
    additional: tuple[dns.rrset.RRset, ...] = ()


@dataclass(frozen=True)
class Records:
    """Every record of the zone: name -> type -> rdatas (one TTL for all)."""

    zone: dns.name.Name
    ttl: int
    names: dict[dns.name.Name, dict[int, tuple[dns.rdata.Rdata, ...]]] = field(
        default_factory=dict)
    parents: frozenset[dns.name.Name] = frozenset()  # empty non-terminals
    services: tuple[dict, ...] = ()  # for /status: what each name answers

    def soa(self) -> dns.rrset.RRset:
        return self.rrset(self.zone, SOA, self.names[self.zone][SOA])

    def rrset(self, owner: dns.name.Name, rdtype: int, rdatas: Iterable[dns.rdata.Rdata]
               ) -> dns.rrset.RRset:
        out = dns.rrset.RRset(owner, IN, rdtype)
        for rd in rdatas:
            out.add(rd, self.ttl)
        return out


def _rd(rdtype: int, text: str) -> dns.rdata.Rdata:
    return dns.rdata.from_text(IN, rdtype, text)


def _host_addresses(host: str, settings: DnsSettings) -> tuple[str, ...]:
    """The addresses an app reaches a listener on `host` at (none if it cannot be said)."""
    if host == "localhost":
        return ("127.0.0.1",)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return ()
    if not ip.is_unspecified:
        return (str(ip),)
    if settings.addresses:
        return settings.addresses
    if _is_wildcard(settings.listen_host):
        return ()  # nothing apps can be told
    return _host_addresses(settings.listen_host, settings)


def _address_records(addresses: Iterable[str]) -> dict[int, tuple[dns.rdata.Rdata, ...]]:
    v4 = tuple(_rd(A, a) for a in addresses if ipaddress.ip_address(a).version == 4)
    v6 = tuple(_rd(AAAA, a) for a in addresses if ipaddress.ip_address(a).version == 6)
    return {t: rds for t, rds in ((A, v4), (AAAA, v6)) if rds}


def build(settings: DnsSettings, imports: Sequence[ImportConfig], catalog: Catalog, me: str,
          serial: int) -> Records:
    """The zone's records now. `serial` is the SOA serial (the caller raises it whenever the
    records change)."""
    zone = dns.name.from_text(settings.zone)
    ns = dns.name.from_text("ns", zone)
    ttl = settings.ttl
    names: dict[dns.name.Name, dict[int, tuple[dns.rdata.Rdata, ...]]] = {
        zone: {
            SOA: (_rd(SOA, f"{ns} hostmaster.{zone} {serial % 2**32} {max(ttl, 60)} "
                           f"{max(ttl, 60)} 86400 {ttl}"),),
            NS: (_rd(NS, str(ns)),),
        },
    }
    glue = _address_records(_host_addresses(settings.listen_host, settings))
    if glue:
        names[ns] = glue
    services: list[dict] = []
    for im in sorted(imports, key=lambda i: (i.namespace, i.name)):
        svc = ServiceKey(im.namespace, im.name)
        exporters = [e for e in catalog.exports_of(svc) if e.allows(me)]
        host, port = im.listen
        base = dns.name.from_text(f"{im.name}.{im.namespace}.svc", zone)
        row = {"name": base.to_text(omit_final_dot=True), "service": str(svc),
               "listen": f"{host}:{port}",
               "exported_by": sorted({e.cluster for e in exporters}), "srv": []}
        services.append(row)
        if not exporters:
            continue  # no ServiceImport without an export: the name does not exist
        addresses = _host_addresses(host, settings)
        row["addresses"] = list(addresses)
        srv = _rd(SRV, f"0 100 {port} {base}")
        names[base] = {**_address_records(addresses), SRV: (srv,)}
        for proto in sorted({e.protocol for e in exporters}):
            named = dns.name.from_text(f"_{proto}._tcp", base)
            names[named] = {SRV: (srv,)}
            row["srv"].append(named.to_text(omit_final_dot=True))
    parents: set[dns.name.Name] = set()
    for name in names:
        p = name.parent() if name != zone else zone
        while p != zone and p.is_subdomain(zone):
            parents.add(p)
            p = p.parent()
    return Records(zone, ttl, names, frozenset(parents - set(names)), tuple(services))


def resolve(records: Records, qname: dns.name.Name, qtype: int, qclass: int = IN) -> Resolution:
    """The answer to one question (module docstring: the rules)."""
    if qclass not in (IN, dns.rdataclass.ANY) or not qname.is_subdomain(records.zone):
        return Resolution(REFUSED)
    types = records.names.get(qname)
    if types is None:
        if qname in records.parents:
            return Resolution(NOERROR, authority=(records.soa(),))
        return Resolution(NXDOMAIN, authority=(records.soa(),))
    wanted = sorted(types) if qtype == ANY else [qtype] if qtype in types else []
    if not wanted:
        return Resolution(NOERROR, authority=(records.soa(),))
    answer = tuple(records.rrset(qname, t, types[t]) for t in wanted)
    additional: list[dns.rrset.RRset] = []
    if qtype != ANY:
        for rr in answer:
            if rr.rdtype == SRV:
                target = rr[0].target
                for t in (A, AAAA):
                    if t in records.names.get(target, {}):
                        additional.append(records.rrset(target, t, records.names[target][t]))
    return Resolution(NOERROR, answer, (), tuple(additional))
