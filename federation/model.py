"""The shared vocabulary: frozen values for localities, endpoints, exports, clusters, the catalog.

Theory of operation
-------------------
The federation keeps its state as keys in a revisioned store (shaped like etcd). The catalog is
a pure fold of those keys:

    catalog/clusters/<cluster>              ClusterRecord   (written at join)
    catalog/bundles/<trust-domain>          SPIFFE bundle   (JWKS; written by its own cluster)
    catalog/live/<cluster>                  {"since": t}    (attached to the cluster's lease)
    catalog/exports/<cluster>/<ns>/<name>   Export          (attached to the cluster's lease)
    catalog/imports/<cluster>/<ns>/<name>   ImportRecord    (attached to the cluster's lease)
    catalog/drills/<id>                     Drill           (written by the federation only)
    drills/<id>/samples/<cluster>/<second>  probe counts    (not in the catalog: never watched)

Keys attached to a lease vanish when it expires, so a cluster that stops renewing loses its
exports in every other cluster's view. `Catalog.apply` folds one store event at a time, which is
how a gateway follows the federation's watch; `Catalog.from_items` folds a snapshot.

Everything coming from the wire goes through `*.from_json`, which validates and names the field
that was wrong, so a malformed peer raises `InputError` instead of corrupting a view.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any, NamedTuple

from federation.drill_model import DRILLS, Drill
from federation.errors import InputError
from federation.fields import check_name, choices, get_field
from federation.units import parse_hostport

CATALOG_PREFIX = "catalog/"
CLUSTERS = "catalog/clusters/"
BUNDLES = "catalog/bundles/"
LIVE = "catalog/live/"
EXPORTS = "catalog/exports/"
IMPORTS = "catalog/imports/"
# DRILLS = "catalog/drills/" is drill_model's (with the Drill it holds)
SAMPLES = "drills/"
TOKENS = "tokens/"
SILENT = "silent/"  # silent/<c>: {"since": t}, when c's lease ended (not pushed to watchers)

MAX_ENDPOINTS = 1000
MAX_CONSUMERS = 1000
# Export protocols: the app protocol behind the port. Both are relayed at L4 for now; an `http`
# export gets an HTTP health check by default (gateway config).
PROTOCOLS = ("tcp", "http")


@dataclass(frozen=True, slots=True)
class Locality:
    region: str
    zone: str
    cluster: str

    def __str__(self) -> str:
        return f"{self.region}/{self.zone}/{self.cluster}"


class TierKind(StrEnum):
    """A locality tier relative to the caller; they nest: cluster < zone < region < any
    (gateway/core/balance.py says how targets are sorted into them)."""

    CLUSTER = "cluster"  # the caller's own cluster
    ZONE = "zone"  # same region and zone
    REGION = "region"  # same region
    ANY = "any"  # anywhere


@dataclass(frozen=True, slots=True)
class FailoverPolicy:
    """How an import spreads over tiers: their order (best first), which other regions come
    first inside `any`, how long a better tier must stay healthy before traffic fails back, and
    how many connect attempts one connection gets. The defaults are the config's defaults.
    Tier names given as strings become `TierKind`s; a bad value raises ValueError."""

    tiers: tuple[TierKind, ...] = tuple(TierKind)
    region_preference: tuple[str, ...] = ()
    failback_after: float = 2.0
    max_attempts: int = 4

    def __post_init__(self) -> None:
        unknown = [t for t in self.tiers if t not in tuple(TierKind)]
        if unknown:
            raise ValueError(
                f"policy tiers: unknown tier kind(s) {unknown!r} (use {choices(TierKind)})"
            )
        object.__setattr__(self, "tiers", tuple(TierKind(t) for t in self.tiers))
        if len(set(self.tiers)) != len(self.tiers):
            raise ValueError(f"policy tiers: {list(self.tiers)!r} lists a tier twice")
        if len(set(self.region_preference)) != len(self.region_preference):
            raise ValueError(
                f"policy region_preference: {list(self.region_preference)!r} lists a region twice"
            )
        if self.failback_after < 0:
            raise ValueError(f"policy failback_after must be >= 0, got {self.failback_after}")
        if self.max_attempts < 1:
            raise ValueError(f"policy max_attempts must be >= 1, got {self.max_attempts}")


@dataclass(frozen=True, slots=True)
class OutlierPolicy:
    """Passive health: eject a local endpoint or peer gateway after `consecutive_failures`
    failed connects, for `base_ejection` doubling up to `max_ejection` seconds; with a
    `response_timeout`, a local endpoint that accepts but does not answer in time counts as a
    failure too (off when None). gateway/core/health.py holds the rules."""

    consecutive_failures: int = 2
    base_ejection: float = 2.0
    max_ejection: float = 60.0
    response_timeout: float | None = None


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One instance: address:port, health as last seen by its own cluster, and a weight."""

    host: str
    port: int
    healthy: bool = True
    weight: int = 1

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def to_json(self) -> dict[str, Any]:
        return {"address": self.address, "healthy": self.healthy, "weight": self.weight}

    @classmethod
    def from_json(cls, obj: Any, what: str = "endpoint") -> Endpoint:
        address = get_field(obj, "address", what, str)
        try:
            host, port = parse_hostport(address)
        except InputError as e:
            raise InputError(f"{what}.address: {e}") from None
        healthy = get_field(obj, "healthy", what, bool)
        weight = get_field(obj, "weight", what, int)
        if not 1 <= weight <= 1000:
            raise InputError(f"{what}.weight: {weight} is not in 1..1000")
        return cls(host, port, healthy, weight)


