"""Policy values (frozen): what the `policies` list of a service file says, read by
gateway/config/policy_objects.py and merged by gateway/core/policies.py (whose docstring is the
spec of the precedence), acted on by gateway/core/retry.py and gateway/dataplane/http/auth/.

They live in gateway.config because the layer rule (pyproject.toml) lets gateway.core import
gateway.config and not the other way round, as for values.py; gateway.core.policies and
gateway.core.retry re-export them, so code outside the config package imports them from there.
Pure.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Generic, TypeVar

CONDITIONS = ("connect-failure", "reset", "timeout", "5xx")
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int = 2  # retries after the first try; 0 turns retries off
    per_try_timeout: float | None = None  # seconds; None: only the backend-request timeout
    backoff_base: float = 0.025
    backoff_cap: float = 0.25
    retry_on: frozenset[str] = frozenset({"connect-failure", "reset"})
    codes: frozenset[int] = frozenset({503})
    methods: frozenset[str] = IDEMPOTENT
    budget_ratio: float = 0.1
    budget_min_per_second: float = 3.0
    budget_window: float = 10.0

    def __post_init__(self) -> None:
        bad = set(self.retry_on) - set(CONDITIONS)
        if bad:
            raise ValueError(f"unknown retry conditions {sorted(bad)} (use {CONDITIONS})")
        if self.backoff_base <= 0 or self.backoff_cap <= 0:
            raise ValueError("backoff base and cap must be > 0")  # cap < base: every delay <= cap
        if self.attempts < 0 or self.budget_ratio < 0 or self.budget_min_per_second < 0:
            raise ValueError("attempts and the budget's ratio and minimum must be >= 0")
        if self.budget_window <= 0:
            raise ValueError("the budget window must be > 0")


GATEWAY, IMPORT, ROUTE = "Gateway", "Import", "Route"
KINDS = (ROUTE, IMPORT, GATEWAY)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class TargetRef:
    """What a policy is attached to. Route names are unique within their import (the routes
    section's rule), so a Route is named with its import: `import_` and `namespace`."""

    kind: str  # Gateway | Import | Route
    name: str
    namespace: str = "default"  # the import's namespace (Import, Route)
    section: str | None = None  # Route only: the rule's name (Gateway API sectionName)
    import_: str | None = None  # Route only (required): the import the route belongs to

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"targetRef kind {self.kind!r} is not one of {KINDS}")
        if self.section is not None and self.kind != ROUTE:
            raise ValueError("only a Route targetRef has a sectionName (a rule's name)")
        if (self.import_ is None) == (self.kind == ROUTE):
            raise ValueError("a Route targetRef, and only a Route one, names its import")

    def __str__(self) -> str:
        if self.kind == IMPORT:
            return f"Import {self.namespace}/{self.name}"
        if self.kind == ROUTE:
            rule = f" rule {self.section}" if self.section is not None else ""
            return f"Route {self.name}{rule} of import {self.namespace}/{self.import_}"
        return f"{self.kind} {self.name}"


@dataclass(frozen=True, slots=True)
class Timeouts:
    request: float | None = None  # seconds for the whole request, retries included; 0: none
    backend_request: float | None = None  # seconds for one try to the backend; 0: none
    idle: float | None = None  # seconds a client connection may sit without a request; 0: none


DEFAULT_TIMEOUTS = Timeouts(request=15.0, backend_request=None, idle=300.0)


@dataclass(frozen=True, slots=True)
class JwtSettings:
    issuer: str
    audiences: tuple[str, ...]
    jwks_file: str | None = None  # exactly one of jwks_file, jwks_url
    jwks_url: str | None = None
    algorithms: tuple[str, ...] = ("RS256", "ES256", "EdDSA")
    clock_skew: float = 30.0  # seconds of leeway on exp and nbf
    required_claims: tuple[str, ...] = ()
    claim_headers: tuple[tuple[str, str], ...] = ()  # (claim, request header to set)
    refresh_interval: float = 300.0  # JWKS URL: refetch this often
    unknown_kid_refresh: float = 10.0  # JWKS URL: at most one refetch per this, on unknown kid
    cache_size: int = 1024  # verified tokens kept (LRU, each until its exp)


@dataclass(frozen=True, slots=True)
class OpenApiSettings:
    spec_file: str
    unknown_fields: str = "reject"  # reject (400) | drop (the body is rewritten without them)
    max_body_bytes: int = 1024 * 1024
    base_path: str = ""  # a prefix before the spec's paths, like /api


@dataclass(frozen=True, slots=True)
class Part(Generic[T]):
    """What one policy sets of a block: `value`, of which only the fields in `names` count."""

    value: T
    names: frozenset[str]

    @classmethod
    def of(cls, value: T, names: Iterable[str]) -> Part[T]:
        names = frozenset(names)
        known = {f.name for f in fields(value)}  # type: ignore[arg-type]
        if not names <= known:
            raise ValueError(f"{sorted(names - known)} are not fields of {type(value).__name__}")
        return cls(value, names)


@dataclass(frozen=True, slots=True)
class PolicySpec:
    timeouts: Part[Timeouts] | None = None
    retry: Part[RetryPolicy] | None = None
    jwt: JwtSettings | None = None
    openapi: OpenApiSettings | None = None

    @property
    def empty(self) -> bool:
        return not (self.timeouts or self.retry or self.jwt or self.openapi)


@dataclass(frozen=True, slots=True)
class Policy:
    name: str
    target: TargetRef
    defaults: PolicySpec = PolicySpec()
    overrides: PolicySpec = PolicySpec()
    order: int = 0  # position in the config (files in order, then entries); lower wins ties
