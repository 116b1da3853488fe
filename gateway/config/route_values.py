"""The values of HTTP routes (modelled on the Gateway API's HTTPRoute): what the config reader
builds from a service file and core/routes.py compiles and matches. Frozen, no logic: the
matching rules and their precedence are core/routes.py's (its docstring is the spec).
"""

from __future__ import annotations

from dataclasses import dataclass

from federation.model import ServiceKey

EXACT, PREFIX, REGEX = "Exact", "PathPrefix", "RegularExpression"


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    name: str  # header or query parameter name (headers: compared lowercase)
    value: str
    kind: str = EXACT  # Exact | RegularExpression


@dataclass(frozen=True, slots=True)
class Match:
    path_kind: str = PREFIX
    path: str = "/"
    headers: tuple[HeaderMatch, ...] = ()
    query: tuple[HeaderMatch, ...] = ()
    method: str | None = None


@dataclass(frozen=True, slots=True)
class HeaderModifier:
    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Redirect:
    scheme: str | None = None
    hostname: str | None = None
    port: int | None = None
    path_kind: str | None = None  # ReplaceFullPath | ReplacePrefixMatch
    path: str | None = None
    status: int = 302


@dataclass(frozen=True, slots=True)
class Rewrite:
    hostname: str | None = None
    path_kind: str | None = None
    path: str | None = None


@dataclass(frozen=True, slots=True)
class Backend:
    service: ServiceKey
    weight: int = 1


@dataclass(frozen=True, slots=True)
class Rule:
    matches: tuple[Match, ...] = (Match(),)
    backends: tuple[Backend, ...] = ()
    request_headers: HeaderModifier | None = None
    response_headers: HeaderModifier | None = None
    redirect: Redirect | None = None
    rewrite: Rewrite | None = None
    name: str | None = None  # unique within its route: a policy targets it as sectionName


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    rules: tuple[Rule, ...]
    hostnames: tuple[str, ...] = ()  # empty: any Host