class ServiceKey(NamedTuple):
    """A service's identity. A tuple, so hashing it (dict keys on every request and connection)
    is C's, not a dataclass's generated Python `__hash__`."""

    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class Export:
    """A service one cluster offers. `allowed_consumers` None means every federated cluster."""

    cluster: str
    namespace: str
    name: str
    port: int
    protocol: str = "tcp"
    endpoints: tuple[Endpoint, ...] = ()
    allowed_consumers: tuple[str, ...] | None = None

    @property
    def service(self) -> ServiceKey:
        return ServiceKey(self.namespace, self.name)

    @property
    def key(self) -> str:
        return f"{EXPORTS}{self.cluster}/{self.namespace}/{self.name}"

    def healthy_weight(self) -> int:
        return sum(e.weight for e in self.endpoints if e.healthy)

    def allows(self, consumer: str) -> bool:
        return self.allowed_consumers is None or consumer in self.allowed_consumers

    def to_json(self) -> dict[str, Any]:
        return {
            "cluster": self.cluster,
            "namespace": self.namespace,
            "name": self.name,
            "port": self.port,
            "protocol": self.protocol,
            "endpoints": [e.to_json() for e in self.endpoints],
            "allowed_consumers": (
                None if self.allowed_consumers is None else list(self.allowed_consumers)
            ),
        }

    @classmethod
    def from_json(cls, obj: Any, what: str = "export") -> Export:
        cluster = check_name(get_field(obj, "cluster", what, str), f"{what}.cluster")
        namespace = check_name(get_field(obj, "namespace", what, str), f"{what}.namespace")
        name = check_name(get_field(obj, "name", what, str), f"{what}.name")
        port = get_field(obj, "port", what, int)
        if not 0 < port < 65536:
            raise InputError(f"{what}.port: {port} is not in 1..65535")
        protocol = get_field(obj, "protocol", what, str)
        if protocol not in PROTOCOLS:
            raise InputError(
                f"{what}.protocol: {protocol!r} is not supported (use {' or '.join(PROTOCOLS)})"
            )
        raw_eps = get_field(obj, "endpoints", what, list)
        if len(raw_eps) > MAX_ENDPOINTS:
            raise InputError(f"{what}.endpoints: {len(raw_eps)} endpoints, at most {MAX_ENDPOINTS}")
        endpoints = tuple(
            Endpoint.from_json(e, f"{what}.endpoints[{i}]") for i, e in enumerate(raw_eps)
        )
        consumers = obj.get("allowed_consumers")
        if consumers is not None:
            if not isinstance(consumers, list) or len(consumers) > MAX_CONSUMERS:
                raise InputError(f"{what}.allowed_consumers: expected a list of cluster names")
            consumers = tuple(
                check_name(c, f"{what}.allowed_consumers[{i}]") for i, c in enumerate(consumers)
            )
        return cls(cluster, namespace, name, port, protocol, endpoints, consumers)


