"""The gateway config as frozen values: what `parse_config` returns and the runtime codes against.

Durations are float seconds, file paths absolute, defaults applied (schema.py holds the field
tables with the defaults and bounds; reader.py reads the YAML). Concepts shared with the
federation (Endpoint, FailoverPolicy, OutlierPolicy) are federation.model's values, not copies.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from federation.model import Endpoint, FailoverPolicy, Locality, OutlierPolicy
from gateway.config.policy_values import Policy
from gateway.config.route_values import Route
from gateway.errors import Problem

__all__ = [
    "ClusterConfig",
    "DnsConfig",
    "ExportConfig",
    "FederationConfig",
    "GatewayConfig",
    "HealthCheck",
    "IdentityConfig",
    "ImportConfig",
    "LimitsConfig",
    "ListenConfig",
    "NamespaceGrant",
    "PolicyConfig",
    "ProbeConfig",
    "ReloadConfig",
    "ServiceSource",
    "TunnelConfig",
    "XdsConfig",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    name: str
    region: str
    zone: str
    trust_domain: str

    @property
    def locality(self) -> Locality:
        return Locality(self.region, self.zone, self.name)


@dataclass(frozen=True, slots=True)
class FederationConfig:
    url: str  # https://host[:port][/path], without a trailing slash (the first of `urls`)
    ca_file: Path
    token_file: Path | None
    urls: tuple[str, ...] = ()  # every replica (one etcd store), tried in turn; () = (url,)

    @property
    def replicas(self) -> tuple[str, ...]:
        return self.urls or (self.url,)


@dataclass(frozen=True, slots=True)
class ListenConfig:
    inbound: tuple[str, int]
    admin: tuple[str, int]
    advertise: str  # host:port other gateways dial


@dataclass(frozen=True, slots=True)
class IdentityConfig:
    svid_ttl: float
    ca_cert_file: Path | None
    ca_key_file: Path | None
    bundle_refresh_hint: float = 300.0  # our bundle's spiffe_refresh_hint
    rotation_overlap: float = 3600.0  # `identity rotate-ca`: each CA change lasts this long


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_connections: int
    connect_timeout: float
    idle_timeout: float
    drain_timeout: float = 30.0  # a handed-over or SIGQUIT-stopped process drains this long
    takeover_timeout: float = 30.0  # a `--takeover` process must be ready within this
    http_max_header_bytes: int = 65536  # HTTP imports: request head bytes (431 beyond)
    http_max_headers: int = 100  # HTTP imports: request header count (431 beyond)
    http_max_target_bytes: int = 8192  # HTTP imports: request target length (414 beyond)
    http_header_timeout: float = 10.0  # HTTP imports: a request head within this, or 408
    inbound_max_handshakes: int = 256  # inbound: TLS handshakes in progress at once
    inbound_handshake_timeout: float = 5.0  # inbound: a handshake not done by then is closed


@dataclass(frozen=True, slots=True)
class DnsConfig:
    """The clusterset DNS responder (gateway/dns/)."""

    listen: tuple[str, int]  # UDP and TCP
    ttl: int = 5  # seconds, of every record and of negative answers (the SOA minimum)
    zone: str = "clusterset.local"  # lowercase, no trailing dot
    addresses: tuple[str, ...] = ()  # answered for imports listening on a wildcard address


@dataclass(frozen=True, slots=True)
class TunnelConfig:
    """A WireGuard tunnel to every peer (gateway/tunnel/); links then dial overlay addresses."""

    kind: str  # "wireguard"
    listen_port: int = 51820  # UDP, on every address
    interface: str = "isthmus0"  # unique on the machine (wireguard-go's socket directory)
    endpoint: str = ""  # host:port peers send to; "" = listen.advertise's host + listen_port
    rotate_every: float = 86400.0  # a new key pair this often (0: never)
    rotation_overlap: float = 10.0  # the next key is announced this long before it is used


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """OTLP/HTTP export of the HTTP hops' spans (gateway/control/otlp.py)."""

    otlp_endpoint: str
    service_name: str = "isthmus-gateway"
    flush_interval: float = 1.0
    max_queue: int = 4096


@dataclass(frozen=True, slots=True)
class XdsConfig:
    """The Aggregated Discovery Service for proxyless gRPC and Envoy (gateway/xds/)."""

    listen: tuple[str, int]  # plaintext gRPC: bind it where only this cluster's apps reach


