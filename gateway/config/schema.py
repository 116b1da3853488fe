"""The gateway's config file: field tables, section builders and cross-field rules.

Theory of operation
-------------------
One YAML file configures one gateway (README.md, "Config reference", documents every field).
Each section is a table of `Field`s (reader.py): name, parser with its bounds, default, doc.
The reader checks a mapping against its table (unknown, duplicate, missing fields), runs the
parsers and applies the defaults; a builder here turns the values into the frozen values of
values.py. Every problem is recorded, none raised, so one pass reports everything.

Cross-field rules (listener clashes, duplicate services, timeout < interval, ...) run in the
builders and only on values that passed their own checks, so one mistake is not reported twice.
If any problem was recorded, `ConfigError` carries them all, sorted by line. Otherwise the result
is a `GatewayConfig` with defaults applied, durations as float seconds and every file path made
absolute (relative paths are relative to the config file's directory).

Some settings are valid but risky (the plain-HTTP admin port on every interface): they are
*warnings*, `Problem`s in `GatewayConfig.warnings` (and `ConfigError.warnings`), which
`isthmus config validate` prints and `isthmus gateway run` logs; they never fail the file.

This module is pure: apart from `load_config` reading the one file (reader.read_text), it does no
I/O, and it imports no asyncio, socket, time or random.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from federation.model import PROTOCOLS, Endpoint, FailoverPolicy, OutlierPolicy, TierKind
from federation.units import format_duration, format_hostport
from gateway.config.reader import (
    Field,
    Reader,
    Section,
    Table,
    _absolute,
    _child,
    _is_loopback,
    _is_wildcard,
    _or,
    _quiet_hostport,
    _quiet_service,
    _same_bind,
    choice,
    duration,
    integer,
    read_text,
)
from gateway.config.values import (
    ClusterConfig,
    ExportConfig,
    FederationConfig,
    GatewayConfig,
    HealthCheck,
    IdentityConfig,
    ImportConfig,
    LimitsConfig,
    ListenConfig,
    ProbeConfig,
)
from gateway.errors import ConfigError, Problem

__all__ = [
    "ClusterConfig",
    "ConfigError",
    "Endpoint",
    "ExportConfig",
    "FailoverPolicy",
    "FederationConfig",
    "GatewayConfig",
    "HealthCheck",
    "IdentityConfig",
    "ImportConfig",
    "LimitsConfig",
    "ListenConfig",
    "OutlierPolicy",
    "Problem",
    "ProbeConfig",
    "TIERS",
    "load_config",
    "parse_config",
]

MAX_EXPORTS = 1000
MAX_IMPORTS = 1000
MAX_ENDPOINTS = 1000
MAX_CONSUMERS = 1000
TIERS = tuple(t.value for t in TierKind)
HEALTH_KINDS = ("tcp", "http")
MAX_SEND_BYTES = 1024  # health_check.send
MAX_EXPECT_BYTES = 256  # health_check.expect
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]{1,255}")
_DAY = 86400.0
DEFAULT_HTTP_PATH = "/healthz"
DEFAULT_FAILOVER = FailoverPolicy()  # the defaults are federation.model's, defined once
DEFAULT_OUTLIER = OutlierPolicy()

_name = Reader.name
_hostport = Reader.hostport
_filepath = Reader.filepath


def _defaults(table: Table) -> dict[str, Any]:
    return {f.name: f.default for f in table}


# --------------------------------------------------------------------------------------------
# The field tables, one per section, in the order the error messages list the fields.

CLUSTER: Table = (
    Field("name", _name, doc="this cluster's name, unique in the federation"),
    Field("region", _name),
    Field("zone", _name),
    Field("trust_domain", lambda r, n, p: _Schema.trust_domain(r, n, p), None,
          doc="default <name>.isthmus.local"),
)
FEDERATION: Table = (
    Field("url", Reader.url, doc="https://host[:port][/path]"),
    Field("ca_file", _filepath),
    Field("token_file", _filepath, None, doc="join token, needed for the first join only"),
)
LISTEN: Table = (
    Field("inbound", _hostport, doc="the mTLS listener other gateways dial"),
    Field("admin", _hostport),
    Field("advertise", None, None, doc="host:port other gateways dial; default: inbound"),
)
IDENTITY: Table = (
    Field("svid_ttl", duration(minimum=60, maximum=30 * _DAY), _DAY),
    Field("ca_cert_file", _filepath, None, doc="with ca_key_file: use this CA, not our own"),
    Field("ca_key_file", _filepath, None),
)
LIMITS: Table = (
    Field("max_connections", integer(1, 1_000_000), 10000),
    Field("connect_timeout", duration(maximum=60), 1.0),
    Field("idle_timeout", duration(maximum=_DAY), 3600.0),
)
OUTLIER: Table = (
    Field("consecutive_failures", integer(1, 1000), DEFAULT_OUTLIER.consecutive_failures),
    Field("base_ejection", duration(maximum=3600), DEFAULT_OUTLIER.base_ejection),
    Field("max_ejection", duration(maximum=3600), DEFAULT_OUTLIER.max_ejection),
    Field("response_timeout", duration(maximum=3600), DEFAULT_OUTLIER.response_timeout,
          doc="off unless set"),
)


def _timing(interval: float, timeout: float) -> Table:
    return (
        Field("interval", duration(minimum=0.01, maximum=3600), interval),
        Field("timeout", duration(maximum=60), timeout),
        Field("healthy_threshold", integer(1, 100), 2),
        Field("unhealthy_threshold", integer(1, 100), 2),
    )


PEER_PROBE: Table = _timing(0.5, 0.5)
HEALTH_TIMING: Table = _timing(1.0, 0.5)
HEALTH: Table = (
    Field("kind", None, None, doc="tcp or http; default: the export's protocol"),
    Field("path", None, None, doc="http only; default /healthz"),
    Field("send", None, None, doc="tcp only, with expect"),
    Field("expect", None, None, doc="tcp only"),
    *HEALTH_TIMING,
)
ENDPOINT: Table = (
    Field("address", _hostport),
    Field("weight", integer(1, 1000), 1),
)
EXPORT: Table = (
    Field("name", _name),
    Field("namespace", _name, "default"),
    Field("port", integer(1, 65535)),
    Field("protocol", choice(PROTOCOLS, "protocol"), "tcp"),
    Field("endpoints", None),
    Field("health_check", None, None, doc="default: tcp connect, or GET /healthz for http"),
    Field("allowed_consumers", None, None, doc="default: every federated cluster"),
)
FAILOVER: Table = (
    Field("tiers", lambda r, n, p: _Schema.tiers(r, n, p), DEFAULT_FAILOVER.tiers),
    Field("region_preference", lambda r, n, p: _Schema.regions(r, n, p),
          DEFAULT_FAILOVER.region_preference),
    Field("failback_after", duration(maximum=3600, zero_ok=True), DEFAULT_FAILOVER.failback_after),
    Field("max_attempts", integer(1, 16), DEFAULT_FAILOVER.max_attempts),
)
IMPORT: Table = (
    Field("name", _name),
    Field("namespace", _name, "default"),
    Field("listen", _hostport),
    Field("failover", lambda r, n, p: _Schema.failover(r, n, p), DEFAULT_FAILOVER),
)
DEFAULT_IDENTITY = IdentityConfig(**_defaults(IDENTITY))
DEFAULT_LIMITS = LimitsConfig(**_defaults(LIMITS))
DEFAULT_PROBE = ProbeConfig(**_defaults(PEER_PROBE))
DEFAULT_HEALTH_CHECK = HealthCheck("tcp", None, **_defaults(HEALTH_TIMING))
# The check of a `protocol: http` export without a health_check section: GET /healthz, where
# any answer below 500 proves the app answers (an app without /healthz says 404).
DEFAULT_HTTP_HEALTH_CHECK = replace(
    DEFAULT_HEALTH_CHECK, kind="http", path=DEFAULT_HTTP_PATH, healthy_status_below=500
)
TOP: Table = (
    Field("cluster", lambda r, n, p: _Schema.cluster(r, n, p)),
    Field("federation", lambda r, n, p: _Schema.federation(r, n, p)),
    Field("listen", lambda r, n, p: _Schema.listen(r, n, p)),
    Field("state_dir", _filepath),
    Field("identity", lambda r, n, p: _Schema.identity(r, n, p), DEFAULT_IDENTITY),
    Field("limits", lambda r, n, p: _Schema.simple(r, n, p, LIMITS, LimitsConfig), DEFAULT_LIMITS),
    Field("outlier_detection", lambda r, n, p: _Schema.outlier(r, n, p), DEFAULT_OUTLIER),
    Field("peer_probe", lambda r, n, p: _Schema.probe(r, n, p), DEFAULT_PROBE),
    Field("exports", None, ()),
    Field("imports", None, ()),
)


# --------------------------------------------------------------------------------------------
# Entry points


def load_config(path: str | os.PathLike[str]) -> GatewayConfig:
    """Read and validate one config file. Every failure, I/O included, is a ConfigError."""
    return parse_config(read_text(path), Path(path))


def parse_config(text: str, source: Path) -> GatewayConfig:
    """Validate config text; relative paths in it are resolved against source's directory."""
    source = Path(source)
    reader = _Schema(str(source), _absolute(source).parent)
    root = reader.compose(text)
    config = reader.gateway(root, _absolute(source)) if root is not None else None
    warnings = sorted(reader.warnings, key=lambda p: p.line or 0)
    if reader.problems or config is None:
        raise ConfigError(sorted(reader.problems, key=lambda p: p.line or 0), warnings)
    return replace(config, warnings=tuple(warnings))


