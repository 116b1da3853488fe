"""HTTP routes, modelled on the Gateway API's HTTPRoute (pure): match a request, pick a backend,
apply filters.

Theory of operation
-------------------
An HTTP import's routes are rules; a rule has matches (ORed; none = `PathPrefix /`), filters
and weighted backend refs. A match ANDs its conditions:

    path         Exact | PathPrefix (element-wise: /foo matches /foo, /foo/, /foo/bar, not
                 /foobar; a trailing / in the prefix is ignored) | RegularExpression (full match)
    headers      Exact (names case-insensitive) | RegularExpression, every one must hold
    queryParams  Exact | RegularExpression, every one must hold (the first value of a name)
    method       equal

Precedence (HTTPRoute's, across every rule of every route): an Exact path beats a prefix, a
longer prefix a shorter one; a RegularExpression path (implementation-specific in the spec)
ranks between them, a longer pattern first, as Contour and Envoy Gateway order them, so a
regex is not shadowed by a catch-all `/`; then a method match, then more header matches, then
more query matches; ties go
to the route listed first (routes are ordered by file, then position), then to the rule listed
first. `compile_routes` sorts every (match, rule) pair once per config version; `match` walks
that list and returns the first hit.

A rule's backends are drawn by weight (`pick`, injected randomness; weight 0 = never; all zero =
no backend, a 500). Filters: RequestHeaderModifier / ResponseHeaderModifier (set, add, remove),
RequestRedirect (scheme, hostname, port, path ReplaceFullPath | ReplacePrefixMatch, status 301 |
302), URLRewrite (hostname, path ReplaceFullPath | ReplacePrefixMatch).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import unquote_plus

from federation.model import ServiceKey
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

__all__ = ["Backend", "CompiledRoutes", "Decision", "HeaderMatch", "HeaderModifier", "Match",
           "Redirect", "Rewrite", "Route", "Rule", "compile_routes", "decide", "match_holds",
           "modify_headers",
           "pick", "redirect_location", "rewrite_path"]

def _value_holds(h: HeaderMatch, got: str | None, regex: Mapping[str, re.Pattern]) -> bool:
    if got is None:
        return False
    if h.kind == EXACT:
        return got == h.value
    return regex[h.value].fullmatch(got) is not None


def _path_holds(kind: str, want: str, path: str, regex: Mapping[str, re.Pattern]) -> bool:
    if kind == EXACT:
        return path == want
    if kind == PREFIX:
        prefix = want.rstrip("/")
        return prefix == "" or path == prefix or path.startswith(prefix + "/")
    return regex[want].fullmatch(path) is not None


def match_holds(m: Match, method: str, path: str, headers: Mapping[str, str],
                query: Mapping[str, str], regex: Mapping[str, re.Pattern]) -> bool:
    """Every condition of `m` holds for the request (`headers` keys lowercase)."""
    if m.method is not None and method != m.method:
        return False
    if not _path_holds(m.path_kind, m.path, path, regex):
        return False
    return (all(_value_holds(h, headers.get(h.name.lower()), regex) for h in m.headers)
            and all(_value_holds(q, query.get(q.name), regex) for q in m.query))


@dataclass(frozen=True)
class CompiledRoutes:
    """Every (match, rule, route) in precedence order."""

    entries: tuple[tuple[Match, Rule, Route], ...] = field(default_factory=tuple)
    needs_query: bool = False  # some match looks at query parameters (parse them only then)
    backends: frozenset[ServiceKey] = frozenset()  # every service a rule may send to
    regex: Mapping[str, re.Pattern] = field(default_factory=dict)  # compiled once, by pattern
    decisions: Mapping[tuple[int, ServiceKey], Decision] = field(default_factory=dict)

    def match(self, method: str, path: str, headers: Mapping[str, str],
              query: Mapping[str, str], host: str = "") -> tuple[Route, Rule, Match] | None:
        """The first entry that holds, or None (a 404). `headers` keys lowercase."""
        bare = host.rsplit(":", 1)[0].lower() if host and not host.endswith("]") else host
        for m, rule, route in self.entries:
            if route.hostnames and not any(_host_holds(h, bare) for h in route.hostnames):
                continue
            if match_holds(m, method, path, headers, query, self.regex):
                return route, rule, m
        return None


def _host_holds(pattern: str, host: str) -> bool:
    pattern = pattern.lower()
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and host.count(".") >= pattern.count(".")
    return host == pattern


def _rank(m: Match) -> tuple:
    kind = {EXACT: 0, REGEX: 1, PREFIX: 2}[m.path_kind]
    length = len(m.path.rstrip("/")) if m.path_kind == PREFIX else len(m.path)
    return (kind, -length, m.method is None, -len(m.headers), -len(m.query))


def compile_routes(routes: Sequence[Route]) -> CompiledRoutes:
    """Sort once: HTTPRoute precedence, then route order, then rule order (module docstring)."""
    keyed = []
    for ri, route in enumerate(routes):
        for ui, rule in enumerate(route.rules):
            for m in rule.matches:
                keyed.append((_rank(m), ri, ui, (m, rule, route)))
    keyed.sort(key=lambda k: (k[0], k[1], k[2]))
    entries = tuple(k[3] for k in keyed)
    backends = frozenset(b.service for r in routes for u in r.rules for b in u.backends)
    regex = {p: re.compile(p) for m, _, _ in entries
             for p in ([m.path] if m.path_kind == REGEX else [])
             + [h.value for h in (*m.headers, *m.query) if h.kind == REGEX]}
    return CompiledRoutes(entries, any(m.query for m, _, _ in entries), backends, regex,
                          decisions_of(routes))


def pick(backends: Sequence[Backend], random: Callable[[], float]) -> Backend | None:
    """A backend drawn by weight; None if every weight is 0 (or there is none)."""
    total = sum(b.weight for b in backends)
    if total <= 0:
        return None
    x = random() * total
    for b in backends:
        x -= b.weight
        if x < 0:
            return b
    return next(b for b in reversed(backends) if b.weight > 0)


def modify_headers(headers: list[tuple[str, str]], mod: HeaderModifier
                   ) -> list[tuple[str, str]]:
    """Headers (name, value) after set (replace every value), add (append) and remove."""
    gone = {n.lower() for n in mod.remove} | {n.lower() for n, _ in mod.set}
    out = [(n, v) for n, v in headers if n.lower() not in gone]
    out += list(mod.set) + list(mod.add)
    return out


def _replace_path(kind: str | None, new: str | None, path: str, m: Match) -> str:
    if kind is None or new is None:
        return path
    if kind == "ReplaceFullPath":
        return new
    # ReplacePrefixMatch: the matched prefix replaced, the rest of the path kept
    prefix = m.path.rstrip("/") if m.path_kind == PREFIX else path
    return (new.rstrip("/") + path[len(prefix):]) or "/"


def rewrite_path(rw: Rewrite, path: str, m: Match) -> str:
    return _replace_path(rw.path_kind, rw.path, path, m)


def redirect_location(rd: Redirect, scheme: str, host: str, path: str, query: str,
                      m: Match) -> str:
    """The Location of a RequestRedirect (query kept as it came)."""
    s = rd.scheme or scheme
    bare, _, port = host.partition(":")
    h = rd.hostname or bare
    default = {"http": 80, "https": 443}.get(s)
    # HTTPRoute: no port given -> the new scheme's well-known port, else the request's
    if rd.port is not None:
        p = rd.port
    elif rd.scheme:
        p = default
    else:
        p = int(port) if port.isdigit() else None
    netloc = h if p is None or p == default else f"{h}:{p}"
    new = _replace_path(rd.path_kind, rd.path, path, m)
    return f"{s}://{netloc}{new}" + (f"?{query}" if query else "")


# ---------------------------------------------------------------------------------------------
# One request's decision: route -> filters -> backend (what the HTTP session then performs)

PROXY, REDIRECT, NOT_FOUND, NO_BACKEND = "proxy", "redirect", "not-found", "no-backend"


@dataclass(frozen=True, slots=True)
class Decision:
    kind: str  # PROXY | REDIRECT | NOT_FOUND | NO_BACKEND
    route: str = ""  # "route-name" (or "" when no route matched / no routes: the default)
    backend: ServiceKey | None = None
    path: str | None = None  # the request target to send (URLRewrite applied), None: as it came
    host: str | None = None  # a new Host (URLRewrite hostname), else None: as it came
    request_headers: HeaderModifier | None = None
    response_headers: HeaderModifier | None = None
    location: str | None = None  # REDIRECT
    status: int = 0  # REDIRECT
    rule: str | None = None  # the matched rule's name, when it has one (policies' sectionName)


NOT_FOUND_DECISION = Decision(NOT_FOUND)


def decisions_of(routes: Sequence[Route]) -> dict[tuple[int, ServiceKey], Decision]:
    """The decision of each (rule, backend) that needs nothing of the request (no rewrite, no
    redirect), made once per config version: the hot path returns these, allocating nothing."""
    out: dict[tuple[int, ServiceKey], Decision] = {}
    for route in routes:
        for rule in route.rules:
            if rule.rewrite is None and rule.redirect is None:
                for b in rule.backends:
                    out[(id(rule), b.service)] = Decision(
                        PROXY, route.name, b.service, None, None, rule.request_headers,
                        rule.response_headers, rule=rule.name)
    return out


def decide(routes: CompiledRoutes, default: Decision, method: str, target: str,
           headers: Mapping[str, str], host: str, random: Callable[[], float],
           scheme: str = "http") -> Decision:
    """What to do with one request. No routes at all: `default` (the import's own service, as
    it came). `target` is the request target (path?query)."""
    if not routes.entries:
        return default
    path, _, query = target.partition("?")
    params: Mapping[str, str] = _query(query) if routes.needs_query else {}
    hit = routes.match(method, path, headers, params, host)
    if hit is None:
        return NOT_FOUND_DECISION
    route, rule, m = hit
    if rule.redirect is not None:
        loc = redirect_location(rule.redirect, scheme, host, path, query, m)
        return Decision(REDIRECT, route.name, location=loc, status=rule.redirect.status,
                        rule=rule.name)
    backend = pick(rule.backends, random) if rule.backends else None
    if backend is None:
        return Decision(NO_BACKEND, route.name, rule=rule.name)
    if rule.rewrite is None:
        return routes.decisions[(id(rule), backend.service)]
    path = rewrite_path(rule.rewrite, path, m)
    out = path + ("?" + query if query else "")
    return Decision(PROXY, route.name, backend.service, out, rule.rewrite.hostname,
                    rule.request_headers, rule.response_headers, rule=rule.name)
def _query(query: str) -> dict[str, str]:
    """The first value of each query parameter (HTTPRoute matches the first), %-decoded."""
    out: dict[str, str] = {}
    for part in query.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        out.setdefault(unquote_plus(name), unquote_plus(value))
    return out
