"""The gateway's config file: schema, loading and validation.

Theory of operation
-------------------
One YAML file configures one gateway (README.md, "Config reference", documents every field). The text is
*composed* into PyYAML nodes rather than loaded into plain dicts, so every value still knows the
line it came from. A `_Reader` then walks the nodes section by section:

* each section is checked against its list of allowed fields (unknown, duplicate and missing
  fields are problems; a field set to `null` counts as "not set", so its default applies);
* each value goes through one typed getter (string, name, integer, duration, host:port, path)
  that records a `Problem` and returns None instead of raising, so one pass reports everything;
* cross-field rules (listener clashes, duplicate services, timeout < interval, ...) run last and
  only on values that passed their own checks, so one mistake is not reported twice.

If any problem was recorded, `ConfigError` carries them all, sorted by line. Otherwise the result
is a tree of frozen dataclasses with defaults applied, durations as float seconds and every file
path made absolute (relative paths are relative to the config file's directory).

Some settings are valid but risky (the plain-HTTP admin port on every interface): they are
*warnings*, `Problem`s in `GatewayConfig.warnings` (and `ConfigError.warnings`), which
`isthmus config validate` prints and `isthmus gateway run` logs; they never fail the file.

This module is pure: apart from `load_config` reading the one file, it does no I/O, and it
imports no asyncio, socket, time or random.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from federation.errors import InputError
from federation.model import (
    PROTOCOLS,
    Endpoint,
    FailoverPolicy,
    Locality,
    OutlierPolicy,
    TierKind,
    check_name,
)
from federation.units import format_duration, format_hostport, parse_duration, parse_hostport
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

MAX_FILE_BYTES = 1024 * 1024
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


# --------------------------------------------------------------------------------------------
# The schema, as frozen values. The runtime codes against these names.


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


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_connections: int
    connect_timeout: float
    idle_timeout: float


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
    endpoints: tuple[Endpoint, ...]
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
    warnings: tuple[Problem, ...] = ()  # valid but risky settings (module docstring)


DEFAULT_IDENTITY = IdentityConfig(svid_ttl=_DAY, ca_cert_file=None, ca_key_file=None)
DEFAULT_LIMITS = LimitsConfig(max_connections=10000, connect_timeout=1.0, idle_timeout=3600.0)
DEFAULT_OUTLIER = OutlierPolicy()
DEFAULT_PROBE = ProbeConfig(interval=0.5, timeout=0.5, healthy_threshold=2, unhealthy_threshold=2)
DEFAULT_HEALTH_CHECK = HealthCheck(
    kind="tcp", path=None, interval=1.0, timeout=0.5, healthy_threshold=2, unhealthy_threshold=2
)
DEFAULT_HTTP_PATH = "/healthz"
# The check of a `protocol: http` export without a health_check section: GET /healthz, where
# any answer below 500 proves the app answers (an app without /healthz says 404).
DEFAULT_HTTP_HEALTH_CHECK = HealthCheck(
    kind="http", path=DEFAULT_HTTP_PATH, interval=1.0, timeout=0.5, healthy_threshold=2,
    unhealthy_threshold=2, healthy_status_below=500,
)
DEFAULT_FAILOVER = FailoverPolicy()

# Allowed fields per section: name -> required.
_TOP = {
    "cluster": True,
    "federation": True,
    "listen": True,
    "state_dir": True,
    "identity": False,
    "limits": False,
    "outlier_detection": False,
    "peer_probe": False,
    "exports": False,
    "imports": False,
}
_CLUSTER = {"name": True, "region": True, "zone": True, "trust_domain": False}
_FEDERATION = {"url": True, "ca_file": True, "token_file": False}
_LISTEN = {"inbound": True, "admin": True, "advertise": False}
_IDENTITY = {"svid_ttl": False, "ca_cert_file": False, "ca_key_file": False}
_LIMITS = {"max_connections": False, "connect_timeout": False, "idle_timeout": False}
_OUTLIER = {
    "consecutive_failures": False,
    "base_ejection": False,
    "max_ejection": False,
    "response_timeout": False,
}
_PROBE = {
    "interval": False,
    "timeout": False,
    "healthy_threshold": False,
    "unhealthy_threshold": False,
}
_HEALTH = {"kind": False, "path": False, "send": False, "expect": False, **_PROBE}
_EXPORT = {
    "name": True,
    "namespace": False,
    "port": True,
    "protocol": False,
    "endpoints": True,
    "health_check": False,
    "allowed_consumers": False,
}
_ENDPOINT = {"address": True, "weight": False}
_IMPORT = {"name": True, "namespace": False, "listen": True, "failover": False}
_FAILOVER = {
    "tiers": False,
    "region_preference": False,
    "failback_after": False,
    "max_attempts": False,
}


# --------------------------------------------------------------------------------------------
# Entry points


def load_config(path: str | os.PathLike[str]) -> GatewayConfig:
    """Read and validate one config file. Every failure, I/O included, is a ConfigError."""
    p = Path(path)
    name = str(path)

    def fail(message: str, line: int | None = None) -> ConfigError:
        return ConfigError([Problem(name, line, "", message)])

    try:
        with open(p, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise fail("file not found") from None
    except IsADirectoryError:
        raise fail("is a directory, not a config file") from None
    except PermissionError:
        raise fail("cannot read the file: permission denied") from None
    except OSError as e:
        raise fail(f"cannot read the file: {e.strerror or e}") from None
    if len(data) > MAX_FILE_BYTES:
        raise fail("file is larger than 1 MiB; a gateway config is never that big")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise fail(
            f"not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})", line
        ) from None
    return parse_config(text, p)


def parse_config(text: str, source: Path) -> GatewayConfig:
    """Validate config text; relative paths in it are resolved against source's directory."""
    source = Path(source)
    reader = _Reader(str(source), _absolute(source).parent)
    root = reader.compose(text)
    config = reader.gateway(root, _absolute(source)) if root is not None else None
    warnings = sorted(reader.warnings, key=lambda p: p.line or 0)
    if reader.problems or config is None:
        raise ConfigError(sorted(reader.problems, key=lambda p: p.line or 0), warnings)
    return replace(config, warnings=tuple(warnings))