# --------------------------------------------------------------------------------------------
# The section builders: the rules a table cannot say (one field depends on another).


class _Schema(Reader):
    def __init__(self, file: str, base: Path):
        super().__init__(file, base)
        # (field path, (host, port)) of every socket this gateway binds; set by gateway().
        self._listeners: list[tuple[str, tuple[str, int]]] = []

    def gateway(self, root: Node, source: Path) -> GatewayConfig | None:
        top = self.section(root, "", TOP)
        if top is None:
            return None
        v = top.values
        own = v["cluster"].name if v.get("cluster") is not None else None
        self.check_listeners(top.nodes)
        f = top.nodes
        exports = self.exports(f["exports"], own) if "exports" in f else ()
        imports = self.imports(f["imports"]) if "imports" in f else ()
        if not top.ok:
            return None
        return GatewayConfig(source=source, exports=exports, imports=imports, **v)

    def simple(self, node: Node, path: str, table: Table, make: Callable[..., Any]) -> Any:
        """A section whose fields are independent: the table's values, made into `make`."""
        sec = self.section(node, path, table)
        return None if sec is None or not sec.ok else make(**sec.values)

    def cluster(self, node: Node, path: str) -> ClusterConfig | None:
        sec = self.section(node, path, CLUSTER)
        if sec is None or not sec.ok:
            return None
        v = sec.values
        td = v["trust_domain"] or f"{v['name']}.isthmus.local"
        return ClusterConfig(v["name"], v["region"], v["zone"], td)

    def trust_domain(self, node: Node, path: str) -> str | None:
        td = self.string(node, path)
        if td is None or _TRUST_DOMAIN.fullmatch(td):
            return td
        self.problem(
            node,
            path,
            f"{td!r} is not a valid trust domain "
            "(lowercase letters, digits, '.', '-' and '_', like east-1.isthmus.local)",
        )
        return None

    def federation(self, node: Node, path: str) -> FederationConfig | None:
        return self.simple(node, path, FEDERATION, FederationConfig)

    def listen(self, node: Node, path: str) -> ListenConfig | None:
        sec = self.section(node, path, LISTEN)
        if sec is None:
            return None
        f, inbound, admin = sec.nodes, sec.values.get("inbound"), sec.values.get("admin")
        if admin is not None and _is_wildcard(admin[0]):
            self.warn(
                f["admin"],
                "listen.admin",
                f"{f['admin'].value!r} serves the plain-HTTP, unauthenticated admin endpoints "
                "(/status, /metrics) on every interface; bind it to 127.0.0.1 or a private "
                "address",
            )
        advertise: str | None = None
        if "advertise" in f:
            hp = self.hostport(f["advertise"], "listen.advertise")
            if hp is not None:
                if _is_wildcard(hp[0]):
                    self.problem(
                        f["advertise"],
                        "listen.advertise",
                        f"{f['advertise'].value!r} is a wildcard address that other gateways "
                        "cannot dial; write this host's reachable address",
                    )
                else:
                    advertise = format_hostport(*hp)
        elif inbound is not None:
            if _is_wildcard(inbound[0]):
                self.problem(
                    f["inbound"],
                    "listen.advertise",
                    "required when listen.inbound is a wildcard address "
                    f"({f['inbound'].value!r}): other gateways need an address they can dial",
                )
            else:
                advertise = format_hostport(*inbound)
        if inbound is None or admin is None or advertise is None:
            return None
        return ListenConfig(inbound, admin, advertise)

    def identity(self, node: Node, path: str) -> IdentityConfig | None:
        sec = self.section(node, path, IDENTITY)
        if sec is None:
            return None
        f = sec.nodes
        if ("ca_cert_file" in f) != ("ca_key_file" in f):
            given, missing = (
                ("ca_cert_file", "ca_key_file")
                if "ca_cert_file" in f
                else ("ca_key_file", "ca_cert_file")
            )
            self.problem(
                f[given],
                f"identity.{missing}",
                f"required with identity.{given}: give both the CA certificate and its key, "
                "or neither to let the gateway make its own CA",
            )
            return None
        return IdentityConfig(**sec.values) if sec.ok else None

    def outlier(self, node: Node, path: str) -> OutlierPolicy | None:
        sec = self.section(node, path, OUTLIER)
        if sec is None or "response_timeout" in sec.failed:
            return None
        f, base, top = sec.nodes, sec.values["base_ejection"], sec.values["max_ejection"]
        if base is not None and top is not None and top < base:
            self.problem(
                f.get("max_ejection", f.get("base_ejection", node)),
                f"{path}.max_ejection",
                f"{format_duration(top)} is shorter than base_ejection ({format_duration(base)}); "
                "it must be at least as long",
            )
            return None
        return OutlierPolicy(**sec.values) if sec.ok else None

    def probe(self, node: Node, path: str) -> ProbeConfig | None:
        sec = self.section(node, path, PEER_PROBE, parse=False)
        return None if sec is None else self.timing(sec, PEER_PROBE, strict_timeout=False)

    def timing(self, sec: Section, table: Table, *, strict_timeout: bool) -> ProbeConfig | None:
        """interval, timeout and thresholds; the timeout must be shorter than the interval
        (health checks) or at most as long (peer probes)."""
        self.parse(sec, table)
        f, interval, timeout = sec.nodes, sec.values["interval"], sec.values["timeout"]
        if interval is not None and timeout is not None:
            bad = timeout >= interval if strict_timeout else timeout > interval
            if bad:
                rule = "shorter than" if strict_timeout else "at most"
                self.problem(
                    f.get("timeout", f.get("interval", sec.node)),
                    sec.where("timeout"),
                    f"{format_duration(timeout)} must be {rule} the interval "
                    f"({format_duration(interval)})",
                )
                return None
        if any(t.name in sec.failed for t in table):
            return None
        return ProbeConfig(**{t.name: sec.values[t.name] for t in table})

    def health_check(self, node: Node, path: str, protocol: str | None) -> HealthCheck | None:
        """The kind defaults to the export's protocol (http for http exports, else tcp)."""
        sec = self.section(node, path, HEALTH, parse=False)
        if sec is None:
            return None
        f = sec.nodes
        kind = (
            self.choice(f["kind"], f"{path}.kind", HEALTH_KINDS, "health check kind")
            if "kind" in f
            else ("http" if protocol == "http" else "tcp")
        )
        payloads: dict[str, bytes | None] = {}
        for name, limit in (("send", MAX_SEND_BYTES), ("expect", MAX_EXPECT_BYTES)):
            if name not in f or kind is None:
                continue
            if kind == "tcp":
                payloads[name] = self.payload(f[name], f"{path}.{name}", limit)
                continue
            payloads[name] = None
            self.problem(
                f[name],
                f"{path}.{name}",
                "only tcp checks send and expect bytes (an http check sends GET path and "
                "reads the status line); remove it or set kind: tcp",
            )
        if any(v is None for v in payloads.values()):
            return None
        send, expect = payloads.get("send"), payloads.get("expect")
        if send is not None and expect is None:
            self.problem(
                f["send"],
                f"{path}.expect",
                "required with send: a stopped or hung process still takes the bytes (its "
                "kernel does), so only an expected reply shows the app is alive",
            )
            return None
        hc_path: str | None = None
        healthy_below = 400
        if "path" in f:
            if kind == "tcp":
                self.problem(
                    f["path"],
                    f"{path}.path",
                    "only http checks have a path; remove it or set kind: http",
                )
            elif kind == "http":
                hc_path = self.string(f["path"], f"{path}.path")
                if hc_path is not None and not hc_path.startswith("/"):
                    self.problem(f["path"], f"{path}.path", f"{hc_path!r} must start with '/'")
                    hc_path = None
                if hc_path is None:
                    return None
        elif kind == "http":
            hc_path = DEFAULT_HTTP_PATH
            healthy_below = DEFAULT_HTTP_HEALTH_CHECK.healthy_status_below
        timing = self.timing(sec, HEALTH_TIMING, strict_timeout=True)
        if kind is None or timing is None:
            return None
        t = timing
        return HealthCheck(
            kind, hc_path, t.interval, t.timeout, t.healthy_threshold, t.unhealthy_threshold,
            send, expect, healthy_below,
        )

    def exports(self, node: Node, own: str | None) -> tuple[ExportConfig, ...]:
        return self.services(
            node, "exports", MAX_EXPORTS, "export", lambda n, path: self.export(n, path, own)
        )

    def services(
        self,
        node: Node,
        section: str,
        maximum: int,
        verb: str,
        parse: Callable[[Node, str], Any],
    ) -> tuple[Any, ...]:
        """The entries of `exports` or `imports`, each service at most once. A repeated service
        is reported even when either entry has other problems (its name and namespace are
        read quietly then), so one run shows both."""
        nodes = self.items(node, section, section, maximum)
        if nodes is None:
            return ()
        out: list[Any] = []
        seen: dict[tuple[str, str], int] = {}
        for i, n in enumerate(nodes):
            path = f"{section}[{i}]"
            entry = parse(n, path)
            key = (entry.namespace, entry.name) if entry is not None else _quiet_service(n)
            if key is not None and key in seen:
                self.problem(
                    n,
                    path,
                    f"service {key[0]}/{key[1]} is already {verb}ed by "
                    f"{section}[{seen[key]}]; {verb} each service once",
                )
                continue
            if key is not None:
                seen[key] = i
            if entry is not None:
                out.append(entry)
        return tuple(out)

    def export(self, node: Node, path: str, own: str | None) -> ExportConfig | None:
        sec = self.section(node, path, EXPORT)
        if sec is None:
            return None
        f, v = sec.nodes, sec.values
        endpoints = (
            self.endpoints(f["endpoints"], f"{path}.endpoints") if "endpoints" in f else None
        )
        protocol = v.get("protocol")
        hc: HealthCheck | None = (
            DEFAULT_HTTP_HEALTH_CHECK if protocol == "http" else DEFAULT_HEALTH_CHECK
        )
        if "health_check" in f:
            hc = self.health_check(f["health_check"], f"{path}.health_check", protocol)
        consumers: tuple[str, ...] | None = None
        ok = True
        if "allowed_consumers" in f:
            consumers = self.consumers(f["allowed_consumers"], f"{path}.allowed_consumers", own)
            ok = consumers is not None
        if not ok or not sec.ok or endpoints is None or hc is None:
            return None
        return ExportConfig(
            v["name"], v["namespace"], v["port"], protocol, endpoints, hc, consumers
        )

    def endpoints(self, node: Node, path: str) -> tuple[Endpoint, ...] | None:
        nodes = self.items(node, path, "endpoints", MAX_ENDPOINTS)
        if nodes is None:
            return None
        if not nodes:
            self.problem(node, path, "at least one endpoint is required")
            return None
        out: list[Endpoint] = []
        seen: dict[tuple[str, int], int] = {}
        ok = True
        for i, n in enumerate(nodes):
            where = f"{path}[{i}]"
            ep = self.endpoint(n, where)
            if ep is None:
                ok = False
                continue
            key = (ep.host.lower(), ep.port)
            own = self.own_listener(ep.host, ep.port)
            if own is not None:
                self.problem(
                    n,
                    where,
                    f"{ep.address!r} is this gateway's own {own}; endpoints must be the "
                    "service's instances, not the gateway",
                )
                ok = False
                continue
            if key in seen:
                self.problem(
                    n,
                    where,
                    f"duplicate endpoint {ep.address!r} (also {path}[{seen[key]}]); "
                    "raise its weight instead of listing it twice",
                )
                ok = False
                continue
            seen[key] = i
            out.append(ep)
        return tuple(out) if ok else None

    def endpoint(self, node: Node, path: str) -> Endpoint | None:
        if isinstance(node, ScalarNode):
            hp = self.hostport(node, path)
            return None if hp is None else Endpoint(hp[0], hp[1])
        if not isinstance(node, MappingNode):
            self.problem(
                node,
                path,
                "expected host:port or {address: host:port, weight: N}, "
                f"got {self.describe(node)}",
            )
            return None
        sec = self.section(node, path, ENDPOINT)
        if sec is None or not sec.ok:
            return None
        (host, port), weight = sec.values["address"], sec.values["weight"]
        return Endpoint(host, port, weight=weight)

    def consumers(self, node: Node, path: str, own: str | None) -> tuple[str, ...] | None:
        out = self.unique_names(node, path, "cluster names", MAX_CONSUMERS)
        if out is None:
            return None
        if own is not None and own not in out:
            out.append(own)  # the own cluster may always call its own exports
        return tuple(out)

    def imports(self, node: Node) -> tuple[ImportConfig, ...]:
        return self.services(node, "imports", MAX_IMPORTS, "import", self.import_)

    def import_(self, node: Node, path: str) -> ImportConfig | None:
        sec = self.section(node, path, IMPORT)
        if sec is None or not sec.ok:
            return None
        v = sec.values
        return ImportConfig(v["name"], v["namespace"], v["listen"], v["failover"])

    def failover(self, node: Node, path: str) -> FailoverPolicy | None:
        sec = self.section(node, path, FAILOVER, parse=False)
        if sec is None:
            return None
        self.parse(sec, FAILOVER[:2])
        tiers, prefs = sec.values["tiers"], sec.values["region_preference"]
        if "region_preference" in sec.nodes and prefs and tiers is not None and "any" not in tiers:
            self.problem(
                sec.nodes["region_preference"],
                f"{path}.region_preference",
                "has no effect without the 'any' tier; add 'any' to tiers or remove it",
            )
            sec.failed.add("region_preference")
        self.parse(sec, FAILOVER[2:])
        return FailoverPolicy(**sec.values) if sec.ok else None

    def tiers(self, node: Node, path: str) -> tuple[str, ...] | None:
        nodes = self.items(node, path, "tiers", len(TIERS) * 4)
        if nodes is None:
            return None
        if not nodes:
            self.problem(node, path, f"must list at least one tier of {_or(TIERS)}")
            return None
        out: list[str] = []
        ok = True
        for i, n in enumerate(nodes):
            tier = self.choice(n, f"{path}[{i}]", TIERS, "tier")
            if tier is None:
                ok = False
            elif tier in out:
                self.problem(n, f"{path}[{i}]", f"tier {tier!r} is listed twice")
                ok = False
            else:
                out.append(tier)
        return tuple(out) if ok else None

    def regions(self, node: Node, path: str) -> tuple[str, ...] | None:
        out = self.unique_names(node, path, "regions", 1000, "region ")
        return None if out is None else tuple(out)

    # -- cross-field checks ------------------------------------------------------------------

    def check_listeners(self, top: dict[str, Node]) -> None:
        """No two sockets this gateway binds may share a port (a wildcard clashes with all)."""
        found: list[tuple[str, Node, tuple[str, int]]] = []
        listen_node = top.get("listen")
        if isinstance(listen_node, MappingNode):
            for key in ("inbound", "admin"):
                n = _child(listen_node, key)
                hp = _quiet_hostport(n)
                if n is not None and hp is not None:
                    found.append((f"listen.{key}", n, hp))
        imports_node = top.get("imports")
        if isinstance(imports_node, SequenceNode):
            for i, item in enumerate(imports_node.value):
                n = _child(item, "listen")
                hp = _quiet_hostport(n)
                if n is not None and hp is not None:
                    found.append((f"imports[{i}].listen", n, hp))
        for j, (path, node, (host, port)) in enumerate(found):
            for other_path, _, (other_host, other_port) in found[:j]:
                if port == other_port and _same_bind(host, other_host):
                    self.problem(
                        node,
                        path,
                        f"{format_hostport(host, port)!r} clashes with {other_path} "
                        f"({format_hostport(other_host, other_port)}); every listener needs "
                        "its own port",
                    )
                    break
        self._listeners = [(p, hp) for p, _, hp in found]

    def own_listener(self, host: str, port: int) -> str | None:
        """The field of our own listener at host:port, if an endpoint points back at us."""
        for path, (h, p) in self._listeners:
            if p == port and (
                h.lower() == host.lower() or (_is_wildcard(h) and _is_loopback(host))
            ):
                return path
        return None
