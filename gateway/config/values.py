"""The gateway config as frozen values: what `parse_config` returns and the runtime codes against.

Durations are float seconds, file paths absolute, defaults applied (schema.py holds the field
tables with the defaults and bounds; reader.py reads the YAML). Concepts shared with the
federation (Endpoint, FailoverPolicy, OutlierPolicy) are federation.model's values, not copies.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from federation.model import Endpoint, FailoverPolicy, Locality, OutlierPolicy
from gateway.errors import Problem

__all__ = [
    "ClusterConfig",
    "ExportConfig",
    "FederationConfig",
    "GatewayConfig",
    "HealthCheck",
    "IdentityConfig",
    "ImportConfig",
    "LimitsConfig",
    "ListenConfig",
    "ProbeConfig",
]


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
    url: str  # https://host[:port][/path], without a trailing slash
    ca_file: Path
    token_file: Path | None


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