_WG_KEY = re.compile(r"[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=")  # base64 of 32 bytes


@dataclass(frozen=True, slots=True)
class Tunnel:
    """A cluster's WireGuard side, in its record: what peers configure to reach it."""

    public_key: str  # base64 of the 32-byte Curve25519 public key, as `wg` prints it
    endpoint: str  # host:port of its WireGuard UDP socket on the underlay
    overlay_address: str = ""  # its address inside the tunnels; the federation assigns it
    next_public_key: str = ""  # announced before a key rotation uses it (peers pre-install it)

    def to_json(self) -> dict[str, Any]:
        return {"public_key": self.public_key, "endpoint": self.endpoint,
                "overlay_address": self.overlay_address,
                **({"next_public_key": self.next_public_key} if self.next_public_key else {})}

    @classmethod
    def from_json(cls, obj: Any, what: str = "tunnel") -> Tunnel:
        key = get_field(obj, "public_key", what, str)
        if not _WG_KEY.fullmatch(key):
            raise InputError(f"{what}.public_key: {key[:60]!r} is not a WireGuard public key "
                             "(base64 of 32 bytes)")
        endpoint = get_field(obj, "endpoint", what, str)
        try:
            parse_hostport(endpoint)
        except InputError as e:
            raise InputError(f"{what}.endpoint: {e}") from None
        overlay = obj.get("overlay_address", "")
        if not isinstance(overlay, str) or len(overlay) > 64:
            raise InputError(f"{what}.overlay_address: expected an IP address string")
        if overlay:
            try:
                ipaddress.ip_address(overlay)
            except ValueError:
                raise InputError(f"{what}.overlay_address: {overlay!r} is not an IP "
                                 "address") from None
        nxt = obj.get("next_public_key", "")
        if nxt and (not isinstance(nxt, str) or not _WG_KEY.fullmatch(nxt)):
            raise InputError(f"{what}.next_public_key: not a WireGuard public key (base64 of "
                             "32 bytes)")
        return cls(key, endpoint, overlay, nxt)


@dataclass(frozen=True, slots=True)
class ClusterRecord:
    name: str
    region: str
    zone: str
    trust_domain: str
    gateway_address: str  # host:port of the east-west mTLS listener
    tunnel: Tunnel | None = None  # its WireGuard side, when it runs one

    @property
    def locality(self) -> Locality:
        return Locality(self.region, self.zone, self.name)

    @property
    def key(self) -> str:
        return f"{CLUSTERS}{self.name}"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "region": self.region,
            "zone": self.zone,
            "trust_domain": self.trust_domain,
            "gateway_address": self.gateway_address,
            **({"tunnel": self.tunnel.to_json()} if self.tunnel is not None else {}),
        }

    @classmethod
    def from_json(cls, obj: Any, what: str = "cluster") -> ClusterRecord:
        name = check_name(get_field(obj, "name", what, str), f"{what}.name")
        region = check_name(get_field(obj, "region", what, str), f"{what}.region")
        zone = check_name(get_field(obj, "zone", what, str), f"{what}.zone")
        td = get_field(obj, "trust_domain", what, str)
        if not re.fullmatch(r"[a-z0-9._-]{1,255}", td):
            raise InputError(f"{what}.trust_domain: {td!r} is not a valid trust domain")
        gw = get_field(obj, "gateway_address", what, str)
        try:
            parse_hostport(gw)
        except InputError as e:
            raise InputError(f"{what}.gateway_address: {e}") from None
        raw = obj.get("tunnel")
        tunnel = None if raw is None else Tunnel.from_json(raw, f"{what}.tunnel")
        return cls(name, region, zone, td, gw, tunnel)


