"""Pure drill planning: where every import's traffic goes today, and where it would go with a
region or cluster lost. No I/O: the CLI fetches the catalog and prints what this returns.

Theory of operation
-------------------
A drill's *scope* is a region (every cluster of that region in the catalog) or one cluster.
For every `ImportRecord` published by a cluster NOT in scope (an *importer*), the plan builds
the same `Target`s a gateway's router would, but from the catalog alone:

- the importer's own endpoints of the service (from its own live export of it, if any), one
  target per endpoint, healthy as the importer last published it;
- for every OTHER live cluster exporting the service to the importer (`allowed_consumers`) and
  known in `catalog.clusters`, one target for its gateway, weight = the export's healthy
  endpoint weight, healthy when that weight is > 0.

`build_tiers` groups them with the import's failover policy; the traffic goes to the *first
eligible tier* (the steady state after failback; during a failback wait the real gateway may
still be on a worse tier). "After" is the same computation with every target of a cluster in
scope removed. Each route names the tier, the clusters of its healthy targets and the healthy
endpoints behind them (a remote gateway counts its export's healthy endpoints).

A service whose "after" route has no eligible tier has *no healthy target* with the scope lost:
`DrillPlan.no_target` lists them (the CLI warns and exits 3). Live probing is not part of the
plan: health is what the catalog says (stale by up to a health-check interval).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from federation.errors import InputError
from federation.model import Catalog, Export, ImportRecord, Locality, ServiceKey
from federation.units import parse_hostport
from gateway.core.balance import Policy, Target, build_tiers

__all__ = ["Route", "ServicePlan", "DrillPlan", "scope_clusters", "plan_drill"]


@dataclass(frozen=True)
class Route:
    """Where an import's new connections go: the first eligible tier (None: no healthy target)."""

    tier: str | None
    clusters: tuple[str, ...]  # clusters holding the tier's healthy targets, sorted
    healthy_endpoints: int

    def to_json(self) -> dict[str, Any]:
        return {
            "tier": self.tier,
            "clusters": list(self.clusters),
            "healthy_endpoints": self.healthy_endpoints,
        }

    def __str__(self) -> str:
        if self.tier is None:
            return "NO HEALTHY TARGET"
        return f"{self.tier}: {', '.join(self.clusters)} ({self.healthy_endpoints} ep)"


@dataclass(frozen=True)
class ServicePlan:
    cluster: str  # the importer
    region: str
    zone: str
    service: str  # "ns/name"
    affected: bool  # some cluster in scope exports this service
    today: Route
    after: Route

    @property
    def changed(self) -> bool:
        return self.today != self.after

    @property
    def no_target(self) -> bool:
        return self.after.tier is None

    def to_json(self) -> dict[str, Any]:
        return {
            "cluster": self.cluster,
            "region": self.region,
            "zone": self.zone,
            "service": self.service,
            "affected": self.affected,
            "changed": self.changed,
            "today": self.today.to_json(),
            "after": self.after.to_json(),
            "no_target": self.no_target,
        }


@dataclass(frozen=True)
class DrillPlan:
    scope_kind: str
    scope: str
    clusters_in_scope: tuple[str, ...]
    # "ns/name" exported by a live cluster in scope (the drill's services)
    services: tuple[str, ...]
    rows: tuple[ServicePlan, ...]  # sorted by (cluster, service)

    @property
    def no_target(self) -> tuple[str, ...]:
        """'cluster: ns/name' of every import left with no healthy target."""
        return tuple(f"{r.cluster}: {r.service}" for r in self.rows if r.no_target)

    def to_json(self) -> dict[str, Any]:
        return {
            "scope": {self.scope_kind: self.scope},
            "clusters_in_scope": list(self.clusters_in_scope),
            "services": list(self.services),
            "imports": [r.to_json() for r in self.rows],
            "no_target": list(self.no_target),
        }


