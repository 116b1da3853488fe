"""The `policies` list of a service file: timeouts, retries, JWT and OpenAPI validation attached
to the gateway, an import, a route or a route rule (docs/policies.md is the reference).

Each entry becomes a `gateway.core.policies.Policy`; the precedence between them (defaults:
most specific wins; `overrides`: least specific wins) is gateway/core/policies.py's. Read with
the field tables of reader.py: unknown fields, bad values and cross-field mistakes are problems
`FILE:LINE: policies[i].field: message` recorded on the reader, every one in one pass; an entry
with any problem is left out (the caller refuses the whole file when there are problems).

Checked here: names unique in the list; `sectionName` and `import` only on a Route (and
`import` required there: route names are unique per import), `namespace` not on a Gateway;
`backendRequest` <= `request` and `backoff_base` <= `backoff_cap` when one block sets both;
exactly one of `jwks_file` and `jwks_url` (https, or http to a loopback address only);
`claim_headers` naming valid header names other than the ones the proxy owns. Not
checked here: that the target exists (routes are another section; an unknown target is simply
never on a request's chain) and that the OpenAPI file parses (gateway/dataplane/http/auth/
openapi.py's `OpenApiValidator.from_file` reports that, naming the file).

Pure apart from the Reader's own file handling.
"""

from __future__ import annotations

import re
from dataclasses import fields
from typing import Any
from urllib.parse import urlsplit

from yaml.nodes import MappingNode, Node

from gateway.config.policy_values import (
    CONDITIONS,
    GATEWAY,
    IDEMPOTENT,
    KINDS,
    ROUTE,
    JwtSettings,
    OpenApiSettings,
    Part,
    Policy,
    PolicySpec,
    RetryPolicy,
    TargetRef,
    Timeouts,
)
from gateway.config.reader import (
    DAY,
    Field,
    Reader,
    Section,
    Table,
    _is_loopback,
    _or,
    choice,
    duration,
    integer,
)

__all__ = ["parse_policies", "POLICY", "TARGET_REF", "TIMEOUTS", "RETRY", "BUDGET", "JWT",
           "OPENAPI"]

MAX_POLICIES = 1000
MAX_LIST = 64  # audiences, claims, codes, methods, claim headers
JWT_ALGORITHMS = ("RS256", "ES256", "EdDSA")
UNKNOWN_FIELDS = ("reject", "drop")
MAX_BODY_LIMIT = 64 * 1024 * 1024
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}")  # an HTTP token (method, header name)
# headers the proxy itself owns: a claim may not be forwarded as one of them
RESERVED_HEADERS = frozenset({
    "authorization", "host", "content-length", "transfer-encoding", "connection", "upgrade",
    "te", "trailer", "keep-alive", "proxy-connection", "cookie",
})
DEFAULT_RETRY = RetryPolicy()
DEFAULT_JWT = JwtSettings("", ())
DEFAULT_OPENAPI = OpenApiSettings("")


