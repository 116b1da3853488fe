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

from yaml.nodes import MappingNode, Node, SequenceNode

from federation.model import Endpoint, FailoverPolicy, OutlierPolicy
from federation.units import format_duration, format_hostport
from gateway.config.files import ServiceFile, find, read_service_file, services_dir
from gateway.config.owners import (
    Listener,
    declared,
    import_listeners,
    listener_clashes,
    ownership_clashes,
)
from gateway.config.policy import check, check_policy_targets, parse_policy
from gateway.config.policy_objects import parse_policies
from gateway.config.reader import (
    DAY,
    Field,
    Reader,
    Table,
    _absolute,
    _child,
    _is_wildcard,
    _line,
    _quiet_hostport,
    defaults,
    duration,
    integer,
    read_text,
)
from gateway.config.services import (
    DEFAULT_FAILOVER,
    DEFAULT_HEALTH_CHECK,
    DEFAULT_HTTP_HEALTH_CHECK,
    TIERS,
    Services,
    _timing,
)
from gateway.config.side_sections import RELOAD, TRACING, XDS, SideSections
from gateway.config.values import (
    NO_POLICY,
    ClusterConfig,
    ExportConfig,
    FederationConfig,
    GatewayConfig,
    HealthCheck,
    IdentityConfig,
    ImportConfig,
    LimitsConfig,
    ListenConfig,
    PolicyConfig,
    ProbeConfig,
    ReloadConfig,
    ServiceSource,
    TracingConfig,
    XdsConfig,
)
from gateway.errors import ConfigError, Problem

__all__ = [
    "DEFAULT_FAILOVER",
    "DEFAULT_HEALTH_CHECK",
    "DEFAULT_HTTP_HEALTH_CHECK",
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
    "ReloadConfig",
    "TIERS",
    "load_config",
    "parse_config",
]

_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]{1,255}")
DEFAULT_OUTLIER = OutlierPolicy()

_name = Reader.name
_hostport = Reader.hostport
_filepath = Reader.filepath


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
    Field("url", lambda r, n, p: _Schema.urls(r, n, p),
          doc="https://host[:port][/path], or a list of them (replicas on one etcd store)"),
    Field("ca_file", _filepath),
    Field("token_file", _filepath, None, doc="join token, needed for the first join only"),
)
LISTEN: Table = (
    Field("inbound", _hostport, doc="the mTLS listener other gateways dial"),
    Field("admin", _hostport),
    Field("advertise", None, None, doc="host:port other gateways dial; default: inbound"),
)
IDENTITY: Table = (
    Field("svid_ttl", duration(minimum=60, maximum=30 * DAY), DAY),
    Field("ca_cert_file", _filepath, None, doc="with ca_key_file: use this CA, not our own"),
    Field("ca_key_file", _filepath, None),
    Field("bundle_refresh_hint", duration(minimum=1, maximum=DAY), 300.0,
          doc="spiffe_refresh_hint of our bundle: how often peers should refresh it"),
    Field("rotation_overlap", duration(minimum=1, maximum=30 * DAY), 3600.0,
          doc="`identity rotate-ca`: >= 3 x bundle_refresh_hint"),
)
LIMITS: Table = (
    Field("max_connections", integer(1, 1_000_000), 10000),
    Field("connect_timeout", duration(maximum=60), 1.0),
    Field("idle_timeout", duration(maximum=DAY), 3600.0),
    Field("drain_timeout", duration(maximum=DAY, zero_ok=True), 30.0,
          doc="a handed-over or SIGQUIT-stopped process drains this long"),
    Field("takeover_timeout", duration(minimum=1.0, maximum=600.0), 30.0,
          doc="a `--takeover` process must be ready within this"),
    Field("http_max_header_bytes", integer(1024, 1024 * 1024), 65536,
          doc="HTTP imports: a request head beyond this is refused (431)"),
    Field("http_max_headers", integer(1, 1000), 100,
          doc="HTTP imports: more request headers are refused (431)"),
    Field("http_max_target_bytes", integer(256, 1024 * 1024), 8192,
          doc="HTTP imports: a longer request target is refused (414)"),
    Field("http_header_timeout", duration(maximum=3600, zero_ok=True), 10.0,
          doc="HTTP imports: a request head not complete this long after it began (or after "
              "the connection opened) gets 408; 0s: no limit"),
    Field("inbound_max_handshakes", integer(1, 100_000), 256,
          doc="inbound: TLS handshakes in progress at once; more connections are closed unread"),
    Field("inbound_handshake_timeout", duration(maximum=60), 5.0,
          doc="inbound: a TLS handshake not done within this is closed"),
)
OUTLIER: Table = (
    Field("consecutive_failures", integer(1, 1000), DEFAULT_OUTLIER.consecutive_failures),
    Field("base_ejection", duration(maximum=3600), DEFAULT_OUTLIER.base_ejection),
    Field("max_ejection", duration(maximum=3600), DEFAULT_OUTLIER.max_ejection),
    Field("response_timeout", duration(maximum=3600), DEFAULT_OUTLIER.response_timeout,
          doc="off unless set"),
)
PEER_PROBE: Table = _timing(0.5, 0.5)
DEFAULT_IDENTITY = IdentityConfig(**defaults(IDENTITY))
DEFAULT_LIMITS = LimitsConfig(**defaults(LIMITS))
DEFAULT_PROBE = ProbeConfig(**defaults(PEER_PROBE))
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
    Field("policies", None, (), doc="timeouts, retries, JWT, OpenAPI (policy_objects.py)"),
    Field("services_dir", services_dir, None, doc="a directory or a list of globs"),
    Field("policy", parse_policy, NO_POLICY, doc="guard rails on service files"),
    Field("reload", lambda r, n, p: _Schema.simple(r, n, p, RELOAD, ReloadConfig),
          ReloadConfig(), doc="live reload of service files"),
    Field("dns", lambda r, n, p: _Schema.dns(r, n, p), None,
          doc="the clusterset.local DNS responder; none without this section"),
    Field("tunnel", lambda r, n, p: _Schema.tunnel(r, n, p), None,
          doc="WireGuard between gateways; none without this section"),
    Field("xds", lambda r, n, p: _Schema.simple(r, n, p, XDS, XdsConfig), None,
          doc="ADS for proxyless gRPC and Envoy; none without this section"),
    Field("tracing", lambda r, n, p: _Schema.simple(r, n, p, TRACING, TracingConfig), None,
          doc="OTLP/HTTP export of HTTP spans; none without this section"),
)