def _absolute(p: Path) -> Path:
    return Path(os.path.abspath(p.expanduser()))


# --------------------------------------------------------------------------------------------
# The reader: typed getters that record problems and return None instead of raising.


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def _line(node: Node | None) -> int | None:
    return None if node is None else node.start_mark.line + 1


class _Reader:
    def __init__(self, file: str, base: Path):
        self.file = file
        self.base = base
        self.problems: list[Problem] = []
        self.warnings: list[Problem] = []
        self._ctor = SafeConstructor()
        # (field path, (host, port)) of every socket this gateway binds; set by gateway().
        self._listeners: list[tuple[str, tuple[str, int]]] = []

    # -- plumbing ----------------------------------------------------------------------------

    def problem(self, node: Node | None, path: str, message: str) -> None:
        self.problems.append(Problem(self.file, _line(node), path, message))

    def warn(self, node: Node | None, path: str, message: str) -> None:
        self.warnings.append(Problem(self.file, _line(node), path, message))

    def compose(self, text: str) -> Node | None:
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            line = mark.line + 1 if mark is not None else None
            what = " ".join(s for s in (e.context, e.problem) if s)
            self.problems.append(Problem(self.file, line, "", f"not valid YAML: {what}"))
            return None
        except yaml.reader.ReaderError as e:
            line = text[: e.position].count("\n") + 1 if isinstance(e.position, int) else None
            self.problems.append(
                Problem(
                    self.file,
                    line,
                    "",
                    f"not valid YAML: character {_char(e.character)!r} is not allowed in a YAML file",
                )
            )
            return None
        except yaml.YAMLError as e:
            msg = " ".join(str(e).split())
            self.problems.append(Problem(self.file, None, "", f"not valid YAML: {msg}"))
            return None
        if root is None or _is_null(root):
            self.problems.append(
                Problem(self.file, None, "", "the file is empty; see the config reference in README.md")
            )
            return None
        return root

    def scalar(self, node: ScalarNode) -> Any:
        try:
            return self._ctor.construct_object(node)
        except yaml.YAMLError:
            return node.value

    def describe(self, node: Node) -> str:
        if isinstance(node, MappingNode):
            return "a mapping"
        if isinstance(node, SequenceNode):
            return "a list"
        value = self.scalar(node)
        if value is None:
            return "null"
        if isinstance(value, bool):
            return f"boolean {str(value).lower()}"
        if isinstance(value, int):
            return f"integer {value}"
        if isinstance(value, float):
            return f"number {value:g}"
        if isinstance(value, str):
            return f"string {value!r}"
        return f"{type(value).__name__} {node.value!r}"

    def section(self, node: Node, path: str, fields: dict[str, bool]) -> dict[str, Node] | None:
        """Check a mapping's field names; return name -> value node (null values left out)."""
        if not isinstance(node, MappingNode):
            self.problem(
                node,
                path,
                f"expected a mapping with fields {', '.join(fields)}; got {self.describe(node)}",
            )
            return None
        out: dict[str, Node] = {}
        seen: dict[str, Node] = {}
        for key, value in node.value:
            if not (isinstance(key, ScalarNode) and key.tag == "tag:yaml.org,2002:str"):
                self.problem(key, path, f"field names must be strings, got {self.describe(key)}")
                continue
            name = key.value
            where = _join(path, name)
            if name in seen:
                self.problem(key, where, f"duplicate field (first set on line {_line(seen[name])})")
                continue
            seen[name] = key
            if name not in fields:
                self.problem(
                    key, where, f"unknown field {name!r} (allowed here: {', '.join(fields)})"
                )
                continue
            if _is_null(value):
                if fields[name]:
                    self.problem(value, where, "required, but empty")
                continue
            out[name] = value
        for name, required in fields.items():
            if required and name not in seen:
                self.problem(node, _join(path, name), "missing required field")
        return out

    def items(self, node: Node, path: str, what: str, maximum: int) -> list[Node] | None:
        if not isinstance(node, SequenceNode):
            self.problem(node, path, f"expected a list of {what}, got {self.describe(node)}")
            return None
        if len(node.value) > maximum:
            self.problem(node, path, f"{len(node.value)} {what}, at most {maximum} allowed")
            return None
        return list(node.value)

    # -- typed getters -----------------------------------------------------------------------

    def string(self, node: Node, path: str) -> str | None:
        if isinstance(node, ScalarNode) and node.tag == "tag:yaml.org,2002:str":
            if node.value.strip():
                return node.value
            self.problem(node, path, "must not be empty")
            return None
        hint = ""
        if isinstance(node, ScalarNode):
            hint = f" (quote it if you mean the text: '{node.value}')"
        self.problem(node, path, f"expected a string, got {self.describe(node)}{hint}")
        return None

    def name(self, node: Node, path: str) -> str | None:
        value = self.string(node, path)
        if value is None:
            return None
        try:
            return check_name(value, path)
        except InputError as e:
            self.problem(node, path, str(e).removeprefix(f"{path}: "))
            return None

    def choice(self, node: Node, path: str, allowed: tuple[str, ...], what: str) -> str | None:
        value = self.string(node, path)
        if value is None:
            return None
        if value not in allowed:
            self.problem(node, path, f"{value!r} is not a supported {what} (use {_or(allowed)})")
            return None
        return value

    def integer(self, node: Node, path: str, lo: int, hi: int) -> int | None:
        value = self.scalar(node) if isinstance(node, ScalarNode) else None
        if not isinstance(value, int) or isinstance(value, bool):
            self.problem(node, path, f"expected a whole number, got {self.describe(node)}")
            return None
        if not lo <= value <= hi:
            self.problem(node, path, f"{value} is not in {lo}..{hi}")
            return None
        return value

    def duration(
        self,
        node: Node,
        path: str,
        *,
        minimum: float = 0.0,
        maximum: float,
        zero_ok: bool = False,
    ) -> float | None:
        if isinstance(node, ScalarNode) and node.tag == "tag:yaml.org,2002:str":
            raw: Any = node.value
        elif isinstance(node, ScalarNode):
            raw = self.scalar(node)
        else:
            self.problem(node, path, f"expected a duration like 5s, got {self.describe(node)}")
            return None
        try:
            value = parse_duration(raw)
        except InputError as e:
            self.problem(node, path, str(e))
            return None
        if value == 0 and not zero_ok:
            self.problem(node, path, f"{raw!r} must be more than 0")
            return None
        if value < minimum:
            self.problem(node, path, f"{raw!r} is too short: at least {format_duration(minimum)}")
            return None
        if value > maximum:
            self.problem(node, path, f"{raw!r} is too long: at most {format_duration(maximum)}")
            return None
        return value

    def hostport(self, node: Node, path: str) -> tuple[str, int] | None:
        if not (isinstance(node, ScalarNode) and node.tag == "tag:yaml.org,2002:str"):
            self.problem(
                node, path, f"expected host:port like 127.0.0.1:8080, got {self.describe(node)}"
            )
            return None
        try:
            return parse_hostport(node.value)
        except InputError as e:
            self.problem(node, path, str(e))
            return None

    def filepath(self, node: Node, path: str) -> Path | None:
        value = self.string(node, path)
        if value is None:
            return None
        if "\x00" in value:
            self.problem(node, path, "a file path cannot contain NUL characters")
            return None
        p = Path(value).expanduser()
        return Path(os.path.abspath(p if p.is_absolute() else self.base / p))

    # -- sections ----------------------------------------------------------------------------

    def gateway(self, root: Node, source: Path) -> GatewayConfig | None:
        top = self.section(root, "", _TOP)
        if top is None:
            return None
        cluster = self.cluster(top["cluster"]) if "cluster" in top else None
        federation = self.federation(top["federation"]) if "federation" in top else None
        listen = self.listen(top["listen"]) if "listen" in top else None
        state_dir = self.filepath(top["state_dir"], "state_dir") if "state_dir" in top else None
        identity = self.identity(top["identity"]) if "identity" in top else DEFAULT_IDENTITY
        limits = self.limits(top["limits"]) if "limits" in top else DEFAULT_LIMITS
        outlier = (
            self.outlier(top["outlier_detection"])
            if "outlier_detection" in top
            else DEFAULT_OUTLIER
        )
        probe = (
            self.probe(top["peer_probe"], "peer_probe", DEFAULT_PROBE, strict_timeout=False)
            if "peer_probe" in top
            else DEFAULT_PROBE
        )
        own = cluster.name if cluster is not None else None
        self.check_listeners(top)
        exports = self.exports(top["exports"], own) if "exports" in top else ()
        imports = self.imports(top["imports"]) if "imports" in top else ()
        if None in (cluster, federation, listen, state_dir, identity, limits, outlier, probe):
            return None
        return GatewayConfig(
            source=source,
            cluster=cluster,  # type: ignore[arg-type]
            federation=federation,  # type: ignore[arg-type]
            listen=listen,  # type: ignore[arg-type]
            state_dir=state_dir,  # type: ignore[arg-type]
            identity=identity,  # type: ignore[arg-type]
            limits=limits,  # type: ignore[arg-type]
            outlier_detection=outlier,  # type: ignore[arg-type]
            peer_probe=probe,  # type: ignore[arg-type]
            exports=exports,
            imports=imports,
        )

    def cluster(self, node: Node) -> ClusterConfig | None:
        f = self.section(node, "cluster", _CLUSTER)
        if f is None:
            return None
        name = self.name(f["name"], "cluster.name") if "name" in f else None
        region = self.name(f["region"], "cluster.region") if "region" in f else None
        zone = self.name(f["zone"], "cluster.zone") if "zone" in f else None
        trust_domain = f"{name}.isthmus.local" if name else None
        if "trust_domain" in f:
            td = self.string(f["trust_domain"], "cluster.trust_domain")
            trust_domain = None
            if td is not None:
                if _TRUST_DOMAIN.fullmatch(td):
                    trust_domain = td
                else:
                    self.problem(
                        f["trust_domain"],
                        "cluster.trust_domain",
                        f"{td!r} is not a valid trust domain "
                        "(lowercase letters, digits, '.', '-' and '_', like east-1.isthmus.local)",
                    )
        if None in (name, region, zone, trust_domain):
            return None
        return ClusterConfig(name, region, zone, trust_domain)  # type: ignore[arg-type]

    def federation(self, node: Node) -> FederationConfig | None:
        f = self.section(node, "federation", _FEDERATION)
        if f is None:
            return None
        url = self.url(f["url"], "federation.url") if "url" in f else None
        ca_file = self.filepath(f["ca_file"], "federation.ca_file") if "ca_file" in f else None
        token_file = None
        if "token_file" in f:
            token_file = self.filepath(f["token_file"], "federation.token_file")
            if token_file is None:
                return None
        if url is None or ca_file is None:
            return None
        return FederationConfig(url, ca_file, token_file)

    def url(self, node: Node, path: str) -> str | None:
        value = self.string(node, path)
        if value is None:
            return None
        try:
            parts = urlsplit(value)
            port = parts.port
        except ValueError as e:
            self.problem(node, path, f"{value!r} is not a valid URL ({e})")
            return None
        if parts.scheme != "https":
            self.problem(
                node,
                path,
                f"{value!r} is not an https:// URL; the federation is only reached over TLS",
            )
            return None
        if not parts.hostname:
            self.problem(node, path, f"{value!r} has no host")
            return None
        if port == 0:
            self.problem(node, path, f"{value!r}: port 0 is not in 1..65535")
            return None
        if parts.query or parts.fragment or parts.username or parts.password:
            self.problem(
                node, path, f"{value!r}: write only https://host:port[/path], no user, query or #"
            )
            return None
        return value.rstrip("/")

    def listen(self, node: Node) -> ListenConfig | None:
        f = self.section(node, "listen", _LISTEN)
        if f is None:
            return None
        inbound = self.hostport(f["inbound"], "listen.inbound") if "inbound" in f else None
        admin = self.hostport(f["admin"], "listen.admin") if "admin" in f else None
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

    def identity(self, node: Node) -> IdentityConfig | None:
        f = self.section(node, "identity", _IDENTITY)
        if f is None:
            return None
        d = DEFAULT_IDENTITY
        ttl = d.svid_ttl
        if "svid_ttl" in f:
            ttl = self.duration(f["svid_ttl"], "identity.svid_ttl", minimum=60, maximum=30 * _DAY)
        cert = key = None
        if "ca_cert_file" in f:
            cert = self.filepath(f["ca_cert_file"], "identity.ca_cert_file")
        if "ca_key_file" in f:
            key = self.filepath(f["ca_key_file"], "identity.ca_key_file")
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
        if ttl is None or ("ca_cert_file" in f and (cert is None or key is None)):
            return None
        return IdentityConfig(ttl, cert, key)

    def limits(self, node: Node) -> LimitsConfig | None:
        f = self.section(node, "limits", _LIMITS)
        if f is None:
            return None
        d = DEFAULT_LIMITS
        mc: int | None = d.max_connections
        ct: float | None = d.connect_timeout
        it: float | None = d.idle_timeout
        if "max_connections" in f:
            mc = self.integer(f["max_connections"], "limits.max_connections", 1, 1_000_000)
        if "connect_timeout" in f:
            ct = self.duration(f["connect_timeout"], "limits.connect_timeout", maximum=60)
        if "idle_timeout" in f:
            it = self.duration(f["idle_timeout"], "limits.idle_timeout", maximum=_DAY)
        if None in (mc, ct, it):
            return None
        return LimitsConfig(mc, ct, it)  # type: ignore[arg-type]

    def outlier(self, node: Node) -> OutlierPolicy | None:
        path = "outlier_detection"
        f = self.section(node, path, _OUTLIER)
        if f is None:
            return None
        d = DEFAULT_OUTLIER
        cf: int | None = d.consecutive_failures
        base: float | None = d.base_ejection
        top: float | None = d.max_ejection
        if "consecutive_failures" in f:
            cf = self.integer(f["consecutive_failures"], f"{path}.consecutive_failures", 1, 1000)
        if "base_ejection" in f:
            base = self.duration(f["base_ejection"], f"{path}.base_ejection", maximum=3600)
        if "max_ejection" in f:
            top = self.duration(f["max_ejection"], f"{path}.max_ejection", maximum=3600)
        rt: float | None = d.response_timeout
        if "response_timeout" in f:
            rt = self.duration(f["response_timeout"], f"{path}.response_timeout", maximum=3600)
            if rt is None:
                return None
        if base is not None and top is not None and top < base:
            self.problem(
                f.get("max_ejection", f.get("base_ejection", node)),
                f"{path}.max_ejection",
                f"{format_duration(top)} is shorter than base_ejection ({format_duration(base)}); "
                "it must be at least as long",
            )
            return None
        if None in (cf, base, top):
            return None
        return OutlierPolicy(cf, base, top, rt)  # type: ignore[arg-type]

    def probe(
        self, node: Node, path: str, default: ProbeConfig, *, strict_timeout: bool
    ) -> ProbeConfig | None:
        f = self.section(node, path, _PROBE)
        if f is None:
            return None
        return self._probe_fields(node, f, path, default, strict_timeout)

    def _probe_fields(
        self, node: Node, f: dict[str, Node], path: str, default: Any, strict_timeout: bool
    ) -> ProbeConfig | None:
        interval: float | None = default.interval
        timeout: float | None = default.timeout
        ht: int | None = default.healthy_threshold
        ut: int | None = default.unhealthy_threshold
        if "interval" in f:
            interval = self.duration(f["interval"], f"{path}.interval", minimum=0.01, maximum=3600)
        if "timeout" in f:
            timeout = self.duration(f["timeout"], f"{path}.timeout", maximum=60)
        if "healthy_threshold" in f:
            ht = self.integer(f["healthy_threshold"], f"{path}.healthy_threshold", 1, 100)
        if "unhealthy_threshold" in f:
            ut = self.integer(f["unhealthy_threshold"], f"{path}.unhealthy_threshold", 1, 100)
        if interval is not None and timeout is not None:
            bad = timeout >= interval if strict_timeout else timeout > interval
            if bad:
                rule = "shorter than" if strict_timeout else "at most"
                self.problem(
                    f.get("timeout", f.get("interval", node)),
                    f"{path}.timeout",
                    f"{format_duration(timeout)} must be {rule} the interval "
                    f"({format_duration(interval)})",
                )
                return None
        if None in (interval, timeout, ht, ut):
            return None
        return ProbeConfig(interval, timeout, ht, ut)  # type: ignore[arg-type]

    def health_check(self, node: Node, path: str, protocol: str | None) -> HealthCheck | None:
        """The kind defaults to the export's protocol (http for http exports, else tcp)."""
        f = self.section(node, path, _HEALTH)
        if f is None:
            return None
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
        timing = self._probe_fields(node, f, path, DEFAULT_HEALTH_CHECK, strict_timeout=True)
        if kind is None or timing is None:
            return None
        return HealthCheck(
            kind,
            hc_path,
            timing.interval,
            timing.timeout,
            timing.healthy_threshold,
            timing.unhealthy_threshold,
            send,
            expect,
            healthy_below,
        )

    def payload(self, node: Node, path: str, limit: int) -> bytes | None:
        """Bytes of a probe, written as a YAML string: UTF-8, whitespace-only is fine (CR LF)."""
        if not (isinstance(node, ScalarNode) and node.tag == "tag:yaml.org,2002:str"):
            self.problem(
                node, path, f'expected a string like "PING\\r\\n", got {self.describe(node)}'
            )
            return None
        try:
            data = node.value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate escape like "\ud800"
            self.problem(node, path, "is not valid Unicode text")
            return None
        if not data:
            self.problem(node, path, "must not be empty")
            return None
        if len(data) > limit:
            self.problem(node, path, f"{len(data)} bytes (UTF-8), at most {limit} allowed")
            return None
        return data

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
        f = self.section(node, path, _EXPORT)
        if f is None:
            return None
        name = self.name(f["name"], f"{path}.name") if "name" in f else None
        namespace = (
            self.name(f["namespace"], f"{path}.namespace") if "namespace" in f else "default"
        )
        port = self.integer(f["port"], f"{path}.port", 1, 65535) if "port" in f else None
        protocol = "tcp"
        if "protocol" in f:
            protocol = self.choice(f["protocol"], f"{path}.protocol", PROTOCOLS, "protocol")
        endpoints = (
            self.endpoints(f["endpoints"], f"{path}.endpoints") if "endpoints" in f else None
        )
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
        if not ok or None in (name, namespace, port, protocol, endpoints, hc):
            return None
        return ExportConfig(name, namespace, port, protocol, endpoints, hc, consumers)  # type: ignore[arg-type]

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
                f"expected host:port or {{address: host:port, weight: N}}, got {self.describe(node)}",
            )
            return None
        f = self.section(node, path, _ENDPOINT)
        if f is None:
            return None
        hp = self.hostport(f["address"], f"{path}.address") if "address" in f else None
        weight = self.integer(f["weight"], f"{path}.weight", 1, 1000) if "weight" in f else 1
        if hp is None or weight is None:
            return None
        return Endpoint(hp[0], hp[1], weight=weight)

    def unique_names(self, node: Node, path: str, what: str, limit: int, label: str = "") -> list[str] | None:
        """A list of distinct names; every bad or repeated item is a problem (None if any)."""
        nodes = self.items(node, path, what, limit)
        if nodes is None:
            return None
        out: list[str] = []
        ok = True
        for i, n in enumerate(nodes):
            name = self.name(n, f"{path}[{i}]")
            if name is None:
                ok = False
            elif name in out:
                self.problem(n, f"{path}[{i}]", f"{label}{name!r} is listed twice")
                ok = False
            else:
                out.append(name)
        return out if ok else None

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
        f = self.section(node, path, _IMPORT)
        if f is None:
            return None
        name = self.name(f["name"], f"{path}.name") if "name" in f else None
        namespace = (
            self.name(f["namespace"], f"{path}.namespace") if "namespace" in f else "default"
        )
        listen = self.hostport(f["listen"], f"{path}.listen") if "listen" in f else None
        failover: FailoverPolicy | None = DEFAULT_FAILOVER
        if "failover" in f:
            failover = self.failover(f["failover"], f"{path}.failover")
        if None in (name, namespace, listen, failover):
            return None
        return ImportConfig(name, namespace, listen, failover)  # type: ignore[arg-type]

    def failover(self, node: Node, path: str) -> FailoverPolicy | None:
        f = self.section(node, path, _FAILOVER)
        if f is None:
            return None
        d = DEFAULT_FAILOVER
        tiers: tuple[str, ...] | None = d.tiers
        prefs: tuple[str, ...] | None = d.region_preference
        failback: float | None = d.failback_after
        attempts: int | None = d.max_attempts
        if "tiers" in f:
            tiers = self.tiers(f["tiers"], f"{path}.tiers")
        if "region_preference" in f:
            prefs = self.regions(f["region_preference"], f"{path}.region_preference")
            if prefs and tiers is not None and "any" not in tiers:
                self.problem(
                    f["region_preference"],
                    f"{path}.region_preference",
                    "has no effect without the 'any' tier; add 'any' to tiers or remove it",
                )
                prefs = None
        if "failback_after" in f:
            failback = self.duration(
                f["failback_after"], f"{path}.failback_after", maximum=3600, zero_ok=True
            )
        if "max_attempts" in f:
            attempts = self.integer(f["max_attempts"], f"{path}.max_attempts", 1, 16)
        if None in (tiers, prefs, failback, attempts):
            return None
        return FailoverPolicy(tiers, prefs, failback, attempts)  # type: ignore[arg-type]

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