TARGET_REF: Table = (
    Field("kind", choice(KINDS, "targetRef kind")),
    Field("name", Reader.name),
    Field("namespace", Reader.name, None, doc="Import and Route: the import's; default: default"),
    Field("import", Reader.name, None, doc="Route only, required: the import of the route"),
    Field("sectionName", Reader.name, None, doc="Route only: the name of one of its rules"),
)
TIMEOUTS: Table = (
    Field("request", duration(maximum=DAY, zero_ok=True), None,
          doc="the whole request, retries included; 0s: no limit; default 15s"),
    Field("backendRequest", duration(maximum=DAY, zero_ok=True), None,
          doc="one try to the backend; at most request; default: request"),
    Field("idle", duration(maximum=DAY, zero_ok=True), None,
          doc="a client connection without a request; 0s: no limit; default 5m"),
)
BUDGET: Table = (
    Field("percent", integer(0, 100), None, doc="retries per 100 requests; default 10"),
    Field("min_per_second", integer(0, 10000), None, doc="retries always allowed; default 3"),
    Field("window", duration(minimum=1, maximum=3600), None, doc="default 10s"),
)
RETRY: Table = (
    Field("attempts", integer(0, 16), None, doc="retries after the first try; default 2"),
    Field("per_try_timeout", duration(maximum=3600), None, doc="default: backendRequest"),
    Field("backoff_base", duration(minimum=0.001, maximum=60), None, doc="default 25ms"),
    Field("backoff_cap", duration(minimum=0.001, maximum=300), None, doc="default 250ms"),
    Field("retry_on", lambda r, n, p: _conditions(r, n, p), None,
          doc="connect-failure, reset, timeout, 5xx; default connect-failure, reset"),
    Field("codes", lambda r, n, p: _codes(r, n, p), None, doc="statuses; default [503]"),
    Field("methods", lambda r, n, p: _methods(r, n, p), None,
          doc="default GET HEAD OPTIONS PUT DELETE TRACE"),
    Field("budget", lambda r, n, p: _budget(r, n, p), None),
)
JWT: Table = (
    Field("issuer", Reader.string),
    Field("audiences", lambda r, n, p: _strings(r, n, p, "audiences", minimum=1)),
    Field("jwks_file", Reader.filepath, None, doc="relative to this file"),
    Field("jwks_url", lambda r, n, p: _jwks_url(r, n, p), None),
    Field("algorithms", lambda r, n, p: _algorithms(r, n, p), DEFAULT_JWT.algorithms),
    Field("clock_skew", duration(maximum=300, zero_ok=True), DEFAULT_JWT.clock_skew),
    Field("required_claims", lambda r, n, p: _strings(r, n, p, "claim names"), ()),
    Field("claim_headers", lambda r, n, p: _claim_headers(r, n, p), ()),
    Field("refresh_interval", duration(minimum=10, maximum=DAY), DEFAULT_JWT.refresh_interval),
    Field("unknown_kid_refresh", duration(minimum=1, maximum=3600),
          DEFAULT_JWT.unknown_kid_refresh),
    Field("cache_size", integer(0, 100_000), DEFAULT_JWT.cache_size),
)
OPENAPI: Table = (
    Field("spec", Reader.filepath, doc="a YAML or JSON OpenAPI 3.0/3.1 file, relative to this"),
    Field("unknown_fields", choice(UNKNOWN_FIELDS, "unknown_fields mode"),
          DEFAULT_OPENAPI.unknown_fields),
    Field("max_body_bytes", integer(1, MAX_BODY_LIMIT), DEFAULT_OPENAPI.max_body_bytes),
    Field("base_path", lambda r, n, p: _base_path(r, n, p), DEFAULT_OPENAPI.base_path),
)
BLOCKS: Table = (
    Field("timeouts", lambda r, n, p: _timeouts(r, n, p), None),
    Field("retry", lambda r, n, p: _retry(r, n, p), None),
    Field("jwt", lambda r, n, p: _jwt(r, n, p), None),
    Field("openapi", lambda r, n, p: _openapi(r, n, p), None),
)
POLICY: Table = (
    Field("name", Reader.name),
    Field("targetRef", lambda r, n, p: _target(r, n, p)),
    *BLOCKS,
    Field("overrides", lambda r, n, p: _spec(r, n, p), None,
          doc="the same blocks, winning over every default; the least specific target wins"),
)


def parse_policies(r: Reader, node: Node, path: str = "policies",
                   first_order: int = 0) -> tuple[Policy, ...]:
    """The policies of one `policies:` list; problems go to `r`. `first_order` is the position
    of the first entry among every file's policies (files in order), for GEP-713's ties."""
    nodes = r.items(node, path, "policies", MAX_POLICIES)
    if nodes is None:
        return ()
    out: list[Policy] = []
    seen: dict[str, int] = {}
    for i, n in enumerate(nodes):
        where = f"{path}[{i}]"
        sec = r.section(n, where, POLICY)
        if sec is None:
            continue
        name = sec.values.get("name")
        if name is not None and name in seen:
            r.problem(sec.nodes["name"], sec.where("name"),
                      f"policy {name!r} is already defined by {path}[{seen[name]}]")
            continue
        if name is not None:
            seen[name] = i
        defaults = _spec_of(sec.values)
        if sec.ok and defaults.empty and sec.values["overrides"] is None:
            r.problem(n, where, "sets nothing: add timeouts, retry, jwt, openapi or overrides")
            continue
        if sec.ok:
            out.append(Policy(name, sec.values["targetRef"], defaults,
                              sec.values["overrides"] or PolicySpec(), first_order + i))
    return tuple(out)


def _spec_of(values: dict[str, Any]) -> PolicySpec:
    return PolicySpec(values["timeouts"], values["retry"], values["jwt"], values["openapi"])


def _spec(r: Reader, node: Node, path: str) -> PolicySpec | None:
    sec = r.section(node, path, BLOCKS)
    if sec is None or not sec.ok:
        return None
    spec = _spec_of(sec.values)
    if spec.empty:
        r.problem(node, path, "sets nothing: add timeouts, retry, jwt or openapi")
        return None
    return spec