MIN_OVERLAP_FACTOR = 3  # a CA change lasts >= 3 bundle refresh hints (gateway/core/ca_rotation)


def check_overlap(overlap: float, refresh_hint: float) -> str | None:
    """Why a CA rotation `overlap` is too short for bundles refreshed every `refresh_hint`, or
    None: a peer polling at the hint must get MIN_OVERLAP_FACTOR chances to see each bundle."""
    least = MIN_OVERLAP_FACTOR * refresh_hint
    if overlap < least:
        return (f"{format_duration(overlap)} is shorter than {MIN_OVERLAP_FACTOR} x the bundle "
                f"refresh hint ({format_duration(refresh_hint)}), {format_duration(least)}: "
                "peers polling at the hint could miss the new CA")
    return None


# --------------------------------------------------------------------------------------------
# Entry points


def load_config(path: str | os.PathLike[str]) -> GatewayConfig:
    """Read and validate a gateway file and the service files its `services_dir` names, as one
    config. Every failure, I/O included, is a ConfigError naming every problem of every file."""
    shown = Path(path)
    gateway = _absolute(shown)
    reader = _Schema(str(shown), gateway.parent)
    root = reader.compose(read_text(path))
    config = reader.gateway(root, gateway) if root is not None else None
    spec = reader.services_spec
    files: list[ServiceFile] = []
    if spec is not None:
        paths, problems, warnings = find(spec, gateway, shown)
        node, where = reader.top.get("services_dir"), "services_dir"
        reader.problems += [Problem(reader.file, _line(node), where, m) for m in problems]
        reader.warnings += [Problem(reader.file, _line(node), where, m) for m in warnings]
        own = config.cluster.name if config is not None else reader.own
        order = len(config.policies) if config is not None else 0
        for p, name in paths:
            files.append(read_service_file(p, name, own, reader._listeners, order))
            order += len(files[-1].policies)
    return _merge(reader, config, files)


def _merge(reader: _Schema, config: GatewayConfig | None, files: list[ServiceFile]
           ) -> GatewayConfig:
    """The gateway file's config with its service files' services; the cross-file rules
    (listeners, one owner per service, the policy) checked over all of them."""
    problems, warnings = list(reader.problems), list(reader.warnings)
    top = reader.top
    listeners = reader.own_listeners(top) + import_listeners(reader.file, top.get("imports"))
    owned = [d for s in ("exports", "imports") for d in declared(reader.file, s, top.get(s))]
    policy = config.policy if config is not None else reader.policy
    for f in files:
        problems += f.problems
        warnings += f.warnings
        listeners += import_listeners(f.name, f.root.get("imports"))
        owned += [d for s in ("exports", "imports") for d in declared(f.name, s, f.root.get(s))]
        if policy is not None:
            guard = Reader(f.name, f.path.parent)
            check(guard, policy, _relative(f.path, reader.base), f.root)
            problems += guard.problems
        if f.policies:
            guard = Reader(f.name, f.path.parent)
            check_policy_targets(guard, policy or NO_POLICY, _relative(f.path, reader.base),
                                 f.root.get("policies"), f.policies, f.first_order)
            problems += guard.problems
    problems += listener_clashes(listeners, skip_within=reader.file)
    problems += ownership_clashes(owned)
    order = {reader.file: 0, **{f.name: i + 1 for i, f in enumerate(files)}}

    def key(p: Problem) -> tuple[int, int]:
        return order.get(p.file, 0), p.line or 0

    if problems or config is None:
        raise ConfigError(sorted(problems, key=key), sorted(warnings, key=key))
    by_file = [(config.source, config.exports, config.imports)]
    by_file += [(f.path, f.exports, f.imports) for f in files]
    lines = {(d.file, d.section, d.service): d.line for d in owned}
    names = {config.source: reader.file, **{f.path: f.name for f in files}}
    sources = tuple(
        ServiceSource(section, e.namespace, e.name, file,
                      lines.get((names[file], section, (e.namespace, e.name))))
        for file, exports, imports in by_file
        for section, entries in (("exports", exports), ("imports", imports))
        for e in entries
    )
    return replace(
        config,
        exports=tuple(e for _, exports, _ in by_file for e in exports),
        imports=tuple(i for _, _, imports in by_file for i in imports),
        warnings=tuple(sorted(warnings, key=key)),
        service_files=tuple(f.path for f in files),
        service_sources=sources,
        policies=config.policies + tuple(p for f in files for p in f.policies),
    )