@dataclass(frozen=True, slots=True)
class ReloadConfig:
    """How service files are reloaded while the gateway runs (runtime: Gateway.reload)."""

    watch: str = "auto"  # "auto" (inotify, else polling) | "inotify" | "poll" | "sighup" (only)
    poll_interval: float = 1.0  # "poll" (and "auto" without inotify): look this often
    debounce: float = 0.2  # a burst of writes within this is one reload
    drain_timeout: float = 30.0  # a removed import's open connections may last this long


@dataclass(frozen=True, slots=True)
class ProbeConfig:
    interval: float
    timeout: float
    healthy_threshold: int
    unhealthy_threshold: int


@dataclass(frozen=True, slots=True)
class HealthCheck:
    kind: str  # "tcp" | "http"
    path: str | None  # http only
    interval: float
    timeout: float
    healthy_threshold: int
    unhealthy_threshold: int
    send: bytes | None = None  # tcp only: written after the connect
    expect: bytes | None = None  # tcp only: must appear in the reply within the timeout
    # http only: healthy on a status in 200 .. healthy_status_below - 1. 400 (2xx/3xx) when the
    # path was given; 500 for the implied /healthz, which an app may not serve (404 = alive).
    healthy_status_below: int = 400


@dataclass(frozen=True, slots=True)
class ExportConfig:
    name: str
    namespace: str
    port: int
    protocol: str
    endpoints: tuple[Endpoint, ...]  # as configured (healthy: True; health is the book's)
    health_check: HealthCheck
    # None: every federated cluster may call. Otherwise the listed clusters plus our own,
    # which the loader appends when it is not listed.
    allowed_consumers: tuple[str, ...] | None


@dataclass(frozen=True, slots=True)
class ImportConfig:
    name: str
    namespace: str
    listen: tuple[str, int]
    failover: FailoverPolicy
    protocol: str = "tcp"  # "http": an HTTP/1.1 listener that routes each request
    routes: tuple[Route, ...] = ()  # protocol http: HTTPRoute-like rules (config/route_values)
    access_log: bool = False  # protocol http: one log line per request


@dataclass(frozen=True, slots=True)
class NamespaceGrant:
    files: str  # glob of service file paths, relative to the gateway file; "*": every file
    namespaces: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    namespaces: tuple[NamespaceGrant, ...] | None = None  # None: any namespace
    import_listen: tuple[Network, ...] | None = None  # None: any address
    max_endpoints: int | None = None
    max_services_per_file: int | None = None

    def allowed_namespaces(self, file: str) -> tuple[str, ...] | None:
        """The namespaces service file `file` (relative to the gateway file) may use."""
        if self.namespaces is None:
            return None
        out: list[str] = []
        for g in self.namespaces:
            if fnmatchcase(file, g.files):
                out += [n for n in g.namespaces if n not in out]
        return tuple(out)


NO_POLICY = PolicyConfig()


@dataclass(frozen=True, slots=True)
class ServiceSource:
    """The file (absolute; the gateway file for inline services) and line of one service."""

    section: str  # "exports" | "imports"
    namespace: str
    name: str
    file: Path
    line: int | None


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    source: Path  # absolute path of the config file
    cluster: ClusterConfig
    federation: FederationConfig
    listen: ListenConfig
    state_dir: Path
    identity: IdentityConfig
    limits: LimitsConfig
    outlier_detection: OutlierPolicy
    peer_probe: ProbeConfig
    exports: tuple[ExportConfig, ...]
    imports: tuple[ImportConfig, ...]
    warnings: tuple[Problem, ...] = ()  # valid but risky settings (schema.py docstring)
    services_dir: Path | tuple[str, ...] | None = None  # a directory, or glob patterns
    policy: PolicyConfig = NO_POLICY  # the guard rails on service files
    reload: ReloadConfig = ReloadConfig()
    dns: DnsConfig | None = None  # no `dns:` section: no DNS responder
    tunnel: TunnelConfig | None = None  # no `tunnel:` section: links are mTLS on the underlay
    xds: XdsConfig | None = None  # no `xds:` section: no ADS server
    tracing: TracingConfig | None = None  # no `tracing:` section: no span export
    service_files: tuple[Path, ...] = ()  # absolute, in the order read (sorted)
    service_sources: tuple[ServiceSource, ...] = ()  # where each service was declared
    # timeouts, retries, JWT, OpenAPI (gateway/core/policies.py): the gateway file's first, then
    # each service file's in path order; Policy.order is the position in that sequence
    policies: tuple[Policy, ...] = ()

    def source_of(self, section: str, namespace: str, name: str) -> ServiceSource | None:
        """Where the export (section "exports") or import ("imports") was declared."""
        for s in self.service_sources:
            if (s.section, s.namespace, s.name) == (section, namespace, name):
                return s
        return None
