"""Policies attached to the gateway, imports, routes and route rules (pure): values and merging.

Theory of operation
-------------------
A policy is its own object (Gateway API policy attachment, GEP-713): a name, a ``TargetRef``
and what it sets — ``timeouts``, ``retry``, ``jwt``, ``openapi`` — as *defaults* and, in an
``overrides`` block, as *overrides*. Targets nest, least specific first:

    Gateway  ⊃  Import (an HTTP import's listener)  ⊃  Route  ⊃  Route rule (route + sectionName)

A request is attached to one chain (``Attachment``: the gateway, its import, and, once routed,
its route and rule). ``effective_policy(attachment, policies)`` merges every policy whose target
is on the chain, **field by field**:

1. an override wins over every default; among overrides the LEAST specific wins (the gateway's
   owner can pin a value that no route changes);
2. among defaults the MOST specific wins (a rule beats its route, a route its import, an import
   the gateway);
3. on one target, the policy listed first wins (file order, then position; GEP-713's "oldest
   wins", our config having no creation time), then the name in alphabetical order;
4. a field nobody sets takes the built-in default (``DEFAULT_TIMEOUTS``, ``RetryPolicy()``).

"Field" means a leaf: ``timeouts.request`` from a route and ``timeouts.idle`` from the gateway
combine. ``jwt`` and ``openapi`` are merged as whole blocks (issuer, keys and audiences of two
different levels must never mix; one spec file is validated, not two).

The values (``Policy``, ``TargetRef``, ``Timeouts``, ``JwtSettings``, ``OpenApiSettings``,
``Part``, ``PolicySpec``) are defined in gateway/config/policy_values.py (the config layer
builds them) and re-exported here.

What a policy sets is a ``Part``: a value plus the names of the fields the policy really set
(the others hold the class defaults and are ignored by the merge).

Resolved timeouts (HTTPRoute ``timeouts`` semantics): ``0`` means no limit; ``backend_request``
is one try's limit and never exceeds ``request`` (the whole request, retries included): a
larger merged value is cut to ``request``, and an unset one is ``request``.

``PolicyIndex`` is the hot path's form: the policies grouped by target once per config version,
and each chain's result cached (bounded), so a request pays one dict lookup. It returns what
``effective_policy`` returns (tests/gateway/core/test_policies.py checks they agree).

Pure: no asyncio, socket, time or random.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from gateway.config.policy_values import (
    DEFAULT_TIMEOUTS,
    GATEWAY,
    IMPORT,
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

__all__ = [
    "DEFAULT_TIMEOUTS", "GATEWAY", "IMPORT", "KINDS", "ROUTE", "Attachment", "EffectivePolicy",
    "JwtSettings", "OpenApiSettings", "Part", "Policy", "PolicyIndex", "PolicySpec", "RetryPolicy",
    "TargetRef", "Timeouts", "effective_policy",
]
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Attachment:
    """Where one request is: gateway (cluster name), import (namespace, name), route, rule."""

    gateway: str
    import_: tuple[str, str]
    route: str | None = None
    rule: str | None = None

    def levels(self) -> tuple[TargetRef, ...]:
        """The targets on this chain, most specific first."""
        out: list[TargetRef] = []
        ns, name = self.import_
        if self.route is not None:
            if self.rule is not None:
                out.append(TargetRef(ROUTE, self.route, ns, self.rule, name))
            out.append(TargetRef(ROUTE, self.route, ns, None, name))
        out.append(TargetRef(IMPORT, name, namespace=ns))
        out.append(TargetRef(GATEWAY, self.gateway))
        return tuple(out)


@dataclass(frozen=True, slots=True)
class EffectivePolicy:
    timeouts: Timeouts  # resolved: None = no limit
    retry: RetryPolicy
    jwt: JwtSettings | None
    openapi: OpenApiSettings | None
    sources: tuple[tuple[str, str], ...] = field(default=())  # (field, policy name), for `why`

    def source(self, name: str) -> str | None:
        return dict(self.sources).get(name)

    @property
    def try_timeout(self) -> float | None:
        """One try's limit: retry.per_try_timeout when set, never above backend_request."""
        limits = [t for t in (self.retry.per_try_timeout, self.timeouts.backend_request)
                  if t is not None]
        return min(limits) if limits else None


def effective_policy(at: Attachment, policies: Sequence[Policy]) -> EffectivePolicy:
    """The merged policy for a request on chain `at` (see the module docstring)."""
    by_target: dict[TargetRef, list[Policy]] = {}
    for p in policies:
        by_target.setdefault(p.target, []).append(p)
    return _merge(at, by_target)


class PolicyIndex:
    """`effective_policy` for one config version, grouped once and cached per chain."""

    def __init__(self, policies: Sequence[Policy], max_cached: int = 65536):
        self._by_target: dict[TargetRef, list[Policy]] = {}
        for p in policies:
            self._by_target.setdefault(p.target, []).append(p)
        self._cache: dict[Attachment, EffectivePolicy] = {}
        self._max = max_cached

    def effective(self, at: Attachment) -> EffectivePolicy:
        found = self._cache.get(at)
        if found is None:
            found = _merge(at, self._by_target)
            if len(self._cache) >= self._max:
                self._cache.clear()
            self._cache[at] = found
        return found


def _merge(at: Attachment, by_target: dict[TargetRef, list[Policy]]) -> EffectivePolicy:
    levels = at.levels()
    # defaults: most specific level first; overrides: least specific first, and before defaults
    ordered = [
        (p, p.overrides) for t in reversed(levels) for p in _ranked(by_target.get(t, ()))
    ] + [(p, p.defaults) for t in levels for p in _ranked(by_target.get(t, ()))]
    sources: dict[str, str] = {}
    timeouts = _leaves(DEFAULT_TIMEOUTS, "timeouts", [(p, s.timeouts) for p, s in ordered],
                       sources)
    retry = _leaves(RetryPolicy(), "retry", [(p, s.retry) for p, s in ordered], sources)
    jwt = _whole("jwt", [(p, s.jwt) for p, s in ordered], sources)
    openapi = _whole("openapi", [(p, s.openapi) for p, s in ordered], sources)
    return EffectivePolicy(_resolve(timeouts), retry, jwt, openapi, tuple(sorted(sources.items())))


def _ranked(policies: Iterable[Policy]) -> list[Policy]:
    return sorted(policies, key=lambda p: (p.order, p.name))


def _leaves(base: T, block: str, parts: list[tuple[Policy, Part[T] | None]],
            sources: dict[str, str]) -> T:
    chosen: dict[str, Any] = {}
    for policy, part in parts:
        if part is None:
            continue
        for name in part.names:
            if name not in chosen:
                chosen[name] = getattr(part.value, name)
                sources[f"{block}.{name}"] = policy.name
    return replace(base, **chosen) if chosen else base  # type: ignore[type-var]


def _whole(block: str, parts: list[tuple[Policy, T | None]], sources: dict[str, str]) -> T | None:
    for policy, value in parts:
        if value is not None:
            sources[block] = policy.name
            return value
    return None


def _resolve(t: Timeouts) -> Timeouts:
    request = t.request or None  # 0: no limit
    backend = t.backend_request or None
    if request is not None:
        backend = request if backend is None else min(backend, request)
    return Timeouts(request, backend, t.idle or None)