def _relative(p: Path, base: Path) -> str:
    try:
        return p.relative_to(base).as_posix()
    except ValueError:
        return p.as_posix()


def parse_config(text: str, source: Path) -> GatewayConfig:
    """Validate the text of a gateway file (its inline services only; `load_config` reads its
    service files too); relative paths are resolved against source's directory."""
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


class _Schema(Services, SideSections):
    # What `load_config` needs of the gateway file even when it has problems elsewhere.
    top: dict[str, Node] = {}  # replaced per reader, never mutated
    services_spec: Path | tuple[str, ...] | None = None
    policy: PolicyConfig | None = None
    own: str | None = None

    def gateway(self, root: Node, source: Path) -> GatewayConfig | None:
        top = self.section(root, "", TOP)
        if top is None:
            return None
        v = top.values
        own = v["cluster"].name if v.get("cluster") is not None else None
        self.top, self.own = top.nodes, own
        self.services_spec, self.policy = v.get("services_dir"), v.get("policy")
        self.check_listeners(top.nodes)
        f = top.nodes
        exports = self.exports(f["exports"], own) if "exports" in f else ()
        imports = self.imports(f["imports"]) if "imports" in f else ()
        policies = parse_policies(self, f["policies"]) if "policies" in f else ()
        listen, tunnel = v.get("listen"), v.get("tunnel")
        if tunnel is not None and listen is not None and not _is_wildcard(listen.inbound[0]):
            self.problem(f["tunnel"], "tunnel", "links arrive on the overlay address: "
                         f"listen.inbound must be 0.0.0.0 or :: (it is "
                         f"{format_hostport(*listen.inbound)!r}); set listen.advertise to the "
                         "underlay address")
            return None
        if not top.ok:
            return None
        v = {**v, "policies": policies}
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
        sec = self.section(node, path, FEDERATION)
        if sec is None or not sec.ok:
            return None
        v = sec.values
        urls = v["url"]
        return FederationConfig(urls[0], v["ca_file"], v["token_file"],
                                urls if len(urls) > 1 else ())

    def urls(self, node: Node, path: str) -> tuple[str, ...] | None:
        """One URL, or a list of up to 16 (federation replicas)."""
        if not isinstance(node, SequenceNode):
            one = self.url(node, path)
            return None if one is None else (one,)
        items = self.items(node, path, "federation URLs", 16)
        if items is None:
            return None
        if not items:
            self.problem(node, path, "an empty list: give at least one federation URL")
            return None
        out = []
        for i, n in enumerate(items):
            u = self.url(n, f"{path}[{i}]")
            if u is None:
                return None
            out.append(u)
        if len(set(out)) != len(out):
            self.problem(node, path, "the same URL twice")
            return None
        return tuple(out)

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
        v = sec.values
        hint, overlap = v.get("bundle_refresh_hint"), v.get("rotation_overlap")
        why = check_overlap(overlap, hint) if hint is not None and overlap is not None else None
        if why is not None:
            self.problem(f.get("rotation_overlap", f.get("bundle_refresh_hint", node)),
                         f"{path}.rotation_overlap", why)
            return None
        return IdentityConfig(**v) if sec.ok else None

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

    # -- cross-field checks ------------------------------------------------------------------

    def check_listeners(self, top: dict[str, Node]) -> None:
        """No two sockets this gateway binds may share a port (a wildcard clashes with all)."""
        found = self.own_listeners(top)
        found += import_listeners(self.file, top.get("imports"))
        self.problems += listener_clashes(found)
        self._listeners = [(x.path, x.address) for x in found]

    def own_listeners(self, top: dict[str, Node]) -> list[Listener]:
        """listen.inbound and listen.admin, where their addresses are valid."""
        found: list[Listener] = []
        for section, keys in (("listen", ("inbound", "admin")), ("dns", ("listen",)),
                              ("xds", ("listen",))):
            parent = top.get(section)
            if not isinstance(parent, MappingNode):
                continue
            for key in keys:
                n = _child(parent, key)
                hp = _quiet_hostport(n)
                if n is not None and hp is not None:
                    found.append(Listener(self.file, _line(n), f"{section}.{key}", hp))
        return found