def scope_clusters(catalog: Catalog, scope_kind: str, scope: str) -> tuple[str, ...]:
    """The clusters a scope covers; InputError (listing the known ones) when it names nothing."""
    if scope_kind == "region":
        known = sorted({c.region for c in catalog.clusters.values()})
        found = tuple(sorted(n for n, c in catalog.clusters.items() if c.region == scope))
        if not found:
            raise InputError(
                f"unknown region {scope!r}; known regions: {', '.join(known) or '(none)'}"
            )
        return found
    if scope_kind == "cluster":
        if scope not in catalog.clusters:
            known = sorted(catalog.clusters)
            raise InputError(
                f"unknown cluster {scope!r}; known clusters: {', '.join(known) or '(none)'}"
            )
        return (scope,)
    raise InputError(f"scope kind {scope_kind!r}: expected 'region' or 'cluster'")


def _targets(catalog: Catalog, imp: ImportRecord) -> tuple[list[Target], dict[str, int]]:
    """The importer's targets for one service, and the healthy endpoints behind each target key."""
    me = catalog.clusters.get(imp.cluster)
    targets: list[Target] = []
    behind: dict[str, int] = {}
    if me is None:
        return targets, behind
    for ex in sorted(catalog.exports_of(imp.service), key=lambda e: e.cluster):
        if ex.cluster == imp.cluster:
            for ep in ex.endpoints:
                key = f"local:{ep.address}"
                if key in behind:
                    continue
                targets.append(
                    Target(key, me.locality, ep.host, ep.port, ep.weight, ep.healthy, False)
                )
                behind[key] = 1 if ep.healthy else 0
            continue
        rec = catalog.clusters.get(ex.cluster)
        if rec is None or not ex.allows(imp.cluster):
            continue
        targets.append(_remote_target(rec.locality, rec.gateway_address, ex))
        behind[f"remote:{ex.cluster}"] = sum(1 for e in ex.endpoints if e.healthy)
    return targets, behind


def _remote_target(locality: Locality, gateway_address: str, ex: Export) -> Target:
    host, port = parse_hostport(gateway_address)
    weight = ex.healthy_weight()
    return Target(f"remote:{ex.cluster}", locality, host, port, max(1, weight), weight > 0, True)


def _route(
    targets: list[Target], behind: dict[str, int], imp: ImportRecord, catalog: Catalog
) -> Route:
    policy = Policy(imp.tiers, imp.region_preference, imp.failback_after, imp.max_attempts)
    caller = catalog.clusters[imp.cluster].locality
    for tier in build_tiers(targets, caller, policy):
        if tier.eligible:
            healthy = [t for t in tier.targets if t.healthy]
            return Route(
                tier.name,
                tuple(sorted({t.locality.cluster for t in healthy})),
                sum(behind.get(t.key, 0) for t in healthy),
            )
    return Route(None, (), 0)


def plan_drill(catalog: Catalog, scope_kind: str, scope: str) -> DrillPlan:
    """Today's and the with-scope-lost route of every import of every cluster not in scope."""
    in_scope = scope_clusters(catalog, scope_kind, scope)
    lost = set(in_scope)
    services = sorted(
        {
            str(e.service)
            for e in catalog.exports.values()
            if e.cluster in lost and e.cluster in catalog.live
        }
    )
    rows: list[ServicePlan] = []
    for imp in sorted(catalog.imports.values(), key=lambda i: (i.cluster, i.namespace, i.name)):
        rec = catalog.clusters.get(imp.cluster)
        if imp.cluster in lost or rec is None:
            continue
        targets, behind = _targets(catalog, imp)
        remaining = [t for t in targets if t.locality.cluster not in lost]
        rows.append(
            ServicePlan(
                cluster=imp.cluster,
                region=rec.region,
                zone=rec.zone,
                service=str(ServiceKey(imp.namespace, imp.name)),
                affected=str(imp.service) in services,
                today=_route(targets, behind, imp, catalog),
                after=_route(remaining, behind, imp, catalog),
            )
        )
    return DrillPlan(scope_kind, scope, in_scope, tuple(services), tuple(rows))
