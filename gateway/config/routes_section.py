"""The `routes` of an HTTP import, read from a service file: HTTPRoute's fields, spelled as the
Gateway API spells them (so a rule can be copied from an HTTPRoute), into route_values.

    routes:
      - name: checkout                    # unique within the import
        hostnames: ["shop.example.com"]   # optional; "*.example.com" matches one label or more
        rules:
          - matches:                      # ORed; none: PathPrefix /
              - path: {type: PathPrefix, value: /api}     # Exact | PathPrefix | RegularExpression
                headers: [{name: x-canary, value: "1"}]   # type: Exact | RegularExpression
                queryParams: [{name: v, value: "2"}]
                method: GET
            filters:
              - type: RequestHeaderModifier               # also ResponseHeaderModifier
                requestHeaderModifier: {set: [{name: x-a, value: b}], add: [...], remove: [x-c]}
              - type: URLRewrite
                urlRewrite: {hostname: new.host,
                             path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}
              - type: RequestRedirect
                requestRedirect: {scheme: https, hostname: h, port: 443, statusCode: 301,
                                  path: {type: ReplaceFullPath, replaceFullPath: /new}}
            backendRefs:                  # none: the import's own service
              - {name: checkout, weight: 99}
              - {name: checkout-v2, weight: 1}   # namespace: the import's unless given

The Gateway API's own rules are checked here: limits on list lengths (its maxItems), a redirect
and a rewrite not in one rule, a redirect rule without backendRefs, ReplacePrefixMatch only
with a PathPrefix match, regular expressions that compile, header names that are HTTP tokens
and values without CR/LF.
"""

from __future__ import annotations

import re

from yaml.nodes import Node, ScalarNode

from federation.model import ServiceKey
from gateway.config.reader import Field, Reader, Section, Table, choice, integer
from gateway.config.route_values import (
    EXACT,
    PREFIX,
    REGEX,
    Backend,
    HeaderMatch,
    HeaderModifier,
    Match,
    Redirect,
    Rewrite,
    Route,
    Rule,
)

MAX_ROUTES = 64
MAX_RULES = 16  # per route: HTTPRoute's maxItems
MAX_MATCHES = 8
MAX_FILTERS = 16
MAX_BACKENDS = 16
MAX_HEADER_MATCHES = 16
MAX_HOSTNAMES = 16
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
PATH_KINDS = (EXACT, PREFIX, REGEX)
VALUE_KINDS = (EXACT, REGEX)
FILTER_KINDS = ("RequestHeaderModifier", "ResponseHeaderModifier", "RequestRedirect",
                "URLRewrite")
REPLACE_KINDS = ("ReplaceFullPath", "ReplacePrefixMatch")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HOSTNAME = re.compile(r"(\*\.)?[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}"
                       r"[a-z0-9])?)*")

ROUTE: Table = (
    Field("name", Reader.name),
    Field("hostnames", None, ()),
    Field("rules", None, None, doc="default: one rule, everything to the import's service"),
)
RULE: Table = (
    Field("name", Reader.name, None, doc="unique within the route: a policy's sectionName"),
    Field("matches", None, None),
    Field("filters", None, None),
    Field("backendRefs", None, None),
)
MATCH: Table = (
    Field("path", None, None),
    Field("headers", None, None),
    Field("queryParams", None, None),
    Field("method", choice(METHODS, "method"), None),
)
PATH: Table = (
    Field("type", choice(PATH_KINDS, "path match type"), PREFIX),
    Field("value", None, "/"),
)
VALUE_MATCH: Table = (
    Field("name", None),
    Field("value", None),
    Field("type", choice(VALUE_KINDS, "match type"), EXACT),
)
FILTER: Table = (
    Field("type", choice(FILTER_KINDS, "filter type")),
    Field("requestHeaderModifier", None, None),
    Field("responseHeaderModifier", None, None),
    Field("requestRedirect", None, None),
    Field("urlRewrite", None, None),
)
MODIFIER: Table = (
    Field("set", None, ()),
    Field("add", None, ()),
    Field("remove", None, ()),
)
NAME_VALUE: Table = (Field("name", None), Field("value", None))
REDIRECT: Table = (
    Field("scheme", choice(("http", "https"), "scheme"), None),
    Field("hostname", None, None),
    Field("port", integer(1, 65535), None),
    Field("path", None, None),
    Field("statusCode", lambda r, n, p: r.choice_int(n, p, (301, 302)), 302),
)
REWRITE: Table = (
    Field("hostname", None, None),
    Field("path", None, None),
)
PATH_MODIFIER: Table = (
    Field("type", choice(REPLACE_KINDS, "path modifier type")),
    Field("replaceFullPath", None, None),
    Field("replacePrefixMatch", None, None),
)
BACKEND: Table = (
    Field("name", Reader.name),
    Field("namespace", Reader.name, None, doc="default: the import's namespace"),
    Field("weight", integer(0, 1_000_000), 1),
)
_FILTER_FIELD = {"RequestHeaderModifier": "requestHeaderModifier",
                 "ResponseHeaderModifier": "responseHeaderModifier",
                 "RequestRedirect": "requestRedirect", "URLRewrite": "urlRewrite"}