def _child(node: Node | None, key: str) -> Node | None:
    if not isinstance(node, MappingNode):
        return None
    for k, v in node.value:
        if isinstance(k, ScalarNode) and k.value == key:
            return v
    return None


def _quiet_name(node: Node | None) -> str | None:
    if not (isinstance(node, ScalarNode) and node.tag == "tag:yaml.org,2002:str"):
        return None
    try:
        return check_name(node.value, "")
    except InputError:
        return None


def _quiet_service(node: Node) -> tuple[str, str] | None:
    """(namespace, name) of an export or import entry when both are valid, else None."""
    ns_node = _child(node, "namespace")
    ns = "default" if ns_node is None or _is_null(ns_node) else _quiet_name(ns_node)
    name = _quiet_name(_child(node, "name"))
    return None if ns is None or name is None else (ns, name)


def _char(c: Any) -> str:
    return chr(c) if isinstance(c, int) else str(c)


def _quiet_hostport(node: Node | None) -> tuple[str, int] | None:
    if not (isinstance(node, ScalarNode) and node.tag == "tag:yaml.org,2002:str"):
        return None
    try:
        return parse_hostport(node.value)
    except InputError:
        return None


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _same_bind(a: str, b: str) -> bool:
    """Would binding both hosts on one port clash? A wildcard clashes with every address."""
    return a.lower() == b.lower() or _is_wildcard(a) or _is_wildcard(b)


def _or(options: tuple[str, ...]) -> str:
    quoted = [repr(o) for o in options]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]