def _target(r: Reader, node: Node, path: str) -> TargetRef | None:
    sec = r.section(node, path, TARGET_REF)
    if sec is None or not sec.ok:
        return None
    v = sec.values
    kind = v["kind"]
    if v["sectionName"] is not None and kind != ROUTE:
        r.problem(sec.nodes["sectionName"], sec.where("sectionName"),
                  f"only a Route target has a sectionName (a rule's name), not a {kind}")
        return None
    if v["namespace"] is not None and kind == GATEWAY:
        r.problem(sec.nodes["namespace"], sec.where("namespace"),
                  "a Gateway target has no namespace (only Import and Route targets do)")
        return None
    if v["import"] is not None and kind != ROUTE:
        r.problem(sec.nodes["import"], sec.where("import"),
                  f"only a Route target names its import, not a {kind}")
        return None
    if v["import"] is None and kind == ROUTE:
        r.problem(node, sec.where("import"), "required for a Route target: route names are "
                  "unique per import, so name the import the route belongs to")
        return None
    if kind == GATEWAY:
        return TargetRef(GATEWAY, v["name"])
    return TargetRef(kind, v["name"], v["namespace"] or "default", v["sectionName"], v["import"])


def _set(sec: Section) -> dict[str, Any]:
    return {k: sec.values[k] for k in sec.nodes}


def _ordered(r: Reader, sec: Section, low: str, high: str, *, low_name: str | None = None,
             high_name: str | None = None) -> bool:
    lo, hi = sec.values.get(low), sec.values.get(high)
    if lo is None or hi is None or not lo or not hi or lo <= hi:
        return True
    r.problem(sec.nodes[low], sec.where(low),
              f"{low_name or low} ({lo:g}s) must be at most {high_name or high} ({hi:g}s)")
    return False


def _timeouts(r: Reader, node: Node, path: str) -> Part[Timeouts] | None:
    sec = r.section(node, path, TIMEOUTS)
    if sec is None or not sec.ok or not _ordered(r, sec, "backendRequest", "request"):
        return None
    given = _set(sec)
    if "backendRequest" in given:
        given["backend_request"] = given.pop("backendRequest")
    return Part.of(Timeouts(**given), given)


def _retry(r: Reader, node: Node, path: str) -> Part[RetryPolicy] | None:
    sec = r.section(node, path, RETRY)
    if sec is None or not sec.ok or not _ordered(r, sec, "backoff_base", "backoff_cap"):
        return None
    given = _set(sec)
    budget = given.pop("budget", None)
    if budget is not None:
        given.update(budget)
    try:
        return Part.of(RetryPolicy(**given), given)
    except ValueError as e:  # the tables' bounds keep this from happening; say so if it does
        r.problem(node, path, str(e))
        return None


def _budget(r: Reader, node: Node, path: str) -> dict[str, Any] | None:
    sec = r.section(node, path, BUDGET)
    if sec is None or not sec.ok:
        return None
    given = _set(sec)
    out: dict[str, Any] = {}
    if "percent" in given:
        out["budget_ratio"] = given["percent"] / 100
    if "min_per_second" in given:
        out["budget_min_per_second"] = float(given["min_per_second"])
    if "window" in given:
        out["budget_window"] = given["window"]
    return out


def _jwt(r: Reader, node: Node, path: str) -> JwtSettings | None:
    sec = r.section(node, path, JWT)
    if sec is None:
        return None
    v = sec.values
    sources = [k for k in ("jwks_file", "jwks_url") if k in sec.nodes]
    if len(sources) != 1:
        r.problem(node, path, "set exactly one of jwks_file and jwks_url"
                  + (" (both are set)" if sources else ""))
        return None
    if not sec.ok:
        return None
    names = {f.name for f in fields(JwtSettings)}
    return JwtSettings(**{k: (str(x) if k == "jwks_file" and x is not None else x)
                          for k, x in v.items() if k in names})


def _openapi(r: Reader, node: Node, path: str) -> OpenApiSettings | None:
    sec = r.section(node, path, OPENAPI)
    if sec is None or not sec.ok:
        return None
    v = sec.values
    return OpenApiSettings(str(v["spec"]), v["unknown_fields"], v["max_body_bytes"],
                           v["base_path"])


# -- leaf getters --------------------------------------------------------------------------


def _strings(r: Reader, node: Node, path: str, what: str, minimum: int = 0
             ) -> tuple[str, ...] | None:
    nodes = r.items(node, path, what, MAX_LIST)
    if nodes is None:
        return None
    if len(nodes) < minimum:
        r.problem(node, path, f"list at least {minimum} of the {what}")
        return None
    out: list[str] = []
    for i, n in enumerate(nodes):
        value = r.string(n, f"{path}[{i}]")
        if value is None:
            return None
        if value in out:
            r.problem(n, f"{path}[{i}]", f"{value!r} is listed twice")
            return None
        out.append(value)
    return tuple(out)