@dataclass(frozen=True, slots=True)
class ImportRecord:
    """A service a cluster consumes and its failover policy (published so drills can plan)."""

    cluster: str
    namespace: str
    name: str
    failover: FailoverPolicy = FailoverPolicy()

    @property
    def service(self) -> ServiceKey:
        return ServiceKey(self.namespace, self.name)

    @property
    def key(self) -> str:
        return f"{IMPORTS}{self.cluster}/{self.namespace}/{self.name}"

    def to_json(self) -> dict[str, Any]:
        f = self.failover
        return {
            "cluster": self.cluster,
            "namespace": self.namespace,
            "name": self.name,
            "failover": {
                "tiers": [t.value for t in f.tiers],
                "region_preference": list(f.region_preference),
                "failback_after": f.failback_after,
                "max_attempts": f.max_attempts,
            },
        }

    @classmethod
    def from_json(cls, obj: Any, what: str = "import") -> ImportRecord:
        cluster = check_name(get_field(obj, "cluster", what, str), f"{what}.cluster")
        namespace = check_name(get_field(obj, "namespace", what, str), f"{what}.namespace")
        name = check_name(get_field(obj, "name", what, str), f"{what}.name")
        f = get_field(obj, "failover", what, dict)
        w = f"{what}.failover"
        tiers = get_field(f, "tiers", w, list)
        kinds = tuple(TierKind)
        if not tiers or len(tiers) > 4 or len(set(map(str, tiers))) != len(tiers) or any(
            t not in kinds for t in tiers
        ):
            raise InputError(
                f"{w}.tiers: {tiers!r} is not an ordered subset of {[k.value for k in kinds]}"
            )
        prefs = get_field(f, "region_preference", w, list)
        if len(prefs) > 64:
            raise InputError(f"{w}.region_preference: at most 64 regions")
        prefs = tuple(check_name(r, f"{w}.region_preference[{i}]") for i, r in enumerate(prefs))
        failback = float(get_field(f, "failback_after", w, (int, float)))
        attempts = get_field(f, "max_attempts", w, int)
        if not 0 <= failback <= 3600 or not 1 <= attempts <= 16:
            raise InputError(f"{w}: failback_after must be 0..3600 s and max_attempts 1..16")
        try:
            policy = FailoverPolicy(tuple(tiers), prefs, failback, attempts)
        except ValueError as e:  # a region listed twice
            raise InputError(f"{w}: {e}") from None
        return cls(cluster, namespace, name, policy)


def _frozen(d: dict) -> Mapping:
    return MappingProxyType(d)


@dataclass(frozen=True)
class Catalog:
    """The federation's revisioned view. Immutable: `apply` returns a new catalog."""

    revision: int = 0
    clusters: Mapping[str, ClusterRecord] = field(default_factory=lambda: _frozen({}))
    bundles: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: _frozen({}))
    live: frozenset[str] = frozenset()
    exports: Mapping[str, Export] = field(default_factory=lambda: _frozen({}))  # by store key
    imports: Mapping[str, ImportRecord] = field(default_factory=lambda: _frozen({}))  # by store key
    drills: Mapping[str, Drill] = field(default_factory=lambda: _frozen({}))  # by drill id

    @classmethod
    def from_items(cls, items: Iterable[tuple[str, bytes]], revision: int) -> Catalog:
        return cls().apply_all(((k, v, revision) for k, v in items), revision)

    def apply(self, key: str, value: bytes | None, revision: int) -> Catalog:
        """Fold one put (value) or delete (value None). Raises InputError on a malformed value."""
        return self.apply_all([(key, value, revision)], revision)

    def apply_all(
        self,
        changes: Iterable[tuple[str, bytes | None, int]],
        revision: int | None = None,
        on_error: Callable[[InputError], None] | None = None,
    ) -> Catalog:
        """Fold a batch of changes in order, copying each map once per batch (a snapshot of 10k
        exports folds in linear time). A malformed record raises InputError, or, with
        `on_error`, is reported there and skipped so one bad peer cannot poison the view."""
        maps = _Maps(self)
        last = self.revision
        for key, value, rev in changes:
            last = rev
            try:
                maps.fold(key, value)
            except InputError as e:
                if on_error is None:
                    raise
                on_error(e)
        return maps.catalog(last if revision is None else revision)

    def running_drills(self) -> list[Drill]:
        return [d for d in self.drills.values() if d.state == "running"]

    def exports_of(self, service: ServiceKey) -> list[Export]:
        """Exports of a service by live clusters only (a cluster without lease has no endpoints)."""
        return [
            e
            for e in self.exports.values()
            if e.namespace == service.namespace
            and e.name == service.name
            and e.cluster in self.live
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "revision": self.revision,
            "clusters": {k: v.to_json() for k, v in sorted(self.clusters.items())},
            "bundles": {k: dict(v) for k, v in sorted(self.bundles.items())},
            "live": sorted(self.live),
            "exports": [e.to_json() for _, e in sorted(self.exports.items())],
            "imports": [i.to_json() for _, i in sorted(self.imports.items())],
            "drills": [d.to_json() for _, d in sorted(self.drills.items())],
        }

    @classmethod
    def from_json(cls, obj: Any) -> Catalog:
        """Inverse of to_json (used for the on-disk cache a gateway restarts from)."""
        revision = get_field(obj, "revision", "catalog", int)
        items: list[tuple[str, bytes]] = []
        for name, rec in get_field(obj, "clusters", "catalog", dict).items():
            items.append((f"{CLUSTERS}{name}", json.dumps(rec).encode()))
        for td, b in get_field(obj, "bundles", "catalog", dict).items():
            items.append((f"{BUNDLES}{td}", json.dumps(b).encode()))
        for name in get_field(obj, "live", "catalog", list):
            items.append((f"{LIVE}{check_name(name, 'catalog.live')}", b"{}"))
        for e in get_field(obj, "exports", "catalog", list):
            exp = Export.from_json(e, "catalog.exports")
            items.append((exp.key, json.dumps(exp.to_json()).encode()))
        for i in obj.get("imports", []) if isinstance(obj, Mapping) else []:
            rec = ImportRecord.from_json(i, "catalog.imports")
            items.append((rec.key, json.dumps(rec.to_json()).encode()))
        for d in obj.get("drills", []) if isinstance(obj, Mapping) else []:
            drill = Drill.from_json(d, "catalog.drills")
            items.append((drill.key, json.dumps(drill.to_json()).encode()))
        return cls.from_items(items, revision)


