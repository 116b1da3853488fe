"""The shared vocabulary: frozen values for localities, endpoints, exports, clusters, the catalog.

Theory of operation
-------------------
The federation keeps its state as keys in a revisioned store (shaped like etcd). The catalog is
a pure fold of those keys:

    catalog/clusters/<cluster>              ClusterRecord   (written at join)
    catalog/bundles/<trust-domain>          SPIFFE bundle   (JWKS; written by its own cluster)
    catalog/live/<cluster>                  {"since": t}    (attached to the cluster's lease)
    catalog/exports/<cluster>/<ns>/<name>   Export          (attached to the cluster's lease)

Keys attached to a lease vanish when it expires, so a cluster that stops renewing loses its
exports in every other cluster's view. `Catalog.apply` folds one store event at a time, which is
how a gateway follows the federation's watch; `Catalog.from_items` folds a snapshot.

Everything coming from the wire goes through `*.from_json`, which validates and names the field
that was wrong, so a malformed peer raises `InputError` instead of corrupting a view.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from .errors import InputError
from .units import parse_hostport

CATALOG_PREFIX = "catalog/"
CLUSTERS = "catalog/clusters/"
BUNDLES = "catalog/bundles/"
LIVE = "catalog/live/"
EXPORTS = "catalog/exports/"
TOKENS = "tokens/"

# DNS-label-like names: lowercase, digits, dashes; what Kubernetes allows for names/namespaces.
_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
MAX_ENDPOINTS = 1000
MAX_CONSUMERS = 1000


def check_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise InputError(
            f"{what}: {value!r} is not a valid name (lowercase letters, digits and '-', "
            "1-63 characters, starting and ending with a letter or digit)"
        )
    return value


def _field(obj: Mapping[str, Any], key: str, what: str, kind: type | tuple[type, ...]) -> Any:
    if not isinstance(obj, Mapping):
        raise InputError(f"{what}: expected an object, got {type(obj).__name__}")
    if key not in obj:
        raise InputError(f"{what}.{key}: missing")
    value = obj[key]
    if isinstance(value, bool) and kind is not bool:
        raise InputError(f"{what}.{key}: expected {_kind_name(kind)}, got {value!r}")
    if not isinstance(value, kind):
        raise InputError(f"{what}.{key}: expected {_kind_name(kind)}, got {value!r}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    if isinstance(kind, tuple):
        return " or ".join(k.__name__ for k in kind)
    return kind.__name__


@dataclass(frozen=True, slots=True)
class Locality:
    region: str
    zone: str
    cluster: str

    def __str__(self) -> str:
        return f"{self.region}/{self.zone}/{self.cluster}"


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
        address = _field(obj, "address", what, str)
        try:
            host, port = parse_hostport(address)
        except InputError as e:
            raise InputError(f"{what}.address: {e}") from None
        healthy = _field(obj, "healthy", what, bool)
        weight = _field(obj, "weight", what, int)
        if not 1 <= weight <= 1000:
            raise InputError(f"{what}.weight: {weight} is not in 1..1000")
        return cls(host, port, healthy, weight)


@dataclass(frozen=True, slots=True)
class ServiceKey:
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
        cluster = check_name(_field(obj, "cluster", what, str), f"{what}.cluster")
        namespace = check_name(_field(obj, "namespace", what, str), f"{what}.namespace")
        name = check_name(_field(obj, "name", what, str), f"{what}.name")
        port = _field(obj, "port", what, int)
        if not 0 < port < 65536:
            raise InputError(f"{what}.port: {port} is not in 1..65535")
        protocol = _field(obj, "protocol", what, str)
        if protocol != "tcp":
            raise InputError(f"{what}.protocol: {protocol!r} is not supported (use 'tcp')")
        raw_eps = _field(obj, "endpoints", what, list)
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


@dataclass(frozen=True, slots=True)
class ClusterRecord:
    name: str
    region: str
    zone: str
    trust_domain: str
    gateway_address: str  # host:port of the east-west mTLS listener

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
        }

    @classmethod
    def from_json(cls, obj: Any, what: str = "cluster") -> ClusterRecord:
        name = check_name(_field(obj, "name", what, str), f"{what}.name")
        region = check_name(_field(obj, "region", what, str), f"{what}.region")
        zone = check_name(_field(obj, "zone", what, str), f"{what}.zone")
        td = _field(obj, "trust_domain", what, str)
        if not re.fullmatch(r"[a-z0-9._-]{1,255}", td):
            raise InputError(f"{what}.trust_domain: {td!r} is not a valid trust domain")
        gw = _field(obj, "gateway_address", what, str)
        try:
            parse_hostport(gw)
        except InputError as e:
            raise InputError(f"{what}.gateway_address: {e}") from None
        return cls(name, region, zone, td, gw)


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

    @classmethod
    def from_items(cls, items: Iterable[tuple[str, bytes]], revision: int) -> Catalog:
        cat = cls()
        for key, value in items:
            cat = cat.apply(key, value, revision)
        return replace(cat, revision=revision)

    def apply(self, key: str, value: bytes | None, revision: int) -> Catalog:
        """Fold one put (value) or delete (value None). Raises InputError on a malformed value."""
        if key.startswith(CLUSTERS):
            clusters = dict(self.clusters)
            if value is None:
                clusters.pop(key[len(CLUSTERS):], None)
            else:
                rec = ClusterRecord.from_json(_loads(value, key), key)
                clusters[rec.name] = rec
            return replace(self, revision=revision, clusters=_frozen(clusters))
        if key.startswith(BUNDLES):
            bundles = dict(self.bundles)
            if value is None:
                bundles.pop(key[len(BUNDLES):], None)
            else:
                obj = _loads(value, key)
                if not isinstance(obj, dict):
                    raise InputError(f"{key}: a bundle must be a JSON object")
                bundles[key[len(BUNDLES):]] = _frozen(obj)
            return replace(self, revision=revision, bundles=_frozen(bundles))
        if key.startswith(LIVE):
            name = key[len(LIVE):]
            live = self.live - {name} if value is None else self.live | {name}
            return replace(self, revision=revision, live=live)
        if key.startswith(EXPORTS):
            exports = dict(self.exports)
            if value is None:
                exports.pop(key, None)
            else:
                exp = Export.from_json(_loads(value, key), key)
                if exp.key != key:
                    raise InputError(f"{key}: the export inside names {exp.key!r}")
                exports[key] = exp
            return replace(self, revision=revision, exports=_frozen(exports))
        return replace(self, revision=revision)

    def exports_of(self, service: ServiceKey) -> list[Export]:
        """Exports of a service by live clusters only (a cluster without lease has no endpoints)."""
        return [
            e
            for e in self.exports.values()
            if e.namespace == service.namespace and e.name == service.name and e.cluster in self.live
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "revision": self.revision,
            "clusters": {k: v.to_json() for k, v in sorted(self.clusters.items())},
            "bundles": {k: dict(v) for k, v in sorted(self.bundles.items())},
            "live": sorted(self.live),
            "exports": [e.to_json() for _, e in sorted(self.exports.items())],
        }

    @classmethod
    def from_json(cls, obj: Any) -> Catalog:
        """Inverse of to_json (used for the on-disk cache a gateway restarts from)."""
        revision = _field(obj, "revision", "catalog", int)
        items: list[tuple[str, bytes]] = []
        for name, rec in _field(obj, "clusters", "catalog", dict).items():
            items.append((f"{CLUSTERS}{name}", json.dumps(rec).encode()))
        for td, b in _field(obj, "bundles", "catalog", dict).items():
            items.append((f"{BUNDLES}{td}", json.dumps(b).encode()))
        for name in _field(obj, "live", "catalog", list):
            items.append((f"{LIVE}{check_name(name, 'catalog.live')}", b"{}"))
        for e in _field(obj, "exports", "catalog", list):
            exp = Export.from_json(e, "catalog.exports")
            items.append((exp.key, json.dumps(exp.to_json()).encode()))
        return cls.from_items(items, revision)


def _loads(value: bytes, key: str) -> Any:
    try:
        return json.loads(value)
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{key}: not valid JSON ({e})") from None
