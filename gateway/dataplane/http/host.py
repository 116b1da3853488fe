"""What an HTTP session's owner provides (session.Host): routing, routers, the upstream pool,
counters and the access log — shared by the HTTP import listener (listener.py) and the
answering side of a `protocol: http` export (export.py).

    decide    core/routes.decide over the routes compiled for this config version (replaced
              whole by `set_routes` on a reload: requests already decided keep their decision)
    router    the router of a backend service (the gateway's, shared with TCP imports: health,
              outlier detection and locality failover per backend)
    finished  one line of access log (with `access_log: true`) and the counters per route and
              backend cluster: requests by status class, latency histogram
    policies  (route, rule) -> enforce.Enforcement for this config version, or None when no
              policy is on the import's chain (`set_policies`); the retry budgets (`budgets`,
              per route and backend) live as long as the host
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from bisect import bisect_left
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from federation.logs import LogLimiter, quote
from federation.model import ServiceKey
from gateway.core import routes as rt
from gateway.core.retry import BudgetBook
from gateway.dataplane.dial import Dialer, ListenerStats
from gateway.dataplane.http.exchange import Exchange
from gateway.dataplane.http.upstream import Pool

log = logging.getLogger("isthmus.gateway.http")
access = logging.getLogger("isthmus.gateway.access")
limited = LogLimiter(log)

# Latency buckets (seconds) of isthmus_gateway_http_request_duration_seconds
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
MAX_SERIES = 1000  # (route, cluster) pairs counted; more are folded into route "_other"


@dataclass
class RouteStats:
    """One (route, backend cluster): requests by status class and their latency."""

    classes: list[int] = field(default_factory=lambda: [0] * 6)  # index: status // 100 (0: none)
    buckets: list[int] = field(default_factory=lambda: [0] * len(BUCKETS))
    total: float = 0.0
    count: int = 0

    def observe(self, status: int, seconds: float) -> None:
        self.classes[min(status // 100, 5)] += 1
        self.count += 1
        self.total += seconds
        i = bisect_left(BUCKETS, seconds)
        if i < len(BUCKETS):
            self.buckets[i] += 1

    def to_json(self) -> dict[str, Any]:
        return {"classes": list(self.classes), "buckets": list(self.buckets),
                "total": self.total, "count": self.count}


@dataclass
class HttpStats:
    routes: dict[tuple[str, str], RouteStats] = field(default_factory=dict)
    refused: dict[int, int] = field(default_factory=dict)  # status -> requests refused unparsed
    retries: int = 0  # requests sent again after the keep-alive race
    policy_retries: dict[tuple[str, str], int] = field(default_factory=dict)  # (route, reason)
    not_retried: dict[tuple[str, str], int] = field(default_factory=dict)  # (route, reason)
    denied: dict[tuple[str, str, int], int] = field(default_factory=dict)  # route, policy, st

    def retried(self, route: str, reason: str) -> None:
        key = (route or "_default", reason)
        if key in self.policy_retries or len(self.policy_retries) < MAX_SERIES:
            self.policy_retries[key] = self.policy_retries.get(key, 0) + 1

    def retry_skipped(self, route: str, reason: str) -> None:
        key = (route or "_default", reason)
        if key in self.not_retried or len(self.not_retried) < MAX_SERIES:
            self.not_retried[key] = self.not_retried.get(key, 0) + 1

    def denied_by(self, route: str, policy: str, status: int) -> None:
        key = (route or "_default", policy, status)
        if key in self.denied or len(self.denied) < MAX_SERIES:
            self.denied[key] = self.denied.get(key, 0) + 1

    def of(self, route: str, cluster: str) -> RouteStats:
        key = (route, cluster)
        st = self.routes.get(key)
        if st is None:
            if len(self.routes) >= MAX_SERIES:
                key = ("_other", "_other")
                st = self.routes.get(key)
                if st is not None:
                    return st
            st = self.routes[key] = RouteStats()
        return st

    def to_json(self, pool: Pool, budgets: BudgetBook | None = None, now: float = 0.0
                ) -> dict[str, Any]:
        return {"routes": [{"route": r, "cluster": c, **st.to_json()}
                           for (r, c), st in sorted(self.routes.items())],
                "policy_retries": [{"route": r, "reason": why, "count": n}
                                   for (r, why), n in sorted(self.policy_retries.items())],
                "not_retried": [{"route": r, "reason": why, "count": n}
                                for (r, why), n in sorted(self.not_retried.items())],
                "denied": [{"route": r, "policy": p, "status": st, "count": n}
                           for (r, p, st), n in sorted(self.denied.items())],
                "budgets": [] if budgets is None else [
                    {"route": route or "_default", "backend": str(backend),
                     "requests": b.requests, "retries": b.retries, "allowed": b.allowed}
                    for (route, backend), b in sorted(budgets.states(now).items(),
                                                      key=lambda kv: str(kv[0]))],
                "refused": {str(k): v for k, v in sorted(self.refused.items())},
                "retries": self.retries, "pool": {"idle": pool.count(), "reused": pool.reused,
                                                  "dialled": pool.dialled,
                                                  "expired": pool.expired}}


def merge_counters(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Several hosts' http counters as one listener's (the inbound listener's http exports)."""
    if not parts:
        return {}
    refused: dict[str, int] = {}
    for p in parts:
        for k, v in p["refused"].items():
            refused[k] = refused.get(k, 0) + v
    pool = {k: sum(p["pool"][k] for p in parts) for k in parts[0]["pool"]}
    lists = {k: [r for p in parts for r in p.get(k, ())]
             for k in ("policy_retries", "not_retried", "denied", "budgets")}
    return {"routes": [r for p in parts for r in p["routes"]], "refused": refused, **lists,
            "retries": sum(p["retries"] for p in parts), "pool": pool}