def _tokens(r: Reader, node: Node, path: str, what: str) -> tuple[str, ...] | None:
    values = _strings(r, node, path, what, minimum=1)
    if values is None:
        return None
    for i, value in enumerate(values):
        if not _TOKEN.fullmatch(value):
            r.problem(node.value[i], f"{path}[{i}]", f"{value!r} is not a valid {what[:-1]}")
            return None
    return values


def _conditions(r: Reader, node: Node, path: str) -> frozenset[str] | None:
    values = _strings(r, node, path, "conditions")
    if values is None:
        return None
    for i, value in enumerate(values):
        if value not in CONDITIONS:
            r.problem(node.value[i], f"{path}[{i}]",
                      f"{value!r} is not a retry condition (use {_or(CONDITIONS)})")
            return None
    return frozenset(values)


def _codes(r: Reader, node: Node, path: str) -> frozenset[int] | None:
    nodes = r.items(node, path, "status codes", MAX_LIST)
    if nodes is None:
        return None
    out = [r.integer(n, f"{path}[{i}]", 400, 599) for i, n in enumerate(nodes)]
    return None if any(c is None for c in out) else frozenset(out)  # type: ignore[arg-type]


def _methods(r: Reader, node: Node, path: str) -> frozenset[str] | None:
    values = _tokens(r, node, path, "methods")
    if values is None:
        return None
    upper = frozenset(v.upper() for v in values)
    unsafe = sorted(upper - IDEMPOTENT)
    if unsafe:
        r.warn(node, path, f"{', '.join(unsafe)} may not be idempotent: a retry can repeat "
                           "its effect on the backend")
    return upper


def _algorithms(r: Reader, node: Node, path: str) -> tuple[str, ...] | None:
    values = _strings(r, node, path, "algorithms", minimum=1)
    if values is None:
        return None
    for i, value in enumerate(values):
        if value not in JWT_ALGORITHMS:
            hint = (" (HS* would let anyone holding a key the gateway trusts forge tokens; "
                    "'none' is never accepted)") if value.startswith("HS") or value == "none" \
                else ""
            r.problem(node.value[i], f"{path}[{i}]",
                      f"{value!r} is not supported (use {_or(JWT_ALGORITHMS)}){hint}")
            return None
    return values


def _jwks_url(r: Reader, node: Node, path: str) -> str | None:
    value = r.string(node, path)
    if value is None:
        return None
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError as e:
        r.problem(node, path, f"{value!r} is not a valid URL ({e})")
        return None
    if not parts.hostname or parts.scheme not in ("https", "http"):
        r.problem(node, path, f"{value!r} is not an https:// URL with a host")
        return None
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        r.problem(node, path, f"{value!r}: keys are fetched over https, or http to a loopback "
                              "address only (a key server on this host)")
        return None
    if parts.username or parts.password or parts.fragment:
        r.problem(node, path, f"{value!r}: write no user, password or # in the URL")
        return None
    return value


def _claim_headers(r: Reader, node: Node, path: str) -> tuple[tuple[str, str], ...] | None:
    if not isinstance(node, MappingNode):
        r.problem(node, path, f"expected a mapping of claim name to header name, "
                              f"got {r.describe(node)}")
        return None
    if len(node.value) > MAX_LIST:
        r.problem(node, path, f"{len(node.value)} claims, at most {MAX_LIST} allowed")
        return None
    out: list[tuple[str, str]] = []
    headers: set[str] = set()
    for key, value in node.value:
        claim = r.string(key, path)
        if claim is None:
            return None
        where = f"{path}.{claim}"
        header = r.string(value, where)
        if header is None:
            return None
        if not _TOKEN.fullmatch(header):
            r.problem(value, where, f"{header!r} is not a valid header name")
            return None
        if header.lower() in RESERVED_HEADERS:
            r.problem(value, where, f"{header!r} is a header the proxy owns; choose another "
                                    "name, like x-jwt-" + claim)
            return None
        if header.lower() in headers:
            r.problem(value, where, f"header {header!r} is set by another claim already")
            return None
        headers.add(header.lower())
        out.append((claim, header.lower()))
    return tuple(out)


def _base_path(r: Reader, node: Node, path: str) -> str | None:
    value = r.string(node, path)
    if value is None:
        return None
    if not value.startswith("/") or "?" in value or "#" in value:
        r.problem(node, path, f"{value!r} must be a path starting with '/', like /api")
        return None
    return value.rstrip("/")