class _Maps:
    """Mutable working copies of a catalog's maps while a batch of changes is folded."""

    def __init__(self, cat: Catalog) -> None:
        self.clusters = dict(cat.clusters)
        self.bundles = dict(cat.bundles)
        self.live = set(cat.live)
        self.exports = dict(cat.exports)
        self.imports = dict(cat.imports)
        self.drills = dict(cat.drills)

    def fold(self, key: str, value: bytes | None) -> None:
        if key.startswith(CLUSTERS):
            if value is None:
                self.clusters.pop(key[len(CLUSTERS):], None)
            else:
                rec = ClusterRecord.from_json(_loads(value, key), key)
                self.clusters[rec.name] = rec
        elif key.startswith(BUNDLES):
            if value is None:
                self.bundles.pop(key[len(BUNDLES):], None)
            else:
                obj = _loads(value, key)
                if not isinstance(obj, dict):
                    raise InputError(f"{key}: a bundle must be a JSON object")
                self.bundles[key[len(BUNDLES):]] = _frozen(obj)
        elif key.startswith(LIVE):
            name = key[len(LIVE):]
            if value is None:
                self.live.discard(name)
            else:
                self.live.add(name)
        elif key.startswith(EXPORTS):
            if value is None:
                self.exports.pop(key, None)
            else:
                exp = Export.from_json(_loads(value, key), key)
                if exp.key != key:
                    raise InputError(f"{key}: the export inside names {exp.key!r}")
                self.exports[key] = exp
        elif key.startswith(IMPORTS):
            if value is None:
                self.imports.pop(key, None)
            else:
                rec = ImportRecord.from_json(_loads(value, key), key)
                if rec.key != key:
                    raise InputError(f"{key}: the import inside names {rec.key!r}")
                self.imports[key] = rec
        elif key.startswith(DRILLS):
            did = key[len(DRILLS):]
            if value is None:
                self.drills.pop(did, None)
            else:
                drill = Drill.from_json(_loads(value, key), key)
                if drill.id != did:
                    raise InputError(f"{key}: the drill inside is {drill.id!r}")
                self.drills[did] = drill

    def catalog(self, revision: int) -> Catalog:
        return Catalog(
            revision=revision,
            clusters=_frozen(self.clusters),
            bundles=_frozen(self.bundles),
            live=frozenset(self.live),
            exports=_frozen(self.exports),
            imports=_frozen(self.imports),
            drills=_frozen(self.drills),
        )


def _loads(value: bytes, key: str) -> Any:
    try:
        return json.loads(value)
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{key}: not valid JSON ({e})") from None