class RouteReader(Reader):
    """Reads the `routes` of an import (a mixin of config.services.Services)."""

    def routes(self, node: Node, path: str, service: ServiceKey) -> tuple[Route, ...] | None:
        nodes = self.items(node, path, "routes", MAX_ROUTES)
        if nodes is None:
            return None
        out: list[Route] = []
        seen: dict[str, int] = {}
        ok = True
        for i, n in enumerate(nodes):
            where = f"{path}[{i}]"
            route = self.route(n, where, service)
            if route is None:
                ok = False
                continue
            if route.name in seen:
                self.problem(n, f"{where}.name", f"route {route.name!r} is already defined by "
                             f"{path}[{seen[route.name]}]; give each route its own name")
                ok = False
                continue
            seen[route.name] = i
            out.append(route)
        return tuple(out) if ok else None

    def route(self, node: Node, path: str, service: ServiceKey) -> Route | None:
        sec = self.section(node, path, ROUTE)
        if sec is None:
            return None
        f = sec.nodes
        hostnames: tuple[str, ...] | None = ()
        if "hostnames" in f:
            hostnames = self._hostnames(f["hostnames"], sec.where("hostnames"))
        rules: tuple[Rule, ...] | None = (Rule(backends=(Backend(service),)),)
        if "rules" in f:
            rules = self._list(f["rules"], sec.where("rules"), "rules", MAX_RULES,
                               lambda n, p: self.rule(n, p, service))
        if "rules" in f and rules is not None and not self._unique_rule_names(
                f["rules"], sec.where("rules"), rules):
            rules = None
        if not sec.ok or hostnames is None or rules is None:
            return None
        return Route(sec.values["name"], rules, hostnames)

    def _unique_rule_names(self, node: Node, path: str, rules: tuple[Rule, ...]) -> bool:
        seen: dict[str, int] = {}
        for i, rule in enumerate(rules):
            if rule.name is None:
                continue
            if rule.name in seen:
                self.problem(node.value[i], f"{path}[{i}].name", f"rule {rule.name!r} is "
                             f"already named by {path}[{seen[rule.name]}]; names are unique "
                             "within a route")
                return False
            seen[rule.name] = i
        return True

    def rule(self, node: Node, path: str, service: ServiceKey) -> Rule | None:
        sec = self.section(node, path, RULE)
        if sec is None:
            return None
        f = sec.nodes
        matches = (Match(),) if "matches" not in f else self._list(
            f["matches"], sec.where("matches"), "matches", MAX_MATCHES, self.match)
        filters = () if "filters" not in f else self._list(
            f["filters"], sec.where("filters"), "filters", MAX_FILTERS, self.filter_)
        backends = None if "backendRefs" not in f else self._list(
            f["backendRefs"], sec.where("backendRefs"), "backendRefs", MAX_BACKENDS,
            lambda n, p: self.backend(n, p, service))
        if matches is None or filters is None or ("backendRefs" in f and backends is None):
            return None
        kinds: dict[str, int] = {}
        for i, (kind, _) in enumerate(filters):
            if kind in kinds:
                self.problem(f["filters"], f"{path}.filters[{i}]",
                             f"{kind} is already set by filters[{kinds[kind]}]; one of each")
                return None
            kinds[kind] = i
        by_kind = dict(filters)
        redirect, rewrite = by_kind.get("RequestRedirect"), by_kind.get("URLRewrite")
        if redirect is not None and rewrite is not None:
            self.problem(f["filters"], f"{path}.filters",
                         "RequestRedirect and URLRewrite cannot be in the same rule")
            return None
        if redirect is not None and backends:
            self.problem(f["backendRefs"], f"{path}.backendRefs",
                         "a rule with a RequestRedirect answers itself: remove its backendRefs")
            return None
        for name, mod in (("RequestRedirect", redirect), ("URLRewrite", rewrite)):
            if mod is not None and mod.path_kind == "ReplacePrefixMatch" and any(
                    m.path_kind != PREFIX for m in matches):
                self.problem(f["filters"], f"{path}.filters",
                             f"{name} ReplacePrefixMatch needs every match of the rule to be a "
                             "PathPrefix")
                return None
        if backends is None:
            backends = () if redirect is not None else (Backend(service),)
        if not sec.ok:
            return None
        return Rule(matches, backends, by_kind.get("RequestHeaderModifier"),
                    by_kind.get("ResponseHeaderModifier"), redirect, rewrite,
                    sec.values.get("name"))

    def match(self, node: Node, path: str) -> Match | None:
        sec = self.section(node, path, MATCH)
        if sec is None:
            return None
        f = sec.nodes
        kind, value = PREFIX, "/"
        if "path" in f:
            got = self._path(f["path"], sec.where("path"))
            if got is None:
                return None
            kind, value = got
        headers = () if "headers" not in f else self._list(
            f["headers"], sec.where("headers"), "headers", MAX_HEADER_MATCHES,
            lambda n, p: self.value_match(n, p, header=True))
        query = () if "queryParams" not in f else self._list(
            f["queryParams"], sec.where("queryParams"), "queryParams", MAX_HEADER_MATCHES,
            lambda n, p: self.value_match(n, p, header=False))
        if not sec.ok or headers is None or query is None:
            return None
        return Match(kind, value, headers, query, sec.values["method"])

    def _path(self, node: Node, path: str) -> tuple[str, str] | None:
        sec = self.section(node, path, PATH)
        if sec is None or not sec.ok:
            return None
        kind = sec.values["type"]
        value = "/"
        if "value" in sec.nodes:
            value = self.string(sec.nodes["value"], sec.where("value"))
            if value is None:
                return None
        if kind == REGEX:
            return (kind, value) if self._regex(sec.nodes.get("value", node),
                                                sec.where("value"), value) else None
        if not value.startswith("/"):
            self.problem(sec.nodes.get("value"), sec.where("value"),
                         f"{value!r} must start with '/'")
            return None
        return kind, value

    def _regex(self, node: Node, path: str, pattern: str) -> bool:
        try:
            re.compile(pattern)
        except re.error as e:
            self.problem(node, path, f"{pattern!r} is not a valid regular expression: {e}")
            return False
        return True

    def value_match(self, node: Node, path: str, header: bool) -> HeaderMatch | None:
        sec = self.section(node, path, VALUE_MATCH)
        if sec is None or not sec.ok:
            return None
        name = self._header_name(sec.nodes["name"], sec.where("name")) if header else \
            self.string(sec.nodes["name"], sec.where("name"))
        value = self._value(sec.nodes["value"], sec.where("value"))
        if name is None or value is None:
            return None
        kind = sec.values["type"]
        if kind == REGEX and not self._regex(sec.nodes["value"], sec.where("value"), value):
            return None
        return HeaderMatch(name.lower() if header else name, value, kind)

    def filter_(self, node: Node, path: str) -> tuple[str, object] | None:
        sec = self.section(node, path, FILTER)
        if sec is None or not sec.ok:
            return None
        kind = sec.values["type"]
        want = _FILTER_FIELD[kind]
        for other in _FILTER_FIELD.values():
            if other != want and other in sec.nodes:
                self.problem(sec.nodes[other], sec.where(other),
                             f"belongs to a filter of another type (this one is {kind})")
                return None
        if want not in sec.nodes:
            self.problem(node, sec.where(want), f"required for a {kind} filter")
            return None
        sub, where = sec.nodes[want], sec.where(want)
        value: object | None
        if kind in ("RequestHeaderModifier", "ResponseHeaderModifier"):
            value = self.modifier(sub, where)
        elif kind == "RequestRedirect":
            value = self.redirect(sub, where)
        else:
            value = self.rewrite(sub, where)
        return None if value is None else (kind, value)

    def modifier(self, node: Node, path: str) -> HeaderModifier | None:
        sec = self.section(node, path, MODIFIER)
        if sec is None or not sec.ok:
            return None
        f = sec.nodes
        pairs: dict[str, tuple[tuple[str, str], ...] | None] = {}
        for key in ("set", "add"):
            pairs[key] = () if key not in f else self._list(
                f[key], sec.where(key), key, MAX_HEADER_MATCHES, self._name_value)
        remove: tuple[str, ...] | None = ()
        if "remove" in f:
            remove = self._list(f["remove"], sec.where("remove"), "remove", MAX_HEADER_MATCHES,
                                self._header_name)
        if remove is None or any(v is None for v in pairs.values()):
            return None
        return HeaderModifier(pairs["set"], pairs["add"], remove)  # type: ignore[arg-type]

    def _name_value(self, node: Node, path: str) -> tuple[str, str] | None:
        sec = self.section(node, path, NAME_VALUE)
        if sec is None or not sec.ok:
            return None
        name = self._header_name(sec.nodes["name"], sec.where("name"))
        value = self._value(sec.nodes["value"], sec.where("value"))
        return None if name is None or value is None else (name.lower(), value)

    def redirect(self, node: Node, path: str) -> Redirect | None:
        sec = self.section(node, path, REDIRECT)
        if sec is None:
            return None
        got = self._host_and_path(sec)
        if got is None or not sec.ok:
            return None
        v = sec.values
        return Redirect(v["scheme"], got[0], v["port"], got[1], got[2], v["statusCode"])

    def rewrite(self, node: Node, path: str) -> Rewrite | None:
        sec = self.section(node, path, REWRITE)
        if sec is None or not sec.ok:
            return None
        got = self._host_and_path(sec)
        if got is None:
            return None
        host, pk, pv = got
        if host is None and pk is None:
            self.problem(node, path, "set hostname, path or both")
            return None
        return Rewrite(host, pk, pv)

    def _host_and_path(self, sec: Section) -> tuple[str | None, str | None, str | None] | None:
        """The `hostname` and `path` modifier of a redirect or a rewrite (None: a problem)."""
        f = sec.nodes
        host = None
        if "hostname" in f:
            host = self._hostname(f["hostname"], sec.where("hostname"), wildcard=False)
            if host is None:
                return None
        if "path" not in f:
            return host, None, None
        got = self._path_modifier(f["path"], sec.where("path"))
        return None if got is None else (host, *got)

    def _path_modifier(self, node: Node, path: str) -> tuple[str, str] | None:
        sec = self.section(node, path, PATH_MODIFIER)
        if sec is None or not sec.ok:
            return None
        kind = sec.values["type"]
        want = "replaceFullPath" if kind == "ReplaceFullPath" else "replacePrefixMatch"
        other = "replacePrefixMatch" if want == "replaceFullPath" else "replaceFullPath"
        if other in sec.nodes:
            self.problem(sec.nodes[other], sec.where(other), f"not used with type {kind}")
            return None
        if want not in sec.nodes:
            self.problem(node, sec.where(want), f"required with type {kind}")
            return None
        value = self.string(sec.nodes[want], sec.where(want))
        if value is None:
            return None
        if not value.startswith("/"):
            self.problem(sec.nodes[want], sec.where(want), f"{value!r} must start with '/'")
            return None
        return kind, value

    def backend(self, node: Node, path: str, service: ServiceKey) -> Backend | None:
        sec = self.section(node, path, BACKEND)
        if sec is None or not sec.ok:
            return None
        v = sec.values
        return Backend(ServiceKey(v["namespace"] or service.namespace, v["name"]), v["weight"])

    # -- small values ----------------------------------------------------------------------------
    def _list(self, node: Node, path: str, what: str, maximum: int, parse) -> tuple | None:
        nodes = self.items(node, path, what, maximum)
        if nodes is None:
            return None
        out = [parse(n, f"{path}[{i}]") for i, n in enumerate(nodes)]
        return None if any(x is None for x in out) else tuple(out)

    def _hostnames(self, node: Node, path: str) -> tuple[str, ...] | None:
        return self._list(node, path, "hostnames", MAX_HOSTNAMES,
                          lambda n, p: self._hostname(n, p, wildcard=True))

    def _hostname(self, node: Node, path: str, wildcard: bool) -> str | None:
        value = self.string(node, path)
        if value is None:
            return None
        value = value.lower()
        if not _HOSTNAME.fullmatch(value) or (value.startswith("*.") and not wildcard):
            allowed = "a DNS name like shop.example.com" + (
                " or *.example.com" if wildcard else "")
            self.problem(node, path, f"{value!r} is not {allowed}")
            return None
        return value

    def _header_name(self, node: Node, path: str) -> str | None:
        value = self.string(node, path)
        if value is None:
            return None
        if not _TOKEN.fullmatch(value):
            self.problem(node, path, f"{value!r} is not an HTTP header name")
            return None
        return value

    def _value(self, node: Node, path: str) -> str | None:
        if isinstance(node, ScalarNode) and node.tag != "tag:yaml.org,2002:str":
            self.problem(node, path, f"expected a string, got {self.describe(node)} (quote it: "
                         f"\"{node.value}\")")
            return None
        value = self.string(node, path)
        if value is not None and ("\r" in value or "\n" in value or "\0" in value):
            self.problem(node, path, "must not contain CR, LF or NUL")
            return None
        return value

    def choice_int(self, node: Node, path: str, allowed: tuple[int, ...]) -> int | None:
        value = self.integer(node, path, 0, 1 << 31)
        if value is not None and value not in allowed:
            self.problem(node, path, f"{value} is not one of {', '.join(map(str, allowed))}")
            return None
        return value
