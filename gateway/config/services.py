"""The service sections of the gateway config: exports (with endpoints and health checks) and
imports (with their failover policy): field tables and builders, used by schema.py.

These are the fields app teams own (README.md, "Config reference"); schema.py reads the gateway
file's own sections and calls these for `exports` and `imports`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from yaml.nodes import MappingNode, Node, ScalarNode

from federation.model import PROTOCOLS, Endpoint, FailoverPolicy, ServiceKey, TierKind
from federation.units import format_duration
from gateway.config.reader import (
    Field,
    Reader,
    Section,
    Table,
    _is_loopback,
    _is_wildcard,
    _or,
    _quiet_service,
    choice,
    defaults,
    duration,
    integer,
)
from gateway.config.routes_section import RouteReader
from gateway.config.values import ExportConfig, HealthCheck, ImportConfig, ProbeConfig

MAX_EXPORTS = 1000
MAX_IMPORTS = 1000
MAX_ENDPOINTS = 1000
MAX_CONSUMERS = 1000
TIERS = tuple(t.value for t in TierKind)
HEALTH_KINDS = ("tcp", "http")
MAX_SEND_BYTES = 1024  # health_check.send
MAX_EXPECT_BYTES = 256  # health_check.expect
DEFAULT_HTTP_PATH = "/healthz"
DEFAULT_FAILOVER = FailoverPolicy()  # the defaults are federation.model's, defined once
_name = Reader.name
_hostport = Reader.hostport


def _timing(interval: float, timeout: float) -> Table:
    return (
        Field("interval", duration(minimum=0.01, maximum=3600), interval),
        Field("timeout", duration(maximum=60), timeout),
        Field("healthy_threshold", integer(1, 100), 2),
        Field("unhealthy_threshold", integer(1, 100), 2),
    )


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
    Field("tiers", lambda r, n, p: Services.tiers(r, n, p), DEFAULT_FAILOVER.tiers),
    Field("region_preference", lambda r, n, p: Services.regions(r, n, p),
          DEFAULT_FAILOVER.region_preference),
    Field("failback_after", duration(maximum=3600, zero_ok=True), DEFAULT_FAILOVER.failback_after),
    Field("max_attempts", integer(1, 16), DEFAULT_FAILOVER.max_attempts),
)
IMPORT: Table = (
    Field("name", _name),
    Field("namespace", _name, "default"),
    Field("listen", _hostport),
    Field("protocol", choice(PROTOCOLS, "protocol"), "tcp",
          doc="http: the listener speaks HTTP/1.1 and routes each request"),
    Field("failover", lambda r, n, p: Services.failover(r, n, p), DEFAULT_FAILOVER),
    Field("routes", None, (), doc="protocol: http only; see \"HTTP routes\""),
    Field("access_log", Reader.boolean, False, doc="protocol: http only: a line per request"),
)
DEFAULT_HEALTH_CHECK = HealthCheck("tcp", None, **defaults(HEALTH_TIMING))
# The check of a `protocol: http` export without a health_check section: GET /healthz, where
# any answer below 500 proves the app answers (an app without /healthz says 404).
DEFAULT_HTTP_HEALTH_CHECK = replace(
    DEFAULT_HEALTH_CHECK, kind="http", path=DEFAULT_HTTP_PATH, healthy_status_below=500
)


class Services(RouteReader):
    def __init__(self, file: str, base: Path):
        super().__init__(file, base)
        # (field path, (host, port)) of every socket this gateway binds (schema.check_listeners)
        self._listeners: list[tuple[str, tuple[str, int]]] = []

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
        v, f = sec.values, sec.nodes
        routes: tuple | None = ()
        if v["protocol"] != "http":
            for name in ("routes", "access_log"):
                if name in f:
                    self.problem(f[name], f"{path}.{name}", "only an import with protocol: http "
                                 "has HTTP routes and an access log; set protocol: http")
                    return None
        elif "routes" in f:
            routes = self.routes(f["routes"], f"{path}.routes",
                                 ServiceKey(v["namespace"], v["name"]))
            if routes is None:
                return None
        return ImportConfig(v["name"], v["namespace"], v["listen"], v["failover"],
                            v["protocol"], routes, v["access_log"])

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

    def own_listener(self, host: str, port: int) -> str | None:
        """The field of our own listener at host:port, if an endpoint points back at us."""
        for path, (h, p) in self._listeners:
            if p == port and (
                h.lower() == host.lower() or (_is_wildcard(h) and _is_loopback(host))
            ):
                return path
        return None