@dataclass(frozen=True, slots=True)
class HttpLimits:
    max_header_bytes: int = 65536
    max_headers: int = 100
    max_target_bytes: int = 8192
    header_timeout: float = 10.0  # a request head must be complete within this (408); 0: off


DEFAULT_LIMITS = HttpLimits()


class SpanSink(Protocol):
    """Where finished requests' spans go (control/otlp.OtlpExporter)."""

    def add(self, trace_id: str, span_id: str, parent_id: str | None, start_ns: int,
            end_ns: int, attrs: dict[str, Any]) -> None: ...


class HttpHost:
    """The session.Host part of an HTTP listener (see the module docstring). `loop`, `spawn`
    and `stats` (dial.ListenerStats) are its owner's."""

    name: str
    loop: asyncio.AbstractEventLoop
    stats: ListenerStats

    def __init__(self, service: ServiceKey, routes: rt.CompiledRoutes,
                 routers: Mapping[ServiceKey, Any], dialer: Dialer, limits: HttpLimits,
                 access_log: bool, rng: random.Random | None) -> None:
        self.service = service
        self.default = rt.Decision(rt.PROXY, "", service)  # no routes: all of it, as it came
        self.routes = routes
        self.needs_headers = _needs_headers(routes)
        self.routers = routers
        self.dialer = dialer
        self.max_header_bytes = limits.max_header_bytes
        self.max_headers = limits.max_headers
        self.max_target_bytes = limits.max_target_bytes
        self.header_timeout = limits.header_timeout
        self.access_log = access_log
        self.rng = rng or random.Random()
        self.random: Callable[[], float] = self.rng.random
        self.http = HttpStats()
        self.pool = Pool()
        self.spans: SpanSink | None = None  # the `tracing:` section's exporter (control/otlp)
        self.policies: dict[tuple[str, str | None], Any] | None = None
        self.budgets = BudgetBook()

    def spawn(self, coro: Any) -> asyncio.Task:
        raise NotImplementedError

    def set_routes(self, routes: rt.CompiledRoutes, access_log: bool,
                   routers: Mapping[ServiceKey, Any]) -> None:
        """A reload's routes (and the routers of their backends): new requests use them;
        requests already decided keep their decision."""
        self.routes = routes
        self.needs_headers = _needs_headers(routes)
        self.access_log = access_log
        self.routers = routers

    def set_policies(self, table: dict[tuple[str, str | None], Any] | None) -> None:
        """This config version's enforce.Enforcement per (route, rule), or None: no policy
        anywhere on this import's chain. Requests already admitted keep theirs."""
        self.policies = table

    def http_counters(self) -> dict[str, Any]:
        return self.http.to_json(self.pool, self.budgets, self.loop.time())

    def decide(self, method: str, target: str, headers: dict[str, str], host: str
               ) -> rt.Decision:
        return rt.decide(self.routes, self.default, method, target, headers, host, self.random)

    def router(self, service: ServiceKey) -> Any:
        return self.routers.get(service)

    def rand_bits(self, n: int) -> int:
        return self.rng.getrandbits(n)

    def refused(self, status: int, why: str) -> None:
        self.http.refused[status] = self.http.refused.get(status, 0) + 1
        limited.info(f"refused-{status}", "%s: request refused with %d: %s", self.name, status,
                     quote(why))

    def finished(self, ex: Exchange) -> None:
        now = self.loop.time()  # type: ignore[union-attr]
        d = ex.decision
        route = d.route if d is not None else ""
        self.http.of(route or "_default", ex.cluster).observe(ex.status, now - ex.started)
        spans = self.spans
        if spans is not None and ex.trace is not None:
            tr = ex.trace
            end = time.time_ns()
            spans.add(tr.trace_id, tr.span_id, tr.parent_id,
                      end - int((now - ex.started) * 1e9), end,
                      {"http.request.method": ex.method.decode("latin-1"),
                       "url.path": ex.target.decode("latin-1")[:256],
                       "isthmus.route": route or "_default", "isthmus.listener": self.name,
                       "isthmus.backend": str(d.backend) if d is not None else "",
                       "isthmus.backend_cluster": ex.cluster,
                       "http.response.status_code": ex.status})
        if self.access_log:
            tr = ex.trace
            access.info(
                "%s %s %s route=%s backend=%s cluster=%s status=%d duration_ms=%.2f "
                "upstream_ms=%.2f trace_id=%s span_id=%s parent_id=%s%s",
                self.service, ex.method.decode("latin-1"), quote(ex.target.decode("latin-1")),
                route or "-", d.backend if d is not None and d.backend else "-",
                ex.cluster or "-", ex.status, (now - ex.started) * 1000,
                (now - ex.connected_at) * 1000 if ex.connected_at else 0.0,
                tr.trace_id if tr else "-", tr.span_id if tr else "-",
                (tr.parent_id or "-") if tr else "-",
                f" error={quote(ex.error)}" if ex.error else "")


def _needs_headers(routes: rt.CompiledRoutes) -> bool:
    return any(m.headers for m, _, _ in routes.entries)
